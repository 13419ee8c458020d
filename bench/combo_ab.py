"""A/B of inductor's launch options in the fast modes' graphs: full updates in one process, alternated in rounds.

Variants (each a fast-mode switch, read when compile_agent and compile_optimizer compile the units):
  plain  as the trainer compiles by default
  combo  FASTDREAMER_COMBO_KERNELS=1 (fast.combo_kernels_on): inductor's `combo_kernels`, up to 8 independent small
         kernels of a graph (the weight casts before the matmuls, the per-layer reductions of a backward, ...)
         launched as one. Inductor forms them for GPU devices only; on the CPU the census (`python -m
         bench.gpu_codegen --combo-kernels`) counts what a GPU would get.
  pdl    FASTDREAMER_PDL=1 (fast.pdl_on): inductor's `triton.enable_pdl`, every Triton kernel launched with
         programmatic dependent launch (compute capability 9 or more: it may start while the kernel before it
         finishes, and waits before it reads that kernel's output; `python -m bench.gpu_codegen --pdl` counts the
         launches it covers). Elsewhere it compiles the plain code.
Agents from one seed, one per variant; each makes one update from the same state and its gradients are compared
with plain's (bf16: 0.1 relative per parameter, as bench.observe_ab; fp32: 1e-3), then all that passed are timed in
alternated rounds and reported as the ratio to `plain`. A variant that fails to compile or its check is a FAIL row,
not timed, and the script exits 1.

  python -m bench.combo_ab --device cuda --size 12m --mode graphs --json bench/results/combo_ab_cuda_12m.json
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from fastdreamer import fast
from fastdreamer.train import update_step

from .__main__ import meta
from .bench_block_gru import write_json
from .common import ab_parser, ab_run, make_agent, random_batch, rel_err, timeit
from .observe_ab import CHECK_REL

# name: (combo kernels, programmatic dependent launch)
VARIANTS = {"plain": (False, False), "combo": (True, False), "pdl": (False, True)}


def main(argv=None) -> dict:
    p = ab_parser(__doc__.splitlines()[0], 10, "updates")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    variants = ["plain", *[v for v in dict.fromkeys(args.variants.split(",")) if v and v != "plain"]]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"combo_ab: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    device, mode, precision, cfg = ab_run("combo_ab", args)
    if device.type == "cpu":
        fast.tune_cpu_allocator()
    info = meta(args, device)
    info.update(
        command=" ".join(["python -m bench.combo_ab", *sys.argv[1:]]),
        mode=mode,
        precision=precision,
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
        rounds=args.rounds,
        repeat=args.repeat,
        variants=variants,
    )
    out = {"complete": False, "meta": info, "rows": []}
    print(f"combo_ab: {info['device']}, torch {info['torch']}, size {args.size}, {mode} {precision}")
    save = (lambda: write_json(args.json, out)) if args.json else (lambda: None)

    updates, grads, first_ms, errors = {}, {}, {}, {}
    saved = fast.COMBO_KERNELS, fast.PDL
    data = None
    try:
        for name in variants:
            fast.COMBO_KERNELS, fast.PDL = VARIANTS[name]  # read when the units are compiled (make_update)
            agent, opt = make_agent(cfg, args.obs, device)  # one seed: the same parameters for every variant
            if data is None:
                data = random_batch(agent, cfg.batch_size, cfg.batch_length + cfg.replay_context, device)
            try:
                update = fast.make_update(update_step, agent, opt, mode, precision)
                torch.manual_seed(1)  # the same draws for all
                t0 = time.perf_counter()
                update(data)  # compiles (graphs: and captures), then p.grad holds this update's gradients
            except Exception as e:  # noqa: BLE001 (a variant that does not compile: a FAIL row, the others timed)
                if name == "plain":
                    raise
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            first_ms[name] = (time.perf_counter() - t0) * 1e3
            grads[name] = {n: q.grad.detach().clone() for n, q in agent.named_parameters() if q.grad is not None}
            updates[name] = update
    finally:
        fast.COMBO_KERNELS, fast.PDL = saved
    out["rows"] = [{"variant": "plain", "ok": True, "first_call_ms": first_ms["plain"]}]
    timed = ["plain"]
    for name in variants[1:]:
        if name in errors:
            out["rows"].append({"variant": name, "ok": False, "error": errors[name]})
            print(f"  check {name} FAIL: {errors[name]}")
            continue
        want, got = grads["plain"], grads[name]
        errs = {n: rel_err(got[n], g) for n, g in want.items() if n in got}
        worst = max(errs, key=errs.get)
        ok = got.keys() == want.keys() and errs[worst] < CHECK_REL[precision]
        print(f"  check {name} gradients vs plain: worst {errs[worst]:.2e} ({worst}) {'ok' if ok else 'FAIL'}")
        row = {"variant": name, "ok": ok, "check_worst_rel": errs[worst], "check_worst_param": worst}
        out["rows"].append({**row, "first_call_ms": first_ms[name]})
        if ok:
            timed.append(name)
    save()
    medians: dict[str, list[float]] = {v: [] for v in timed}
    for r in range(args.rounds):
        for v in timed if r % 2 == 0 else timed[::-1]:
            ms, _ = timeit(lambda v=v: updates[v](data), device, warmup=1, repeat=args.repeat)
            medians[v].append(ms)
        print(f"  round {r}: " + ", ".join(f"{v} {medians[v][-1]:.3f} ms" for v in timed))
    base = statistics.median(medians["plain"])
    for row in out["rows"]:
        v = row["variant"]
        if v in medians:
            med = statistics.median(medians[v])
            row.update(median_ms=med, round_medians_ms=medians[v], vs_plain=base / med)
            print(f"  {v:6s} {med:9.3f} ms  (rounds {min(medians[v]):.3f}-{max(medians[v]):.3f})  x{base / med:.3f}")
    out["complete"] = True
    out["meta"]["end_time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    if not all(row["ok"] for row in out["rows"]):
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
