"""Kernels per compiled observe step, read from the code inductor generates (no profiler, no GPU needed).

The fast update is bound by kernel count, most of it the 64 observe steps forward and backward (bench/LOG.md,
2026-11-26). This counts, for each way the observe loop takes its parameters' gradients (bench/observe_ab.py's
variants), the launches in the compiled step's forward and backward graphs: inductor's fused kernels, extern calls
(matmuls) and fallback ATen ops. On a CPU the kernels are C++ loops and fuse differently from a GPU's Triton kernels
(the first H200 profile had ~110 launches per step where this count, plus autograd's adds, gives ~57 on the CPU), so
compare variants within one device. On a CPU it also counts, with the profiler, the ops per step that run between
the graphs and would each launch a kernel on a GPU (autograd's gradient adds, copies of strided gradients); not
counted: what runs once per loop (fan_out's sums, defer's reductions).

  python -m bench.step_kernels --device cpu --size debug
  python -m bench.step_kernels --device cpu --size debug --rollout   # the imagination rollout, unmerged and merged
"""

from __future__ import annotations

import argparse
import re

import torch
from torch._inductor.utils import run_and_get_code

from fastdreamer import fast

from .common import device_arg, make_agent, make_config, rollout_starts, size_arg
from .observe_ab import VARIANTS, set_flags

LAUNCH = re.compile(
    r"^\s*(?:\w+ = )?(?:(cpp_fused_\w+)\(|(\w+)\.run\(|extern_kernels\.(\w+)\(|torch\.ops\.(\w+\.\w+)\.\w+\()"
)


def launches(code: str) -> dict[str, int]:
    """{kind: count} of the launches in the `call` function of one generated module."""
    body = code[code.find("def call(") :]
    out = {"fused": 0, "extern": 0, "aten": 0}
    for line in body.splitlines():
        m = LAUNCH.match(line)
        if m:
            out["fused" if m.group(1) or m.group(2) else "extern" if m.group(3) else "aten"] += 1
    return out


def _observe(variant: str, size: str, device: str, precision: str, T: int):
    """A fresh compiled agent with `variant`'s flags and a function running its observe loop, forward and backward,
    over fresh inputs of T steps (or `steps`)."""
    cfg = make_config(size)
    agent, _ = make_agent(cfg, "vector", device)
    fast.compile_agent(agent)
    rssm = agent.rssm
    for unit in ("action_inputs", "deter_inputs"):  # eager: the generated code is then the step's graphs alone
        rssm.__dict__.pop(unit)
    set_flags(rssm, variant)
    B = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    deter, stoch = rssm.initial(B, device)

    def run(steps: int = T):
        tokens = torch.randn(B, steps, agent.encoder.out_dim, generator=g).to(device).requires_grad_()
        actions = torch.randn(B, steps, agent.act_dim, generator=g).to(device)
        first = torch.zeros(B, steps, dtype=torch.bool, device=device)
        with fast.autocast(device, "compile", precision):
            d, s, lp = rssm.observe(deter, stoch, tokens, actions, first)
            loss = d.float().square().mean() + lp.float().mean() + s.float().mean()
        loss.backward()

    return run


def count(variant: str, size: str, device: str, precision: str) -> list[dict[str, int]]:
    """Launch counts of the compiled observe step's graphs (forward, then backward) for one variant."""
    run = _observe(variant, size, device, precision, T=2)  # two steps: the second reuses the first's graphs
    torch._dynamo.reset()  # every variant compiles its own graphs, so each one's code is generated here
    _, codes = run_and_get_code(run)
    return [launches(c) for c in codes]


# What the profiler lists outside the compiled graphs that launches no kernel on a GPU: views and allocations.
NO_KERNEL = {
    *("alias", "as_strided", "detach", "expand", "flatten", "movedim", "permute", "reshape", "select", "slice"),
    *("squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as", "_unsafe_view", "split"),
    *("empty", "empty_like", "empty_strided", "lift_fresh", "_to_copy_noop", "result_type", "resolve_conj"),
    *("resolve_neg", "is_nonzero", "_has_compatible_shallow_copy_type", "to", "contiguous", "clone"),
}
# Inside a compiled graph (not its runtime wrapper, which copies strided gradients before the backward graph).
COMPILED_MARKS = ("Torch-Compiled Region", "## Call CompiledFxGraph")


def between(variant: str, size: str, device: str, precision: str) -> dict[str, float]:
    """The ATen ops per observe step, forward and backward, that run outside the compiled step's graphs and would
    launch a kernel on a GPU (autograd's gradient adds, a compiled backward's copies of strided gradients, the
    loop's indexing): {op: count per step}, from the CPU profiler, as the difference between an 8-step and a 4-step
    loop (what runs once per loop cancels). Leaf ops only, so a copy inside contiguous() counts once, as copy_."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()  # a fresh cache per variant: no pile-up of the step's recompiles across calls
    run = _observe(variant, size, device, precision, T=8)
    run(4)  # compiles (strides differ with T, so each loop length has its own graphs)
    run(8)
    counts = []
    for steps in (4, 8):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(steps)
        ops: dict[str, int] = {}
        for e in prof.events():
            name = e.name.removeprefix("aten::")
            if not e.name.startswith("aten::") or name in NO_KERNEL:
                continue
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            if any(c.startswith(COMPILED_MARKS) for c in chain):
                continue
            if any(c.startswith("aten::") and c.removeprefix("aten::") not in NO_KERNEL for c in chain):
                continue  # inside another counted op
            ops[name] = ops.get(name, 0) + 1
        counts.append(ops)
    short, long = counts
    return {k: (long.get(k, 0) - short.get(k, 0)) / 4 for k in sorted(set(short) | set(long))}


def rollout_launches(size: str, device: str, precision: str) -> dict[str, dict[str, int]]:
    """Launches of the whole compiled imagination rollout (one graph, H steps unrolled) from B*T starts, for
    Agent.rollout and Agent.merged_rollout: {name: {kind: count}}."""
    from fastdreamer.agent import Agent

    cfg = make_config(size)
    out = {}
    for name in ("rollout", "merged_rollout"):
        torch._dynamo.reset()
        agent, _ = make_agent(cfg, "vector", device)
        deter, stoch = rollout_starts(agent, cfg.batch_size * cfg.batch_length, device)
        lat, act = agent.noise(deter.shape[0], cfg.imag_length, cfg.imag_length + 1, device)
        fn = torch.compile(getattr(Agent, name).__get__(agent), dynamic=False)
        with fast.autocast(torch.device(device), "compile", precision):
            _, codes = run_and_get_code(fn, deter, stoch, lat, act)
        total = {"fused": 0, "extern": 0, "aten": 0}
        for code in codes:
            for kind, n in launches(code).items():
                total[kind] += n
        out[name] = total
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--size", default="debug", type=size_arg)
    p.add_argument("--precision", default="auto", choices=fast.PRECISIONS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rollout", action="store_true", help="count the imagination rollout's launches instead")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_kernels: --device cuda asked for, but CUDA is not available here")
    precision = fast.resolve_precision(args.precision, "compile", device)
    if args.rollout:
        H = make_config(args.size).imag_length
        print(f"step_kernels: {args.size}, {device.type}, {precision}; launches of the compiled rollout, H {H}")
        out = rollout_launches(args.size, args.device, precision)
        for name, t in out.items():
            per = "/".join(f"{n / H:.1f}" for n in t.values())
            print(f"  {name:14s} fused/extern/aten {t['fused']}/{t['extern']}/{t['aten']}  per step {per}")
        return out
    print(
        f"step_kernels: {args.size}, {device.type}, {precision}; launches per observe step (graph: fused/extern/aten)"
    )
    out = {}
    for v in args.variants.split(","):
        graphs = count(v, args.size, args.device, precision)
        if len(graphs) != 2:
            raise SystemExit(f"step_kernels: expected the step's forward and backward graphs, got {len(graphs)}")
        out[v] = {"forward": graphs[0], "backward": graphs[1], "total": sum(sum(g.values()) for g in graphs)}
        cells = "  ".join(f"{k} {g['fused']}/{g['extern']}/{g['aten']}" for k, g in zip(("fwd", "bwd"), graphs))
        if device.type == "cpu":
            ops = {k: n for k, n in between(v, args.size, args.device, precision).items() if n}
            out[v]["between"] = ops
            cells += f"  between {sum(ops.values()):g} ({', '.join(f'{k} {n:g}' for k, n in ops.items()) or '-'})"
        print(f"  {v:9s} {cells}  total {out[v]['total']}")
    return out


if __name__ == "__main__":
    main()
