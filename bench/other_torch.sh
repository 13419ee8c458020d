#!/usr/bin/env bash
# Run a command of this checkout under another torch than the installed one, on this machine: the GPU machine's
# (torch 2.11.0+cu130 so far), whose inductor lowers and fuses differently from the CPU's 2.13. Two faults only 2.11
# showed were found this way (bench/LOG.md, session 33): a cat that became a kernel per observe step, and the
# sub-pixel decoder's conv that did not compile at fp32.
#
#   bash bench/other_torch.sh 2.11.0 python -m pytest -q -n 2 --dist worksteal tests
#   bash bench/other_torch.sh 2.11.0 python -m bench.gpu_codegen --size 12m
#
# The first call installs torch VERSION from PyPI (the CUDA build: it imports and generates code without a GPU; a few
# GiB with its CUDA libraries) into DIR (default /tmp/torch-VERSION) with `pip install --target`, and links all of
# it but triton into DIR-notriton: the command then finds that torch first on PYTHONPATH and the installed Triton,
# whose interpreter runs the kernel tests (Triton 3.6's fails on the current NumPy's scalar conversion).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: bash bench/other_torch.sh VERSION COMMAND..." >&2
  exit 2
fi
version=$1
shift
dir=${DIR:-/tmp/torch-$version}
if ! compgen -G "$dir/torch-$version*.dist-info" >/dev/null; then
  python3 -m pip install -q --target "$dir" "torch==$version"
fi
mkdir -p "$dir-notriton"
for f in "$dir"/*; do
  case $(basename "$f") in
  triton | triton-*) ;;
  *) ln -sfn "$f" "$dir-notriton/$(basename "$f")" ;;
  esac
done
export PYTHONPATH="$dir-notriton:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, triton; print('other_torch: torch', torch.__version__, 'triton', triton.__version__)" >&2
exec "$@"
