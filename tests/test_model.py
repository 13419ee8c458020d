"""The RSSM core, losses and agent against plain implementations written here."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastdreamer.kernels.block_gru import reference

from fastdreamer import dists
from fastdreamer.agent import Agent, lambda_return, percentiles
from fastdreamer.config import Config
from fastdreamer.dists import symlog
from fastdreamer.envs import EnvSpec
from fastdreamer.rssm import RSSM, stack_steps


def per_block_core(deter, stoch, action, w):
    """The block GRU written the obvious way: every block a separate matmul, gates split per block."""
    D = deter.shape[1]
    G = w.wh.shape[0]
    H = D // G

    def norm(x, s):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-4) * s

    x = torch.cat(
        [
            F.silu(norm(deter @ w.w0 + w.b0, w.s0)),
            F.silu(norm(stoch @ w.w1 + w.b1, w.s1)),
            F.silu(norm(action @ w.w2 + w.b2, w.s2)),
        ],
        -1,
    )
    hidden = torch.cat([torch.cat([deter[:, g * H : (g + 1) * H], x], -1) @ w.wh[g] for g in range(G)], -1)
    hidden = F.silu(norm(hidden + w.bh, w.sh))
    out = []
    for g in range(G):
        gates = hidden[:, g * H : (g + 1) * H] @ w.wg[g] + w.bg[g * 3 * H : (g + 1) * 3 * H]
        r, c, u = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :]
        r = torch.sigmoid(r)
        c = torch.tanh(r * c)
        u = torch.sigmoid(u - 1)
        out.append(u * c + (1 - u) * deter[:, g * H : (g + 1) * H])
    return torch.cat(out, -1)


@pytest.mark.parametrize("B,D,G,K,SC,A", [(1, 8, 2, 3, 4, 1), (3, 24, 4, 5, 12, 3), (16, 64, 8, 16, 32, 6)])
def test_block_gru_reference_matches_per_block_loop(B, D, G, K, SC, A):
    g = torch.Generator().manual_seed(B * 100 + D)
    shapes = dict(
        w0=(D, K),
        b0=(K,),
        s0=(K,),
        w1=(SC, K),
        b1=(K,),
        s1=(K,),
        w2=(A, K),
        b2=(K,),
        s2=(K,),
        wh=(G, D // G + 3 * K, D // G),
        bh=(D,),
        sh=(D,),
        wg=(G, D // G, 3 * D // G),
        bg=(3 * D,),
    )
    w32 = reference.BlockGRUWeights(**{k: torch.randn(s, generator=g).requires_grad_() for k, s in shapes.items()})
    in32 = [torch.randn(B, n, generator=g).requires_grad_() for n in (D, SC, A)]
    out = reference.step(*in32, w32)
    expect = per_block_core(*in32, w32)
    # Same float32 math in a different association order: differences of a few ulps of values ~1.
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    probe = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * probe).sum(), in32 + list(w32))
    grads_ref = torch.autograd.grad((expect * probe).sum(), in32 + list(w32))
    for name, a, b in zip(["deter", "stoch", "action", *reference.BlockGRUWeights._fields], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def _core_case(seed: int):
    """Random core weights and inputs that require grad, a probe for the output's gradient, and the leaves:
    (B, w, deter, stoch, action, probe, leaves)."""
    g = torch.Generator().manual_seed(seed)
    B, D, G, K, SC, A = 3, 24, 4, 5, 12, 3
    w = reference.random_weights(D, G, K, SC, A, g)
    w = reference.BlockGRUWeights(*(t.requires_grad_() for t in w))
    deter, stoch, action = (torch.randn(B, n, generator=g).requires_grad_() for n in (D, SC, A))
    probe = torch.randn(B, D, generator=g)
    return B, w, deter, stoch, action, probe, [deter, stoch, action, *w]


def _assert_same_step(got, want, probe, leaves):
    """Two core outputs bitwise equal, and their gradients into every leaf for one probe."""
    assert torch.equal(got, want)
    for a, b in zip(
        torch.autograd.grad((got * probe).sum(), leaves), torch.autograd.grad((want * probe).sum(), leaves)
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bf16", [False, True])
def test_block_gru_step_takes_its_action_branch_precomputed(bf16, monkeypatch):
    """step(..., x2=action_branch(action)) is step(..., action), bitwise: output, every gradient (the action and the
    branch's weights through action_branch), and with taps the same seen factors less the branch's sites (taps at
    those sites with x2 are refused). The switch hands x2 to the Triton core too, whose output is the reference's
    given the same x2 (tests/kernels/test_block_gru.py checks its gradients)."""

    B, w, deter, stoch, action, probe, leaves = _core_case(11)
    want = reference.step(deter, stoch, action, w, bf16)
    got = reference.step(deter, stoch, None, w, bf16, x2=reference.action_branch(action, w, bf16))
    _assert_same_step(got, want, probe, leaves)

    widths = reference.tap_widths(w)
    taps = {site: torch.zeros(B, widths[site]) for site in reference.TAP_SITES}
    out, seen = reference.step(deter, stoch, action, w, bf16, taps=taps)
    kept = {site: t for site, t in taps.items() if site not in reference.ACTION_SITES}
    x2 = reference.action_branch(action, w, bf16)
    out_h, seen_h = reference.step(deter, stoch, None, w, bf16, taps=kept, x2=x2)
    assert torch.equal(out_h, out) and sorted(seen_h) == sorted(kept)
    assert all(torch.equal(seen_h[site], seen[site]) for site in kept)
    with pytest.raises(ValueError, match="action branch's sites"):  # their taps would get no gradient
        reference.step(deter, stoch, None, w, bf16, taps=taps, x2=x2)

    _assert_triton_core_takes(monkeypatch, deter, stoch, action, w, x2=x2)


@pytest.mark.parametrize("bf16", [False, True])
def test_block_gru_step_takes_its_branch_products_precomputed(bf16, monkeypatch):
    """step(..., x0p=deter @ w0, x1p=stoch @ w1) is step(...), bitwise, output and every gradient (deter's through
    both its uses, w0's and w1's through the products), with taps the same seen factors at every site (x0's is
    still deter, x1's stoch); with rows of the inputs and of the products zeroed alike (the RSSM's is_first mask)
    too. The switch hands x0p and x1p to the Triton core too (as x2 above)."""

    B, w, deter, stoch, action, probe, leaves = _core_case(12)
    keep = torch.tensor([1.0, 0.0, 1.0])[:, None]
    prod = reference._operand(deter, bf16) @ reference._operand(w.w0, bf16)
    prod1 = reference._operand(stoch, bf16) @ reference._operand(w.w1, bf16)
    want = reference.step(deter * keep, stoch * keep, action, w, bf16)
    got = reference.step(deter * keep, stoch * keep, action, w, bf16, x0p=prod * keep, x1p=prod1 * keep)
    _assert_same_step(got, want, probe, leaves)

    widths = reference.tap_widths(w)
    taps = {site: torch.zeros(B, widths[site]) for site in reference.TAP_SITES}
    out, seen = reference.step(deter, stoch, action, w, bf16, taps=taps)
    out_p, seen_p = reference.step(deter, stoch, action, w, bf16, taps=taps, x0p=prod, x1p=prod1)
    assert torch.equal(out_p, out) and sorted(seen_p) == sorted(seen)
    assert all(torch.equal(seen_p[site], seen[site]) for site in seen)

    _assert_triton_core_takes(monkeypatch, deter, stoch, action, w, x0p=prod)
    _assert_triton_core_takes(monkeypatch, deter, stoch, action, w, x0p=prod, x1p=prod1)


def _assert_triton_core_takes(monkeypatch, deter, stoch, action, w, **given):
    """block_gru.step under the Triton core with these given branches: reference.step's float32 output given the
    same, within the fused kernels' output tolerance (kernels/block_gru/fused.py); without grad."""
    from fastdreamer.kernels import block_gru

    if os.environ.get("TRITON_INTERPRET") != "1":  # these are CPU tensors: the kernels take them in the interpreter
        return
    with torch.no_grad():
        want = reference.step(deter, stoch, action, w, **given)
        monkeypatch.setattr(block_gru, "_impl", "triton")
        got = block_gru.step(deter, stoch, action, w, **given)
        monkeypatch.setattr(block_gru, "_impl", "torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_block_gru_rejects_bad_shapes():
    w = reference.BlockGRUWeights(
        *(
            torch.zeros(s)
            for s in [
                (8, 3),
                (3,),
                (3,),
                (4, 3),
                (3,),
                (3,),
                (2, 3),
                (3,),
                (3,),
                (2, 13, 4),
                (8,),
                (8,),
                (2, 4, 12),
                (24,),
            ]
        )
    )
    reference.check_shapes(torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(2, 2), w)
    with pytest.raises(ValueError, match="mismatched batch"):
        reference.check_shapes(torch.zeros(2, 8), torch.zeros(3, 4), torch.zeros(2, 2), w)
    with pytest.raises(ValueError, match="w1 has shape"):
        reference.check_shapes(torch.zeros(2, 8), torch.zeros(2, 5), torch.zeros(2, 2), w)


def test_lambda_return_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    N, L, disc, lam = 5, 12, 0.99, 0.95
    rew, boot = rng.normal(size=(N, L)), rng.normal(size=(N, L))
    term, last = rng.random((N, L)) < 0.2, rng.random((N, L)) < 0.2
    out = lambda_return(*(torch.tensor(x) for x in (last, term, rew, boot)), disc, lam).numpy()
    # G_t = r_{t+1} + disc * (1 - term_{t+1}) * [(1 - lam') V_{t+1} + lam' G_{t+1}], lam' = lam * (1 - last_{t+1}),
    # with G_{L-1} = V_{L-1}.
    for n in range(N):
        g = boot[n, L - 1]
        for t in reversed(range(L - 1)):
            lam_t = lam * (1 - last[n, t + 1])
            g = rew[n, t + 1] + disc * (1 - term[n, t + 1]) * ((1 - lam_t) * boot[n, t + 1] + lam_t * g)
            assert out[n, t] == pytest.approx(g, rel=1e-12, abs=1e-12)


def test_lambda_return_in_float32_over_a_replay_batch():
    """The replay value loss's returns: 64 steps (the unrolled form's longest products), float32 inputs, against the
    recursion in float64. Each return sums at most 64 rounded terms, so the bound is 64 float32 ulps of the largest
    return; an off-by-one in the products moves returns by O(1)."""
    gen = torch.Generator().manual_seed(1)
    N, L, disc, lam = 16, 64, 1 - 1 / 333, 0.95
    rew, boot = torch.randn(N, L, generator=gen), 10 * torch.randn(N, L, generator=gen)
    term, last = torch.rand(N, L, generator=gen) < 0.05, torch.rand(N, L, generator=gen) < 0.05
    got = lambda_return(last, term, rew, boot, disc, lam)
    want = torch.empty(N, L - 1, dtype=torch.float64)
    g = boot[:, -1].double()
    for t in reversed(range(L - 1)):
        lam_t = lam * (~last[:, t + 1]).double()
        g = rew[:, t + 1].double() + disc * (~term[:, t + 1]).double() * (
            (1 - lam_t) * boot[:, t + 1].double() + lam_t * g
        )
        want[:, t] = g
    assert got.dtype == torch.float32 and got.shape == (N, L - 1)
    assert (got.double() - want).abs().max() <= L * 2**-24 * want.abs().max()


def test_percentiles_match_numpy():
    x = torch.randn(15361, generator=torch.Generator().manual_seed(0))
    got = percentiles(x, (5.0, 95.0, 0.0, 100.0, 50.0))
    expect = np.percentile(x.numpy(), [5, 95, 0, 100, 50])
    np.testing.assert_allclose(torch.stack(got).numpy(), expect, rtol=1e-6)


def test_rssm_resets_state_and_action_on_first_step():
    torch.manual_seed(0)
    rssm = RSSM(token_dim=6, act_dim=2, deter=16, hidden=8, stoch=4, classes=3, blocks=4)
    token = torch.randn(2, 6)
    first = torch.tensor([True, True])
    deter = torch.randn(2, 16) * 5
    stoch = F.one_hot(torch.randint(0, 3, (2, 4)), 3).float()
    action = torch.randn(2, 2)
    torch.manual_seed(1)
    a = rssm.obs_step(deter, stoch, action, token, first)
    torch.manual_seed(1)
    b = rssm.obs_step(torch.zeros(2, 16), torch.zeros(2, 4, 3), torch.zeros(2, 2), token, first)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.manual_seed(1)
    c = rssm.obs_step(deter, stoch, action, token, ~first)
    assert not torch.equal(a[0], c[0])


def observe_case(seed: int, T: int):
    """A small RSSM (deter 16, 4 latents of 3 classes) and an observe sequence (B 3, T steps, token 6, action 2)
    with some first steps: rssm, tokens, actions, is_first, deter0, stoch0, uniforms, and the generator."""
    gen = torch.Generator().manual_seed(seed)
    B, E, A = 3, 6, 2
    torch.manual_seed(0)
    rssm = RSSM(token_dim=E, act_dim=A, deter=16, hidden=8, stoch=4, classes=3, blocks=4)
    tokens = torch.randn(B, T, E, generator=gen, requires_grad=True)
    actions = torch.randn(B, T, A, generator=gen)
    first = torch.rand(B, T, generator=gen) < 0.3
    deter0 = torch.randn(B, 16, generator=gen, requires_grad=True)
    stoch0 = F.one_hot(torch.randint(0, 3, (B, 4), generator=gen), 3).float()
    u = torch.rand(T, B, 4, 1, generator=gen)
    return rssm, tokens, actions, first, deter0, stoch0, u, gen


def test_observe_is_its_steps_with_the_per_step_work_hoisted():
    """observe() against the plain loop of obs_step over tokens[:, t] with the same uniforms: outputs and every
    gradient (parameters, tokens, initial state) bitwise. And what it hoists: one uniform draw per sequence, none
    per step, and no per-step select_backward (a zero-filled (B, T, E) gradient per step in the plain loop)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, T = 3, 7
    rssm, tokens, actions, first, deter0, stoch0, u, gen = observe_case(5, T)
    weights = torch.randn(B, T, 4, 3, generator=gen)

    def grads(outs):
        deters, stochs, logps = outs
        loss = deters.square().mean() + (logps * weights).sum() + (stochs * weights).sum()
        leaves = [tokens, deter0, *rssm.step_params().values()]
        return torch.autograd.grad(loss, leaves)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        got = rssm.observe(deter0, stoch0, tokens, actions, first, u)
        got_grads = grads(got)
    deter, stoch, want = deter0, stoch0, ([], [], [])
    for t in range(T):
        deter, stoch, logp = rssm.obs_step(deter, stoch, actions[:, t], tokens[:, t], first[:, t], u[t])
        for out, x in zip(want, (deter, stoch, logp)):
            out.append(x)
    want = tuple(torch.stack(x, 1) for x in want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(got_grads, grads(want)):
        assert torch.equal(g, w)
    assert "select_backward.default" not in ops.names
    with Ops() as ops:
        rssm.observe(deter0, stoch0, tokens, actions, first)  # draws its uniforms: once
    draws = [n for n in ops.names if n.split(".")[0] in ("uniform_", "rand", "bernoulli_", "normal_", "random_")]
    assert len(draws) == 1, draws


def test_observe_with_emitted_copies_is_the_same_loop_and_hands_its_steps_contiguous_gradients():
    """emit_copies (the fast modes' observe): the same outputs and every gradient as the plain observe, bitwise; the
    steps' outputs for the stack are copies distinct from the carried state; and stack_steps hands each step a
    contiguous gradient slice (torch.stack's backward hands strided ones, which a compiled step copies)."""
    B, T = 3, 5
    rssm, tokens, actions, first, deter0, stoch0, u, gen = observe_case(7, T)
    weights = [torch.randn(B, T, *shape, generator=gen) for shape in ((16,), (4, 3), (4, 3))]
    leaves = [tokens, deter0, *rssm.step_params().values()]

    def run(emit):
        rssm.emit_copies = emit
        outs = rssm.observe(deter0, stoch0, tokens, actions, first, u)
        loss = sum((x * w).sum() for x, w in zip(outs, weights)) + outs[0].square().sum()
        return outs, torch.autograd.grad(loss, leaves)

    (want, want_grads), (got, got_grads) = run(False), run(True)
    for g, w in zip([*got, *got_grads], [*want, *want_grads], strict=True):
        assert torch.equal(g, w)
    rssm.emit_copies = True
    step = rssm.obs_step(deter0, stoch0, actions[:, 0], tokens[:, 0], first[:, 0], u[0], emit=True)
    assert len(step) == 5 and torch.equal(step[3], step[0]) and torch.equal(step[4], step[1])
    assert step[3].data_ptr() != step[0].data_ptr() and step[4].data_ptr() != step[1].data_ptr()

    seen = []
    xs = [torch.randn(B, 4, 3, generator=gen, requires_grad=True) for _ in range(T)]
    for x in xs:
        x.register_hook(lambda g: seen.append(g.is_contiguous()))
    stacked = stack_steps(xs)
    assert torch.equal(stacked, torch.stack(xs, 1))
    grad = torch.randn(B, T, 4, 3, generator=gen)
    assert torch.equal(torch.stack(torch.autograd.grad(stacked, xs, grad), 1), grad)
    assert seen == [True] * T


def test_kl_free_bits_and_gradient_split():
    rssm = RSSM(token_dim=6, act_dim=2, deter=16, hidden=8, stoch=4, classes=3, blocks=4, free_nats=1.0)
    post = torch.log_softmax(torch.randn(2, 5, 4, 3) * 3, -1).requires_grad_()
    prior = torch.log_softmax(torch.randn(2, 5, 4, 3) * 3, -1).requires_grad_()
    dyn, rep = rssm.kl_losses(post, prior)
    kl = dists.categorical_kl(post, prior).sum(-1)
    assert torch.allclose(dyn, kl.clamp_min(1.0)) and torch.allclose(rep, kl.clamp_min(1.0))
    gd = torch.autograd.grad(dyn.sum(), [post, prior], allow_unused=True)
    gr = torch.autograd.grad(rep.sum(), [post, prior], allow_unused=True)
    assert gd[0] is None and gd[1] is not None  # dyn trains the prior only
    assert gr[0] is not None and gr[1] is None  # rep trains the posterior only


def make_agent(discrete=True, image=False, image_size=64, **kw):
    obs = {"vector": ((4,), torch.float32)}
    if image:
        obs["image"] = ((image_size, image_size, 3), torch.uint8)
    spec = EnvSpec(obs=obs, discrete=discrete, act_dim=3, env_id="test", classes=0)
    cfg = Config(size="debug", batch_size=3, batch_length=6, imag_length=4, **kw)
    return Agent(cfg, spec), cfg, spec


def random_batch(spec, B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for k, (shape, dt) in spec.obs.items():
        data[k] = (
            torch.randint(0, 256, (B, L, *shape), generator=g).to(dt)
            if dt == torch.uint8
            else torch.randn(B, L, *shape, generator=g)
        )
    data["reward"] = torch.randn(B, L, generator=g)
    data["is_first"] = torch.rand(B, L, generator=g) < 0.15
    data["is_last"] = torch.rand(B, L, generator=g) < 0.15
    data["is_terminal"] = data["is_last"] & (torch.rand(B, L, generator=g) < 0.5)
    if spec.discrete:
        data["action"] = F.one_hot(torch.randint(0, 3, (B, L), generator=g), 3).float()
    else:
        data["action"] = torch.randn(B, L, 3, generator=g)
    data["deter"] = torch.randn(B, L, 32, generator=g).bfloat16()
    data["stoch"] = torch.randint(0, 4, (B, L, 4), generator=g).to(torch.uint8)
    return data


@pytest.mark.parametrize("discrete,image,size", [(True, False, 64), (False, True, 64), (True, True, 96)])
def test_agent_loss_is_finite_and_trains_every_module(discrete, image, size):
    torch.manual_seed(0)
    agent, cfg, spec = make_agent(discrete, image, image_size=size)  # 96: the reference main's Atari frames
    loss, metrics, latents = agent.loss(random_batch(spec))
    assert torch.isfinite(loss)
    expected = {"dyn", "rep", "rew", "con", "policy", "value", "repval", "vector"} | ({"image"} if image else set())
    assert {k[5:] for k in metrics if k.startswith("loss/") and k != "loss/total"} == expected
    loss.backward()
    missing = [n for n, p in agent.named_parameters() if not n.startswith("slow_critic.") and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in agent.slow_critic.parameters())
    assert latents["deter"].shape == (3, 6, 32) and latents["stoch"].shape == (3, 6, 4)


def test_discrete_observations_are_one_hot_in_and_categorical_out():
    """The reference's DictConcat one-hots discrete keys (no symlog) beside the symlogged vector, and its decoder
    scores them by a categorical log-likelihood summed over elements: against F.one_hot and F.cross_entropy."""
    torch.manual_seed(0)
    obs = {"vector": ((4,), torch.float32), "discrete": ((2,), torch.int32)}
    spec = EnvSpec(obs=obs, discrete=True, act_dim=3, env_id="test", classes=6)
    agent = Agent(Config(size="debug", batch_size=3, batch_length=6, imag_length=4), spec)
    vec, idx = torch.randn(3, 5, 4), torch.randint(0, 6, (3, 5, 2), dtype=torch.int32)
    want = agent.encoder.mlp(torch.cat([symlog(vec), F.one_hot(idx.long(), 6).float().flatten(-2)], -1))
    got = agent.encoder({"vector": vec, "discrete": idx})
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same operations on the same values

    deter, stoch = torch.randn(3, 5, 32), torch.randn(3, 5, 4 * 4)
    recon = agent.decoder(deter, stoch)
    assert recon["discrete"].shape == (3, 5, 2 * 6) and recon["vector"].shape == (3, 5, 4)
    rew, con = torch.zeros(3, 5, 255), torch.zeros(3, 5)
    fields = {"vector": vec, "discrete": idx, "reward": torch.zeros(3, 5), "is_terminal": torch.zeros(3, 5, dtype=bool)}
    loss = agent.prediction_losses(recon, rew, con, fields)["discrete"]
    logits = recon["discrete"].unflatten(-1, (2, 6)).flatten(0, 2)
    want = F.cross_entropy(logits, idx.long().flatten(), reduction="none").view(3, 5, 2)
    torch.testing.assert_close(loss, want.sum(-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="need their classes"):
        Agent(Config(size="debug"), EnvSpec(obs=obs, discrete=True, act_dim=3, env_id="t", classes=0))


def test_discrete_observation_elements_of_unequal_classes_are_each_their_own_categorical():
    """Elements of 2, 2, 5 and 3 classes (the reference's separate keys): the encoder reads 2 + 2 + 5 + 3 one-hot
    inputs, no always-zero columns that would enlarge its fan-in; the decoder's softmax of each element is over its own
    classes only, so its log-likelihood is F.cross_entropy's over those logits."""
    torch.manual_seed(0)
    counts = (2, 2, 5, 3)
    obs = {"discrete": ((4,), torch.int32)}
    spec = EnvSpec(obs=obs, discrete=True, act_dim=3, env_id="test", classes=5, obs_classes=counts)
    agent = Agent(Config(size="debug", batch_size=3, batch_length=6, imag_length=4), spec)
    assert agent.encoder.mlp[0].linear.in_features == sum(counts)
    idx = torch.stack([torch.randint(0, n, (3, 5)) for n in counts], -1).to(torch.int32)
    onehots = [F.one_hot(idx[..., i].long(), n).float() for i, n in enumerate(counts)]
    want = agent.encoder.mlp(torch.cat(onehots, -1))
    torch.testing.assert_close(agent.encoder({"discrete": idx}), want, rtol=0, atol=0)

    deter, stoch = torch.randn(3, 5, 32), torch.randn(3, 5, 4 * 4)
    recon = agent.decoder(deter, stoch)["discrete"]
    assert recon.shape == (3, 5, sum(counts))  # no logits for classes an element does not have
    fields = {"discrete": idx, "reward": torch.zeros(3, 5), "is_terminal": torch.zeros(3, 5, dtype=bool)}
    loss = agent.prediction_losses({"discrete": recon}, torch.zeros(3, 5, 255), torch.zeros(3, 5), fields)["discrete"]
    want, i = 0, 0
    for e, n in enumerate(counts):  # each element's logits are the next n outputs
        logits = recon[..., i : i + n].flatten(0, 1)
        want = want + F.cross_entropy(logits, idx[..., e].long().flatten(), reduction="none")
        i += n
    torch.testing.assert_close(loss, want.view(3, 5), rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    grads = [p.grad for p in agent.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_reward_and_critic_start_at_zero():
    """Zero-initialised output layers: predictions are exactly 0 before training (symmetric bins)."""
    agent, cfg, spec = make_agent()
    f = torch.randn(5, agent.rssm.feat_dim)
    with torch.no_grad():  # twohot_pred gives values only
        assert torch.equal(dists.twohot_pred(agent.reward(f), agent.bins), torch.zeros(5))
        assert torch.equal(dists.twohot_pred(agent.critic(f), agent.bins), torch.zeros(5))


def test_actor_loss_does_not_reach_the_world_model():
    torch.manual_seed(0)
    agent, cfg, spec = make_agent(
        loss_rec=0, loss_rew=0, loss_con=0, loss_dyn=0, loss_rep=0, loss_value=0, loss_repval=0
    )
    loss, _, _ = agent.loss(random_batch(spec))
    loss.backward()
    wm = [p for m in (agent.encoder, agent.rssm, agent.decoder) for p in m.parameters()]
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in wm)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in agent.actor.parameters())


def test_repval_gradient_reaches_the_world_model():
    """As in the reference (repval_grad: True), the replay value loss trains the representation."""
    torch.manual_seed(0)
    agent, cfg, spec = make_agent(
        loss_rec=0, loss_rew=0, loss_con=0, loss_dyn=0, loss_rep=0, loss_value=0, loss_policy=0
    )
    with torch.no_grad():  # a non-zero critic so the repval loss depends on features
        agent.critic.out.weight.normal_()
    loss, _, _ = agent.loss(random_batch(spec))
    loss.backward()
    assert agent.encoder.mlp[0].linear.weight.grad.abs().max() > 0


def _plain_returns(rew, cont, boot, last, lam):
    """Lambda-returns step by step, as DreamerV3 writes them: R_t = r_t+1 + c_t+1 ((1 - l) v_t+1 + l R_t+1), where a
    cut (last) sets l to 0, and R_L-1 = v_L-1. rew, cont (the discount times continuation), boot, last: (N, L)."""
    L = rew.shape[1]
    rets = [boot[:, -1]]
    for t in reversed(range(L - 1)):
        lt = lam * (1.0 - last[:, t + 1].float())
        rets.append(rew[:, t + 1] + cont[:, t + 1] * ((1 - lt) * boot[:, t + 1] + lt * rets[-1]))
    return torch.stack(rets[::-1][:-1], 1)


def test_agent_loss_matches_the_formulas_written_out():
    """Every term of Agent.loss against the DreamerV3 formulas written out here from the modules' outputs, each
    loss scale distinct, a return scale above its floor, non-zero reward, critic and slow-critic heads: the losses
    and every parameter's gradient. The modules (encoder, observe, heads, two-hot) are tested on their own; this is
    the loss around them: the KL with free bits, the continue target, the imagined returns, their normaliser, the
    REINFORCE and entropy terms, the value and replay-value losses and their weights and masks."""
    torch.manual_seed(0)
    scales = dict(loss_dyn=1.1, loss_rep=0.2, loss_rew=0.9, loss_con=0.8, loss_rec=1.3)
    scales.update(loss_policy=1.2, loss_value=0.7, loss_repval=0.4)
    agent, cfg, spec = make_agent(
        **scales, slowreg=0.6, actent=0.05, lam=0.9, horizon=50, retnorm_rate=0.5, retnorm_limit=1e-3
    )
    with torch.no_grad():
        for head in (agent.reward, agent.critic, agent.slow_critic):
            head.out.weight.normal_(0, 0.05)
    data = random_batch(spec)
    torch.manual_seed(1)
    total, metrics, _ = agent.loss(data)
    params = agent.trainable()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    agent.retnorm_lo.zero_()
    agent.retnorm_hi.zero_()

    torch.manual_seed(1)  # the same draws, in the same order: the posterior's, then imagination's
    B, T = 3, 6
    obs = {k: v[:, 1:] for k, v in data.items()}  # replay context 1: step 0 only starts the latent
    deter0 = data["deter"][:, 0].float()
    stoch0 = F.one_hot(data["stoch"][:, 0].long(), agent.rssm.classes).float()
    is_first, is_term = obs["is_first"], obs["is_terminal"]
    is_last = obs["is_last"]
    deters, stochs, post = agent.rssm.observe(deter0, stoch0, agent.encoder(obs), data["action"][:, :-1], is_first)
    prior = agent.rssm.prior(deters)

    def kl(p, q):
        return (p.exp() * (p - q)).sum(-1).sum(-1)

    want = {
        "dyn": kl(post.detach(), prior).clamp_min(cfg.free_nats),
        "rep": kl(post, prior.detach()).clamp_min(cfg.free_nats),
        "vector": (agent.decoder(deters, stochs.flatten(-2))["vector"] - symlog(obs["vector"])).square().sum(-1),
    }
    f = torch.cat([deters, stochs.flatten(-2)], -1)
    want["rew"] = dists.twohot_loss(agent.reward(f), obs["reward"], agent.bins)
    con_target = (1.0 - is_term.float()) * (1 - 1 / cfg.horizon)
    want["con"] = F.binary_cross_entropy_with_logits(agent.cont(f).squeeze(-1), con_target, reduction="none")

    imgfeat, imgact = agent.imagine(deters.detach().flatten(0, 1), stochs.detach().flatten(0, 1))
    with torch.no_grad():
        rew = dists.twohot_pred(agent.reward(imgfeat), agent.bins)
        con = torch.sigmoid(agent.cont(imgfeat).squeeze(-1))
        val = dists.twohot_pred(agent.critic(imgfeat), agent.bins)
        slowval = dists.twohot_pred(agent.slow_critic(imgfeat), agent.bins)
        ret = _plain_returns(rew, con, val, torch.zeros_like(con, dtype=torch.bool), cfg.lam)
        lo, hi = (cfg.retnorm_rate * torch.quantile(ret.flatten(), q) for q in (0.05, 0.95))  # EMAs from 0
        adv = (ret - val[:, :-1]) / torch.clamp_min(hi - lo, cfg.retnorm_limit)
        weight = torch.cumprod(con, 1)[:, :-1]
    assert hi - lo > cfg.retnorm_limit, "the return scale is above its floor: the advantages are divided by it"
    probs = 0.99 * torch.softmax(agent.actor(imgfeat), -1) + 0.01 / spec.act_dim
    logpi = (imgact * probs.log()).sum(-1)[:, :-1]
    ent = -(probs * probs.log()).sum(-1)[:, :-1]
    want["policy"] = weight * -(logpi * adv + cfg.actent * ent)
    critic = agent.critic(imgfeat)[:, :-1]
    want["value"] = weight * (
        dists.twohot_loss(critic, ret, agent.bins)
        + cfg.slowreg * dists.twohot_loss(critic, slowval[:, :-1], agent.bins)
    )
    rep_critic = agent.critic(f)
    with torch.no_grad():
        boot = ret[:, 0].reshape(B, T)
        rep_ret = _plain_returns(obs["reward"], (1.0 - is_term.float()) * (1 - 1 / cfg.horizon), boot, is_last, cfg.lam)
        rep_slow = dists.twohot_pred(agent.slow_critic(f), agent.bins)
    want["repval"] = (~is_last[:, :-1]).float() * (
        dists.twohot_loss(rep_critic[:, :-1], rep_ret, agent.bins)
        + cfg.slowreg * dists.twohot_loss(rep_critic[:, :-1], rep_slow[:, :-1], agent.bins)
    )
    scale = {"dyn": 1.1, "rep": 0.2, "rew": 0.9, "con": 0.8, "vector": 1.3, "policy": 1.2, "value": 0.7, "repval": 0.4}
    want_total = sum(scale[k] * v.mean() for k, v in want.items())
    for key, value in want.items():
        torch.testing.assert_close(metrics[f"loss/{key}"], value.mean().detach(), rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-7)
    want_grads = torch.autograd.grad(want_total, params, allow_unused=True)
    names = [n for n, p in agent.named_parameters() if not n.startswith("slow_critic.")]
    for name, g, w in zip(names, grads, want_grads, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:  # float32 sums in other orders: 1e-5 of the gradient's own size
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=name)


def test_sequence_start_takes_the_stored_latent_and_the_action_before_each_step():
    agent, cfg, spec = make_agent()
    data = random_batch(spec)
    deter0, stoch0, prevact, obs = agent.sequence_start(data)  # replay context 1: step 0 starts the latent
    assert torch.equal(deter0, data["deter"][:, 0].float())
    assert torch.equal(stoch0, F.one_hot(data["stoch"][:, 0].long(), agent.rssm.classes).float())
    assert torch.equal(prevact, data["action"][:, :-1]) and prevact.shape[1] == 6
    assert obs.keys() == data.keys() and all(torch.equal(obs[k], data[k][:, 1:]) for k in obs)
    agent0, _, _ = make_agent(replay_context=0)  # no context: the initial state and a zero action first
    deter0, stoch0, prevact, obs = agent0.sequence_start(data)
    assert not deter0.any() and not stoch0.any() and deter0.shape == (3, 32) and stoch0.shape == (3, 4, 4)
    assert not prevact[:, 0].any() and torch.equal(prevact[:, 1:], data["action"][:, :-1])
    assert all(torch.equal(obs[k], data[k]) for k in obs)


def test_the_core_scales_actions_above_one_and_leaves_others_alone():
    """The reference divides the core's action input by max(1, |a|) elementwise, with no gradient through it."""
    from fastdreamer.rssm import _scale_action

    a = torch.tensor([[-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0]], requires_grad=True)
    got = _scale_action(a)
    assert torch.equal(got.detach(), torch.tensor([[-1.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.0]]))
    (g,) = torch.autograd.grad(got.sum(), a)
    assert torch.equal(g, torch.tensor([[1 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]]))
    torch.manual_seed(0)
    agent, _, _ = make_agent(discrete=False)
    deter, stoch = torch.randn(2, 32), F.one_hot(torch.randint(0, 4, (2, 4)), 4).float()
    u = torch.rand(2, 4, 1)
    big = torch.tensor([[3.0, -0.5, 2.0], [-4.0, 0.5, 1.0]])
    got = agent.rssm.img_step(deter, stoch, big, u)[0]
    want = agent.rssm.img_step(deter, stoch, big / big.abs().clamp_min(1.0), u)[0]
    assert torch.equal(got, want), "the core saw the action scaled"
    assert not torch.equal(got, agent.rssm.img_step(deter, stoch, big * 0.5, u)[0])


def test_replay_context_starts_from_the_stored_latent():
    torch.manual_seed(0)
    agent, cfg, spec = make_agent()
    data = random_batch(spec)
    data["is_first"][:, 1] = False
    torch.manual_seed(1)
    a, _, lat_a = agent.loss(data)
    data2 = {k: v.clone() for k, v in data.items()}
    data2["deter"][:, 0] += 1.0
    torch.manual_seed(1)
    b, _, lat_b = agent.loss(data2)
    assert not torch.equal(lat_a["deter"][:, 0], lat_b["deter"][:, 0])
    data3 = {k: v.clone() for k, v in data2.items()}
    data3["is_first"][:, 1] = True  # a reset right after the context step discards it
    data4 = {k: v.clone() for k, v in data.items()}
    data4["is_first"][:, 1] = True
    torch.manual_seed(1)
    _, _, lat_c = agent.loss(data3)
    torch.manual_seed(1)
    _, _, lat_d = agent.loss(data4)
    assert torch.equal(lat_c["deter"], lat_d["deter"])


def test_return_normaliser_tracks_percentiles_with_a_floor():
    agent, cfg, spec = make_agent()
    ret = torch.linspace(0, 100, 1001)
    for _ in range(3):
        offset, scale = agent._update_retnorm(ret)
    lo = 5.0 * (1 - 0.99**3)
    hi = 95.0 * (1 - 0.99**3)
    assert offset.item() == pytest.approx(lo, rel=1e-5) and scale.item() == pytest.approx(hi - lo, rel=1e-5)
    agent2, _, _ = make_agent()
    _, scale = agent2._update_retnorm(torch.zeros(100))
    assert scale.item() == 1.0  # limit: small returns are not scaled up


def test_slow_critic_is_an_ema():
    agent, cfg, spec = make_agent()
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.slow_critic.parameters()]
    agent.update_slow_critic()
    for b, s, c in zip(before, agent.slow_critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(s, 0.98 * b + 0.02 * c)


@pytest.mark.parametrize("policy_unimix", [0.0, 0.01, 0.3])
def test_actor_unimix_is_its_own_setting_and_leaves_the_rssm_alone(policy_unimix):
    spec = EnvSpec(obs={"vector": ((3,), torch.float32)}, discrete=True, act_dim=5, env_id="t")
    torch.manual_seed(0)
    agent = Agent(Config(size="debug", unimix=0.01, policy_unimix=policy_unimix), spec)
    with torch.no_grad():
        agent.actor.out.weight.normal_(0, 30.0)  # a peaked policy: some classes far below any floor
    f = torch.randn(64, agent.rssm.feat_dim)
    probs = agent.policy(f).logp_all.exp()[:, 0]  # (64, G = 1, 5)
    raw = torch.softmax(agent.actor(f).float(), -1)
    torch.testing.assert_close(probs, (1 - policy_unimix) * raw + policy_unimix / 5, rtol=1e-5, atol=1e-7)
    assert raw.min() < 1e-4, "the test needs classes below the floor to tell the settings apart"
    assert agent.rssm.unimix == 0.01


def test_continuous_actor_has_separate_mean_and_std_layers_clipped_apart():
    """The reference's bounded_normal has a mean and a stddev layer: AGC bounds each by its own norm, so a huge std
    gradient must not shrink the mean's step."""
    from fastdreamer.optim import LaProp

    torch.manual_seed(0)
    agent, cfg, spec = make_agent(discrete=False)
    actor = agent.actor
    assert actor.out.weight.shape == actor.std.weight.shape == (3, actor.mlp.out_dim)
    f = torch.randn(5, agent.rssm.feat_dim)
    h = actor.mlp(f)
    pol = agent.policy(f)
    torch.testing.assert_close(pol.mean, torch.tanh(actor.out(h)))
    torch.testing.assert_close(pol.std, (cfg.maxstd - cfg.minstd) * torch.sigmoid(actor.std(h) + 2.0) + cfg.minstd)

    def mean_step(std_grad_scale):
        """The mean weight's change after LaProp steps over the agent's real parameter list, where only the actor's
        output layers have gradients."""
        a = copy.deepcopy(agent)
        opt = LaProp(a.trainable(), lr=1.0, warmup=0, agc=cfg.agc)
        for _ in range(2):  # step 0 has lr 0
            a.actor.out.weight.grad = torch.full_like(a.actor.out.weight, 1e-6)  # far under the clip
            a.actor.std.weight.grad = torch.full_like(a.actor.std.weight, std_grad_scale)
            opt.step()
        return a.actor.out.weight.detach() - actor.out.weight.detach()

    torch.testing.assert_close(mean_step(1e3), mean_step(0.0), rtol=0, atol=0)
    assert mean_step(0.0).abs().max() > 0


def _rollout_case(discrete: bool, horizon: int, n: int = 64):
    from fastdreamer.agent import Agent
    from fastdreamer.config import Config

    torch.manual_seed(0)
    spec = EnvSpec(obs={"vector": ((4,), torch.float32)}, discrete=discrete, act_dim=3, env_id="test")
    agent = Agent(Config(size="debug", imag_length=horizon), spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init (zero biases, unit scales): a dropped bias or scale shows
        for q in agent.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=gen))
    rssm = agent.rssm
    deter = torch.randn(n, rssm.deter, generator=gen)
    stoch = F.one_hot(torch.randint(0, rssm.classes, (n, rssm.stoch), generator=gen), rssm.classes).float()
    torch.manual_seed(2)
    lat, act = agent.noise(n, horizon, horizon + 1, "cpu")
    return agent, (deter, stoch, lat, act)


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_merged_rollout_is_the_rollout(precision, discrete):
    """Agent.merged_rollout (the fast modes' imagination) against rollout (eager's) from the same starts and noise.
    float32: the same discrete actions, continuous ones and feats within 1e-5 (the merged matmuls sum in another
    order; feats seen bitwise equal here).
    bf16 autocast: the actor's and the prior's first pre-activations round at other places, so a near tie can flip
    a sampled latent or discrete action and the trajectory then goes its own way; so: few flips (seen 0.8% of the
    states, bound 2%), and every trajectory's feats and actions before its first flip within 2^-6 in norm (a few
    bf16 roundings; seen bitwise for discrete actions, 4.8e-4 and 2.2e-3 for continuous ones)."""
    agent, args = _rollout_case(discrete, horizon=5)
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        feats, acts = agent.rollout(*args)
        m_feats, m_acts = agent.merged_rollout(*args)
    assert m_feats.shape == feats.shape and m_acts.shape == acts.shape
    if precision == "fp32":
        if discrete:
            assert torch.equal(m_acts, acts)
        torch.testing.assert_close(m_acts, acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m_feats, feats, rtol=1e-5, atol=1e-5)
        return
    from bench.rollout_ab import BF16_FLIPS, BF16_REL, agree_before_flips

    flips, err = agree_before_flips((m_feats, m_acts), (feats, acts), agent.rssm.deter, discrete)
    assert flips < BF16_FLIPS, f"{flips:.3%} of the imagined states flipped"
    assert err < BF16_REL, f"feats or actions before the trajectories part: relative error {err}"


def test_loss_metric_means_are_the_plain_means():
    """Agent.loss takes its metrics' means of same-shaped tensors as one reduction (agent._means), and the latents'
    entropy (summed over S and C, averaged over B and T) as a mean over all elements times S * C: the plain means
    and the plain entropy, to float32 summation order."""
    from fastdreamer.agent import _means

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 15, generator=gen) for _ in range(3))
    torch.testing.assert_close(_means(a, b, c), torch.stack([a.mean(), b.mean(), c.mean()]), rtol=1e-6, atol=1e-7)
    S, C = 4, 5
    logp = torch.log_softmax(torch.randn(3, 7, S, C, generator=gen), -1)
    want = dists.categorical_entropy(logp).sum(-1).mean()
    torch.testing.assert_close(_means(-(logp.exp() * logp))[0] * (S * C), want, rtol=1e-6, atol=1e-6)


def test_merged_rollout_stores_its_feats_in_bf16_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast every reader of the imagined feats is a matmul that casts them to bf16 first, so
    merged_rollout stores them as bf16: the fp32 feats of the same rollout (storage switched off) rounded, bitwise,
    with the same actions; and a head reads the same values from either."""
    from fastdreamer.kernels import block_gru

    agent, args = _rollout_case(True, horizon=4)
    with torch.autocast("cpu", torch.bfloat16):
        feats, acts = agent.merged_rollout(*args)
        with monkeypatch.context() as m:
            m.setattr(block_gru, "_bf16_autocast", lambda device: False)
            f32_feats, f32_acts = agent.merged_rollout(*args)
        heads = agent.reward(feats), agent.reward(f32_feats)
    assert feats.dtype == torch.bfloat16 and f32_feats.dtype == torch.float32
    assert torch.equal(feats, f32_feats.bfloat16()) and torch.equal(acts, f32_acts)
    assert torch.equal(*heads)
    feats, _ = agent.merged_rollout(*args)  # no autocast: float32
    assert feats.dtype == torch.float32


def test_merged_rollout_makes_two_matmuls_fewer_per_step():
    """What merged_rollout is for, counted at the dispatcher: per step one matmul of the new deter for three uses and
    one of the new sample for two, instead of four (the actor's first layer, the core's deter and stoch branches,
    the prior's first layer); once, before the loop, the two of the start states."""

    from counting import MatmulCount

    def count(merged: bool, horizon: int) -> int:
        agent, args = _rollout_case(True, horizon)
        with MatmulCount() as c:
            (agent.merged_rollout if merged else agent.rollout)(*args)
        return c.calls

    calls = {m: {h: count(m, h) for h in (3, 5)} for m in (False, True)}
    slope = {m: (c[5] - c[3]) / 2 for m, c in calls.items()}
    assert slope[False] - slope[True] == 2, calls


def test_the_compiled_merged_rollout_launches_two_matmuls_fewer_per_step():
    """bench.step_kernels --rollout (inductor's generated code, CPU, debug size, H 3 and 5): the compiled merged
    rollout makes 2 matmuls fewer per step, 2 more before the loop (the starts' products) and 1 fewer after it (the
    last action's actor layer): 2H - 1 in all, and no more fused kernels per step. Before the loop it may launch a
    kernel more, the concatenation of the merged weights (seen: 13 fused kernels per step each, 46 against 45 at
    H 3. Until session 27, 187 against 201 at H 15: the plain rollout's step had a kernel more, its next block-layer
    operand recomputing the gate math, which the split block layer removed, reference._split_hidden)."""
    from bench.step_kernels import rollout_launches

    counts = {H: rollout_launches("debug", "cpu", "fp32", H) for H in (3, 5)}
    for H, c in counts.items():
        assert c["rollout"]["extern"] - c["merged_rollout"]["extern"] == 2 * H - 1, counts
    slope = {
        name: {kind: (counts[5][name][kind] - counts[3][name][kind]) / 2 for kind in ("extern", "fused")}
        for name in ("rollout", "merged_rollout")
    }
    assert slope["rollout"]["extern"] - slope["merged_rollout"]["extern"] == 2, slope
    assert slope["merged_rollout"]["fused"] <= slope["rollout"]["fused"], slope


def test_a_cpus_compiled_core_step_splits_its_block_layer_without_gradients_only(monkeypatch):
    """Compiled for the CPU (inductor's C++ code), a core step without gradients (imagination, acting) multiplies the
    deter blocks and x apart (reference._split_hidden: a bmm and a mm, no zero-padded operand u, which the C++ code
    built with a scalar loop); with gradients it keeps u and one bmm, as it does with SPLIT_HIDDEN cleared. Both the
    eager step's values and gradient."""
    from torch._inductor.utils import run_and_get_code

    from bench.step_kernels import launches

    gen = torch.Generator().manual_seed(4)
    w = reference.random_weights(48, 4, 24, 20, 5, gen)
    inputs = torch.randn(7, 48, generator=gen), torch.randn(7, 20, generator=gen), torch.randn(7, 5, generator=gen)
    want = reference.step(*inputs, w)
    for grad, split in ((False, True), (True, True), (False, False)):
        torch._dynamo.reset()
        deter = inputs[0].clone().requires_grad_(grad)
        monkeypatch.setattr(reference, "SPLIT_HIDDEN", split)  # False: bench.rollout_ab's merged_u
        with torch.set_grad_enabled(grad):
            got, codes = run_and_get_code(torch.compile(reference.step, dynamic=False), deter, *inputs[1:], w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        u_form = grad or not split
        assert ("constant_pad_nd" in codes[0]) == u_form, (grad, split, codes[0][codes[0].find("def call(") :])
        # The forward's matmuls: the three branches, the block layer (split: two), the gate layer.
        assert launches(codes[0])["extern"] == (5 if u_form else 6), (grad, split, launches(codes[0]))
        if grad:
            got.square().sum().backward()
            ref_deter = inputs[0].clone().requires_grad_()
            reference.step(ref_deter, *inputs[1:], w).square().sum().backward()
            torch.testing.assert_close(deter.grad, ref_deter.grad, rtol=1e-5, atol=1e-6)


def test_a_compiled_function_retraces_when_the_core_is_switched(monkeypatch):
    """Compiled code branches on the core (Agent.merged_rollout falls back to rollout for the Triton core, the
    observe step calls block_gru.step, which picks the core): that holds only if dynamo guards on the switch, so a
    graph traced under one core is not replayed under the other. Checked here, since nothing else would show it."""
    from fastdreamer.kernels import block_gru

    def which(x):
        return x + 1 if block_gru.get_impl() == "triton" else x

    compiled = torch.compile(which)
    x = torch.zeros(2)
    assert torch.equal(compiled(x), x)
    monkeypatch.setattr(block_gru, "triton_available", lambda device=None: (True, ""))
    try:
        assert block_gru.set_impl("triton") == "triton"
        assert torch.equal(compiled(x), x + 1)
    finally:
        block_gru.set_impl("torch")
    assert torch.equal(compiled(x), x)
