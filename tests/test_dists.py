import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.twohot_error import pair_terms, subtracted_pred
from fastdreamer import dists
from fastdreamer.dists import symexp, symlog


def test_symlog_symexp_are_inverse():
    x = torch.tensor([-1e6, -3.0, -1e-3, 0.0, 2e-4, 5.0, 1e7], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-12)
    assert torch.equal(symlog(torch.zeros(1)), torch.zeros(1))


def test_bins_are_symmetric_and_span_symexp_20():
    for n in (255, 256, 5):
        b = dists.twohot_bins(n).double()
        assert b.shape == (n,)
        assert torch.all(b[1:] >= b[:-1])
        assert torch.equal(b, -b.flip(0))
        assert b[-1] == pytest.approx(math.expm1(20.0), rel=1e-6)


def test_twohot_round_trip():
    """Encoding a target and taking the expectation over bins recovers it, within the bins' range."""
    torch.manual_seed(0)
    bins = dists.twohot_bins(255).double()
    target = torch.cat([torch.randn(500).double() * 10, torch.tensor([0.0, 1.0, -1.0, 123456.0, bins[200].item()])])
    enc = dists.twohot_encode(target, bins)
    assert torch.allclose(enc.sum(-1), torch.ones_like(target))
    assert ((enc > 0).sum(-1) <= 2).all()
    # Relative to the bin spacing around the target: float64 leaves ~1e-16 of it.
    assert torch.allclose(enc @ bins, target, rtol=1e-9, atol=1e-9)


def test_twohot_clips_outside_range():
    bins = dists.twohot_bins(255).double()
    enc = dists.twohot_encode(torch.tensor([1e12, -1e12], dtype=torch.float64), bins)
    assert enc[0, -1] == 1 and enc[1, 0] == 1


def test_twohot_loss_matches_dense_cross_entropy():
    torch.manual_seed(1)
    bins = dists.twohot_bins(255)
    logits = torch.randn(7, 9, 255, requires_grad=True)
    target = torch.randn(7, 9) * 30
    fast = dists.twohot_loss(logits, target, bins)
    dense = -(dists.twohot_encode(target, bins) * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(fast, dense, atol=1e-5)  # fp32 log-softmax, values ~5
    (g1,) = torch.autograd.grad(fast.sum(), logits)
    (g2,) = torch.autograd.grad(dense.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("n,shape", [(255, (7, 9)), (256, (7, 9)), (5, (3, 4, 5))])
def test_twohot_masked_form_is_bitwise_the_gather_form(n, shape):
    """twohot_nll_masked (what compiled code runs) against the reference's gather form: the same loss and the same
    gradient, bit for bit, on fresh targets that hit bins exactly, fall between them, and lie past either end (also
    infinite), with log-probs read through a strided view."""
    gen = torch.Generator().manual_seed(1000 + n)
    bins = dists.twohot_bins(n)
    logits = torch.randn((*shape, 2 * n), generator=gen, requires_grad=True)
    k = torch.randint(0, n - 1, shape, generator=gen)
    kinds = [
        torch.randn(shape, generator=gen) * 30,  # anywhere, mostly between bins
        bins[torch.randint(0, n, shape, generator=gen)],  # exactly on a bin, the end bins included
        (bins[k] + bins[k + 1]) / 2,  # halfway
        bins[-1]
        * (1 + torch.rand(shape, generator=gen))
        * torch.sign(torch.randn(shape, generator=gen)),  # past an end
    ]
    pick = torch.randint(0, len(kinds), shape, generator=gen)
    target = torch.stack(kinds).gather(0, pick[None]).squeeze(0)
    target.view(-1)[:4] = torch.tensor([math.inf, -math.inf, 0.0, -0.0])  # 256 bins hold both 0.0 and -0.0
    logp = torch.log_softmax(logits, -1)[..., ::2]  # a strided view, as the critic's slices are
    logp = torch.where(torch.rand(logp.shape, generator=gen) < 0.05, -math.inf, logp)  # a -inf away from targets
    want = dists.twohot_nll_gather(logp, target, bins)
    got = dists.twohot_nll_masked(logp, target, bins)
    finite = want.isfinite()
    assert 0.5 < finite.float().mean() < 1  # some targets' bins are -inf (NaN loss: -inf * weight 0, or inf - inf)
    assert ((got == want) | (got.isnan() & want.isnan())).all()  # also where both are inf or NaN
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # bits: -0.0 and 0.0 differ
    (g_want,) = torch.autograd.grad(want[finite].sum(), logits, retain_graph=True)
    (g_got,) = torch.autograd.grad(got[finite].sum(), logits)
    assert torch.equal(g_got, g_want)  # values: zeros may differ in sign (-(w * 0) against a scattered +0)


def test_twohot_nll_refuses_a_target_it_would_broadcast():
    bins = dists.twohot_bins(255)
    logp = torch.log_softmax(torch.randn(4, 6, 255), -1)
    with pytest.raises(ValueError, match=r"target \(1, 6\) for log-probs \(4, 6, 255\)"):
        dists.twohot_nll(logp, torch.zeros(1, 6), bins)


def test_twohot_masked_form_keeps_the_nan_of_a_nan_target():
    bins = dists.twohot_bins(255)
    logits = torch.randn(3, 255, requires_grad=True)
    target = torch.tensor([1.0, math.nan, -4.0])
    for form in (dists.twohot_nll_gather, dists.twohot_nll_masked):
        loss = form(torch.log_softmax(logits, -1), target, bins)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert loss.isnan().tolist() == [False, True, False], form.__name__
        assert grad[1].isnan().all() and not grad[[0, 2]].isnan().any(), form.__name__


def test_twohot_nll_runs_the_gather_form_eagerly_and_the_masked_form_compiled(monkeypatch):
    calls = []

    def counted(name):
        form = getattr(dists, name)
        return lambda *args: calls.append(name) or form(*args)

    for name in ("twohot_nll_gather", "twohot_nll_masked"):
        monkeypatch.setattr(dists, name, counted(name))
    bins = dists.twohot_bins(255)
    logp, target = torch.log_softmax(torch.randn(4, 255), -1), torch.randn(4) * 10
    eager = dists.twohot_nll(logp, target, bins)
    torch._dynamo.reset()
    compiled = torch.compile(dists.twohot_nll, backend="eager", fullgraph=True)(logp, target, bins)
    assert calls == ["twohot_nll_gather", "twohot_nll_masked"]
    assert torch.equal(compiled, eager)


def _integer_tensors_saved_for_backward(loss_fn) -> list:
    """Integer tensors the compiled forward of loss_fn hands its backward (inductor's own partition), found in the
    post-grad forward graph's outputs."""
    import torch._inductor.config as inductor_config

    outputs = []

    def record(graph):
        (node,) = [n for n in graph.nodes if n.op == "output"]
        outputs.append([getattr(a, "meta", {}).get("val") for a in node.args[0]])

    bins = dists.twohot_bins(255)
    logits = torch.randn(4, 8, 255, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(4, 8) * 10
    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_pre_pass=record):
        torch.compile(lambda x, t: loss_fn(x, t, bins).mean())(logits, target).backward()
    forward = outputs[0]  # compiled first; its outputs past the loss are what the backward reads
    return [
        v.dtype
        for v in forward[1:]
        if isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.dtype == torch.bool)
    ]


def test_compiled_twohot_loss_saves_no_integer_tensor_for_its_backward():
    """The trigger of the Triton 3.6 compile failure (bench/LOG.md, 2026-11-26) was int64 indices computed by the
    counting reduction and stored for the gather's backward; the gather form must show it (or this check sees
    nothing) and the loss as compiled must not."""
    gather = _integer_tensors_saved_for_backward(
        lambda x, t, b: dists.twohot_nll_gather(torch.log_softmax(x.float(), -1), t, b)
    )
    assert torch.int64 in gather
    assert _integer_tensors_saved_for_backward(dists.twohot_loss) == []


@pytest.mark.parametrize("classes", [4, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onehot_index_is_the_argmax_of_a_one_hot_as_uint8(classes, dtype):
    gen = torch.Generator().manual_seed(classes)
    index = torch.randint(0, classes, (5, 7, 3), generator=gen)
    index.view(-1)[:2] = torch.tensor([0, classes - 1])
    got = dists.onehot_index(dists.one_hot(index, classes, dtype))
    assert got.dtype == torch.uint8 and torch.equal(got.long(), index)


def test_twohot_pred_is_zero_for_uniform_and_matches_expectation():
    bins = dists.twohot_bins(255)
    assert torch.equal(dists.twohot_pred(torch.zeros(3, 255), bins), torch.zeros(3))
    torch.manual_seed(2)
    logits = torch.randn(4, 255, dtype=torch.float64) * 3
    expect = torch.softmax(logits, -1) @ bins.double()
    assert torch.allclose(dists.twohot_pred(logits, bins.double()), expect, rtol=1e-10, atol=1e-6)


def test_twohot_pred_stays_float32_under_bf16_autocast():
    """The fast modes run the loss under bf16 autocast; the expected values (rewards, values, and so returns and
    advantages) are float32 there as in the reference, whose output heads cast their logits to float32. A matmul with
    the bins rounded them to bf16 (~0.4%)."""
    bins = dists.twohot_bins(255)
    logits = torch.randn(64, 255, generator=torch.Generator().manual_seed(3)) * 3
    for fn in (dists.twohot_pred, torch.compile(dists.twohot_pred, dynamic=False)):
        plain = fn(logits, bins)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(logits, bins)
        assert got.dtype == torch.float32 and torch.equal(got, plain)


def test_twohot_pred_refuses_logits_that_require_grad():
    logits = torch.zeros(2, 255, requires_grad=True)
    with pytest.raises(ValueError, match="values only"):
        dists.twohot_pred(logits, dists.twohot_bins(255))
    with torch.no_grad():
        assert torch.equal(dists.twohot_pred(logits, dists.twohot_bins(255)), torch.zeros(2))


# twohot_pred's float32 error against float64 (the same float32 logits): relative to its pair terms
# (bench.twohot_error.pair_terms), plus a floor for values near zero. Measured (python -m bench.twohot_error), eager
# and compiled, logits N(c, s^2) for s from 1e-6 to 10 with per-row offsets c ~ N(0, 9): <= 5.4e-7 of the terms;
# the subtracted form: 0.06 at s = 1e-6, 6e-4 at 1e-4.
PRED_RTOL, PRED_ATOL = 2e-6, 1e-6


@pytest.mark.parametrize("n", [255, 256])
@pytest.mark.parametrize("compiled", [False, True])
def test_twohot_pred_error_is_relative_to_its_terms_not_to_the_bins(n, compiled):
    """Near-uniform heads (every head early in training) have values ~1e-4 while the bins reach 4.9e8: a
    probability's rounding (~2e-10 near 1/255) times an outer bin is ~0.1, so subtracting rounded probabilities gave
    errors ~0.6 whatever the value. twohot_pred's error must be relative to the terms it sums."""
    bins = dists.twohot_bins(n)
    pred = torch.compile(dists.twohot_pred, dynamic=False) if compiled else dists.twohot_pred
    gen = torch.Generator().manual_seed(n + compiled)
    worst_subtracted = 0.0
    for scale in (1e-6, 1e-4, 1e-2, 1.0, 10.0):
        logits = torch.randn(2048, n, generator=gen) * scale + torch.randn(2048, 1, generator=gen) * 3
        want = subtracted_pred(logits.double(), bins.double())  # exact enough in float64
        bound = PRED_RTOL * pair_terms(logits, bins) + PRED_ATOL
        err = (pred(logits, bins).double() - want).abs()
        assert (err <= bound).all(), f"scale {scale}: error {(err / bound).max():.3g} x the bound"
        worst_subtracted = max(worst_subtracted, ((subtracted_pred(logits, bins) - want).abs() / bound).max().item())
    assert worst_subtracted > 100, "the subtracted form passes this bound: the test could not see what it guards"
    assert torch.equal(pred(torch.zeros(3, n), bins), torch.zeros(3))
    masked = torch.zeros(2, n)
    masked[:, :3], masked[:, -3:] = -torch.inf, -torch.inf  # pairs with zero probability on both sides
    masked[1, -5] = 1.0
    want = torch.softmax(masked.double(), -1).nan_to_num() @ bins.double()
    torch.testing.assert_close(pred(masked, bins).double(), want, rtol=1e-6, atol=1e-6)
    steep = torch.linspace(-300.0, 300.0, n)[None]  # outer pairs' logits 600 apart: no overflow
    want = torch.softmax(steep.double(), -1) @ bins.double()
    torch.testing.assert_close(pred(steep, bins).double(), want, rtol=1e-6, atol=0)


def test_unimix_puts_a_floor_under_every_class():
    logits = torch.tensor([[100.0, 0.0, -100.0, 0.0]])
    p = dists.unimix_logits(logits, 0.01).exp()
    assert torch.allclose(p.sum(-1), torch.ones(1))
    assert p.min() >= 0.01 / 4 - 1e-7
    assert p[0, 0] == pytest.approx(0.99 + 0.0025, abs=1e-6)


def test_onehot_sample_frequencies_and_straight_through_gradient():
    torch.manual_seed(3)
    logits = torch.tensor([0.0, 1.0, 2.0]).repeat(20000, 1).requires_grad_(True)
    logp = dists.unimix_logits(logits, 0.0)
    s = dists.sample_onehot(logp)
    assert torch.equal(s.detach().sum(-1), torch.ones(20000))
    freq = s.detach().mean(0)
    assert torch.allclose(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1), atol=0.015)  # ~4 sigma at n=2e4
    c = torch.tensor([1.0, 2.0, 3.0])
    (g,) = torch.autograd.grad((s * c).sum(), logits)
    (want,) = torch.autograd.grad((torch.softmax(logits, -1) * c).sum(), logits)  # straight through: d probs, once
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)


def test_binary_logp_is_the_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logit, target = torch.randn(500, generator=g) * 4, torch.rand(500, generator=g)
    want = -F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    torch.testing.assert_close(dists.binary_logp(logit, target), want, rtol=1e-6, atol=1e-6)


def test_onehot_sample_matches_multinomial_frequencies_and_never_draws_a_zero_probability_class():
    torch.manual_seed(5)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    n = 40000
    logp = torch.log(probs).repeat(n, 1, 1)  # (n, 3, 5) with -inf for the empty classes
    s = dists.sample_onehot(logp)
    assert torch.equal(s.sum(-1), torch.ones(n, 3))
    freq = s.mean(0)
    assert (freq[probs == 0] == 0).all()
    ref = F.one_hot(torch.multinomial(probs, n, replacement=True).T, 5).float().mean(0)  # torch's own sampler
    assert torch.allclose(freq, probs, atol=0.01) and torch.allclose(ref, probs, atol=0.01)  # ~4 sigma at n=4e4


def test_kl_and_entropy_match_torch_distributions():
    torch.manual_seed(4)
    p, q = torch.randn(5, 32, 16), torch.randn(5, 32, 16)
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    assert torch.allclose(dists.categorical_kl(lp, lq), ref, atol=1e-5)
    assert torch.allclose(dists.categorical_entropy(lp), torch.distributions.Categorical(logits=p).entropy(), atol=1e-5)


def test_policy_continuous_matches_torch_normal_and_bounds_std():
    torch.manual_seed(5)
    raw = torch.randn(6, 8) * 5
    pol = dists.Policy(raw, discrete=False, minstd=0.1, maxstd=1.0)
    assert (pol.std >= 0.1).all() and (pol.std <= 1.0).all() and (pol.mean.abs() <= 1).all()
    ref = torch.distributions.Normal(pol.mean, pol.std)
    a = pol.sample()
    assert torch.allclose(pol.logp(a), ref.log_prob(a).sum(-1), atol=1e-5)
    assert torch.allclose(pol.entropy(), ref.entropy().sum(-1), atol=1e-5)


def test_policy_discrete_uses_unimix():
    raw = torch.tensor([[50.0, 0.0, 0.0]])
    pol = dists.Policy(raw, discrete=True, unimix=0.01)
    probs = pol.logp_all.exp()
    assert probs.min() == pytest.approx(0.01 / 3, rel=1e-4)
    a = torch.tensor([[0.0, 1.0, 0.0]])
    assert pol.logp(a).item() == pytest.approx(math.log(0.01 / 3), rel=1e-4)
    assert np.isclose(pol.entropy().item(), -(probs * probs.log()).sum().item(), atol=1e-6)


@pytest.mark.parametrize("unimix", [0.0, 0.01])
def test_policy_groups_of_unequal_classes_match_one_categorical_per_group(unimix):
    # A MultiDiscrete([2, 5, 3]) policy: three categoricals padded to 5 classes, each against a plain one of its own.
    gen = torch.Generator().manual_seed(11)
    counts = (2, 5, 3)
    raw = (torch.randn(4, 6, 15, generator=gen) * 3).requires_grad_()
    pol = dists.Policy(raw, discrete=True, unimix=unimix, groups=3, counts=torch.tensor(counts))
    logits = raw.unflatten(-1, (3, 5))
    refs = [torch.log((1 - unimix) * torch.softmax(logits[..., g, :c], -1) + unimix / c) for g, c in enumerate(counts)]
    for g, c in enumerate(counts):
        torch.testing.assert_close(pol.logp_all[..., g, :c], refs[g], atol=1e-6, rtol=1e-6)
        assert (pol.logp_all[..., g, c:] == dists.Policy.PAD).all()
    ent = sum(-(r.exp() * r).sum(-1) for r in refs)
    torch.testing.assert_close(pol.entropy(), ent, atol=1e-5, rtol=1e-5)
    index = torch.stack([torch.randint(0, c, (4, 6), generator=gen) for c in counts], -1)  # (4, 6, 3)
    action = torch.cat([F.one_hot(index[..., g], 5) for g in range(3)], -1).float()
    ref_logp = sum(refs[g].gather(-1, index[..., g : g + 1])[..., 0] for g in range(3))
    torch.testing.assert_close(pol.logp(action), ref_logp, atol=1e-5, rtol=1e-5)
    mode = pol.mode().unflatten(-1, (3, 5)).argmax(-1)
    assert torch.equal(mode, torch.stack([r.argmax(-1) for r in refs], -1))
    # Gradients: the same as through the plain categoricals, finite, and zero at the padding's logits.
    (got,) = torch.autograd.grad((pol.logp(action) + pol.entropy()).sum(), raw)
    (want,) = torch.autograd.grad((ref_logp + ent).sum(), raw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got.unflatten(-1, (3, 5))[..., 0, 2:] == 0).all() and (got.unflatten(-1, (3, 5))[..., 2, 3:] == 0).all()


def test_policy_groups_without_unimix_keep_far_classes_finite():
    # A logit gap of 200: softmax underflows to 0, log_softmax does not (as for one unpadded categorical).
    raw = torch.tensor([[0.0, 200.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    pol = dists.Policy(raw, discrete=True, unimix=0.0, groups=2, counts=torch.tensor([2, 3]))
    torch.testing.assert_close(pol.logp_all[0, 0, :2], torch.log_softmax(raw[0, :2], -1))
    torch.testing.assert_close(pol.logp_all[0, 1], torch.log_softmax(raw[0, 3:], -1))
    assert pol.logp_all[0, 0, 2] == dists.Policy.PAD
    loss = pol.logp(torch.tensor([[1.0, 0, 0, 0, 1, 0]])) + pol.entropy()
    (grad,) = torch.autograd.grad(loss.sum(), raw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and grad[0, 2] == 0


def test_policy_groups_sample_their_own_probabilities_and_never_the_padding():
    counts = torch.tensor([2, 4])
    raw = torch.tensor([[1.0, 0.0, 9.0, 9.0, 0.5, -1.0, 2.0, 0.0]])  # group 0's padding logits are large: ignored
    pol = dists.Policy(raw, discrete=True, unimix=0.01, groups=2, counts=counts)
    gen = torch.Generator().manual_seed(3)
    n = 40000
    u = torch.rand(n, 2, 1, generator=gen)
    u[:8] = 1 - 2**-24  # the largest float32 below 1, past a last cdf that rounds below it: the group's last class
    sample = pol.sample(u.unsqueeze(1)).squeeze(1).unflatten(-1, (2, 4))  # (n, 2, 4)
    assert (sample.sum(-1) == 1).all() and (sample[:, 0, 2:] == 0).all()
    assert (sample[:8, 0, 1] == 1).all() and (sample[:8, 1, 3] == 1).all()
    freq = sample.float().mean(0)
    torch.testing.assert_close(freq, pol.logp_all.exp()[0], atol=0.01, rtol=0)  # ~5 sigma at n = 40000


def test_one_hot_equals_torch_one_hot_for_indices_in_range():
    gen = torch.Generator().manual_seed(0)
    for shape, n in (((5,), 3), ((4, 7), 255), ((2, 3, 32), 16)):
        index = torch.randint(0, n, shape, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            got = dists.one_hot(index, n, dtype)
            assert got.dtype == dtype and torch.equal(got, F.one_hot(index, n).to(dtype))
