"""The fused Triton block-GRU against reference.py: outputs and every gradient, odd shapes, both weight dtypes.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on CUDA natively.
Tolerances are the table in kernels/block_gru/fused.py; every buffer a kernel must write starts as NaN here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # the fused kernels' module imports it; setup.py installs it where wheels exist

from fastdreamer.kernels import block_gru  # noqa: E402
from fastdreamer.kernels.block_gru import fused, reference  # noqa: E402
from fastdreamer.kernels.block_gru.reference import BlockGRUWeights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {"atol": 2e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}
BF16_WEIGHT_GRAD_TOL = {"atol": 1e-4, "rtol": 8e-3}  # one bf16 rounding (<= 2^-8 relative) of the fp32 grad
NAMES = ("deter", "stoch", "action", *BlockGRUWeights._fields)


@pytest.fixture(autouse=True)
def poison_and_restore(monkeypatch):
    monkeypatch.setattr(fused, "DEBUG_POISON", True)
    yield
    block_gru.set_impl("torch")


def make_case(B, D, G, K, SC, A, dtype=torch.float32, seed=0):
    """Random inputs and weights at roughly unit activation scale; norm scales near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    w = reference.random_weights(D, G, K, SC, A, gen, DEVICE)
    w = BlockGRUWeights(*(t.to(dtype) for t in w))
    action = r(B, A)
    action = action / action.abs().clamp(min=1.0)
    return r(B, D), r(B, SC), action, w, r(B, D)  # the last is the upstream gradient


def grads_of(fn, deter, stoch, action, w, dout, upcast=False):
    """fn's output and its gradients w.r.t. all 17 inputs; upcast=True differentiates fp32 copies of the weights."""
    ins = [t.detach().clone().requires_grad_() for t in (deter, stoch, action)]
    ins += [(t.detach().float() if upcast else t.detach().clone()).requires_grad_() for t in w]
    out = fn(ins[0], ins[1], ins[2], BlockGRUWeights(*ins[3:]))
    return out, torch.autograd.grad(out, ins, dout)


# (B, D, G, K, S*C, A): D not a power of two, odd hidden sizes, batch 1 / 3 / 16; S*C = 100 > D makes the stoch
# branch span more input tiles than the deter branch; the last needs several tiles everywhere (D/G = 132 > 64-wide
# tiles, K = 136 > 128, B = 17 > 16 rows per program). Batch 1000 takes ~25 s in the interpreter, so it runs on GPU
# only (below).
SHAPES = [(1, 24, 4, 20, 15, 6), (3, 40, 8, 12, 100, 3), (16, 24, 4, 16, 9, 1), (17, 264, 2, 136, 30, 5)]


@pytest.mark.parametrize("tiles", ["parallel", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_D{}_G{}_K{}_SC{}_A{}".format(*s))
def test_step_matches_reference_output_and_every_gradient(shape, dtype, tiles, monkeypatch):
    """Both tile policies of fused.py: at these shapes "parallel" narrows most output tiles to 16 columns (as at
    batch 16 on a GPU), "wide" keeps them up to 64 / 128 (as at batch 1024)."""
    monkeypatch.setattr(fused, "TILES", tiles)
    deter, stoch, action, w, dout = make_case(*shape, dtype=dtype, seed=sum(shape))
    out, grads = grads_of(fused.step, deter, stoch, action, w, dout)
    # bf16 weights: the reference on the same weights upcast to fp32 is the same math the kernel does.
    ref, ref_grads = grads_of(reference.step, deter, stoch, action, w, dout, upcast=True)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg, t in zip(NAMES, grads, ref_grads, (deter, stoch, action, *w)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        tol = BF16_WEIGHT_GRAD_TOL if t.dtype == torch.bfloat16 else GRAD_TOL
        torch.testing.assert_close(g.float(), rg, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def bf16_spec_pinned_to(deter, stoch, action, w, monkeypatch):
    """reference.step(bf16=True) with its two rounded activations (x, h) pinned to the fused kernel's values.

    Products of bf16 values are exact in float32, so kernel and spec differ by summation order only, as in fp32,
    except where an activation the two compute a few float32 ulps apart rounds to neighbouring bf16 values (a few
    per case here; each then moves its whole row). Pinning x and h to the kernel's own (saved) values, with the
    gradient passing straight through, removes that, so the fp32 tolerances apply to bf16 compute unchanged.
    Returns the spec as a function of (deter, stoch, action, w) like reference.step, and a dict that each call fills
    with the spec's own x and h (before pinning) next to the kernel's, to check the stages before the pins."""
    _, saved = fused.forward(deter, stoch, action, w, save=True, bf16=True)
    kernel = {"x": saved[1], "h": saved[3]}
    seen = {}

    def pin(name, t):
        seen[name] = (kernel[name], t.detach().clone())
        return t + (kernel[name] - t).detach()

    monkeypatch.setattr(reference, "_pin", pin)
    return (lambda *a: reference.step(*a, bf16=True)), seen


def check_bf16_compute(deter, stoch, action, w, dout, monkeypatch, weight_grad_tol):
    out, grads = grads_of(lambda *a: fused.step(*a, bf16=True), deter, stoch, action, w, dout)
    spec, seen = bf16_spec_pinned_to(deter, stoch, action, w, monkeypatch)
    ref, ref_grads = grads_of(spec, deter, stoch, action, w, dout, upcast=True)
    # The pinned values themselves: x checks the branch stage (bf16 inputs and w_i), h the hidden stage (given the
    # pinned x); the output then checks the gate stage (given the pinned h).
    for name, (got, want) in seen.items():
        torch.testing.assert_close(got, want, **OUT_TOL, msg=lambda m, name=name: f"activation {name}: {m}")
    fp32 = reference.step(deter, stoch, action, BlockGRUWeights(*(t.float() for t in w)))
    # The test can tell the precisions apart: bf16 rounding moves the output far more than the tolerance.
    assert (fp32 - ref).abs().max() > 10 * OUT_TOL["atol"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg, t in zip(NAMES, grads, ref_grads, (deter, stoch, action, *w)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        tol = BF16_WEIGHT_GRAD_TOL if t.dtype == torch.bfloat16 else GRAD_TOL if name in NAMES[:3] else weight_grad_tol
        torch.testing.assert_close(g.float(), rg, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32w", "bf16w"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_D{}_G{}_K{}_SC{}_A{}".format(*s))
def test_bf16_compute_matches_the_reference_bf16_spec(shape, dtype, monkeypatch):
    """What the switch runs under bf16 autocast: every dot's operands rounded to bf16, fp32 sums, straight-through
    gradients. On CPU the interpreter emulates the bf16 dots in fp32; on a GPU they run on the tensor cores."""
    deter, stoch, action, w, dout = make_case(*shape, dtype=dtype, seed=sum(shape) + 1)
    check_bf16_compute(deter, stoch, action, w, dout, monkeypatch, GRAD_TOL)


def test_bf16_backward_under_autocast_sums_in_fp32():
    """The trainer calls backward() inside its bf16 autocast, and autograd runs the op's backward under it. The
    weight gradients must still be the spec's float32 sums: the same numbers as without autocast."""
    deter, stoch, action, w, dout = make_case(16, 24, 4, 20, 15, 6, seed=16)

    def step(*a):
        return fused.step(*a, bf16=True)

    out, grads = grads_of(step, deter, stoch, action, w, dout)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out_ac, grads_ac = grads_of(step, deter, stoch, action, w, dout)
    torch.testing.assert_close(out_ac, out, atol=0, rtol=0)
    for name, g, g_ac in zip(NAMES, grads, grads_ac):
        torch.testing.assert_close(g_ac, g, atol=0, rtol=0, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_bf16_rollout_and_the_switch_under_bf16_autocast():
    """rollout in bf16 compute is the step repeated (the same launches: bitwise equal); the switch picks bf16 compute
    from torch.autocast. The torch reference under autocast also rounds each matmul's result, so it lands near the
    fused result, not on it."""
    B, T, D, G, K, SC, A = 3, 4, 24, 4, 20, 15, 6
    deter, _, _, w, _ = make_case(B, D, G, K, SC, A, seed=13)
    gen = torch.Generator().manual_seed(14)
    stoch = torch.randn(B, T, SC, generator=gen).to(DEVICE)
    action = torch.randn(B, T, A, generator=gen).to(DEVICE)
    out = fused.rollout(deter, stoch, action, w, bf16=True)
    d = deter
    for t in range(T):
        d = fused.step(d, stoch[:, t], action[:, t], w, bf16=True)
        torch.testing.assert_close(out[:, t], d, atol=0, rtol=0)
    assert (out - fused.rollout(deter, stoch, action, w)).abs().max() > 1e-3  # not the fp32 kernels
    block_gru.set_impl("triton")
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        via_switch = block_gru.rollout(deter, stoch, action, w)
        one_step = block_gru.step(deter, stoch[:, 0], action[:, 0], w)
    torch.testing.assert_close(via_switch, out, atol=0, rtol=0)
    torch.testing.assert_close(one_step, out[:, 0], atol=0, rtol=0)
    # Compiled (as the RSSM is), the switch reads the autocast state at trace time and guards on it.
    torch._dynamo.reset()
    compiled = torch.compile(block_gru.step, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(deter, stoch[:, 0], action[:, 0], w), out[:, 0], atol=0, rtol=0)
    with torch.no_grad():
        fp32_step = fused.step(deter, stoch[:, 0], action[:, 0], w)
        torch.testing.assert_close(compiled(deter, stoch[:, 0], action[:, 0], w), fp32_step, atol=0, rtol=0)
    block_gru.set_impl("torch")
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        autocast_ref = block_gru.rollout(deter, stoch, action, w)
    assert (autocast_ref - out).abs().max() < 0.05  # both bf16; autocast also rounds every matmul's result


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16compute"])
@pytest.mark.parametrize("B,min_programs,rows", [(70, 4, 64), (40, 6, 32), (40, 12, 16)])
def test_forward_row_tiles_of_32_and_64(B, min_programs, rows, bf16, monkeypatch):
    """Large batches run the forward with 64- or 32-row tiles (fused.fwd_tiles). Batch 1024 is too slow for the
    interpreter, so MIN_PROGRAMS is lowered to pick those tiles at small batches; B = 70 and 40 leave a partial tile.
    The backward (16-row tiles) reads what this forward saved."""
    monkeypatch.setattr(fused, "MIN_PROGRAMS", min_programs)
    shape = (B, 24, 4, 20, 15, 6)
    assert fused.fwd_tiles(B, 24 // 4, 4, 20)["BB"] == rows
    deter, stoch, action, w, dout = make_case(*shape, seed=B + min_programs)
    out, grads = grads_of(lambda *a: fused.step(*a, bf16=bf16), deter, stoch, action, w, dout)
    if bf16:
        spec, _ = bf16_spec_pinned_to(deter, stoch, action, w, monkeypatch)
    else:
        spec = reference.step
    ref, ref_grads = grads_of(spec, deter, stoch, action, w, dout)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        # Weight grads sum up to 70 rows here (the table's row: 17): measured max error 3.8e-6, bound 1e-4.
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


# The caller's branch inputs (reference.step's x0p, x1p, x2; fused.modes): the combinations the RSSM passes (the
# observe loop under hoist_action and merge_deter: all three; imagination's merged rollout: x0p and x1p) and each alone.
GIVEN = [("x0p",), ("x1p",), ("x2",), ("x0p", "x1p"), ("x0p", "x1p", "x2")]
GIVEN_NAMES = ("x0p", "x1p", "x2")


def given_case(deter, stoch, action, w, names, seed, dtype=torch.float32):
    """The given inputs of a case: the products deter @ w0 and stoch @ w1 and the branch action_branch(action) as a
    caller computes them, moved by noise (so a kernel that recomputed the branch instead of reading it fails), in
    dtype; None where not in names."""
    gen = torch.Generator().manual_seed(seed)
    wf = BlockGRUWeights(*(t.float() for t in w))
    exact = {"x0p": deter @ wf.w0, "x1p": stoch @ wf.w1, "x2": reference.action_branch(action, wf)}
    return {
        n: (exact[n] + 0.3 * torch.randn(exact[n].shape, generator=gen).to(DEVICE)).to(dtype) if n in names else None
        for n in GIVEN_NAMES
    }


def grads_given(fn, deter, stoch, action, w, given, dout, upcast=False, **kw):
    """fn's output and its gradients w.r.t. the 17 inputs and the given ones (zeros where fn does not read an
    input: the reference's autograd has no gradient there, the kernels write zeros)."""
    ins = [t.detach().clone().requires_grad_() for t in (deter, stoch, action)]
    ins += [(t.detach().float() if upcast else t.detach().clone()).requires_grad_() for t in w]
    gin = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in given.items()}
    out = fn(ins[0], ins[1], ins[2], BlockGRUWeights(*ins[3:]), **gin, **kw)
    leaves = ins + [t for t in gin.values() if t is not None]
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("names", GIVEN, ids="+".join)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: "B{}_D{}_G{}_K{}_SC{}_A{}".format(*s))
def test_given_branches_match_the_reference(shape, names, dtype):
    """A branch the caller computed is read, not recomputed: the output and every gradient (the given inputs' too,
    in their dtype; zeros for a weight or input the step then does not read) as reference.step with the same x0p,
    x1p, x2, at the fp32 tolerances (bf16 weights and given inputs: compared on the same values upcast)."""
    deter, stoch, action, w, dout = make_case(*shape, dtype=dtype, seed=sum(shape) + 3)
    given = given_case(deter, stoch, action, w, names, seed=sum(shape), dtype=dtype)
    out, grads = grads_given(fused.step, deter, stoch, action, w, given, dout)
    up = {n: None if t is None else t.float() for n, t in given.items()}
    ref, ref_grads = grads_given(reference.step, deter, stoch, action, w, up, dout, upcast=True)
    # The noise on the given inputs moves the output far past the tolerance: the kernel reads them.
    plain = reference.step(deter, stoch, action, BlockGRUWeights(*(t.float() for t in w)))
    assert (plain - ref).abs().max() > 100 * OUT_TOL["atol"]
    torch.testing.assert_close(out, ref, **OUT_TOL)
    ins = (deter, stoch, action, *w, *(t for t in given.values() if t is not None))
    for name, g, rg, t in zip((*NAMES, *names), grads, ref_grads, ins, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        tol = BF16_WEIGHT_GRAD_TOL if t.dtype == torch.bfloat16 else GRAD_TOL
        torch.testing.assert_close(g.float(), rg, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    unread = {"x0p": "w0", "x1p": "w1", "x2": "w2"}
    for n in names:  # the products' weights and the whole action branch are not read: exactly zero
        assert not grads[NAMES.index(unread[n])].any(), unread[n]
    assert ("x1p" not in names) == bool(grads[1].any()) and ("x2" not in names) == bool(grads[2].any())


@pytest.mark.parametrize("names", [("x0p", "x1p", "x2"), ("x0p", "x1p")], ids="+".join)
def test_given_branches_in_bf16_compute(names, monkeypatch):
    """The same under bf16 compute (what the switch runs under bf16 autocast), against the pinned bf16 spec."""
    deter, stoch, action, w, dout = make_case(*SHAPES[3], seed=31)
    given = given_case(deter, stoch, action, w, names, seed=32)
    _, saved = fused.forward(deter, stoch, action, w, save=True, bf16=True, **given)
    kernel = {"x": saved[1], "h": saved[3]}
    monkeypatch.setattr(reference, "_pin", lambda name, t: t + (kernel[name] - t).detach())
    out, grads = grads_given(fused.step, deter, stoch, action, w, given, dout, bf16=True)
    ref, ref_grads = grads_given(reference.step, deter, stoch, action, w, given, dout, bf16=True)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg in zip((*NAMES, *names), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("names", [(), ("x0p", "x1p"), ("x0p", "x1p", "x2")], ids=lambda n: "+".join(n) or "none")
def test_tapped_step_with_given_branches_matches_the_reference(names):
    """Deferred weight gradients (taps) with given branches, as the fast modes' observe loop runs the Triton core:
    the output, each site's factor, each tap's gradient (its site's per-row gradient) and the gradients of the
    inputs and the given branches as reference.step's with the same taps; no tap at the action branch's sites when
    x2 is given (a step given one there is refused)."""
    deter, stoch, action, w, dout = make_case(*SHAPES[1], seed=41)
    given = given_case(deter, stoch, action, w, names, seed=42)
    widths = reference.tap_widths(w)
    sites = fused.tap_sites("x2" in names)

    def run(fn):
        ins = [t.clone().requires_grad_() for t in (deter, stoch, action)]
        gin = {n: None if t is None else t.clone().requires_grad_() for n, t in given.items()}
        taps = {s: torch.zeros(deter.shape[0], widths[s], device=DEVICE, requires_grad=True) for s in sites}
        out, seen = fn(*ins, w, taps=taps, **gin)
        leaves = [*ins, *(t for t in gin.values() if t is not None), *taps.values()]
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        return out, seen, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]

    out, seen, grads = run(fused.step)
    ref, ref_seen, ref_grads = run(reference.step)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    assert sorted(seen) == sorted(ref_seen) == sorted(sites)
    for s in sites:
        want = ref_seen[s].reshape(seen[s].shape)
        torch.testing.assert_close(seen[s], want, **OUT_TOL, msg=lambda m, s=s: f"factor of {s}: {m}")
    for name, g, rg in zip(("deter", "stoch", "action", *names, *sites), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    if "x2" in names:
        taps = {s: torch.zeros(deter.shape[0], widths[s], device=DEVICE) for s in reference.TAP_SITES}
        with pytest.raises(ValueError, match="taps at .* expected the sites"):
            fused.step(deter, stoch, action, w, taps=taps, **given)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16compute"])
@pytest.mark.parametrize("names", [("x2",), ("x0p", "x1p", "x2")], ids="+".join)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_D{}_G{}_K{}_SC{}_A{}".format(*s))
def test_packed_factors_are_the_reference_factors(shape, names, bf16, monkeypatch):
    """With x2 the tapped step's kernels write the factors of reference.PACKED_SITES themselves (packed=True; the
    fast observe loop records them as they are): every element written (the buffer starts as NaN), equal to the
    factors computed from the saved activations in torch (fused._seen without them), and to reference.step's
    factors packed (reference.pack_factors), those rounded to bf16 that the bf16 compute's dots read rounded (x, h),
    with the spec's x and h pinned to the kernel's."""
    deter, stoch, action, w, _ = make_case(*shape, seed=sum(shape) + 7)
    given = given_case(deter, stoch, action, w, names, seed=sum(shape) + 8)
    sites = fused.tap_sites(True)
    widths = reference.tap_widths(w)
    taps = {s: torch.zeros(deter.shape[0], widths[s], device=DEVICE) for s in sites}
    out, seen, fac = fused.step(deter, stoch, action, w, bf16=bf16, taps=taps, packed=True, **given)
    assert fac.shape == (deter.shape[0], sum(reference.packed_widths(w).values())) and fac.isfinite().all()
    # The same factors from the saved activations, in torch.
    _, saved = fused.forward(deter, stoch, action, w, save=True, bf16=bf16, **given)
    plain = fused._seen(deter, stoch, action, saved, w.wh.shape[0], bf16, fused.modes(*given.values()))
    torch.testing.assert_close(fac, reference.pack_factors(plain), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference.pack_factors(seen), fac, atol=0, rtol=0)  # seen's are views of fac
    # The spec's.
    kernel = {"x": saved[1], "h": saved[3]}
    if bf16:
        monkeypatch.setattr(reference, "_pin", lambda name, t: t + (kernel[name] - t).detach())
    ref, ref_seen = reference.step(deter, stoch, action, w, bf16=bf16, taps=taps, **given)
    want = reference.pack_factors(ref_seen)
    if bf16:
        K, D = w.w0.shape[1], deter.shape[1]
        rounded = torch.zeros(want.shape[1], dtype=torch.bool, device=DEVICE)
        rounded[2 * K : 5 * K] = rounded[5 * K + D :] = True
        want = torch.where(rounded, want.bfloat16().float(), want)
        assert (want != reference.pack_factors(ref_seen)).any()  # the rounding shows at these shapes
    torch.testing.assert_close(fac, want, **OUT_TOL)
    torch.testing.assert_close(out, ref, **OUT_TOL)


def test_packed_factors_under_either_implementation_and_bad_requests():
    """The switch's packed=True gives reference.pack_factors of the step's factors under the torch core too, and a
    request without taps or without x2 is refused (the packed layout has no action branch sites)."""
    deter, stoch, action, w, _ = make_case(*SHAPES[1], seed=51)
    given = given_case(deter, stoch, action, w, ("x2",), seed=52)
    widths = reference.tap_widths(w)
    taps = {s: torch.zeros(deter.shape[0], widths[s], device=DEVICE) for s in fused.tap_sites(True)}
    got = {}
    for impl in block_gru.IMPLS:
        assert block_gru.set_impl(impl) == impl
        out, seen, packed = block_gru.step(deter, stoch, action, w, taps=taps, packed=True, **given)
        torch.testing.assert_close(packed, reference.pack_factors(seen), atol=0, rtol=0)
        got[impl] = out, packed
        with pytest.raises(ValueError, match="packed factors are for a tapped step"):
            block_gru.step(deter, stoch, action, w, taps=taps, packed=True)
        with pytest.raises(ValueError, match="packed factors are for a tapped step"):
            block_gru.step(deter, stoch, action, w, packed=True, **given)
    for a, b in zip(got["triton"], got["torch"], strict=True):
        torch.testing.assert_close(a, b, **OUT_TOL)
    with pytest.raises(ValueError, match="packed factors are for a tapped step"):
        fused.step(deter, stoch, action, w, taps=taps, packed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tapped", [False, True], ids=["train", "tapped"])
def test_first_zeroes_the_given_products_on_its_rows(tapped, dtype):
    """first (the observe loop's is_first): x0p and x1p count as zero on its rows. The tapped kernels apply it as they
    read them and write the products' gradients masked, in their dtype (the other paths mask in torch): output,
    factors, every tap's gradient and the gradients of the inputs and the given branches as reference.step's with the
    same first; the products' gradients exactly zero on the first rows, and the result differs from the unmasked
    step's there (so a kernel that ignored first fails)."""
    deter, stoch, action, w, dout = make_case(*SHAPES[3], seed=61)
    names = ("x0p", "x1p", "x2")
    given = given_case(deter, stoch, action, w, names, seed=62, dtype=dtype)
    # A column of a (B, T) mask, as the observe loop's steps take it: strided.
    first = torch.tensor([[i % 3 == 1, i % 2 == 0] for i in range(deter.shape[0])], device=DEVICE)[:, 0]
    assert first.stride(0) == 2
    widths = reference.tap_widths(w)
    sites = fused.tap_sites(True)

    def run(fn, first):
        ins = [t.clone().requires_grad_() for t in (deter,)]
        gin = {n: t.clone().requires_grad_() for n, t in given.items()}
        kw = {"first": first}
        taps = {}
        if tapped:
            taps = {s: torch.zeros(deter.shape[0], widths[s], device=DEVICE, requires_grad=True) for s in sites}
            kw["taps"] = taps
        out = fn(ins[0], stoch, action, w, **gin, **kw)
        out, seen = out if tapped else (out, {})
        leaves = [*ins, *gin.values(), *taps.values()]
        grads = torch.autograd.grad(out, leaves, dout)
        return out, seen, grads

    out, seen, grads = run(fused.step, first)
    ref, ref_seen, ref_grads = run(reference.step, first)
    plain, _, _ = run(fused.step, None)
    rows = first.nonzero()[:, 0]
    assert (plain[rows] - ref[rows]).abs().max() > 100 * OUT_TOL["atol"]
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for s in seen:
        torch.testing.assert_close(seen[s], ref_seen[s].reshape(seen[s].shape), **OUT_TOL, msg=lambda m, s=s: s)
    for name, g, rg in zip(("deter", *names, *(sites if tapped else ())), grads, ref_grads, strict=True):
        want_dtype = given[name].dtype if name in given else torch.float32
        assert g.dtype == want_dtype, name
        tol = BF16_WEIGHT_GRAD_TOL if g.dtype == torch.bfloat16 else GRAD_TOL
        torch.testing.assert_close(g.float(), rg.float(), **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    for g in grads[1:3]:  # x0p's and x1p's
        assert not g[rows].any() and g[first.logical_not()].abs().sum() > 0


def test_bad_first_raises_value_error_naming_the_shape():
    deter, stoch, action, w, _ = make_case(*SHAPES[1], seed=63)
    given = given_case(deter, stoch, action, w, ("x0p", "x1p"), seed=64)
    for bad in (torch.zeros(deter.shape[0] + 1, dtype=torch.bool), torch.zeros(deter.shape[0])):
        for step in (fused.step, reference.step):
            with pytest.raises(ValueError, match=r"first must be \(3,\) bool"):
                step(deter, stoch, action, w, first=bad.to(DEVICE), **given)


def test_gradients_flow_when_only_the_state_requires_grad():
    deter, stoch, action, w, dout = make_case(3, 24, 4, 20, 15, 6, seed=1)
    d = deter.clone().requires_grad_()
    (g,) = torch.autograd.grad(fused.step(d, stoch, action, w), d, dout)
    d2 = deter.clone().requires_grad_()
    (rg,) = torch.autograd.grad(reference.step(d2, stoch, action, w), d2, dout)
    torch.testing.assert_close(g, rg, **GRAD_TOL)


def test_bf16_inputs_get_bf16_grads_matching_the_reference():
    deter, stoch, action, w, dout = make_case(3, 40, 8, 12, 100, 3, seed=9)
    deter, stoch, action = deter.bfloat16(), stoch.bfloat16(), action.bfloat16()
    out, grads = grads_of(fused.step, deter, stoch, action, w, dout)
    ref, ref_grads = grads_of(reference.step, deter, stoch, action, w, dout)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.dtype == rg.dtype, name
        # Both sides round the same fp32 grad to bf16 for deter/stoch/action: allow one bf16 ulp between them.
        tol = {"atol": 1e-4, "rtol": 8e-3} if g.dtype == torch.bfloat16 else GRAD_TOL
        torch.testing.assert_close(g.float(), rg.float(), **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_step_without_grad_matches_reference():
    deter, stoch, action, w, _ = make_case(3, 40, 8, 12, 32, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            fused.step(deter, stoch, action, w), reference.step(deter, stoch, action, w), **OUT_TOL
        )


def test_step_with_its_backward_and_rollout_compile_as_one_graph():
    """The RSSM's world-model step is compiled: the fused core must trace without graph breaks (fullgraph) and give
    the same numbers. aot_eager runs the custom ops' fake implementations, forward and backward, like inductor."""
    deter, stoch, action, w, dout = make_case(3, 24, 4, 20, 15, 6, seed=10)
    torch._dynamo.reset()
    out, grads = grads_of(torch.compile(fused.step, backend="aot_eager", fullgraph=True), deter, stoch, action, w, dout)
    ref, ref_grads = grads_of(reference.step, deter, stoch, action, w, dout)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    seq = torch.stack([stoch, 0.5 * stoch], 1), torch.stack([action, -action], 1)  # (B, 2, S*C), (B, 2, A)
    roll = torch.compile(fused.rollout, backend="aot_eager", fullgraph=True)(deter, *seq, w)
    torch.testing.assert_close(roll, reference.rollout(deter, *seq, w), **OUT_TOL)


def test_step_with_given_branches_and_taps_compiles_as_one_graph():
    """The observe loop's compiled step with the Triton core: given branches (optional arguments of the custom ops)
    and taps trace without graph breaks and give the eager numbers and gradients."""
    deter, stoch, action, w, dout = make_case(3, 24, 4, 20, 15, 6, seed=12)
    given = given_case(deter, stoch, action, w, GIVEN_NAMES, seed=13)
    widths = reference.tap_widths(w)

    def run(fn):
        gin = {n: t.clone().requires_grad_() for n, t in given.items()}
        taps = {s: torch.zeros(3, widths[s], device=DEVICE, requires_grad=True) for s in fused.tap_sites(True)}
        out, seen = fn(deter, stoch, action, w, taps=taps, **gin)
        grads = torch.autograd.grad(out, [*gin.values(), *taps.values()], dout)
        return [out, *seen.values(), *grads]

    torch._dynamo.reset()
    got = run(torch.compile(fused.step, backend="aot_eager", fullgraph=True))
    for a, b in zip(got, run(fused.step), strict=True):
        torch.testing.assert_close(a, b, **OUT_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs CUDA")
def test_step_and_its_backward_replay_in_a_cuda_graph():
    deter, stoch, action, w, dout = make_case(16, 40, 8, 12, 100, 3, seed=11)
    ins = [t.clone().requires_grad_() for t in (deter, stoch, action, *w)]

    def run():
        out = fused.step(ins[0], ins[1], ins[2], BlockGRUWeights(*ins[3:]))
        return (out, *torch.autograd.grad(out, ins, dout))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    new_deter = make_case(16, 40, 8, 12, 100, 3, seed=12)[0]
    with torch.no_grad():
        ins[0].copy_(new_deter)
    graph.replay()
    ref, ref_grads = grads_of(reference.step, new_deter, stoch, action, w, dout)
    torch.testing.assert_close(static[0], ref, **OUT_TOL)
    for name, g, rg in zip(NAMES, static[1:], ref_grads):
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="batch 1000 is too slow for the interpreter")
def test_bf16_compute_on_tensor_cores_at_batch_1000_and_12m_widths(monkeypatch):
    """The imagination's shape in bf16 compute: the forward's dots on the tensor cores (GPU only). Weight grads sum
    1000 rows, hence the B = 1000 tolerance of the fp32 test."""
    deter, stoch, action, w, dout = make_case(1000, 2048, 8, 256, 512, 6, seed=15)
    check_bf16_compute(deter, stoch, action, w, dout, monkeypatch, {"atol": 3e-3, "rtol": 1e-4})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="batch 1000 is too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_matches_reference_at_batch_1000_and_12m_widths(dtype):
    deter, stoch, action, w, dout = make_case(1000, 2048, 8, 256, 512, 6, dtype=dtype, seed=3)
    out, grads = grads_of(fused.step, deter, stoch, action, w, dout)
    ref, ref_grads = grads_of(reference.step, deter, stoch, action, w, dout, upcast=True)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg, t in zip(NAMES, grads, ref_grads, (deter, stoch, action, *w)):
        # Weight grads here sum 1000 rows: allow the fp32 rounding of that many terms (sqrt(1000) x the base).
        tol = BF16_WEIGHT_GRAD_TOL if t.dtype == torch.bfloat16 else {"atol": 3e-3, "rtol": 1e-4}
        torch.testing.assert_close(g.float(), rg, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rollout_matches_reference_rollout(dtype):
    B, T, D, G, K, SC, A = 3, 4, 24, 4, 20, 15, 6
    deter, _, _, w, _ = make_case(B, D, G, K, SC, A, dtype=dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    stoch = torch.randn(B, T, SC, generator=gen).to(DEVICE)
    action = torch.randn(B, T, A, generator=gen).to(DEVICE)
    out = fused.rollout(deter, stoch, action, w)
    ref = reference.rollout(deter, stoch, action, BlockGRUWeights(*(t.float() for t in w)))
    assert out.shape == (B, T, D)
    torch.testing.assert_close(out, ref, **OUT_TOL)  # errors do not grow: each step is a contraction mix


def test_switch_dispatches_to_the_fused_kernels(monkeypatch):
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=6)
    calls = []
    for name in ("step", "rollout"):  # count the calls that reach the fused entries
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    assert block_gru.set_impl("triton") == "triton"
    with torch.no_grad():
        torch.testing.assert_close(
            block_gru.step(deter, stoch, action, w), reference.step(deter, stoch, action, w), **OUT_TOL
        )
        block_gru.rollout(deter, stoch[:, None], action[:, None], w)
    assert calls == ["step", "rollout"]
    block_gru.set_impl("torch")
    block_gru.step(deter, stoch, action, w)
    assert calls == ["step", "rollout"]


def test_rollout_is_no_grad_under_either_implementation():
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=9)
    deter.requires_grad_()
    for impl in block_gru.IMPLS:
        block_gru.set_impl(impl)
        assert not block_gru.rollout(deter, stoch[:, None], action[:, None], w).requires_grad, impl


def test_set_impl_without_triton_installed_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with caplog.at_level(logging.WARNING, logger="fastdreamer"):
        assert block_gru.set_impl("triton") == "torch"
    assert len(caplog.records) == 1 and "triton is not installed" in caplog.records[0].getMessage()


def test_backward_reads_inputs_of_any_row_stride():
    """Inputs that are column slices of wider buffers (row stride > width), as the RSSM's slices of concatenated
    features can be: the kernels take them without a copy, and the gradients land in the right columns."""
    B, D, G, K, SC, A = 5, 24, 4, 20, 15, 6
    deter, stoch, action, w, dout = make_case(B, D, G, K, SC, A, seed=21)
    gen = torch.Generator().manual_seed(22)
    wide = [torch.randn(B, n + 9, generator=gen).to(DEVICE) for n in (D, SC, A)]
    for buf, t in zip(wide, (deter, stoch, action)):
        buf[:, : t.shape[1]] = t

    def run(fn):
        bufs = [b.clone().requires_grad_() for b in wide]
        ws = [t.clone().requires_grad_() for t in w]
        views = [b[:, : t.shape[1]] for b, t in zip(bufs, (deter, stoch, action))]
        assert all(v.stride(0) == v.shape[1] + 9 for v in views)
        out = fn(*views, BlockGRUWeights(*ws))
        return out, torch.autograd.grad(out, bufs + ws, dout)

    out, grads = run(fused.step)
    ref, ref_grads = run(reference.step)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
        if name in ("deter", "stoch", "action"):
            assert (g[:, -9:] == 0).all(), name  # nothing lands in the columns the view leaves out


def test_set_impl_falls_back_to_torch_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="fastdreamer"):
        assert block_gru.set_impl("triton") == "torch"
    assert block_gru.get_impl() == "torch"
    assert len(caplog.records) == 1 and "using the torch reference" in caplog.records[0].getMessage()


def test_set_impl_falls_back_for_a_cpu_run_on_a_cuda_machine(monkeypatch, caplog):
    """`--device cpu --gru-impl triton` on a machine with a GPU: the kernels cannot take CPU tensors (without the
    interpreter), so the switch falls back at start instead of failing at the first step."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="fastdreamer"):
        assert block_gru.set_impl("triton", "cpu") == "torch"
    assert len(caplog.records) == 1 and "the run is on cpu" in caplog.records[0].getMessage()
    assert block_gru.set_impl("triton", "cuda") == "triton"


def _bad(kind):
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=7)
    if kind == "batch":
        stoch = stoch[:2]
    elif kind == "blocks":
        deter = torch.cat([deter, deter[:, :2]], 1)  # D = 26 with 4 blocks
    elif kind == "weight_shape":
        w = w._replace(wg=w.wg[:, :, :-1])
    elif kind == "non_contiguous":
        w = w._replace(w0=w.w0.t().contiguous().t())  # right shape, transposed strides
    elif kind == "float64":
        w = BlockGRUWeights(*(t.double() for t in w))
    elif kind == "mixed_dtypes":
        w = w._replace(wh=w.wh.bfloat16())
    elif kind == "int_action":
        action = action.long()
    elif kind == "no_action":
        action = None
    elif kind == "zero_batch":
        deter, stoch, action = deter[:0], stoch[:0], action[:0]
    elif kind == "zero_action":  # the fused backward would leave that branch's gradients unwritten
        action, w = action[:, :0], w._replace(w2=w.w2[:0])
    elif kind == "zero_stoch":
        stoch, w = stoch[:, :0], w._replace(w1=w.w1[:0])
    return deter, stoch, action, w


@pytest.mark.parametrize(
    "kind, match",
    [
        ("batch", r"mismatched batch: deter \(3, 24\), stoch \(2, 15\)"),
        ("blocks", r"deter 26 is not divisible by 4 blocks"),
        ("weight_shape", r"weight wg has shape \(4, 6, 17\), expected \(4, 6, 18\)"),
        ("non_contiguous", r"weight w0 \(24, 20\) with stride \(1, 24\) is not contiguous"),
        ("float64", r"weights must share one dtype"),
        ("mixed_dtypes", r"weights must share one dtype"),
        ("int_action", r"action \(3, 6\) has dtype torch.int64"),
        ("no_action", r"must be tensors, got \['Tensor', 'Tensor', 'NoneType'\]"),
        ("zero_batch", r"batch and widths must be >= 1: deter \(0, 24\)"),
        ("zero_action", r"batch and widths must be >= 1: .*action \(3, 0\)"),
        ("zero_stoch", r"batch and widths must be >= 1: .*stoch \(3, 0\)"),
    ],
)
def test_unsupported_inputs_raise_value_error_naming_the_shape(kind, match):
    deter, stoch, action, w = _bad(kind)
    with pytest.raises(ValueError, match=match):
        fused.step(deter, stoch, action, w)


@pytest.mark.parametrize(
    "given, match",
    [
        ({"x0p": torch.zeros(3, 19)}, r"x0p must be \(3, 20\) of one of .*, got \(3, 19\) torch.float32"),
        ({"x2": torch.zeros(3, 20, dtype=torch.float64)}, r"x2 must be \(3, 20\) .*got \(3, 20\) torch.float64"),
        ({"x1p": [0.0]}, r"x1p must be \(3, 20\) .*got list"),
    ],
)
def test_bad_given_branches_raise_value_error_naming_the_shape(given, match):
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=7)
    given = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in given.items()}
    with pytest.raises(ValueError, match=match):
        fused.step(deter, stoch, action, w, **given)


def test_cpu_tensors_without_the_interpreter_raise_value_error(monkeypatch):
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=13)
    deter, stoch, action, w = deter.cpu(), stoch.cpu(), action.cpu(), BlockGRUWeights(*(t.cpu() for t in w))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"deter \(3, 24\) is on cpu; the kernels need CUDA"):
        fused.step(deter, stoch, action, w)


def test_rollout_rejects_mismatched_sequences():
    deter, stoch, action, w, _ = make_case(3, 24, 4, 20, 15, 6, seed=8)
    with pytest.raises(ValueError, match=r"got \(3, 2, 15\), \(3, 3, 6\)"):
        fused.rollout(deter, stoch[:, None].expand(3, 2, 15), action[:, None].expand(3, 3, 6), w)
    with pytest.raises(ValueError, match=r"no steps: stoch \(3, 0, 15\)"):
        fused.rollout(deter, stoch[:, None, :][:, :0], action[:, None, :][:, :0], w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile every kernel natively")
def test_kernels_compile_for_sm90_and_fit_in_a100_shared_memory():
    """The interpreter never lowers the kernels; compile them for sm_90 here so lowering errors show without a GPU.
    Shared memory must fit an A100's 163 KiB per block (H100/H200 have 227 KiB), at the widest tiles. fp32 weights
    only (the larger tiles; ~30 s uncached on 2 cores): run the script with bf16 by hand after changing a kernel."""
    script = os.path.join(os.path.dirname(__file__), "compile_block_gru_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, script, "fp32"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 26 and all(v <= 163 * 1024 for v in shared.values()), shared
