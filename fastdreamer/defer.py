"""Deferred weight gradients for the observe loop: one matmul per weight over all B*T rows instead of one per step.

A weight used by each of T recurrent steps gets, per step, a gradient matmul over the step's B rows (16 in
training) and a running sum of those T gradients. On an H200 at 12m that is a few hundred skinny kernels per update
(bench/LOG.md, 2026-11-26), and the weight gradient does not need them: for y_t = x_t @ w + b it is
sum_t x_t^T g_t = X^T G, with X and G the T steps' inputs and output gradients stacked.

So the steps get the weights without gradient, and a zero "tap" tensor added at every site where a parameter enters
(a matmul's output, a norm's scaled value): the tap's gradient is that site's output gradient g_t, and the steps
return the site's other factor x_t. Per step, each site's tap is a tensor of its own (the compiled step's backward
then writes each site's gradient from the kernel that computes it) and all factors are packed into one (pack). A
factor the loop has anyway (a step's input or output) need not be packed: a Record subclass whose factors() gathers
it after the loop lets the steps pack only what they compute (the RSSM's observe loop, rssm._ObserveRecord). After
the loop's backward, each parameter's gradient is one reduction over all rows (Sites lists them):

    mm      y = x @ w (+ b)                   dw = X^T G              (w (in, out))
    linear  y = F.linear(x, w, b)             dw = G^T X              (w (out, in))
    block   y = blocklinear(x, w) (+ b)       dw_g = X_g^T G_g        (w (blocks, in, out), x (N, blocks, in))
    scale   y = x * s                         ds = sum over rows of G * X
    and a bias b of mm, linear or block:      db = sum over rows of G

The forward is the per-step path's, value for value (adding a zero changes nothing). The gradients are the same sums
in another order. Under bf16 autocast the per-step path multiplies bf16 operands and rounds each step's weight
gradient to bf16 before summing in float32; here the same bf16-rounded operands are multiplied in float32 over all
rows at once, so the result is the per-step one without its T roundings (tests/test_defer.py bounds the difference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

KINDS = ("mm", "linear", "block", "scale")


class Site(NamedTuple):
    kind: str  # one of KINDS
    params: tuple[str, ...]  # the weight (or scale), then the bias if any
    width: int  # the site's value is (B, width)
    # The per-step path multiplied this site's input and output gradient in bf16 (a matmul under bf16 autocast), so
    # the weight gradient multiplies them rounded to bf16. A fused core that rounds its operands itself hands over
    # the rounded input and takes the output gradient as it is (False).
    bf16: bool = False


def _weight_grad(kind: str, w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, bmm=torch.bmm) -> torch.Tensor:
    """A site's weight gradient from its factors over all rows: x (n, width) and its output gradient g (n, width).
    The matmul kinds are one batched matmul `bmm` (a batch of one for mm and linear), so the bf16 sites can pass
    one with a float32 output."""
    if kind == "mm":
        return bmm(x.t()[None], g[None])[0]
    if kind == "linear":
        return bmm(g.t()[None], x[None])[0]
    if kind == "block":  # x (n, G, I), g (n, G*O) -> (G, I, O)
        return bmm(x.permute(1, 2, 0), g.view(g.shape[0], w.shape[0], w.shape[2]).permute(1, 0, 2))
    return (g * x).sum(0)


def _bf16_weight_grad(kind: str, w: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """_weight_grad of x and g rounded to bf16, summed in float32. A product of two bf16 numbers is exact in
    float32, so on CUDA the bf16 operands go to the tensor cores with a float32 output (bmm's out_dtype overload;
    the float32 FMAs of the rounded operands ran on the H200's SIMT units, ~0.18 ms per 12m update) and only the
    summation order differs. Elsewhere (no CPU kernel takes out_dtype) the rounded operands are multiplied in
    float32."""
    xb, gb = x.bfloat16(), g.bfloat16()
    if not (x.is_cuda and hasattr(torch.ops.aten.bmm, "dtype")):
        return _weight_grad(kind, w, xb.float(), gb.float())
    return _weight_grad(kind, w, xb, gb, lambda a, b: torch.bmm(a, b, torch.float32))


def x_width(kind: str, w: torch.Tensor) -> int:
    """The width of a site's other factor, flattened to (B, width), from its weight."""
    if kind == "mm":
        return w.shape[0]
    if kind == "linear":
        return w.shape[1]
    if kind == "block":
        return w.shape[0] * w.shape[1]
    return w.shape[0]


def pack(seen: dict[str, torch.Tensor], sites: dict[str, Site]) -> torch.Tensor:
    """One step's other factors as one (B, sum of x widths) tensor, in the order of `sites` (what Record takes): one
    output of a compiled step instead of one per site. Detached: no gradient flows through the factors, and a
    compiled step whose output required grad would get (and read) a zero-filled gradient for it every step."""
    return torch.cat([seen[name].flatten(1) for name in sites], 1).detach()


class Record(list):
    """The steps' other factors, one packed (B, sum of x widths) tensor per step, or a tuple of tensors that are its
    consecutive columns (each site's within one of them), as each step packed them. append() detaches them: the
    record lives on the taps' autograd node, so a recorded tensor that carried the graph would keep that node, and
    itself, alive for good (a reference cycle through autograd's C++ nodes, which gc cannot see)."""

    def append(self, packed: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        super().append(tuple(t.detach() for t in packed) if isinstance(packed, tuple) else packed.detach())

    def factors(self, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each site's other factor over all rows, {site: (steps * B, width)} float32, rows step-major (the taps'
        gradients are stacked the same way), from the packed steps; widths: {site: x width}, in pack's order. Each
        part of tuple steps is stacked on its own, so the columns are not copied into one tensor first."""
        steps = [s if isinstance(s, tuple) else (s,) for s in self]
        parts = [torch.stack(list(p)).flatten(0, 1).float() for p in zip(*steps, strict=True)]
        held = sum(p.shape[1] for p in parts)
        if held != sum(widths.values()):
            raise RuntimeError(
                f"defer: the record holds {held} columns of factors per row, the sites take "
                f"{sum(widths.values())} ({widths})"
            )
        out, names = {}, iter(widths)
        for p in parts:
            col = 0
            while col < p.shape[1]:
                name = next(names)
                out[name], col = p[:, col : col + widths[name]], col + widths[name]
            if col != p.shape[1]:
                raise RuntimeError(f"defer: site {name!r} spans two parts of the packed factors ({widths})")
        return out


class _Taps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sites: dict[str, Site], steps: int, batch: int, record: Record, *params):
        ctx.set_materialize_grads(False)
        ctx.sites, ctx.record = sites, record
        ctx.save_for_backward(*params)
        # One zero buffer per site, and a view of it for each step: steps * sites outputs, step-major.
        zeros = [params[0].new_zeros((batch, s.width), dtype=torch.float32) for s in sites.values()]
        return tuple(z.view_as(z) for _ in range(steps) for z in zeros)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        params = ctx.saved_tensors
        sites, record = ctx.sites, ctx.record
        steps = len(grads) // len(sites)
        if len(record) != steps:
            raise RuntimeError(f"defer: {len(record)} steps recorded their inputs, {steps} were tapped")
        out: list[torch.Tensor | None] = [None] * len(params)
        if all(g is None for g in grads):
            return (None, None, None, None, *out)
        names = [p for s in sites.values() for p in s.params]
        with torch.autocast(params[0].device.type, enabled=False):
            at = [names.index(s.params[0]) for s in sites.values()]
            widths = {name: x_width(s.kind, params[i]) for (name, s), i in zip(sites.items(), at, strict=True)}
            xs = record.factors(widths)
            batch = next(g for g in grads if g is not None).shape[0]
            for j, ((name, site), w_at) in enumerate(zip(sites.items(), at, strict=True)):
                w = params[w_at]
                per_step = grads[j :: len(sites)]
                zero = None if all(g is not None for g in per_step) else _missing_grad(batch, site.width, w.device)
                g = torch.stack([zero if g is None else g for g in per_step]).flatten(0, 1).float()
                x = xs[name]
                if site.kind == "block":
                    x = x.unflatten(1, (w.shape[0], w.shape[1]))
                if site.bf16 and site.kind != "scale":
                    wg = _bf16_weight_grad(site.kind, w, x, g)
                else:
                    wg = _weight_grad(site.kind, w, x, g)
                out[w_at] = wg.to(w.dtype)
                if len(site.params) > 1:
                    b_at = names.index(site.params[1])
                    out[b_at] = g.sum(0).to(params[b_at].dtype)
        return (None, None, None, None, *out)


def _missing_grad(batch: int, width: int, device) -> torch.Tensor:
    """A step's missing tap gradient (autograd passes None for a tap that no output depended on)."""
    return torch.zeros((batch, width), dtype=torch.float32, device=device)


def taps(
    sites: dict[str, Site], params: dict[str, torch.Tensor], steps: int, batch: int, record: Record
) -> list[dict[str, torch.Tensor]]:
    """For each of `steps` steps, {site: (batch, width) float32 zeros}, to add at that site: a tensor per site, not
    views of one, so that a compiled step's backward writes each site's gradient from the kernel that computes it
    (one tensor's gradient took one more kernel per step gathering them; bench/LOG.md, session 25). The caller runs
    the steps on the parameters without gradient and appends, per step, pack() of {site: its other factor} to
    `record` (a Record, which detaches it). In the backward the gradient of every parameter named in `sites` (taken
    from `params`) is then computed from the stacked tap gradients and `record`.
    Once differentiable (no double backward)."""
    if not isinstance(record, Record):
        raise TypeError(f"defer: record must be a defer.Record (it detaches what the steps append), got {type(record)}")
    names = [p for s in sites.values() for p in s.params]
    if len(set(names)) != len(names):
        raise ValueError(f"defer: a parameter is at more than one site: {names}")
    for name, s in sites.items():
        if s.kind not in KINDS or not 1 <= len(s.params) <= (1 if s.kind == "scale" else 2):
            raise ValueError(f"defer: site {name!r} has kind {s.kind!r} with parameters {s.params}")
    flat = _Taps.apply(sites, steps, batch, record, *(params[p] for p in names))
    n = len(sites)
    return [dict(zip(sites, flat[t * n : (t + 1) * n], strict=True)) for t in range(steps)]
