#!/usr/bin/env bash
# The GPU measurements of a session with a lent H100/H200, written with their logs and JSON under $OUT (default:
# bench/results/gpu). The machine has no network: build the carried folders here first (once per checkout):
#
#   echo /.gpu/ >> .git/info/exclude; ../shared/gpu/make-env-bundle.sh .gpu 3.12     # envpool, gymnasium, ROMs
#   bash bench/gpu_session.sh wheels                                         # tyro + deps, Pillow into .gpu/whl
#   bash bench/gpu_session.sh bisect-trees                  # the older source trees diag's gru_bisect runs (.bisect)
#
# A session now gets 15 minutes of device time in all (1-2 of them to start the machine) and at most 10 per command,
# so `quick` is THE command for it: one device call, carry [".gpu", ".bisect"], command `BUDGET=540 bash
# bench/gpu_session.sh quick`, timeout_s 580 (session 11: quick took 529 s, then `diag` with BUDGET=265 ran on the
# warm machine, which stays held for 30 s after a call: issue it at once, with what device time is left). It runs the steps of quick() below in order inside one budget of BUDGET s (default 500) counted
# from the script's start, setup included: each step gets min(its cap, the seconds left) under `timeout -k 10`, a
# step with under 30 s left is skipped with a line saying so, and a failed or timed-out step does not stop the next
# one (exit code 1 if any failed). 540 s + 10 s kill grace stays under the 580 s call limit; with the start, ~10 of
# the 15 minutes. Everything is logged to $OUT/quick.log, and the JSON files are rewritten after every row, so a
# step cut by its timeout keeps its finished rows (the device returns at most 8 files). The steps are rewritten for
# each GPU session from the last one's results: bench/results/h200_2026-11-26{,_s8,_s11}, h200_2026-11-27_s21 and bench/LOG.md. `diag`
# is the follow-up call on the warm machine, issued at once after quick with BUDGET = the device time left minus
# ~25 s and timeout_s = BUDGET + 25 (session 11: BUDGET=265): the CUDA fast-vs-eager tests from a fresh and a warm
# state, the warm divergence, the block GRU at older commits, the image update (DRY counts each step at its cap, so
# at BUDGET=265 it shows the last two skipped; session 11's tests took 31 s of their 180 s cap).
# DRY=1 bash bench/gpu_session.sh quick  skips setup and prints each step's command and timeout, counting each step
# as if it ran to its timeout (the worst case the budget must absorb); try BUDGET=200 to see steps skipped.
#
# The phases below were sized for a 30-minute budget: each fits one 10-minute call, but a 15-minute session can run
# one of them at most. On the device, carrying .gpu:   bash bench/gpu_session.sh PHASE [PHASE...]   (BUNDLE=dir for
# another folder; checked here with a cp311 bundle: the bundle and wheels unpack and import, up to the CUDA device
# query)
#   gputests  the kernel and fast-mode tests on CUDA (the GPU-only kernel, graph and sync tests)
#   tests     the rest of the pytest suite on CUDA
#   fast      python -m bench at 12m, vector observations, eager + compile -> fast_cuda_12m.json
#   graphs    the same for eager + graphs + graphs_triton                  -> fast_cuda_12m_graphs.json
#   image   python -m bench at 12m, 64x64 images, all modes               -> fast_cuda_12m_image.json
#   gru     bench/bench_block_gru.py (12m and 200m, B16 and B1024, bf16 and fp32 compute) -> block_gru_cuda.json
#   e2e     the training loop, pong 12m, compile and graphs, with and without the env-step overlap
#   big     python -m bench at 200m, vector observations                  -> fast_cuda_200m.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
# The trees of gru_bisect: session 8's commit (its core and defer code are ce011ec's parent's), then the changes to
# the core's or defer's code since: the tensor-core weight products, their one bmm form, the hoisted action branch,
# its review fixes (reference.step's x2 refusal), x0p
BISECT_REVS="ad4fe04 ce011ec f663e14 37a1153 f5a0711 5033e19"

if [[ ${1:-} == bisect-trees ]]; then  # here, before the device call: the source trees gru_bisect runs (ignored,
  # carried: carry [".gpu", ".bisect"])
  grep -qx "/.bisect/" .git/info/exclude || echo "/.bisect/" >>.git/info/exclude
  rm -rf .bisect
  for rev in $BISECT_REVS; do
    mkdir -p ".bisect/$rev" && git archive "$rev" setup.py pyproject.toml fastdreamer kernels bench/__init__.py \
      bench/bench_block_gru.py bench/common.py bench/__main__.py | tar x -C ".bisect/$rev" || exit 1
  done
  exit 0
fi

if [[ ${1:-} == wheels ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl \
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0 || exit 1
  # Pillow (videos: the open-loop report of image runs, eval --video) is compiled: the GPU machine's Python 3.12 build.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d .gpu/whl pillow==12.0.0
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
  # What every step imports; envpool (pong's e2e step) and tyro (the train CLI) only warn: no quick/diag step needs them.
  python3 -c "import torch, triton, gymnasium; print('versions', torch.__version__, triton.__version__, \
torch.cuda.get_device_name())" || return 1
  python3 -c "import envpool, tyro; print('envpool', envpool.__version__)" || echo "setup: WARNING envpool or tyro missing"
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

step() {  # step NAME CAP CMD...: CMD under timeout min(CAP, seconds left of BUDGET), or skipped under MIN_STEP_S
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < MIN_STEP_S)); then
    echo "== $name: skipped, $left s of the $BUDGET s budget left (under $MIN_STEP_S s)"
    summary+=" $name:skipped"
    return 0
  fi
  local grant=$((cap < left ? cap : left))
  echo "== $name: timeout $grant s (cap $cap s, $left s left): $*"
  if [[ -n ${DRY:-} ]]; then
    SECONDS=$((SECONDS + grant))
    summary+=" $name:dry"
    return 0
  fi
  local t0=$SECONDS rc
  timeout -k 10 "$grant" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && summary+=" $name:timeout" || summary+=" $name:rc$rc"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  return "$rc"
}

begin() {  # a plan's start: the setup, or under DRY=1 a line saying it is skipped
  if [[ -n ${DRY:-} ]]; then
    echo "== DRY: setup skipped; each step printed and counted as running to its timeout"
  else
    setup || { echo "setup failed"; return 1; }
  fi
}

quick() {
  local rc=0
  summary=""
  begin || return 1
  # The plan, in priority order (a step that does not fit the budget is skipped; the last ones first).
  # Session 24 (bench/results/h200_2026-11-27_s24, bench/LOG.md) measured the full update at 10.46 ms (graphs, 30.1x
  # eager), 3,223 kernels per update, pong 935 env steps/s with the image update at 31 ms inside the loop. Since: the
  # compiled LaProp's 237 per-tensor stack copies are one custom op (fastdreamer::norms), the replay returns'
  # 61 per-step kernels are 2, and (session 25) the observe step is 9 + 9 Triton kernels, not 11 + 10 (its lean
  # record, the block input in one kernel, the deter handed on masked, a tap per site: -176 launches per update in
  # the census, bench/results/gpu_codegen_12m_graphs_torch211_s25.json) and the rollout casts each weight once,
  # not at each step (fast._one_cast_each: -105). The census, its interpreter's 66 phantom gradient copies removed:
  # 2,747 launches per graphs-mode update (~3,028 for session 24's tree counted alike). Session 26: 2,569 (the
  # rollout 492 -> 419: wh/wg cast once, the branch norms one kernel, the block layer split, feats stored bf16; the
  # observe step's forward 9 -> 8 with its gate pre-activations recomputed; the layers' bias casts gone; the
  # metrics' means stacked). Session 27: the decoder's upsampling convs at their inputs' resolution (for pong).
  # Session 33: under torch 2.11 (this machine's) session 32's observe step had one kernel more per step (a cat of
  # the posterior's factors), removed: 2,551 launches per update in the census under 2.11 with a GPU's realize rule
  # (bench/results/gpu_codegen_12m_graphs_torch211_s33.json; diag's profile, compile mode, is `--optimizer eager`'s).
  # 1. The headline and two levers in one process: graphs mode's full update plain, with inductor's combo kernels
  #    (FASTDREAMER_COMBO_KERNELS) and with programmatic dependent launch (FASTDREAMER_PDL; bench/combo_ab.py).
  #    Predicted: plain 10.46 -> ~9.0-9.4 ms; the census counts ~13% fewer launches with combo kernels at debug size
  #    (12m: bench/results/gpu_codegen_12m_combo_torch211.json), so ~-0.5-1 ms if a combo launch costs what one of
  #    its parts did; PDL covers the Triton launches (session 27's census), ~-0.3-1 ms if it hides ~0.2-0.5 us of
  #    each one's gap and ramp. Three compiles and captures: ~3 x 60 s cold.
  step combo_ab 260 python3 -m bench.combo_ab --device cuda --size 12m --mode graphs --rounds 3 --repeat 10 \
    --json "$OUT/combo_ab_cuda_12m.json" || rc=1
  # 2. Issue 3's question with the inputs the observe loop now hands either core (session 31: the Triton core takes
  #    hoist_action's x2 and merge_deter's x0p and x1p, so its forward launches no branch kernel and its backward's
  #    branch kernel no input product): the 12m deferred step at B16, bf16, both cores, --given; then plain, as
  #    session 11 ran it (compile_defer 159.5, triton_defer 159.8 us per step fwd+bwd). Predicted: triton_defer
  #    given ~125-145 us (the branch kernel's ~10-15 us forward and its two weight reads backward gone); whether it
  #    then beats compile_defer given is the measurement.
  step gru_given 75 python3 bench/bench_block_gru.py --device cuda --models 12m --batches 16 --compute bf16 \
    --modes compile_defer triton_defer --given --repeats 20 --json "$OUT/block_gru_defer_12m_given.json" || rc=1
  step gru_plain 60 python3 bench/bench_block_gru.py --device cuda --models 12m --batches 16 --compute bf16 \
    --modes compile_defer triton_defer --repeats 20 --json "$OUT/block_gru_defer_12m.json" || rc=1
  # 3. The convolutions, each variant checked against eager fp32 first (never run on a GPU yet): session 27's
  #    sub-pixel decoder (base) against the reference's repeat-then-conv (upsample; 36% of the decoder's conv
  #    multiply-adds; CPU compile bf16, 32 images: 84.2 -> 51.0 ms for the whole image part), and channels_last.
  #    Predicted: the decoder's ~half of pong's ~20 ms of convolutions to ~1/3, so upsample/base ~1.4-1.8x.
  step conv_ab 120 python3 -m bench.conv_ab --device cuda --size 12m --mode graphs \
    --variants base,upsample,channels_last --json "$OUT/conv_ab_cuda_12m.json" || rc=1
  # 4. What bounds pong: where the 12m image update's time goes (session 11: ~20 ms more than the vector update's,
  #    for ~1 TFLOP of convolutions; session 24's census: as many launches as the vector update, so kernel time).
  step profile_image 150 python3 -m bench.profile_update --device cuda --size 12m --obs image --mode compile \
    --updates 1 --top 40 --out "$OUT/profile_12m_image.txt" || rc=1
  # 5. cuDNN's benchmark mode is a process flag (conv_ab's docstring): base again in a second process with it on; its
  #    base row against step 3's says what autotuning the static conv shapes would give the trainer.
  step conv_ab_tuned 90 python3 -m bench.conv_ab --device cuda --size 12m --mode graphs --variants base \
    --cudnn-benchmark --json "$OUT/conv_ab_cuda_12m_benchmark.json" || rc=1
  # 6. The LaProp step alone (session 11: eager 0.726, compiled 0.510 ms); predicted compiled ~0.2-0.25 ms.
  step optim 60 python3 -m bench.optim_step --device cuda --size 12m --json "$OUT/optim_step_cuda_12m.json" || rc=1
  rm -f "$OUT"/*.tmp  # a JSON write cut by a timeout leaves its temp file; the device returns only 8 files
  echo "== quick: rc $rc after $SECONDS s of $BUDGET:$summary"
  return "$rc"
}

gru_bisect() {  # bench_block_gru's compile_defer row at this checkout, then at each carried tree, oldest first:
  # the two ends of the regression come first, so a step cut by its timeout still compares them
  local rev rc=0
  echo "-- this checkout"
  python3 bench/bench_block_gru.py --device cuda --models 12m --batches 16 --compute bf16 --modes compile_defer \
    --repeats 20 || rc=1
  for rev in $BISECT_REVS; do
    [[ -d .bisect/$rev ]] || { echo "gru_bisect: .bisect/$rev missing (bash bench/gpu_session.sh bisect-trees)"; rc=1; continue; }
    echo "-- $rev"
    (cd ".bisect/$rev" && PYTHONPATH=/tmp/envb/site:$PWD python3 bench/bench_block_gru.py --device cuda --models 12m \
      --batches 16 --compute bf16 --modes compile_defer --repeats 20) || rc=1
  done
  return "$rc"
}

diag() {  # the follow-up call after quick, on the warm machine (BUDGET = the device time left - ~25 s): the
  # goal row of issue 4 (pong end to end; session 24: 935 env steps/s, its loop's update 30.98 ms), the kernel count
  # (session 24: 3,223 per update in compile mode; predicted ~2,870 since: -58 replay-return kernels, -192 observe
  # step kernels and -105 rollout casts of session 25; the -237 stack copies are graphs mode's compiled LaProp, which compile mode's profile
  # does not run), the graph breaks,
  # then the block GRU's deferred step
  local rc=0
  summary=""
  begin || return 1
  step e2e 150 python3 -m bench.end_to_end --preset pong --size 12m --mode graphs --device cuda --seconds 8 || rc=1
  # The full update with the Triton core in graphs mode, now with hoist_action and merge_deter too (session 31),
  # against the torch core in the same process (first session: 31.77 against 21.52 ms, without those levers).
  step full_triton 200 python3 -m bench --device cuda --size 12m --components full_update \
    --modes eager,graphs,graphs_triton --no-env --repeat 10 --json "$OUT/fast_cuda_12m_graphs_triton.json" || rc=1
  # The CUDA-only report tests (session 24: a stale T-frame assertion, fixed) and the kernels' CUDA-graph tests.
  step cuda_tests 90 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_report.py \
    tests/kernels -k "cuda or graphed" || rc=1
  step profile 150 python3 -m bench.profile_update --device cuda --size 12m --mode compile --updates 1 --top 30 \
    --out "$OUT/profile_12m.txt" || rc=1
  step graph_breaks 60 python3 -m bench.graph_breaks --device cuda --precision bf16 || rc=1
  # The block GRU's deferred training step at this commit (session 21: 162.8 us; 115.0 before 37a1153).
  step gru 60 python3 bench/bench_block_gru.py --device cuda --models 12m --batches 16 --compute bf16 \
    --modes compile_defer triton_defer --repeats 20 --json "$OUT/block_gru_defer_12m.json" || rc=1
  rm -f "$OUT"/*.tmp
  echo "== diag: rc $rc after $SECONDS s of $BUDGET:$summary"
  return "$rc"
}

if [[ ${1:-} == gru-bisect ]]; then  # quick's step (timeout runs programs, not shell functions); setup done there
  gru_bisect
  exit $?
fi

if [[ ${1:-} == quick || ${1:-} == diag ]]; then
  (($# == 1)) || { echo "$1 runs alone: it owns the call's whole budget"; exit 2; }
  BUDGET=${BUDGET:-500} MIN_STEP_S=30
  log=$OUT/$1.log
  [[ -n ${DRY:-} ]] && log=/dev/null
  "$1" 2>&1 | tee "$log"
  exit "${PIPESTATUS[0]}"
fi

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
      phase gru timeout 560 python3 bench/bench_block_gru.py --device cuda --compute bf16 fp32 \
        --json "$OUT/block_gru_cuda.json" || rc=1 ;;
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
