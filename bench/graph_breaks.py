"""Where dynamo breaks the fast modes' graphs: `python -m bench.graph_breaks [--device cpu|cuda] [--precision P]`.

Compiles the agent's units as compile mode does (fastdreamer.fast.compile_agent and compile_optimizer), but with
dynamo's `eager` backend, so it takes seconds on any machine and checks the torch that is installed. Then it runs
one update (defer, hoist_action and merge_deter on, as on a GPU), one acting step and one imagination rollout, and
prints each graph break dynamo recorded with its count, and exits 1 if one is not planned
(fastdreamer.fast.PLANNED_BREAKS).

Why it exists: on the H200's torch 2.11, `tap or (lambda ...)` in the block GRU's reference step broke the compiled
observe step's graph (dynamo 2.11 cannot take the truth of a closure; 2.13 can). Nothing failed: the step ran as
several graphs, and each tap's slice, a view crossing a graph boundary, went to eager autograd, which costs a fill,
a copy and an add per site and step (~2 ms of a 12m update; bench/LOG.md, session 21). The CPU's torch showed none
of it. Run this first on every new torch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys


@contextlib.contextmanager
def eager_compile():
    """While entered, torch.compile compiles with dynamo's `eager` backend: dynamo traces (and counts its graph breaks)
    as it does for inductor, without inductor's code generation."""
    import torch

    real = torch.compile

    def eager_backend(fn=None, **kwargs):
        kwargs["backend"] = "eager"
        kwargs.pop("options", None)  # inductor's (fast._compile's): the eager backend has none, and warns per graph
        return real(**kwargs) if fn is None else real(fn, **kwargs)

    torch.compile = eager_backend
    try:
        yield
    finally:
        torch.compile = real


def census(
    device: str = "cpu", precision: str = "fp32", size: str = "debug", obs: str = "vector"
) -> tuple[dict[str, int], dict[str, int]]:
    """All graph breaks and the unplanned ones (fastdreamer.fast.unplanned_graph_breaks), {reason: count} each, for
    one update, acting step and rollout of a seeded agent of `size`, compiled as compile mode compiles it but with
    dynamo's eager backend."""
    import torch
    import torch._dynamo

    from bench.common import make_agent, make_config, random_batch, random_obs, rollout_starts
    from fastdreamer import fast
    from fastdreamer.train import update_step

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_compile())
        stack.callback(setattr, fast, "DEFER", fast.DEFER)
        fast.DEFER = True  # the GPU's observe loop (deferred weight gradients), here on any device
        cfg = make_config(size, device=device)
        agent, opt = make_agent(cfg, obs, device)
        update = fast.make_update(update_step, agent, opt, "compile", precision)
        fast.compile_optimizer(opt)
        update(random_batch(agent, cfg.batch_size, cfg.batch_length + cfg.replay_context, device))
        fast.make_act(agent, "compile", precision)(agent.initial(3, device), random_obs(agent, 3, device))
        fast.make_imagine(agent, "compile", precision)(*rollout_starts(agent, 3, device))
    return fast.graph_breaks(), fast.unplanned_graph_breaks()


def main(argv=None) -> int:
    from bench.common import device_arg, size_arg

    p = argparse.ArgumentParser(prog="python -m bench.graph_breaks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--size", type=size_arg, default="debug")
    p.add_argument("--obs", choices=("vector", "image"), default="vector")
    args = p.parse_args(argv)
    import torch

    breaks, bad = census(args.device, args.precision, args.size, args.obs)
    print(
        f"graph breaks, torch {torch.__version__}, {args.device}, {args.precision}: {sum(breaks.values())} "
        f"({sum(bad.values())} unexpected)"
    )
    for reason, count in sorted(breaks.items(), key=lambda kv: -kv[1]):
        mark = "UNEXPECTED" if reason in bad else "expected"
        head, _, context = reason.partition("Developer debug context:")
        print(f"  {count:4d}  {mark:10s}  {head.split(' Explanation:')[0]} | {context.split(' For more')[0].strip()}")
    if bad:
        print("where: rerun with TORCH_LOGS=graph_breaks (each break's file, line and user stack)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
