"""A/B of the imagination rollout: Agent.rollout against Agent.merged_rollout, compiled alike, in one process.

The fast modes compile merged_rollout (the matmuls that read one tensor merged into one; fastdreamer/agent.py). This
times it against the unmerged rollout compiled the same way, and against itself with the core's block layer in the
u form (merged_u: block_gru.reference._block_inputs, not _split_hidden), from the same starts (B*T of the size's
config), alternated round by round (these machines are noisy), each after a check against the unmerged rollout in
the same form from the same noise: in fp32 the same actions and feats within 1e-4 relative; in bf16, where rounding
tips near ties into other trajectories, few such flips and every trajectory's feats and actions before its first
flip within 2^-6 relative (agree_before_flips, which the unit test of merged_rollout uses too). A failed check
prints FAIL and the variant is not timed.

  python -m bench.rollout_ab --device cuda --size 12m --mode graphs --json bench/results/rollout_ab.json
"""

from __future__ import annotations

import functools
import statistics
import sys

import torch
from fastdreamer.kernels.block_gru import reference

from fastdreamer import fast
from fastdreamer.agent import Agent

from .__main__ import meta
from .bench_block_gru import write_json
from .common import ab_parser, ab_run, make_agent, rollout_starts, timeit

# merged_u: merged with the core's block layer in the u form (block_gru.reference.SPLIT_HIDDEN cleared while it is
# traced and run), the form compiled rollouts took before session 28 on a CPU.
VARIANTS = ("rollout", "merged", "merged_u")
FP32_REL = 1e-4  # feats, relative in norm: the merged matmuls sum in another order (seen 0 on the CPU at debug)
BF16_FLIPS = 0.02  # fraction of states whose latent or discrete action flipped (seen 0.8% in the unit test)
BF16_REL = 2**-6  # feats and actions before each trajectory's first flip, relative in norm: a few bf16 roundings


def agree_before_flips(got, want, deter: int, discrete: bool) -> tuple[float, float]:
    """Two bf16 rollouts from the same starts and noise, (feats (N, H+1, F), actions (N, H+1, A)) each: the fraction
    of states where a trajectory goes its own way (a sampled latent differs, or a discrete action), and the largest
    relative error (in norm) of feats and of actions over the states before each trajectory's first flip (through the
    state where a flipped action is taken). Continuous actions differ by roundings everywhere: compared, not
    flipped."""
    (gf, ga), (wf, wa) = got, want
    steps = gf.shape[1]

    def first(mask):  # (N, H+1) -> the first True per row, or H+1
        return torch.where(mask.any(1), mask.float().argmax(1), steps)

    lat_flip = (gf[..., deter:] != wf[..., deter:]).any(-1)
    end, flips = first(lat_flip), lat_flip.float().mean()
    if discrete:
        act_flip = (ga != wa).any(-1)
        end, flips = torch.minimum(end, first(act_flip) + 1), flips + act_flip.float().mean()
    same = torch.arange(steps, device=end.device)[None, :] < end[:, None]
    errs = [float((g[same] - w[same]).float().norm() / w[same].float().norm()) for g, w in ((gf, wf), (ga, wa))]
    return float(flips), max(errs)


def make(cfg, obs: str, device, variant: str, mode: str, precision: str):
    """(agent, imagine): a fresh agent (make_agent's seeded init, the same for every variant) and its imagination
    in `mode` with `variant`'s rollout (fast.make_imagine compiles merged_rollout)."""
    agent, _ = make_agent(cfg, obs, device)
    imagine = fast.make_imagine(agent, mode, precision)
    if variant in ("rollout", "rollout_u"):
        plain = functools.partial(Agent.rollout, agent)
        agent.rollout = fast._graph_break(torch.compile(plain, dynamic=False))
    if variant.endswith("_u"):
        return agent, functools.partial(_u_form, imagine)
    return agent, imagine


def _u_form(imagine, *args):
    """imagine(*args) with the core's block layer in the u form (reference.SPLIT_HIDDEN cleared for the call: dynamo
    traces, or picks the graph traced, under it; a captured graph kept the form it was captured with)."""
    saved, reference.SPLIT_HIDDEN = reference.SPLIT_HIDDEN, False
    try:
        return imagine(*args)
    finally:
        reference.SPLIT_HIDDEN = saved


def check(got, want, precision: str, deter: int, discrete: bool) -> tuple[bool, float, float | None]:
    """(ok, the relative error the check bounds, in bf16 the fraction of flipped states)."""
    (gf, ga), (wf, wa) = got, want
    if precision == "fp32":
        err = max(float((g - w).norm() / w.norm()) for g, w in ((gf, wf), (ga, wa)))
        return err < FP32_REL, err, None
    flips, err = agree_before_flips(got, want, deter, discrete)
    return flips < BF16_FLIPS and err < BF16_REL, err, flips


def main(argv=None) -> dict:
    p = ab_parser(__doc__.splitlines()[0], 10, "rollouts")  # --batch-size x --batch-length: the starts
    args = p.parse_args(argv)
    device, mode, precision, cfg = ab_run("rollout_ab", args)
    n = cfg.batch_size * cfg.batch_length
    info = meta(args, device)
    info.update(
        command=" ".join(["python -m bench.rollout_ab", *sys.argv[1:]]),
        mode=mode,
        precision=precision,
        starts=n,
        horizon=cfg.imag_length,
        rounds=args.rounds,
        repeat=args.repeat,
    )
    out = {"complete": False, "meta": info, "rows": []}
    print(f"rollout_ab: {info['device']}, torch {info['torch']}, size {args.size}, {mode} {precision}, {n} starts")

    made = {v: make(cfg, args.obs, device, v, mode, precision) for v in VARIANTS}
    imagines = {v: imagine for v, (_, imagine) in made.items()}
    deter, stoch = rollout_starts(made["rollout"][0], n, device)
    # merged_u's check is against the unmerged rollout in its own block-layer form: in bf16 the two forms round the
    # block layer apart, which alone tips many states into other trajectories (seen 13% at 1m from 1,024 starts, where
    # the merges alone tip 0.02%).
    refs = {"merged": "rollout", "merged_u": "rollout_u"}
    runs = {**imagines, "rollout_u": make(cfg, args.obs, device, "rollout_u", mode, precision)[1]}
    results = {}
    for v, imagine in runs.items():
        torch.manual_seed(5)
        results[v] = [t.clone() for t in imagine(deter, stoch)]
    agent = made["rollout"][0]
    checks = {}  # variant: (ok, value, flips), each against the unmerged rollout in its form
    for v, ref in refs.items():
        checks[v] = check(results[v], results[ref], precision, agent.rssm.deter, agent.spec.discrete)
        ok, value, flips = checks[v]
        what = "feats and actions rel" if flips is None else f"{flips:.2%} states flipped; before them, rel"
        print(f"  check {v} vs {ref}: {what} {value:.3g} {'ok' if ok else 'FAIL'}")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    variants = [v for v in VARIANTS if v == "rollout" or checks[v][0]]
    for r in range(args.rounds):
        for v in variants:
            med, _ = timeit(lambda v=v: imagines[v](deter, stoch), device, warmup=2, repeat=args.repeat)
            times[v].append(med)
        print(f"  round {r}: " + ", ".join(f"{v} {times[v][-1]:.3f} ms" for v in variants))
    base = statistics.median(times["rollout"])
    for v in VARIANTS:
        ok, value, flips = checks.get(v, (True, None, None))
        row = {"variant": v, "ok": ok, "check": value}
        if flips is not None:
            row["flipped"] = flips
        if times[v]:
            med = statistics.median(times[v])
            row.update(median_ms=med, rounds_ms=times[v], ratio=base / med)
            print(f"  {v:8s} {med:.3f} ms  (rounds {min(times[v]):.3f}-{max(times[v]):.3f})  x{base / med:.2f}")
        else:
            print(f"  {v:8s} FAIL (check {value:.3g})")
        out["rows"].append(row)
    out["complete"] = True
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
