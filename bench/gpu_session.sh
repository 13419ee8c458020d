#!/usr/bin/env bash
# The GPU measurements of a session with the lent H200, in phases that each fit one 10-minute device call and
# write their logs and JSON under $OUT (default: bench/results/gpu). The machine has no network: build the carried
# folders here first (once per checkout):
#
#   echo /.gpu/ >> .git/info/exclude; ../shared/gpu/make-env-bundle.sh .gpu 3.12     # envpool, gymnasium, ROMs
#   bash bench/gpu_session.sh wheels                                                  # tyro + deps into .gpu/whl
#
# then, on the device, carrying .gpu:   bash bench/gpu_session.sh PHASE [PHASE...]   (BUNDLE=dir for another folder;
# checked here with a cp311 bundle: the bundle and wheels unpack and import, up to the CUDA device query)
#   gputests  the kernel and fast-mode tests on CUDA (the GPU-only kernel, graph and sync tests)
#   tests     the rest of the pytest suite on CUDA
#   fast      python -m bench at 12m, vector observations, eager + compile -> fast_cuda_12m.json
#   graphs    the same for eager + graphs + graphs_triton                  -> fast_cuda_12m_graphs.json
#   image   python -m bench at 12m, 64x64 images, all modes               -> fast_cuda_12m_image.json
#   gru     bench/bench_block_gru.py (12m and 200m, B16 and B1024)        -> block_gru_cuda.json
#   e2e     the training loop, pong 12m, compile and graphs, with and without the env-step overlap
#   big     python -m bench at 200m, vector observations                  -> fast_cuda_200m.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"

if [[ ${1:-} == wheels ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl \
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0
  exit $?
fi

setup() {
  mkdir -p /tmp/envb && tar xzf "${BUNDLE:-.gpu}/envbundle.tgz" -C /tmp/envb || return 1
  if compgen -G "${BUNDLE:-.gpu}/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/envb/site \
      "${BUNDLE:-.gpu}"/whl/*.whl || return 1
  fi
  export PYTHONPATH=/tmp/envb/site:$PWD ENVPOOL_ASSETS_PATH=/tmp/envb/assets PYTHONUNBUFFERED=1
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
  python3 -c "import torch, triton, envpool, tyro; print('versions', torch.__version__, triton.__version__, \
envpool.__version__, torch.cuda.get_device_name())" || return 1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
}

phase() {
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  return "$rc"
}

setup || { echo "setup failed"; exit 1; }
rc=0
for p in "$@"; do
  case $p in
    gputests)
      phase gputests timeout 540 python3 -m pytest -q -p no:cacheprovider --durations=10 tests/kernels \
        tests/test_fast.py || rc=1 ;;
    tests)
      phase tests timeout 540 python3 -m pytest -q -p no:cacheprovider --durations=10 tests \
        --ignore=tests/kernels --ignore=tests/test_fast.py || rc=1 ;;
    fast)
      phase fast timeout 560 python3 -m bench --device cuda --size 12m --modes eager,compile \
        --json "$OUT/fast_cuda_12m.json" || rc=1 ;;
    graphs)
      phase graphs timeout 560 python3 -m bench --device cuda --size 12m --modes eager,graphs,graphs_triton \
        --json "$OUT/fast_cuda_12m_graphs.json" || rc=1 ;;
    image)
      phase image timeout 560 python3 -m bench --device cuda --size 12m --obs image \
        --json "$OUT/fast_cuda_12m_image.json" || rc=1 ;;
    gru)
      phase gru timeout 560 python3 bench/bench_block_gru.py --device cuda --json "$OUT/block_gru_cuda.json" || rc=1 ;;
    e2e)
      for mode in compile graphs; do
        phase "e2e_$mode" timeout 270 python3 -m bench.end_to_end --preset pong --size 12m --mode "$mode" \
          --device cuda --seconds 20 --no-overlap || rc=1
      done ;;
    big)
      phase big timeout 560 python3 -m bench --device cuda --size 200m --modes eager,compile,graphs \
        --json "$OUT/fast_cuda_200m.json" || rc=1 ;;
    *) echo "unknown phase $p"; rc=2 ;;
  esac
done
exit $rc
