"""A/B of the observe loop's gradient paths, full updates in one process, alternated in rounds.

The fast modes' observe loop can take its parameters' gradients three ways (fastdreamer/rssm.py RSSM.observe),
its steps' output gradients two ways, and their action input two:

  per_step  autograd's own: each step casts its weights (bf16 autocast) and adds its weight gradients into the sum
  fan_out   one cast copy of the weights for all steps, the T step gradients summed once (fastdreamer/fanout.py)
  defer     the steps run without parameter gradients; each parameter's gradient is one reduction over all B*T rows
            after the loop's backward (fastdreamer/defer.py)
  emit      defer, and each step's deter and sample gradients (from the next step and from the output stack) summed
            inside its compiled backward, the stack's gradients contiguous (RSSM.emit_copies)
  hoist     emit, and the core's action branch computed for all steps before the loop (RSSM.hoist_action)
  merge     hoist, and one matmul of each step's new deter for its posterior and the next step's core, the
            posterior's token part before the loop (RSSM.merge_deter): the fast modes' default on CUDA and on a
            CPU with native bf16, with the torch core
  cpu       fan_out, emit and hoist without defer: the fast modes' default on a CPU without native bf16
  cpu_stacked  cpu with fan_out's gradient sum in its other form, stacks of 16 steps each summed in float32 (a GPU's;
            a CPU's is one running sum since session 29: fastdreamer/fanout.py step_sum)

These machines are noisy, so the variants are timed in one process, alternated round by round, and reported as ratios
to per_step. Before timing, each variant makes one update from the same state and its gradients are compared with
per_step's, parameter by parameter; a failed check prints FAIL and is not timed.

  python -m bench.observe_ab --device cuda --size 12m --mode graphs --json bench/results/observe_ab.json
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from fastdreamer.kernels import block_gru

from fastdreamer import fanout, fast
from fastdreamer.train import update_step

from .__main__ import meta
from .bench_block_gru import write_json
from .common import ab_parser, ab_run, make_agent, random_batch, rel_err, timeit

FLAGS = (
    "fan_out",
    "defer",
    "emit_copies",
    "hoist_action",
    "merge_deter",
)  # RSSM attributes; each variant turns some on
VARIANTS = {
    "per_step": (),
    "fan_out": ("fan_out",),
    "defer": ("defer",),
    "emit": ("defer", "emit_copies"),
    "hoist": ("defer", "emit_copies", "hoist_action"),
    "merge": ("defer", "emit_copies", "hoist_action", "merge_deter"),
    "cpu": ("fan_out", "emit_copies", "hoist_action"),
    "cpu_stacked": ("fan_out", "emit_copies", "hoist_action"),  # and fanout.FORCE_SUM = "stacked" (flags)
}
# One update from the same state, every variant against per_step: the largest relative difference (in norm) of one
# parameter's gradient. The variants compute the same sums in another order (and, in bf16, without or with the
# per-step path's bf16 roundings of each step's weight gradient: tests/test_defer.py bounds those by 2^-8); their
# compiled graphs also round differently: in bf16, inductor keeps some fused intermediates in float32 where eager
# rounds them (seen on the CPU: compiled defer vs compiled per_step up to 8.6e-3 at T4, 2e-3 with inductor's
# emulate_precision_casts). A wrong or missing gradient is off by O(1), so the guard sits at 0.1 in bf16 (as
# bench_block_gru's) and 1e-3 in fp32 (seen: 5.9e-7). (The parameters' changes are no check: LaProp's first step is
# about lr * sign(g), which flips for near-zero gradient elements under any rounding.)
CHECK_REL = {"bf16": 0.1, "fp32": 1e-3}


def set_flags(rssm, variant: str) -> None:
    """Turn the observe loop's flags of `variant` on and the others off."""
    for flag in FLAGS:
        setattr(rssm, flag, flag in VARIANTS[variant])


def flags(agent, variant: str) -> None:
    set_flags(agent.rssm, variant)
    fanout.FORCE_SUM = "stacked" if variant == "cpu_stacked" else None


def main(argv=None) -> dict:
    try:
        return _main(argv)
    finally:
        fanout.FORCE_SUM = None  # cpu_stacked's setting ends with the run


def _main(argv=None) -> dict:
    p = ab_parser(__doc__.splitlines()[0], 5, "updates")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"observe_ab: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if "per_step" not in variants:
        variants.insert(0, "per_step")  # the reference of the check and of the ratios
    device, mode, precision, cfg = ab_run("observe_ab", args)
    if device.type == "cpu":
        fast.tune_cpu_allocator()
    agent, opt = make_agent(cfg, args.obs, device)
    data = random_batch(agent, cfg.batch_size, cfg.batch_length + cfg.replay_context, device)
    info = meta(args, device)
    info.update(
        command=" ".join(["python -m bench.observe_ab", *sys.argv[1:]]),
        mode=mode,
        precision=precision,
        defer=None,  # meta() records the default; here each variant sets its own (VARIANTS)
        block_gru=block_gru.get_impl(),
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
        variants=variants,
        rounds=args.rounds,
        repeat=args.repeat,
    )
    out = {"complete": False, "meta": info, "rows": []}
    print(f"observe_ab: {info['device']}, torch {info['torch']}, size {args.size}, {mode} {precision}")

    # One update callable per variant (graphs: one capture each, made with that variant's flags). Each variant
    # compiles its own graphs of the observe step (six for all seven variants); past dynamo's recompile limit (8 by
    # default) a function silently runs eagerly, and the timings would be eager ones.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    fast.compile_agent(agent)
    restore = fast._snapshot(agent, opt)
    names = [n for n, q in agent.named_parameters() if q.requires_grad]
    updates, grads, errors = {}, {}, {}
    for v in variants:
        flags(agent, v)
        try:
            updates[v] = fast.make_update(update_step, agent, opt, mode, precision)
            restore()
            torch.manual_seed(1)  # the same draws (the observe loop's latent samples, the rollout's noise) for each
            updates[v](data)  # graphs: capture, then one replay, whose gradients p.grad now holds
        except Exception as e:  # noqa: BLE001 (a variant that cannot run is a FAIL row; the others are still timed)
            errors[v] = f"{type(e).__name__}: {str(e)[:300]}"
            grads[v] = {}
            restore()
            continue
        params = dict(agent.named_parameters())
        grads[v] = {n: params[n].grad.detach().clone() for n in names if params[n].grad is not None}
        restore()
    ok = {}
    for v in variants:
        want, got = grads["per_step"], grads[v]
        if v in errors or not want:
            ok[v] = False
            why = errors.get(v) or f"per_step did not run ({errors.get('per_step')})"
            print(f"  check {v:9s} FAIL: {why}")
            out["rows"].append({"variant": v, "ok": False, "error": why})
            continue
        errs = {n: rel_err(got[n], g) for n, g in want.items() if n in got}
        worst = max(errs, key=errs.get) if errs else None
        ok[v] = got.keys() == want.keys() and errs[worst] < CHECK_REL[precision]
        note = "" if got.keys() == want.keys() else f", gradients of {sorted(want.keys() ^ got.keys())} missing"
        print(
            f"  check {v:9s} gradients vs per_step: worst {errs.get(worst, 0):.2e} ({worst}){note} "
            f"{'ok' if ok[v] else 'FAIL'}"
        )
        out["rows"].append({"variant": v, "check_worst_rel": errs.get(worst), "check_worst_param": worst, "ok": ok[v]})
    save = (lambda: write_json(args.json, out)) if args.json else (lambda: None)
    save()  # the checks on disk before the timing (a run cut by its timeout keeps what it has)
    timed = [v for v in variants if ok[v]]
    medians: dict[str, list[float]] = {v: [] for v in timed}
    for r in range(args.rounds):
        for v in timed if r % 2 == 0 else timed[::-1]:
            flags(agent, v)
            ms, _ = timeit(lambda v=v: updates[v](data), device, warmup=1, repeat=args.repeat)
            medians[v].append(ms)
        print(f"  round {r}: " + ", ".join(f"{v} {medians[v][-1]:.2f} ms" for v in timed))
        for row in out["rows"]:
            if row["variant"] in medians:
                row["round_medians_ms"] = medians[row["variant"]]
        save()
    base = statistics.median(medians["per_step"]) if "per_step" in medians else None
    for row in out["rows"]:
        v = row["variant"]
        if v not in medians:
            continue
        med = statistics.median(medians[v])
        row.update(median_ms=med, round_medians_ms=medians[v], vs_per_step=base / med if base else None)
        ratio = f"  x{base / med:.2f}" if base else ""
        print(f"  {v:9s} {med:9.2f} ms  (rounds {min(medians[v]):.2f}-{max(medians[v]):.2f}){ratio}")
    restore()
    out["complete"] = True
    out["meta"]["end_time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return out


if __name__ == "__main__":
    main()
