"""One parameter handed to the T steps of a recurrent loop as T views of one copy, with one gradient sum.

When a parameter is used in each of the 64 observe steps, autograd adds each step's weight gradient into a running
sum (one kernel per step and parameter) and, under bf16 autocast, casts the weight to bf16 at every step and each
step's gradient back (two more). On an H200 at 12m the update's 7,975 kernels held 1,323 fp32 adds (19 x 63 of them
these) and 1,230 launches of cast kernels (most of them these; bench/LOG.md, 2026-11-26). fan_out() makes the cast
once and, in the backward, sums the T step gradients in float32 in a few kernels (stacks of CHUNK, their sums). The
values are those of the per-step path: each step sees the same (cast) weight, and each step's gradient is summed in
float32, in another order.

Memory: the T step gradients are held until the sum (the per-step path adds them as they come), T x the step's
parameters in bf16, 648 MB at 12m and ~10 GiB at 200m with T 64. Worth it only where it also saves the casts, so
the RSSM uses it under bf16 autocast only (rssm.RSSM.observe). Where fastdreamer/defer.py runs (the fast modes on
CUDA and, since session 29, on a CPU with native bf16: fast.defer_on) the steps take no parameter gradients at all,
and fan_out is not used; it remains the fast modes' path on a CPU without native bf16 (which runs fp32 by default,
where fan_out does nothing) and with FASTDREAMER_DEFER=0.
"""

from __future__ import annotations

import torch

CHUNK = 16
# step_sum's form in _FanOut's backward: None picks it by device (running on a CPU, stacked elsewhere); "running" or
# "stacked" forces one (bench.observe_ab's cpu_stacked variant times the stacked form on a CPU).
FORCE_SUM: str | None = None


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n: int, dtype: torch.dtype, w: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.w_dtype = w.dtype
        c = w.detach().to(dtype)
        return tuple(c.view_as(c) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        used = [g for g in grads if g is not None]
        if not used:
            return None, None, None
        running = FORCE_SUM == "running" if FORCE_SUM else used[0].device.type == "cpu"
        return None, None, step_sum(used, running).to(ctx.w_dtype)


def step_sum(used: list[torch.Tensor], running: bool) -> torch.Tensor:
    """The float32 sum of the step gradients (bf16 or float32), a new tensor. running: one running sum that each
    gradient is added into as it is (the add casts it on the fly), one kernel per step; else stacks of CHUNK, each
    summed in float32, a few kernels in all (the step gradients are all held until here anyway, autograd buffers
    them; one stack of all T would copy them once more, CHUNK at a time copies at most CHUNK of them). On a CPU,
    where kernels are no launches, the running sum is ~3x faster: the stacked sum casts each stack to float32 first,
    a copy of its own (1m, T 64, one thread: 8.4 against 24.5 ms per update; bench/LOG.md, session 29)."""
    if running:
        total = used[0].to(torch.float32, copy=True)
        for g in used[1:]:
            total.add_(g)
        return total
    total = None
    for i in range(0, len(used), CHUNK):
        part = torch.stack(used[i : i + CHUNK]).sum(0, dtype=torch.float32)
        total = part if total is None else total + part
    return total


def fan_out(params: dict[str, torch.Tensor], n: int, dtypes: dict[str, torch.dtype]) -> list[dict[str, torch.Tensor]]:
    """n dicts {name: tensor}: for each of n steps, every parameter as a view of one copy in dtypes.get(name, its
    own dtype). The gradient reaching each parameter is the float32 sum of its n views' gradients."""
    views = {name: _FanOut.apply(n, dtypes.get(name, w.dtype), w) for name, w in params.items()}
    return [{name: v[t] for name, v in views.items()} for t in range(n)]
