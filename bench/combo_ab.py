"""A/B of inductor's combo kernels in the fast modes' graphs: full updates in one process, alternated in rounds.

With FASTDREAMER_COMBO_KERNELS=1 (fast.combo_kernels_on) every unit the fast modes compile is compiled with
inductor's `combo_kernels`: up to 8 independent small kernels of a graph (the weight casts before the matmuls, the
per-layer reductions of a backward, ...) are launched as one. Inductor forms them for GPU devices only; on the CPU
the census (`python -m bench.gpu_codegen --combo-kernels`) counts what a GPU would get. Two agents from one seed,
one compiled without and one with them; each makes one update from the same state and the gradients are compared
(bf16: 0.1 relative per parameter, as bench.observe_ab; fp32: 1e-3), then both are timed in alternated rounds and
reported as the ratio to `plain`.

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

VARIANTS = {"plain": False, "combo": True}


def main(argv=None) -> dict:
    p = ab_parser(__doc__.splitlines()[0], 10, "updates")
    args = p.parse_args(argv)
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
    )
    out = {"complete": False, "meta": info, "rows": []}
    print(f"combo_ab: {info['device']}, torch {info['torch']}, size {args.size}, {mode} {precision}")
    save = (lambda: write_json(args.json, out)) if args.json else (lambda: None)

    updates, grads, first_ms, errors = {}, {}, {}, {}
    saved = fast.COMBO_KERNELS
    data = None
    try:
        for name, combo in VARIANTS.items():
            fast.COMBO_KERNELS = combo  # read when compile_agent and compile_optimizer compile the units
            agent, opt = make_agent(cfg, args.obs, device)  # one seed: the same parameters for both
            if data is None:
                data = random_batch(agent, cfg.batch_size, cfg.batch_length + cfg.replay_context, device)
            try:
                update = fast.make_update(update_step, agent, opt, mode, precision)
                torch.manual_seed(1)  # the same draws for both
                t0 = time.perf_counter()
                update(data)  # compiles (graphs: and captures), then p.grad holds this update's gradients
            except Exception as e:  # noqa: BLE001 (combo kernels that do not compile: a FAIL row, plain still timed)
                if name == "plain":
                    raise
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            first_ms[name] = (time.perf_counter() - t0) * 1e3
            grads[name] = {n: q.grad.detach().clone() for n, q in agent.named_parameters() if q.grad is not None}
            updates[name] = update
    finally:
        fast.COMBO_KERNELS = saved
    out["rows"] = [{"variant": "plain", "ok": True, "first_call_ms": first_ms["plain"]}]
    if "combo" in errors:
        ok = False
        out["rows"].append({"variant": "combo", "ok": False, "error": errors["combo"]})
        print(f"  check combo FAIL: {errors['combo']}")
    else:
        want, got = grads["plain"], grads["combo"]
        errs = {n: rel_err(got[n], g) for n, g in want.items() if n in got}
        worst = max(errs, key=errs.get)
        ok = got.keys() == want.keys() and errs[worst] < CHECK_REL[precision]
        print(f"  check combo gradients vs plain: worst {errs[worst]:.2e} ({worst}) {'ok' if ok else 'FAIL'}")
        row = {"variant": "combo", "ok": ok, "check_worst_rel": errs[worst], "check_worst_param": worst}
        out["rows"].append({**row, "first_call_ms": first_ms["combo"]})
    save()
    timed = list(VARIANTS) if ok else ["plain"]
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
    if not ok:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
