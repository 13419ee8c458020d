"""Kernels per compiled observe step, read from the code inductor generates (no profiler, no GPU needed).

The fast update is bound by kernel count, most of it the 64 observe steps forward and backward (bench/LOG.md,
2026-11-26). This counts, for each way the observe loop takes its parameters' gradients (bench/observe_ab.py's
variants), the launches in the compiled step's forward and backward graphs: inductor's fused kernels, extern calls
(matmuls) and fallback ATen ops. On a CPU the kernels are C++ loops and fuse differently from a GPU's Triton kernels
(the first H200 profile had ~110 launches per step where this count, plus autograd's adds, gives ~57 on the CPU), so
compare variants within one device. Not counted: what autograd runs between the graphs (per_step's gradient
accumulation, one add per step parameter and step) and what runs once per loop (fan_out's sums, defer's
reductions).

  python -m bench.step_kernels --device cpu --size debug
"""

from __future__ import annotations

import argparse
import re

import torch
from torch._inductor.utils import run_and_get_code

from fastdreamer import fast

from .common import make_agent, make_config
from .observe_ab import VARIANTS

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


def count(variant: str, size: str, device: str, precision: str) -> list[dict[str, int]]:
    """Launch counts of the compiled observe step's graphs (forward, then backward) for one variant."""
    cfg = make_config(size)
    agent, _ = make_agent(cfg, "vector", device)
    fast.compile_agent(agent)
    rssm = agent.rssm
    rssm.fan_out, rssm.defer = VARIANTS[variant]
    B, T = cfg.batch_size, 2  # two steps: the second reuses the first's graphs
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, T, agent.encoder.out_dim, generator=g).to(device).requires_grad_()
    actions = torch.randn(B, T, agent.act_dim, generator=g).to(device)
    first = torch.zeros(B, T, dtype=torch.bool, device=device)
    deter, stoch = rssm.initial(B, device)

    def run():
        with fast.autocast(device, "compile", precision):
            d, s, lp = rssm.observe(deter, stoch, tokens, actions, first)
            loss = d.float().square().mean() + lp.float().mean() + s.float().mean()
        loss.backward()

    torch._dynamo.reset()  # every variant compiles its own graphs, so each one's code is generated here
    _, codes = run_and_get_code(run)
    return [launches(c) for c in codes]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="debug")
    p.add_argument("--precision", default="auto", choices=fast.PRECISIONS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_kernels: --device cuda asked for, but CUDA is not available here")
    precision = fast.resolve_precision(args.precision, "compile", device)
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
        print(f"  {v:9s} {cells}  total {out[v]['total']}")
    return out


if __name__ == "__main__":
    main()
