"""The LaProp + AGC step alone, eager against compiled (fast.compile_optimizer, what the graphs mode runs), on one
size's parameters with random gradients.

Eager, the step is ~14 foreach passes over parameter-sized lists; the H200 profile of a 12m update put them at ~0.45
ms (bench/LOG.md, 2026-11-26), bound by memory traffic, not launches. Compiled, the norms are one pass and the
elementwise chain one more. The two are timed alternately in one process (rounds), and before timing the compiled
step is checked against the eager one from the same state: a failing check prints FAIL and is not timed. On CUDA each
variant is captured in a CUDA graph and its replays are timed, as the graphs mode runs it inside the update (timing
plain calls would time the host: eager's launches, the compiled step's guards over every tensor).

  python -m bench.optim_step --device cuda --size 12m --json bench/results/optim_step_cuda_12m.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fastdreamer import fast
from fastdreamer.optim import LaProp

from .__main__ import meta
from .bench_block_gru import write_json
from .common import count_arg, device_arg, json_arg, make_agent, make_config, size_arg, threads_arg, timeit

# One step from the same state, compiled against eager: the parameters' displacement. The compiled norms sum in
# another order (~1e-6 relative on the clip factors); a wrong formula is off by O(1).
CHECK_REL = 1e-4


def laprop(cfg, device, tensors: int = 0, seed: int = 0) -> tuple[LaProp, list[torch.Tensor]]:
    """A fresh LaProp over the agent's trainable parameters of `cfg` (the first `tensors` of them if > 0), each with
    a fixed random gradient."""
    agent, _ = make_agent(cfg, "vector", device, seed=seed)
    params = list(agent.trainable())[: tensors or None]
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return LaProp(params, lr=cfg.lr, warmup=0), params


def graphed(step, device: torch.device):
    """`step` as a CUDA graph's replay on CUDA (fast._Graph, the graphs mode's capture); as it is elsewhere. Each
    replay is one more optimizer step on the same state."""
    if device.type != "cuda":
        return step
    graph = fast._Graph(lambda _: step(), {}, device=device)
    return lambda: graph({})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--size", default="12m", type=size_arg)
    p.add_argument("--rounds", type=count_arg, default=3)
    p.add_argument("--repeat", type=count_arg, default=20, help="timed steps per variant and round")
    p.add_argument("--threads", type=threads_arg, default=0)
    p.add_argument("--tensors", type=int, default=0, help="only the first N parameter tensors (a quick run)")
    p.add_argument("--json", default=None, type=json_arg)
    p.set_defaults(obs="vector")  # the parameters of the vector-observation agent (meta() records it)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("optim_step: --device cuda asked for, but CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args.size)
    eager, params = laprop(cfg, device, args.tensors)
    compiled, cparams = laprop(cfg, device, args.tensors)
    fast.compile_optimizer(compiled)
    info = meta(args, device)
    for key in ("fan_out", "defer"):  # the observe loop's switches: nothing to do with this benchmark
        info.pop(key, None)
    info.update(
        graphed=device.type == "cuda",
        command=" ".join(["python -m bench.optim_step", *sys.argv[1:]]),
        tensors=len(params),
        params=sum(q.numel() for q in params),
        rounds=args.rounds,
        repeat=args.repeat,
    )
    print(
        f"optim_step: {info['device']}, torch {info['torch']}, size {args.size}: {len(params)} tensors, "
        f"{info['params'] / 1e6:.2f}M parameters"
    )

    start = [q.detach().clone() for q in params]
    eager.step()
    compiled.step()  # compiles
    moved = max((a - s).abs().max().item() for a, s in zip(params, start, strict=True))
    worst = max(
        ((c - a).norm() / (a - s).norm().clamp_min(1e-30)).item()
        for a, c, s in zip(params, cparams, start, strict=True)
    )
    ok = worst < CHECK_REL and moved > 0
    print(
        f"  check: compiled against eager after one step, worst relative displacement error {worst:.2e} "
        f"(bound {CHECK_REL:g}) -> {'ok' if ok else 'FAIL'}"
    )
    rows = {v: {"variant": v, "ok": ok or v == "eager", "times": []} for v in ("eager", "compiled")}
    steps = {v: graphed(opt.step, device) for v, opt in (("eager", eager), ("compiled", compiled)) if rows[v]["ok"]}
    for _ in range(args.rounds):
        for v, row in rows.items():
            if row["ok"]:
                row["times"].append(timeit(steps[v], device, warmup=2, repeat=args.repeat)[0])
    out = {"meta": info, "rows": []}
    base = statistics.median(rows["eager"]["times"])
    for v, row in rows.items():
        times = row.pop("times")
        if row["ok"]:
            row.update(median_ms=statistics.median(times), spread_ms=max(times) - min(times))
            row["speedup"] = base / row["median_ms"]
            print(
                f"  {v:9s} {row['median_ms']:8.3f} ms  (rounds spread {row['spread_ms']:.3f})  "
                f"{row['speedup']:.2f}x eager"
            )
        else:
            print(f"  {v:9s} FAIL")
        if v == "compiled":
            row["check_worst_rel"] = worst
        out["rows"].append(row)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
