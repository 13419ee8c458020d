"""Deferred weight gradients (fastdreamer/defer.py) against the per-step autograd path they replace: the same forward,
bitwise, and the same gradients up to summation order (float32) or the per-step path's bf16 roundings (bf16)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from counting import MatmulCount
from fastdreamer.kernels import block_gru

from fastdreamer import defer
from fastdreamer.rssm import RSSM

# float32: both paths sum the same B*T products, autograd per step then across steps, defer in one matmul: they
# differ by reassociation only, ~T * 2^-24 relative at worst; seen <= 1.5e-7 on these shapes.
GRAD_REL = 1e-5
# bf16 autocast, weights of bf16 matmuls (and the posterior's F.linear biases, whose gradient autocast also sums in
# bf16): the per-step path rounds each step's weight gradient to bf16 (2^-9 relative per element) before summing the
# steps in float32; defer multiplies the same bf16 operands and sums all rows in float32, without those roundings.
# So they differ by about one bf16 rounding: seen <= 1.8e-3 on these shapes; bound 2^-8.
BF16_REL = 2**-8
# The Triton core under bf16 autocast, with a branch given by the caller (hoist_action's x2, merge_deter's x0p and
# x1p) against the same core computing it: the kernel sums a branch's bf16 product in float32 (block_gru's bf16
# compute), the caller's matmul under autocast rounds that product to bf16 (2^-9 relative per element), as the torch
# core's own matmul does. So the two differ by one bf16 rounding of the branch's pre-activation, carried through the
# norms and the recurrence: deters and log-probs within GIVEN_BF16_REL in norm (seen <= 1.7e-4 and 8.0e-4 with
# hoist_action; bound 2^-8), gradients as MERGE_BF16_RATIO and MERGE_BF16_REL (below) say. A wrong column, mask or
# bias of the given branch moves them by O(1).
GIVEN_BF16_REL = 2**-8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_taps_give_every_kind_its_gradient():
    """A toy recurrent loop with one site of each kind (no weight square, so a transposed layout shows), float32:
    the parameters' gradients from the taps equal autograd's per-step ones; a site whose value a step does not use
    counts as zero there, and so does a whole step that nothing depends on (the last one)."""
    B, T, NI, NO, NL, G = 5, 6, 4, 8, 10, 2
    gen = torch.Generator().manual_seed(0)
    p = {
        "w": torch.randn(NI, NO, generator=gen),
        "b": torch.randn(NO, generator=gen),
        "lw": torch.randn(NL, NO, generator=gen),
        "lb": torch.randn(NL, generator=gen),
        "bw": torch.randn(G, NL // G, NI // G, generator=gen),
        "s": torch.randn(NI, generator=gen),
    }
    p = {k: v.requires_grad_() for k, v in p.items()}
    xs = torch.randn(T, B, NI, generator=gen)
    sites = {
        "mm": defer.Site("mm", ("w", "b"), NO),
        "lin": defer.Site("linear", ("lw", "lb"), NL),
        "blk": defer.Site("block", ("bw",), NI),
        "sc": defer.Site("scale", ("s",), NI),
    }

    def loop(w, taps=None, record=None):
        h = torch.zeros(B, NI)
        total = 0.0
        for t in range(T):
            tap = taps[t] if taps else dict.fromkeys(sites, 0.0)
            seen = {}
            a = xs[t] + h
            seen["mm"] = a
            y = a @ w["w"] + w["b"] + tap["mm"]
            seen["lin"] = y
            z = torch.tanh(F.linear(y, w["lw"], w["lb"]) + tap["lin"])
            zb = z.view(B, G, NL // G)
            seen["blk"] = zb
            k = torch.einsum("bgi,gio->bgo", zb, w["bw"]).reshape(B, NI) + tap["blk"]
            seen["sc"] = k
            h = torch.sin(k * w["s"] + tap["sc"]) if t % 3 else torch.sin(k)  # s unused at t = 0, 3
            if t < T - 1:  # the last step feeds nothing: its taps get no gradient at all
                total = total + (h * (t + 1)).square().sum()
            if record is not None:
                record.append(defer.pack(seen, sites))
        return total

    loop(p).backward()
    want = {k: v.grad.clone() for k, v in p.items()}
    for v in p.values():
        v.grad = None
    record = defer.Record()
    taps = defer.taps(sites, p, T, B, record)
    loop({k: v.detach() for k, v in p.items()}, taps, record).backward()
    for k, v in p.items():
        assert v.grad is not None, f"no gradient for {k}"
        assert rel(v.grad, want[k]) < GRAD_REL, f"{k}: relative error {rel(v.grad, want[k])}"


def test_taps_refuse_a_parameter_at_two_sites_and_unknown_kinds():
    w = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="more than one site"):
        defer.taps({"a": defer.Site("mm", ("w",), 3), "b": defer.Site("mm", ("w",), 3)}, {"w": w}, 2, 1, defer.Record())
    with pytest.raises(ValueError, match="kind 'conv'"):
        defer.taps({"a": defer.Site("conv", ("w",), 3)}, {"w": w}, 2, 1, defer.Record())
    with pytest.raises(ValueError, match="kind 'scale'"):
        defer.taps({"a": defer.Site("scale", ("w", "w2"), 3)}, {"w": w, "w2": w}, 2, 1, defer.Record())


def observe_inputs(B=3, T=6, E=10, A=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, 24, generator=gen),
        F.one_hot(torch.randint(0, 4, (B, 3), generator=gen), 4).float(),
        torch.randn(B, T, E, generator=gen),
        torch.randn(B, T, A, generator=gen),
        torch.rand(B, T, generator=gen) < 0.2,
    ), torch.randn(B, T, 3, 4, generator=gen)


def make_rssm(obslayers=2):
    torch.manual_seed(0)
    return RSSM(10, 2, deter=24, hidden=8, stoch=3, classes=4, blocks=4, obslayers=obslayers)


def run_observe(rssm, inputs, weights, precision):
    for q in rssm.parameters():
        q.grad = None
    ctx = torch.autocast("cpu", torch.bfloat16, cache_enabled=False) if precision == "bf16" else None
    torch.manual_seed(2)
    with ctx or contextlib.nullcontext():
        deters, stochs, logps = rssm.observe(*inputs)
        loss = deters.float().square().mean() + (logps * weights).sum() + (stochs * weights).sum()
    loss.backward()
    return (deters, stochs, logps), {n: q.grad.clone() for n, q in rssm.named_parameters() if q.grad is not None}


interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
IMPLS = ["torch", pytest.param("triton", marks=interpreter)]


@pytest.fixture
def core(request):
    """The core implementation of a test parametrized over IMPLS (indirect), selected for the test, then torch."""
    assert block_gru.set_impl(request.param) == request.param
    yield request.param
    block_gru.set_impl("torch")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interpreter)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_observe_with_defer_matches_the_per_step_observe(precision, impl):
    """The world model's observe loop as the fast modes run it (defer on) against eager's per-step path (defer and
    fan_out off), with either core: deters, latents and log-probs bitwise; every parameter gets a gradient, float32,
    within GRAD_REL in float32; under bf16 autocast the weights (and F.linear biases) of autocast's bf16 matmuls
    within BF16_REL, everything else within GRAD_REL (the Triton core multiplies bf16 operands in float32 in both
    paths, so its weights are held to GRAD_REL too)."""
    inputs, weights = observe_inputs()
    rssm = make_rssm()
    assert block_gru.set_impl(impl) == impl
    try:
        rssm.defer = True
        got, got_grads = run_observe(rssm, inputs, weights, precision)
        rssm.defer = False
        want, want_grads = run_observe(rssm, inputs, weights, precision)
    finally:
        block_gru.set_impl("torch")
    for name, g, w in zip(("deters", "stochs", "logps"), got, want, strict=True):
        assert torch.equal(g, w), f"{name} differ"
    assert sorted(got_grads) == sorted(want_grads)
    assert set(rssm.step_params()) <= set(got_grads)
    bf16_matmul = set()
    if precision == "bf16":
        assert block_gru.set_impl(impl) == impl
        try:
            with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
                bf16_matmul = set(rssm.step_dtypes(torch.device("cpu"))) & set(rssm.step_params())
        finally:
            block_gru.set_impl("torch")
        # Three F.linear weights and biases, and with the torch core its five matmul weights.
        assert len(bf16_matmul) == (11 if impl == "torch" else 6)
    for name, g in got_grads.items():
        assert g.dtype == torch.float32, name
        tol = BF16_REL if name in bf16_matmul else GRAD_REL
        assert rel(g, want_grads[name]) < tol, f"gradient of {name}: relative error {rel(g, want_grads[name])}"


@pytest.mark.parametrize("core", IMPLS, indirect=True)
@pytest.mark.parametrize("defer_on", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_observe_with_the_action_branch_hoisted_matches_the_per_step_observe(precision, defer_on, core):
    """hoist_action (the fast modes' observe, either core) against the plain loop, alone and under defer: the same
    latents; deters and log-probs within 1e-5 relative (the branch's matmul over all B*T rows sums in another order;
    in fp32 seen 1.2e-7 and 2.4e-7 absolute here, bitwise in bf16); every parameter, the branch's included, gets a
    gradient within GRAD_REL, or BF16_REL for the weights of bf16 matmuls under bf16 autocast (seen 2.1e-3: the
    hoisted branch's weight gradient is one bf16 matmul over all rows, the per-step path's a float32 sum of per-step
    bf16 ones)."""
    inputs, weights = observe_inputs()
    rssm = make_rssm()
    rssm.defer = defer_on
    rssm.hoist_action = True
    got, got_grads = run_observe(rssm, inputs, weights, precision)
    rssm.defer = rssm.hoist_action = False
    want, want_grads = run_observe(rssm, inputs, weights, precision)
    assert torch.equal(got[1], want[1]), "latents differ"
    assert sorted(got_grads) == sorted(want_grads)
    assert {"core.w2", "core.b2", "core.s2"} | set(rssm.step_params()) <= set(got_grads)
    if precision == "bf16" and core == "triton":
        assert_given_bf16_close(rssm, inputs, weights, got, got_grads, want, want_grads)
        return
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"deters: {m}")
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6, msg=lambda m: f"log-probs: {m}")
    bf16_matmul = set()
    if precision == "bf16":
        with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
            bf16_matmul = set(rssm.step_dtypes(torch.device("cpu")))
    for name, g in got_grads.items():
        tol = BF16_REL if name in bf16_matmul else GRAD_REL
        assert rel(g, want_grads[name]) < tol, f"gradient of {name}: relative error {rel(g, want_grads[name])}"


def assert_given_bf16_close(rssm, inputs, weights, got, got_grads, want, want_grads):
    """The Triton core's observe under bf16 autocast with branches given (got) against the loop computing them in
    the core (want, the flags off, defer too): GIVEN_BF16_REL for deters and log-probs; each gradient within
    MERGE_BF16_REL of want's, and all together at most MERGE_BF16_RATIO times as far from the float32 plain loop's
    as want's are."""
    for i, name in ((0, "deters"), (2, "log-probs")):
        assert rel(got[i], want[i]) < GIVEN_BF16_REL, f"{name}: relative error {rel(got[i], want[i])}"
    for name, g in got_grads.items():
        assert rel(g, want_grads[name]) < MERGE_BF16_REL, f"gradient of {name}: {rel(g, want_grads[name])}"
    flags = {k: getattr(rssm, k) for k in ("defer", "hoist_action", "merge_deter", "emit_copies")}
    for k in flags:
        setattr(rssm, k, False)
    _, ref = run_observe(rssm, inputs, weights, "fp32")
    for k, v in flags.items():
        setattr(rssm, k, v)
    names = sorted(ref)

    def dist(grads):
        return rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([ref[n].flatten() for n in names]))

    assert dist(got_grads) <= MERGE_BF16_RATIO * dist(want_grads), (dist(got_grads), dist(want_grads))


# bf16 autocast, merge_deter against the unmerged loop: the posterior's first pre-activation is the sum of two bf16
# products (deter's part and the hoisted token part, each rounded) instead of one rounded product, and deter's
# gradient from its two uses is one bf16 matmul instead of two: bf16 roundings in other places. So under bf16 the
# merged loop is held to the unmerged one's own distance from the float32 loop: all gradients together (parameters,
# tokens, initial state), relative in norm, at most MERGE_BF16_RATIO times as far (seen 9.33e-3 against 9.27e-3);
# and each gradient within MERGE_BF16_REL of the unmerged bf16 one (seen <= 2.7e-2 at these tiny shapes, where norms
# over 8 units and bias gradients with cancellation amplify roundings; the fast-mode tests' bf16 bound,
# tests/test_fast.py GRAD_REL_TOL), far below the O(1) error of a wrong column, mask or bias.
MERGE_BF16_RATIO = 1.5
MERGE_BF16_REL = 0.1


@pytest.mark.parametrize("core", IMPLS, indirect=True)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_observe_with_the_deter_matmul_merged_matches_the_unmerged_observe(precision, core):
    """merge_deter (the fast modes' observe under defer, either core) against the same loop without it and against the
    plain loop, gradients of the parameters, the tokens and the initial deter. float32: the same latents, deters and
    log-probs within 1e-5 (the merged matmul and the hoisted token part sum in another order; seen 1.5e-8 and
    7.2e-7), every gradient within GRAD_REL of the plain loop's (seen 1.1e-6). bf16: the same latents and deters (the
    w0 part of the merged product rounds as the torch core's own matmul; the Triton core's sums it unrounded, so its
    deters are GIVEN_BF16_REL apart), log-probs within 2^-6 in norm (seen 2.7e-3), the
    gradients as MERGE_BF16_RATIO and MERGE_BF16_REL say. With emit_copies (the carried sample then detached) the
    same, bitwise. The merge needs defer: without it the flag changes nothing. Parameters are moved off their init
    (zero biases, unit scales), so that a dropped bias or scale shows."""
    inputs, weights = observe_inputs()
    inputs[4][0, 0] = True  # a first step that resets its row: the initial deter masked (the merged loop does it first)
    rssm = make_rssm()
    with torch.no_grad():  # non-zero biases, scales off one: a dropped bias or scale shows
        for q in rssm.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))

    def run(precision=precision):
        args = list(inputs)
        args[0], args[2] = args[0].clone().requires_grad_(), args[2].clone().requires_grad_()  # deter0, tokens
        outs, grads = run_observe(rssm, args, weights, precision)
        return outs, dict(grads, deter0=args[0].grad, tokens=args[2].grad)

    rssm.defer = rssm.hoist_action = rssm.merge_deter = True
    got, got_grads = run()
    rssm.emit_copies = True  # the fast modes' flags: the carried sample is then detached (the stack has its copy)
    emitted, emitted_grads = run()
    rssm.emit_copies = False
    assert all(torch.equal(a, b) for a, b in zip(emitted, got))
    assert sorted(emitted_grads) == sorted(got_grads)
    assert all(torch.equal(emitted_grads[n], got_grads[n]) for n in got_grads)
    rssm.merge_deter = False
    unmerged, unmerged_grads = run()
    rssm.defer = rssm.hoist_action = False
    want, want_grads = run()
    rssm.merge_deter = True  # without defer: the plain loop
    plain, plain_grads = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, want))
    assert all(torch.equal(plain_grads[n], want_grads[n]) for n in want_grads)

    assert torch.equal(got[1], want[1]), "latents differ"
    if precision == "bf16" and core == "triton":  # the given products rounded (GIVEN_BF16_REL)
        assert rel(got[0], want[0]) < GIVEN_BF16_REL, f"deters: relative error {rel(got[0], want[0])}"
    else:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"deters: {m}")
    if precision == "fp32":  # reassociation
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6, msg=lambda m: f"log-probs: {m}")
    else:  # a few bf16 roundings (2^-8 relative each) of the pre-activation, through norm and logit layer: in norm
        assert rel(got[2], want[2]) < 2**-6, f"log-probs: relative error {rel(got[2], want[2])}"
    assert sorted(got_grads) == sorted(want_grads) == sorted(unmerged_grads)
    assert {"deter0", "tokens"} <= set(got_grads)
    tol = GRAD_REL if precision == "fp32" else MERGE_BF16_REL
    for name, g in got_grads.items():
        assert rel(g, want_grads[name]) < tol, f"gradient of {name}: relative error {rel(g, want_grads[name])}"
        assert rel(g, unmerged_grads[name]) < tol, f"gradient of {name} vs unmerged: {rel(g, unmerged_grads[name])}"
    if precision == "bf16":
        rssm.merge_deter = False
        _, ref = run("fp32")  # the plain loop in float32
        names = sorted(ref)

        def dist(grads):
            return rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([ref[n].flatten() for n in names]))

        merged_err, unmerged_err = dist(got_grads), dist(unmerged_grads)
        assert merged_err <= MERGE_BF16_RATIO * unmerged_err, (merged_err, unmerged_err)


def test_defer_makes_one_weight_gradient_matmul_per_weight_not_one_per_step():
    """What defer is for, counted at the dispatcher over an observe forward and backward of T steps: the per-step path
    makes one weight-gradient matmul per step for each of the step's 7 matmul weights (the core's five, obs_net's
    and obs_logit's linears); defer makes 7 in all, after the loop. So per step it makes 7 matmuls fewer, and 7 more
    once."""
    inputs, weights = observe_inputs()

    def count(on: bool, T: int) -> int:
        rssm = make_rssm(obslayers=1)
        rssm.defer = on
        args = [*inputs[:2], inputs[2][:, :T], inputs[3][:, :T], inputs[4][:, :T]]
        with MatmulCount() as c:
            run_observe(rssm, args, weights[:, :T], "fp32")
        return c.calls

    per_step = {T: count(False, T) for T in (3, 5)}
    deferred = {T: count(True, T) for T in (3, 5)}
    slope = {k: (v[5] - v[3]) / 2 for k, v in (("per_step", per_step), ("defer", deferred))}
    assert slope["per_step"] - slope["defer"] == 7, (per_step, deferred)
    assert deferred[3] - 3 * slope["defer"] - (per_step[3] - 3 * slope["per_step"]) == 7, (per_step, deferred)


def test_merge_deter_makes_two_matmuls_fewer_per_step():
    """What merge_deter is for, counted at the dispatcher over an observe forward and backward of T steps (defer and
    hoist_action on in both): per step one matmul of deter for the posterior and the next step's core instead of two,
    and one for deter's gradient from both instead of two; once, before the loop, the first step's product and the
    posterior's token part for all rows, and in the backward the tokens' and the initial deter's gradients from
    them."""
    inputs, weights = observe_inputs()

    def count(merge: bool, T: int) -> int:
        rssm = make_rssm(obslayers=1)
        rssm.defer = rssm.hoist_action = True
        rssm.merge_deter = merge
        deter0 = inputs[0].clone().requires_grad_()
        args = [deter0, inputs[1], inputs[2][:, :T].clone().requires_grad_(), inputs[3][:, :T], inputs[4][:, :T]]
        with MatmulCount() as c:
            run_observe(rssm, args, weights[:, :T], "fp32")
        return c.calls

    counts = {merge: {T: count(merge, T) for T in (3, 5)} for merge in (False, True)}
    slope = {k: (v[5] - v[3]) / 2 for k, v in counts.items()}
    assert slope[False] - slope[True] == 2, counts


def test_tap_sites_must_cover_every_step_parameter(monkeypatch):
    """A step parameter without a site would get no gradient at all under defer; tap_sites refuses that."""
    rssm = make_rssm()
    extra = dict(rssm.step_params(), **{"img_logit.bias": rssm.img_logit.bias})
    monkeypatch.setattr(RSSM, "step_params", lambda self, hoisted=False: extra)
    with pytest.raises(RuntimeError, match="tap_sites covers"):
        rssm.tap_sites()


def test_the_compiled_step_backward_has_no_weight_gradient_matmuls_under_defer():
    """bench.step_kernels on the compiled observe step (inductor's generated code, CPU): defer's backward graph has
    the per-step path's matmuls less the 7 weight-gradient ones, and its forward (taps in, the packed factors out)
    launches no more than the per-step path's."""
    from bench.step_kernels import count

    per_step, deferred = (count(v, "debug", "cpu", "fp32") for v in ("per_step", "defer"))
    assert sum(deferred[0].values()) <= sum(per_step[0].values()), (deferred, per_step)
    assert deferred[0]["extern"] == per_step[0]["extern"], (deferred, per_step)
    assert per_step[1]["extern"] - deferred[1]["extern"] == 7, (deferred, per_step)


def test_the_merged_deter_matmul_leaves_the_compiled_step_one_matmul_fewer_each_way():
    """bench.step_kernels: with merge_deter the compiled step's forward and backward each have one matmul fewer than
    with hoist_action alone (float32: seen 8/6/1 + 7/6/0 -> 6/5/1 + 5/5/0), and nothing runs between the steps (the
    carried products are contiguous, so their gradients need no copy, and the carried sample, which gets no gradient
    from the next step, is detached, so no zero-filled one is made for it)."""
    from bench.step_kernels import between, count

    hoisted, merged = (count(v, "debug", "cpu", "fp32") for v in ("hoist", "merge"))
    assert hoisted[0]["extern"] - merged[0]["extern"] == 1, (merged, hoisted)
    assert hoisted[1]["extern"] - merged[1]["extern"] == 1, (merged, hoisted)
    assert sum(merged[0].values()) < sum(hoisted[0].values()), (merged, hoisted)
    assert not any(between("merge", "debug", "cpu", "fp32").values())


def test_the_hoisted_action_branch_leaves_the_compiled_step_one_matmul_fewer():
    """bench.step_kernels: with hoist_action the compiled step's forward has one matmul fewer (the action branch's,
    now one matmul over all rows before the loop) and its backward is unchanged (under defer the branch had no
    matmul there: the action needs no gradient and its weight gradient was deferred)."""
    from bench.step_kernels import count

    emitted, hoisted = (count(v, "debug", "cpu", "fp32") for v in ("emit", "hoist"))
    assert emitted[0]["extern"] - hoisted[0]["extern"] == 1, (hoisted, emitted)
    assert hoisted[1] == emitted[1], (hoisted, emitted)


def test_the_emitting_observe_loop_launches_nothing_between_its_compiled_steps():
    """bench.step_kernels.between on the compiled observe loop (CPU profiler): with defer alone, autograd adds each
    step's two gradients of deter and of the sample, and the compiled backward copies the strided log-prob gradient
    (3 kernels per step on a GPU); with emit_copies those sums happen inside the compiled backward and the stack's
    gradients arrive contiguous: nothing per step outside the graphs."""
    from bench.step_kernels import between

    deferred, emitted = (between(v, "debug", "cpu", "fp32") for v in ("defer", "emit"))
    assert deferred.get("add", 0) >= 2 and deferred.get("copy_", 0) >= 1, deferred
    assert not any(emitted.values()), emitted


def test_a_deferred_observe_frees_its_record_and_graph(monkeypatch):
    """The record lives on the taps' autograd node; tensors in it that carried the graph would keep that node alive
    through themselves, a cycle gc cannot see (it grew ~72 MB per 12m update). After the loop's outputs go, with or
    without a backward, the recorded tensors must be freed."""
    import gc
    import weakref

    records = []
    init = defer.Record.__init__

    def spy(self, *args, **kwargs):  # every record, the observe loop's own kind (rssm._ObserveRecord) too
        init(self, *args, **kwargs)
        records.append(self)

    monkeypatch.setattr(defer.Record, "__init__", spy)
    inputs, weights = observe_inputs()
    rssm = make_rssm()
    rssm.defer = True
    for backward in (True, False):
        records.clear()
        deters, stochs, logps = rssm.observe(*inputs)
        loss = deters.square().mean() + (logps * weights).sum() + (stochs * weights).sum()
        if backward:
            loss.backward()
        (record,) = records
        refs = [weakref.ref(t) for t in record]
        assert len(refs) == 6  # one packed tensor per step
        refs += [weakref.ref(t) for t in getattr(record, "loop", None) or ()]  # the loop's tensors it keeps
        del deters, stochs, logps, loss, record
        records.clear()
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive == 0, f"{alive} of {len(refs)} recorded tensors still alive (backward={backward})"


def test_bf16_sites_multiply_rounded_operands_in_float32():
    """Site.bf16 (autocast's bf16 matmuls): the weight gradient is the float32 (here float64) sum over all rows of
    bf16(x) * bf16(g), nothing rounded after; without the flag, of x * g unrounded. Checked against both sums, each
    computed from the recorded factors and the taps' own gradients, for an mm, a linear and a block site."""
    B, T, NI, NO, G = 6, 5, 8, 12, 2
    gen = torch.Generator().manual_seed(3)
    p = {
        "w": torch.randn(NI, NO, generator=gen),
        "lw": torch.randn(NO, NO, generator=gen),
        "bw": torch.randn(G, NO // G, NI // G, generator=gen),
    }
    p = {k: v.requires_grad_() for k, v in p.items()}
    xs = torch.randn(T, B, NI, generator=gen)
    for flag in (True, False):
        sites = {
            "mm": defer.Site("mm", ("w",), NO, flag),
            "lin": defer.Site("linear", ("lw",), NO, flag),
            "blk": defer.Site("block", ("bw",), NI, flag),
        }
        for v in p.values():
            v.grad = None
        record = defer.Record()
        taps = defer.taps(sites, p, T, B, record)
        tap_grads = [{} for _ in range(T)]
        seen = []
        h = torch.zeros(B, NI)
        total = 0.0
        for t in range(T):
            tap = taps[t]
            for site, z in tap.items():
                z.register_hook(lambda g, out=tap_grads[t], site=site: out.__setitem__(site, g))
            a = xs[t] + h
            y = torch.tanh(a @ p["w"].detach() + tap["mm"])
            z = torch.tanh(F.linear(y, p["lw"].detach()) + tap["lin"])
            zb = z.view(B, G, NO // G)
            h = torch.sin(torch.einsum("bgi,gio->bgo", zb, p["bw"].detach()).reshape(B, NI) + tap["blk"])
            seen.append({"mm": a.detach(), "lin": y.detach(), "blk": zb.detach()})
            record.append(defer.pack(seen[-1], sites))
            total = total + (h * (t + 1)).square().sum()
        total.backward()

        def r(x, flag=flag):
            return (x.bfloat16() if flag else x).double()

        X = {s: torch.cat([step[s] for step in seen]) for s in sites}
        Gs = {s: torch.cat([g[s] for g in tap_grads]) for s in sites}
        want = {
            "w": r(X["mm"]).t() @ r(Gs["mm"]),
            "lw": r(Gs["lin"]).t() @ r(X["lin"]),
            "bw": torch.einsum("ngi,ngo->gio", r(X["blk"]), r(Gs["blk"]).view(-1, G, NI // G)),
        }
        for k, w in want.items():
            assert rel(p[k].grad.double(), w) < GRAD_REL, f"bf16={flag} {k}: {rel(p[k].grad.double(), w)}"
        if flag:  # the rounding is visible at this tolerance: unrounded sums are off
            unrounded = X["mm"].double().t() @ Gs["mm"].double()
            assert rel(p["w"].grad.double(), unrounded) > 10 * GRAD_REL


def weight_product_cases(device="cpu"):
    """(kind, weight, x, g) for an mm, a linear and a block site, factors flattened over 300 rows."""
    gen = torch.Generator().manual_seed(11)
    n, NI, NO, G = 300, 24, 40, 4

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return [
        ("mm", r(NI, NO), r(n, NI), r(n, NO)),
        ("linear", r(NO, NI), r(n, NI), r(n, NO)),
        ("block", r(G, NI // G, NO // G), r(n, G, NI // G), r(n, NO)),
    ]


def test_weight_products_as_one_batched_matmul_match_the_plain_ones():
    # The batched layout defer uses for every matmul site (and, with out_dtype bmm, for the bf16 sites on CUDA),
    # against the plain products.
    plain = {
        "mm": lambda w, x, g: x.t() @ g,
        "linear": lambda w, x, g: g.t() @ x,
        "block": lambda w, x, g: torch.einsum("ngi,ngo->gio", x, g.view(g.shape[0], w.shape[0], w.shape[2])),
    }
    for kind, w, x, g in weight_product_cases():
        got = defer._weight_grad(kind, w, x, g)
        want = plain[kind](w, x, g)
        assert got.shape == w.shape and rel(got, want) < 1e-6, (kind, rel(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_weight_products_on_the_tensor_cores_are_the_float32_sums():
    # Exact bf16 products, float32 sums: only the summation order differs from the CPU's float32 FMAs.
    for kind, w, x, g in weight_product_cases("cuda"):
        got = defer._bf16_weight_grad(kind, w, x, g)
        want = defer._bf16_weight_grad(kind, w.cpu(), x.cpu(), g.cpu())
        assert got.dtype == torch.float32 and rel(got.cpu(), want) < 1e-5, (kind, rel(got.cpu(), want))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interpreter)])
def test_tap_sites_round_where_the_step_multiplied_in_bf16(impl):
    """Under bf16 autocast the posterior's F.linear and the torch core's matmuls multiplied bf16 operands, so their
    sites are bf16; the Triton core hands over rounded inputs and float32 output gradients, and norm scales are
    float32 products: not bf16. In float32 nothing is."""
    rssm = make_rssm()
    assert block_gru.set_impl(impl) == impl
    try:
        bf16, fp32 = rssm.tap_sites(True), rssm.tap_sites(False)
    finally:
        block_gru.set_impl("torch")
    assert not any(s.bf16 for s in fp32.values())
    want = {
        n
        for n, s in bf16.items()
        if s.kind == "linear" or (impl == "torch" and n.startswith("core.") and s.kind != "scale")
    }
    assert {n for n, s in bf16.items() if s.bf16} == want
    assert len(want) == (3 + 5 if impl == "torch" else 3)


def test_records_refuse_factors_they_do_not_hold():
    """Record.factors splits the packed steps by the sites' widths and refuses widths that do not add up; the
    observe loop's record refuses to gather before observe has closed it."""
    from fastdreamer.rssm import _ObserveRecord

    record = defer.Record()
    for _ in range(3):
        record.append(torch.arange(10.0).view(2, 5))
    got = record.factors({"a": 2, "b": 3})
    assert [tuple(t.shape) for t in got.values()] == [(6, 2), (6, 3)]
    assert torch.equal(got["b"][1], torch.tensor([7.0, 8.0, 9.0]))  # step 0's second row, its last three columns
    with pytest.raises(RuntimeError, match="holds 5 columns of factors per row, the sites take 6"):
        record.factors({"a": 3, "b": 3})
    with pytest.raises(RuntimeError, match="not closed"):
        _ObserveRecord(make_rssm()).factors({})


def test_observe_record_keeps_a_hoisted_steps_factors_as_computed():
    """With the core's factors packed (the hoisted step), _ObserveRecord.pack hands the record the core's buffer and
    each other own site's factor as the step computed it, in the sites' order, with no copy (a cat of the
    posterior's factors was a kernel per step in torch 2.11's GPU code); the loop's own sites are left out."""
    from fastdreamer.rssm import _ObserveRecord

    rssm = make_rssm()
    sites = rssm.tap_sites(check=False, hoisted=True)
    B, gen = 3, torch.Generator().manual_seed(0)
    seen = {name: torch.randn(B, site.width, generator=gen) for name, site in sites.items()}
    core_packed = torch.randn(B, 7, generator=gen)
    got = _ObserveRecord.pack(seen, sites, rssm.core, core_packed)
    rest = [n for n in sites if not n.startswith("core.") and n not in _ObserveRecord.OUTER]
    assert rest and len(got) == 1 + len(rest)
    for t, want in zip(got, [core_packed] + [seen[n] for n in rest], strict=True):
        assert t.data_ptr() == want.data_ptr() and torch.equal(t, want) and not t.requires_grad


def test_records_read_steps_packed_in_parts_as_one():
    """A step may pack its factors as a tuple of consecutive column blocks (the observe loop's core factors as the
    Triton core's kernels wrote them, then the rest): factors() reads them as the one tensor they stand for, and
    refuses a site whose columns span two parts."""
    steps = [torch.randn(2, 7) for _ in range(3)]
    whole, parts = defer.Record(), defer.Record()
    for x in steps:
        whole.append(x)
        parts.append((x[:, :3], x[:, 3:].bfloat16().float()))
    widths = {"a": 1, "b": 2, "c": 4}
    want, got = whole.factors(widths), parts.factors(widths)
    assert list(got) == list(widths)
    for name in widths:
        torch.testing.assert_close(got[name], want[name], atol=2e-2, rtol=1e-2)
    assert torch.equal(got["b"], want["b"])  # the first part as it was appended
    with pytest.raises(RuntimeError, match="site 'b' spans two parts"):
        parts.factors({"a": 2, "b": 2, "c": 3})
    with pytest.raises(RuntimeError, match="holds 7 columns"):
        parts.factors({"a": 1, "b": 2})
