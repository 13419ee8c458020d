"""fan_out (one copy of each parameter for all observe steps, one gradient sum) against the per-step path it
replaces: the same forward values, bitwise, and the same gradients up to float32 summation order."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from fastdreamer.kernels import block_gru
from torch.utils._python_dispatch import TorchDispatchMode

from fastdreamer.fanout import CHUNK, fan_out, step_sum
from fastdreamer.rssm import RSSM

# Both paths sum the same T per-step gradients in float32 (autograd one by one, fan_out in one reduction), so they
# differ by reassociation only: ~T * 2^-24 relative at worst, seen <= 3e-7 on these shapes.
GRAD_REL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_fan_out_casts_once_and_sums_the_step_gradients_in_float32():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen).requires_grad_()
    b = torch.randn(5, generator=gen).requires_grad_()
    s = torch.randn(5, generator=gen).requires_grad_()  # never used by any step: no gradient, no error
    xs = [torch.randn(7, 6, generator=gen) for _ in range(9)]

    def loss(ws):
        return sum((((x.bfloat16() @ p["w"]).float() + p["b"]).square() * (t + 1)).sum() for t, (x, p) in ws)

    steps = fan_out({"w": w, "b": b, "s": s}, len(xs), {"w": torch.bfloat16})
    assert [p["w"].dtype for p in steps] == [torch.bfloat16] * len(xs) and steps[0]["b"].dtype == torch.float32
    assert steps[3]["w"].data_ptr() == steps[0]["w"].data_ptr(), "one copy for all steps"
    got = loss(enumerate(zip(xs, steps)))
    got.backward()
    grads = (w.grad.clone(), b.grad.clone())
    assert s.grad is None
    w.grad = b.grad = None
    # The per-step path: a cast per step (as autocast makes), so each step's gradient is cast back to fp32 before
    # autograd adds it. (One cast shared by all steps would sum the step gradients in bf16: 0.6% off here.)
    want = loss(enumerate(zip(xs, [{"w": w.bfloat16(), "b": b} for _ in xs])))
    want.backward()
    assert torch.equal(got, want)
    assert grads[0].dtype == torch.float32
    for g, p in zip(grads, (w, b), strict=True):
        assert rel(g, p.grad) < GRAD_REL


@pytest.mark.parametrize("running", [True, False], ids=["running", "stacked"])
def test_step_sum_is_the_float32_sum_of_the_step_gradients_in_both_forms(running):
    """fan_out's gradient sum in each form (running: a CPU's; stacked: in CHUNKs, every other device's) against a
    float64 sum: float32, a new tensor (the step gradients unchanged), within reassociation of T float32 adds, for
    bf16 and float32 gradients and T not a multiple of CHUNK."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        used = [torch.randn(33, 17, generator=gen).to(dtype) for _ in range(2 * CHUNK + 3)]
        before = [g.clone() for g in used]
        got = step_sum(used, running)
        want = torch.stack([g.double() for g in used]).sum(0)
        assert got.dtype == torch.float32 and all(got.data_ptr() != g.data_ptr() for g in used)
        assert all(torch.equal(g, b) for g, b in zip(used, before, strict=True))
        assert rel(got.double(), want) < GRAD_REL, rel(got.double(), want)
        one = step_sum(used[:1], running)
        assert torch.equal(one, used[0].float()) and one.data_ptr() != used[0].data_ptr()


interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interpreter)])
def test_observe_with_fan_out_matches_the_per_step_observe(impl):
    """The world model's observe loop under bf16 autocast as the fast modes run it (fan_out on: the matmul weights
    cast once) against eager's per-step path: deters, latents and log-probs bitwise, every parameter's gradient
    within GRAD_REL."""
    precision = "bf16"
    B, T, E, A = 3, 6, 10, 2
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(B, T, E, generator=gen)
    actions = torch.randn(B, T, A, generator=gen)
    is_first = torch.rand(B, T, generator=gen) < 0.2
    deter0 = torch.randn(B, 24, generator=gen)
    stoch0 = torch.nn.functional.one_hot(torch.randint(0, 4, (B, 3), generator=gen), 4).float()
    weights = torch.randn(B, T, 3, 4, generator=gen)

    def run(fan):
        torch.manual_seed(0)
        rssm = RSSM(E, A, deter=24, hidden=8, stoch=3, classes=4, blocks=4)
        rssm.fan_out = fan
        ctx = torch.autocast("cpu", torch.bfloat16, cache_enabled=False) if precision == "bf16" else None
        torch.manual_seed(2)
        with ctx or contextlib.nullcontext():
            deters, stochs, logps = rssm.observe(deter0, stoch0, tokens, actions, is_first)
            loss = deters.float().square().mean() + (logps * weights).sum() + (stochs * weights).sum()
        loss.backward()
        return (deters, stochs, logps), {n: p.grad for n, p in rssm.named_parameters() if p.grad is not None}

    assert block_gru.set_impl(impl) == impl
    try:
        (got, got_grads), (want, want_grads) = run(True), run(False)
    finally:
        block_gru.set_impl("torch")
    for name, g, w in zip(("deters", "stochs", "logps"), got, want, strict=True):
        assert torch.equal(g, w), f"{name} differ"
    assert got_grads.keys() == want_grads.keys() and any(n.startswith("core.") for n in want_grads)
    for name, g in got_grads.items():
        assert g.dtype == torch.float32, name
        assert rel(g, want_grads[name]) < GRAD_REL, f"gradient of {name}: relative error {rel(g, want_grads[name])}"


class CastCount(TorchDispatchMode):
    """Counts dtype casts (aten._to_copy) of the given tensors, by storage: {(name, from, to): calls}; and, in
    `upcasts`, bf16 -> fp32 casts of any tensor shaped like one of them (a copy of a weight cast back)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {t.data_ptr(): n for n, t in tensors.items()}
        self.shapes = {t.shape for t in tensors.values() if t.dim() > 1}
        self.calls, self.upcasts = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            x, dtype = args[0], kwargs.get("dtype")
            if x.data_ptr() in self.names:
                key = (self.names[x.data_ptr()], x.dtype, dtype)
                self.calls[key] = self.calls.get(key, 0) + 1
            self.upcasts += x.dtype == torch.bfloat16 and dtype == torch.float32 and x.shape in self.shapes
        return func(*args, **kwargs)


@pytest.mark.parametrize("fan", [True, False])
def test_fan_out_casts_each_matmul_weight_once_per_observe(fan):
    """What fan_out is for, counted at the dispatcher: under bf16 autocast the observe loop's matmul weights are
    cast to bf16 once, not once per step, and never cast back (the torch core's float32 upcast of its operands is
    skipped for bf16 weights under autocast); without fan_out, once per step. In fp32 fan_out is not used at all
    (no cast to save; the held step gradients would cost memory for nothing)."""
    B, T, E, A = 3, 5, 10, 2
    torch.manual_seed(0)
    rssm = RSSM(E, A, deter=24, hidden=8, stoch=3, classes=4, blocks=4)
    rssm.fan_out = fan
    # The matmul operands: the core's five weights, and F.linear's weight and bias (autocast casts both) for
    # obs_net's linear layer and obs_logit.
    matmul = [n for n in rssm.step_params() if n.endswith(("weight", "bias", "w0", "w1", "w2", "wh", "wg"))]
    assert len(matmul) == 9
    args = (torch.randn(B, 24), torch.zeros(B, 3, 4), torch.randn(B, T, E), torch.randn(B, T, A))
    first = torch.zeros(B, T, dtype=torch.bool)
    bf16 = CastCount(rssm.step_params())
    with torch.autocast("cpu", torch.bfloat16, cache_enabled=False), bf16:
        rssm.observe(*args, first)
    want = {(n, torch.float32, torch.bfloat16): 1 if fan else T for n in matmul}
    assert bf16.calls == want
    assert bf16.upcasts == 0, "a bf16 weight copy was cast back to float32"
    fp32 = CastCount(rssm.step_params())
    with fp32:
        rssm.observe(*args, first)
    assert fp32.calls == {} and fp32.upcasts == 0
