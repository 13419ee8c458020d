"""The fast modes compute what eager computes: compiled updates, imagination and acting against eager from the same
seed and state, a host-sync guard over the update and the acting step, and the mode switch's errors.

CPU, size debug with a tiny batch so that a cold inductor compile stays near a minute; the GPU variants are skipped
without CUDA. RNG parity: inductor's fallback_random makes compiled rand_like draw from the eager generator in the
same order, so sampled latents and actions are the same values, not just the same distribution.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from fastdreamer.kernels import block_gru

from bench.common import TINY_CFG, TINY_SPEC, tiny_agent, tiny_batch
from bench.draws import DrawTape, taped
from fastdreamer import defer, fast
from fastdreamer.agent import Agent
from fastdreamer.dists import twohot_pred
from fastdreamer.train import update_step

SPEC, CFG = TINY_SPEC, TINY_CFG
K = 3  # updates compared
# The warm tests start from the state WARM eager fp32 updates leave (bench.common.warm_state): LaProp's moments are
# warm, the reward and critic output layers off zero, the slow critic apart from the critic, the return percentiles
# set (imagined returns are still ~1e-5 to 5e-5 at this config, so the return scale stays at its floor of 1); then
# the two-hot heads settled (bench.common.settle_twohot_heads), so that their values are well-conditioned.
WARM = 8
# Fused reductions sum in another order than eager: differences seen on CPU are <= 1e-6 on losses of size ~10 and
# <= 3e-8 on parameters after 3 updates; 10-100x margin, far below the 1e-3 parameter moves.
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)
FEAT_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 autocast matmuls in the fast modes: ~3 significant digits per matmul.
BF16_TOL = dict(rtol=5e-2, atol=5e-2)
GRAD_REL_TOL = 0.1  # per-tensor gradient, relative in norm, bf16 fast mode against bf16 eager (see the test)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The fused kernels on CPU tensors need Triton's interpreter, which tests/conftest.py turns on only without CUDA.
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


make, batch = tiny_agent, tiny_batch


def obs(n: int, step: int, device="cpu"):
    data = batch(step, device, B=n, L=1)
    return {"vector": data["vector"][:, 0], "is_first": data["is_first"][:, 0]}


def run_updates(mode: str, device="cpu", precision="fp32", warm=0, settled=True, prepare=None):
    """K updates of a tiny agent (make's `warm` and `settled`; `prepare(agent)` first, when given) in `mode`."""
    agent, opt = make(device, warm=warm, settled=settled)
    if prepare is not None:
        prepare(agent)
    update = fast.make_update(update_step, agent, opt, mode, precision)
    torch.manual_seed(1)
    history = []
    for k in range(K):
        metrics, latents = update(batch(k, device))
        history.append(
            ({n: v.detach().clone() for n, v in metrics.items()}, {n: v.clone() for n, v in latents.items()})
        )
    return agent, history, {n: v.clone() for n, v in agent.state_dict().items()}


@pytest.fixture(scope="module")
def fallback_random():
    with inductor_config.patch(fallback_random=True):
        yield


@pytest.fixture(scope="module")
def eager_run():
    return run_updates("eager")


NOISE_IN_GRAPH: list[bool] = []  # torch.compiler.is_compiling() at each Agent.noise call of the compiled run
DEFERRED: list[int] = []  # the number of steps of each deferred observe loop (defer.taps) in the compiled run
INT64_OUT: list[tuple] = []  # the shapes of int64 outputs of the compiled run's post-grad graphs


@pytest.fixture(scope="module")
def compiled_run(fallback_random):
    original, original_taps = Agent.noise, defer.taps

    def recording(self, *args, **kwargs):
        NOISE_IN_GRAPH.append(torch.compiler.is_compiling())
        return original(self, *args, **kwargs)

    def recording_taps(sites, params, steps, *args, **kwargs):
        DEFERRED.append(steps)
        return original_taps(sites, params, steps, *args, **kwargs)

    def recording_outputs(graph):
        (node,) = [n for n in graph.nodes if n.op == "output"]
        vals = [getattr(a, "meta", {}).get("val") for a in node.args[0]]
        INT64_OUT.extend(tuple(v.shape) for v in vals if isinstance(v, torch.Tensor) and v.dtype == torch.int64)

    with pytest.MonkeyPatch.context() as mp, inductor_config.patch(post_grad_custom_pre_pass=recording_outputs):
        mp.setattr(Agent, "noise", recording)
        mp.setattr(defer, "taps", recording_taps)
        mp.setattr(fast, "DEFER", True)  # the GPU default (fast.defer_on), so that this CPU run covers it too
        return run_updates("compile")


def assert_close(name, got, want, tol):
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


LOSSES = ("loss/dyn", "loss/vector", "loss/rew", "loss/con", "loss/value", "loss/repval", "loss/policy")


def assert_updates_close(label, got, want, agent, ref_agent, loss_tol, param_tol, grad_rel_tol, skip=()):
    """K updates' metrics `got` against `want` (LOSSES), `agent`'s parameters against `ref_agent`'s, and the last
    update's gradients per tensor, relative in norm, except those of parameters whose names start with `skip`."""
    for k in range(K):
        for name in LOSSES:
            assert_close(f"{label} update {k} {name}", got[k][name], want[k][name], loss_tol)
    for (name, p_e), p_f in zip(ref_agent.named_parameters(), agent.parameters(), strict=True):
        assert_close(f"{label} parameter {name}", p_f, p_e, param_tol)
        if p_e.grad is not None and not name.startswith(skip):
            err = (p_f.grad - p_e.grad).norm() / p_e.grad.norm().clamp_min(1e-12)
            assert err < grad_rel_tol, f"{label} gradient of {name}: relative error {err:.3g}"


def taped_updates(agent, opt, device, mode, precision, tape: DrawTape | None, ctx=contextlib.nullcontext):
    """K updates of `agent` in `mode` at `precision` (eager: under `ctx`), [(metrics, latents)], under
    bench.draws.taped: without free bits, the draws recorded on `tape` if it is empty (eager; each draw moved to the
    middle of a wide class interval), else replayed from it; tape None: as they come, with free bits.
    For comparing two bf16 computations: where rounding ~1e-2 apart in log-probs meets a discontinuity, two correct
    computations from one seed part by more than any bound a wrong gradient would fail (bench/LOG.md, session 22):
    - a draw: a uniform within ~5e-3 of a class edge picks another class in one of them, which moved the world
      model's gradients 20-30% (bench/draws.py). Replayed from the tape, every draw is far from an edge.
    - free bits: a step's KL within ~1e-2 of free_nats is clamped in one and not in the other, and its gradient is
      all the prior gets from the few unclamped steps (measured: 1 of 32 at 0.993, the prior's gradients 2-10x
      apart). free_nats 0: every step's KL trains the prior, a fuller check of its backward; the fp32 comparisons
      check the clamp."""
    with taped(agent, tape) as before, ctx():
        update = fast.make_update(update_step, agent, opt, mode, precision)  # after attached: compile_agent wraps it
        torch.manual_seed(1)
        history = []
        for k in range(K):
            before(k)
            metrics, latents = update(batch(k, device))
            history.append(({n: v.clone() for n, v in metrics.items()}, {n: v.clone() for n, v in latents.items()}))
    return history


def perturb_logits(agent: Agent, std: float = 1e-2) -> None:
    """Every categorical's logits (latent posterior and prior, actor) plus noise of `std`, from a generator of its
    own: a second computation that rounds like bf16 where the first does not (compiled bf16 posterior log-probs were
    up to 1e-2 from eager bf16's, torch 2.11 and 2.13 alike)."""
    gen = torch.Generator().manual_seed(5)

    def hook(module, args, out):
        return out + std * torch.randn(out.shape, generator=gen)

    for layer in (agent.rssm.obs_logit, agent.rssm.img_logit, agent.actor.out):
        layer.register_forward_hook(hook)


def test_a_draw_tape_keeps_bf16_sized_rounding_from_changing_a_draw():
    """DrawTape (bench/draws.py), on eager fp32 and the same agent with its logits perturbed as bf16 would round
    them: from one seed the perturbation picks other latent classes (the check can fail); with the perturbed run
    replaying the first one's tape, every latent class is the same. Replayed by the unperturbed agent, the tape gives
    the recorded run bit for bit: it serves every draw the update makes."""

    def latents(agent, opt, tape=None):
        return [(metrics, lat["stoch"]) for metrics, lat in taped_updates(agent, opt, "cpu", "eager", "fp32", tape)]

    def perturbed():
        agent, opt = make()
        perturb_logits(agent)
        return agent, opt

    plain = latents(*make())
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(plain, latents(*perturbed()))), "no draw changed"
    tape = DrawTape()
    recorded = latents(*make(), tape)
    assert tape.moved > 0, "no draw was moved to a wider class"
    for (_, a), (_, b) in zip(recorded, latents(*perturbed(), tape), strict=True):
        assert torch.equal(a, b), f"{(a != b).sum()} latent classes differ under the tape"
    for (m_a, a), (m_b, b) in zip(recorded, latents(*make(), tape), strict=True):
        assert torch.equal(a, b) and all(torch.equal(m_a[n], m_b[n]) for n in m_a), "a replay is not the recording"


def test_auto_is_eager_on_a_cpu_without_a_compiler(monkeypatch):
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    assert fast.resolve_mode("auto", torch.device("cpu")) == "eager"
    assert fast.resolve_mode("auto", torch.device("cuda")) == "graphs"


def test_precision_is_bf16_where_the_device_has_it_and_eager_stays_fp32(monkeypatch):
    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert fast.resolve_precision("auto", "compile", cpu) == ("bf16" if native else "fp32")
        assert fast.resolve_precision("auto", "eager", cpu) == "fp32"
        assert fast.resolve_precision("fp32", "compile", cpu) == "fp32"
        assert fast.resolve_precision("bf16", "compile", cpu) == "bf16"
    assert isinstance(fast.autocast(cpu, "compile", "bf16"), torch.autocast)
    assert not isinstance(fast.autocast(cpu, "compile", "fp32"), torch.autocast)
    assert not isinstance(fast.autocast(cpu, "eager"), torch.autocast)
    with pytest.raises(ValueError, match="needs a fast mode"):
        fast.resolve_precision("bf16", "eager", cpu)
    with pytest.raises(ValueError, match="unknown --precision 'fp16'"):
        fast.resolve_precision("fp16", "compile", cpu)
    agent, opt = make()
    with pytest.raises(ValueError, match="needs a fast mode"):
        fast.make_update(update_step, agent, opt, "eager", "bf16")


def test_resolve_mode_picks_and_refuses():
    assert fast.resolve_mode("auto", torch.device("cpu")) == "compile"
    assert fast.resolve_mode("auto", torch.device("cuda")) == "graphs"  # no GPU needed to resolve
    assert fast.resolve_mode("eager", torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fast.resolve_mode("graphs", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown --mode"):
        fast.resolve_mode("fastest", torch.device("cpu"))
    agent, opt = make()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fast.make_update(update_step, agent, opt, "graphs")


def assert_runs_match(label, eager_run, compiled_run, start):
    """Two run_updates results: per update every metric (LOSS_TOL), the sampled latents bitwise and deter
    (FEAT_TOL); the final state (PARAM_TOL); and parameters moved far enough from `start` for a wrong gradient to
    show."""
    (_, eager_hist, eager), (_, comp_hist, comp) = eager_run, compiled_run
    for k, ((m_e, l_e), (m_c, l_c)) in enumerate(zip(eager_hist, comp_hist, strict=True)):
        assert m_e.keys() == m_c.keys()
        for name in m_e:
            assert_close(f"{label}update {k} {name}", m_c[name], m_e[name], LOSS_TOL)
        assert torch.equal(l_c["stoch"], l_e["stoch"]), f"{label}update {k}: sampled latents differ"
        assert_close(f"{label}update {k} deter", l_c["deter"], l_e["deter"], FEAT_TOL)
    assert eager.keys() == comp.keys()
    for name in eager:  # parameters, slow critic and the return-normalisation buffers
        assert_close(f"{label}state {name}", comp[name], eager[name], PARAM_TOL)
    moved = max((eager[n] - start[n]).abs().max().item() for n in eager)
    assert moved > 1e-4, f"parameters barely moved ({moved}); the comparison would not see a wrong gradient"


def test_compiled_updates_match_eager_losses_latents_and_parameters(eager_run, compiled_run):
    assert_runs_match("", eager_run, compiled_run, make()[0].state_dict())


def test_compiled_updates_match_eager_from_a_warm_state(fallback_random, monkeypatch):
    """The comparison above from a trained state (WARM eager updates) instead of a fresh agent, whose first update
    is a special case: its reward and critic output layers are zero (every imagined value and return is 0, and their
    hidden layers get no gradient at update 0), the slow critic equals the critic, and LaProp's first step is
    lr * sign(g).
    Every gradient is checked here, the actor's too, within 1e-4 relative in norm (fp32 in another summation order;
    measured <= 1.5e-6 on the CPU by `python -m bench.divergence --warm 8`)."""
    monkeypatch.setattr(fast, "DEFER", True)
    start = make(warm=WARM)[0].state_dict()
    assert start["critic.out.weight"].abs().max() > 0 and start["reward.out.weight"].abs().max() > 0
    assert not torch.equal(start["critic.out.weight"], start["slow_critic.out.weight"]), "slow critic = critic"
    assert start["retnorm_hi"] > start["retnorm_lo"], "the return percentiles were never set"
    eager_run, comp_run = run_updates("eager", warm=WARM), run_updates("compile", warm=WARM)
    assert_runs_match("warm ", eager_run, comp_run, start)
    got, want = [h[0] for h in comp_run[1]], [h[0] for h in eager_run[1]]
    assert_updates_close("warm compile", got, want, comp_run[0], eager_run[0], LOSS_TOL, PARAM_TOL, 1e-4)


def value_noise(agent: Agent, rel: float = 1e-7) -> float:
    """The largest change of a reward, critic or slow-critic value when its logits (from random features, 64 rows)
    take independent relative noise of `rel`, the size of float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn((64, agent.critic.mlp[0].linear.in_features), generator=gen)
    worst = 0.0
    with torch.no_grad():
        for head in (agent.reward, agent.critic, agent.slow_critic):
            logits = head(feat)
            noisy = logits * (1 + rel * torch.randn(logits.shape, generator=gen))
            worst = max(worst, (twohot_pred(noisy, agent.bins) - twohot_pred(logits, agent.bins)).abs().max().item())
    return worst


def test_the_warm_state_values_are_well_conditioned():
    """The warm comparisons test the compilation, not the two-hot heads' condition number: from the warm state,
    float32-sized logit noise moves a value by < 1e-5, where the values are ~1e-3 and the tolerances 1e-5 (measured
    1.3e-7). Without settling, near-uniform heads after the WARM updates, it moves them by 0.1: a GEMM that
    rounds one logit of a far bin differently moves that value by ~1e-2 (bench/LOG.md, sessions 17-18)."""
    assert value_noise(make(warm=WARM)[0]) < 1e-5
    assert value_noise(make(warm=WARM, settled=False)[0]) > 1e-2  # what settling is for: the check can fail


def split_k(linear: torch.nn.Linear):
    """linear's forward with its first half of outputs (the negative bins of a two-hot head) summed over two halves
    of the inputs, as a split-K GEMM tile sums them: the same numbers in another order, so a bin and its mirror,
    whose weight rows are equal, can round one ulp apart (eager's GEMM rounds them alike here)."""

    def forward(x):
        k, n = linear.in_features, linear.out_features // 2
        w, b = linear.weight, linear.bias
        lo = F.linear(x[..., : k // 2], w[:n, : k // 2]) + F.linear(x[..., k // 2 :], w[:n, k // 2 :]) + b[:n]
        return torch.cat([lo, F.linear(x, w[n:], b[n:])], -1)

    return forward


def split_twohot_heads(agent: Agent) -> None:
    for head in (agent.reward, agent.critic, agent.slow_critic):
        head.out.forward = split_k(head.out)


def eager_updates(settled: bool, split: bool, warm: int = WARM):
    prepare = split_twohot_heads if split else None
    agent, history, _ = run_updates("eager", warm=warm, settled=settled, prepare=prepare)
    return agent, [metrics for metrics, _ in history]


def test_the_warm_comparisons_pass_a_correct_gemm_that_rounds_mirrored_bins_apart():
    """What settling buys, shown on the CPU: eager with the two-hot heads' output layers split as a split-K GEMM
    would (the same sums in another order) against plain eager, under the warm test's bounds, every gradient
    included. From the settled warm state it passes (measured: policy loss 2e-10 apart, gradients <= 6.3e-6
    relative); from the unsettled one the same correct change fails them (update 0's value loss 3.57 moved by 6.2e-3,
    policy losses of -3e-4 by 1.6e-3 to 1.7e-2, the actor's gradient 258x relative): there a comparison cannot tell
    a compiled update from a wrong one. Nor from a fresh agent at updates 1-2, after whose first update the heads are
    near uniform (policy loss -1.3e-4 moved by 2.8e-4): the fresh comparisons hold only where the fast mode rounds a
    bin and its mirror alike, as CPU inductor does."""
    plain, plain_hist = eager_updates(settled=True, split=False)
    split, split_hist = eager_updates(settled=True, split=True)
    assert_updates_close("split-K", split_hist, plain_hist, split, plain, LOSS_TOL, PARAM_TOL, 1e-4)
    for warm in (WARM, 0):
        plain, plain_hist = eager_updates(settled=False, split=False, warm=warm)
        split, split_hist = eager_updates(settled=False, split=True, warm=warm)
        with pytest.raises(AssertionError, match="split-K"):
            assert_updates_close("split-K", split_hist, plain_hist, split, plain, LOSS_TOL, PARAM_TOL, 1e-4)


def test_the_compiled_updates_defer_the_observe_weight_gradients(compiled_run):
    # So the comparison with eager above covers fastdreamer/defer.py inside a compiled update.
    assert DEFERRED == [CFG.batch_length] * K, DEFERRED


def test_no_compiled_graph_of_the_update_outputs_an_int64_tensor(compiled_run):
    # Every output of a compiled graph is stored by its kernels; int64 values computed from a reduction and stored
    # (the two-hot loss's gather indices, the latents' argmax) made Triton 3.6 fail to compile kernels for the H200
    # (bench/LOG.md, 2026-11-26). dists.twohot_nll_masked and dists.onehot_index have no integers to store.
    assert compiled_run and INT64_OUT == [], f"int64 outputs of compiled graphs, shapes {INT64_OUT}"


def test_the_compiled_update_draws_the_imagination_noise_outside_its_graphs(compiled_run):
    # Inside agent.loss's graph the rollout's noise draw would be traced, and inductor would order its random ops
    # as it likes (see the test below); fast.compile_agent keeps Agent.noise eager.
    assert NOISE_IN_GRAPH, "the compiled updates never drew imagination noise"
    assert not any(NOISE_IN_GRAPH), f"Agent.noise ran inside a compiled graph ({sum(NOISE_IN_GRAPH)} calls)"


def test_compiled_imagination_matches_eager_given_the_same_noise(fallback_random, compiled_run):
    agent, _ = make()
    comp_agent = compiled_run[0]
    comp_agent.load_state_dict(agent.state_dict())
    gen = torch.Generator().manual_seed(7)
    N = CFG.batch_size * CFG.batch_length  # the shape the update compiled the rollout for: no new graph
    deter = torch.randn(N, 32, generator=gen)
    stoch = torch.nn.functional.one_hot(torch.randint(0, 4, (N, 4), generator=gen), 4).float()
    torch.manual_seed(3)
    feats_e, acts_e = agent.imagine(deter, stoch)
    torch.manual_seed(3)
    feats_c, acts_c = fast.make_imagine(comp_agent, "compile", "fp32")(deter, stoch)
    assert feats_c.shape == (N, CFG.imag_length + 1, 32 + 16)
    assert torch.equal(acts_c, acts_e), "imagined actions differ"
    assert_close("imagined feats", feats_c, feats_e, FEAT_TOL)


def rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize(
    "device,mode",
    [("cpu", "compile"), pytest.param("cuda", "compile", marks=cuda), pytest.param("cuda", "graphs", marks=cuda)],
)
def test_fast_rollout_and_acting_use_exactly_the_noise_drawn_up_front(device, mode):
    """Without fallback_random (as in training): the fast imagination and acting step take all their random numbers
    from Agent.noise, drawn eagerly, and none inside a graph. On the H200 the compiled rollout drew other latents
    than eager from its second draw on (fp32: every start's latent differed at step 1, its deter agreed to 1e-7):
    random ops inside a graph need not draw what eager draws. Here: the numbers one eager noise() call
    draws, passed to the eager rollout, give the fast path's output (fp32, actions exactly), and the generator
    stands after the fast call where that one noise() call left it (compile: no draw inside the graph)."""
    agent, _ = make(device)
    fast_agent, _ = make(device)
    gen = torch.Generator().manual_seed(7)
    N, H = 24, CFG.imag_length
    deter = torch.randn(N, 32, generator=gen).to(device)
    stoch = torch.nn.functional.one_hot(torch.randint(0, 4, (N, 4), generator=gen), 4).float().to(device)
    torch.manual_seed(3)
    lat, act = agent.noise(N, H, H + 1, device)
    after = rng_state(device)
    feats_e, acts_e = agent.rollout(deter, stoch, lat, act)
    imagine = fast.make_imagine(fast_agent, mode, "fp32")
    torch.manual_seed(3)
    feats_f, acts_f = imagine(deter, stoch)
    if mode == "compile":
        assert torch.equal(rng_state(device), after), "the compiled rollout drew random numbers of its own"
    assert torch.equal(acts_f, acts_e), "imagined actions differ from the eager rollout given the same noise"
    assert_close("imagined feats", feats_f, feats_e, FEAT_TOL)

    carry = agent.initial(3, device)
    step = fast.make_act(fast_agent, mode, "fp32")
    for k in range(3):
        o = obs(3, k, device)
        torch.manual_seed(10 + k)
        lat, act = agent.noise(3, 1, 1, device)
        after = rng_state(device)
        a_e, c_e = agent.policy_step(carry, o, lat[0], act[0])
        torch.manual_seed(10 + k)
        a_f, c_f = step(carry, o)
        if mode == "compile":
            assert torch.equal(rng_state(device), after), "the compiled acting step drew random numbers of its own"
        assert torch.equal(a_f, a_e), f"step {k}: actions differ"
        assert torch.equal(c_f[1], c_e[1]), f"step {k}: sampled latents differ"
        carry = c_e


def test_compiled_acting_matches_eager(fallback_random, compiled_run):
    agent, _ = make()
    comp_agent = compiled_run[0]
    comp_agent.load_state_dict(agent.state_dict())
    act_e, act_c = fast.make_act(agent, "eager"), fast.make_act(comp_agent, "compile", "fp32")
    carry_e = carry_c = agent.initial(3, "cpu")
    for step in range(3):
        torch.manual_seed(10 + step)
        a_e, carry_e = act_e(carry_e, obs(3, step))
        torch.manual_seed(10 + step)
        a_c, carry_c = act_c(carry_c, obs(3, step))
        assert torch.equal(a_c, a_e), f"step {step}: actions differ"
        for name, x_c, x_e in zip(("deter", "stoch", "prevact"), carry_c, carry_e, strict=True):
            assert_close(f"step {step} {name}", x_c, x_e, FEAT_TOL)


# Host syncs: every way a tensor's value reaches Python. On CPU nothing actually waits, so the guard makes each one
# raise instead; the same code on CUDA would stall the stream there.
SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS + ("to",)}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostSync(f"host sync: Tensor.{name} on a {tuple(self.shape)} tensor inside a step")

        return raiser

    def to(self, *args, **kwargs):
        # A device tensor copied to the host, or (caught on CPU too) a literal "cpu" target; `.to(device)` with a
        # device object on a CPU run is a no-op and allowed.
        target = kwargs.get("device", args[0] if args else None)
        to_host = isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
        if to_host and (self.device.type != "cpu" or isinstance(target, str)):
            raise HostSync(f"host sync: Tensor.to(cpu) on a {tuple(self.shape)} tensor inside a step")
        return saved["to"](self, *args, **kwargs)

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, forbid(name))
        torch.Tensor.to = to
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_sync_guard_catches_a_sync():
    x = torch.ones(3)
    with no_host_sync(), pytest.raises(HostSync, match="Tensor.item"):
        x.sum().item()
    with no_host_sync(), pytest.raises(HostSync, match="__bool__"):
        if x.sum() > 0:
            pass
    assert x.sum().item() == 3.0  # restored afterwards


def test_update_and_acting_step_never_sync_with_the_host():
    agent, opt = make()
    data = batch(0)
    update = fast.make_update(update_step, agent, opt, "eager")
    act = fast.make_act(agent, "eager")
    carry = agent.initial(3, "cpu")
    observations = [obs(3, step) for step in range(2)]
    with no_host_sync():
        for step in range(2):
            update(data)
            action, carry = act(carry, observations[step])
        agent.act(carry, observations[0], greedy=True)


def test_replay_sample_and_write_never_sync_with_the_host():
    """The rest of the loop's device work: sampling (online queue entries and uniform windows) and the latent
    write-back. The queue's position is host ints, so taking from it reads nothing back."""
    from fastdreamer.replay import Replay

    spec = {"x": ((2,), torch.float32), "deter": ((4,), torch.bfloat16)}
    r = Replay(spec, capacity=3 * 40, num_envs=3, seq_len=5, device="cpu", online=True)
    for t in range(23):
        r.add({"x": torch.full((3, 2), float(t)), "deter": torch.zeros(3, 4, dtype=torch.bfloat16)})
    with no_host_sync():
        for _ in range(4):  # 12 queued chunks, so the first three batches take from the queue
            data, idx = r.sample(4)
            r.write(idx[:, 1:], {"deter": torch.ones(4, 4, 4)})
    assert r.consumed == (23 // 5) * 3 and (data["x"][:, 1:] - data["x"][:, :-1] == 1).all()


@cuda
@pytest.mark.parametrize("mode", ["eager", "compile", "graphs"])
def test_updates_and_acting_never_sync_on_cuda(mode):
    """The guard above on the real thing: CUDA's sync debug mode raises on any call that waits for the device (a
    value read back, a blocking copy, nonzero), over updates and acting steps after their warm-up (compiling and
    capturing may sync; training's steady state must not)."""
    agent, opt = make("cuda")
    update = fast.make_update(update_step, agent, opt, mode)
    act = fast.make_act(agent, mode)
    data = [batch(k, "cuda") for k in range(2)]
    observations = [obs(3, step, "cuda") for step in range(2)]
    carry = agent.initial(3, "cuda")
    for k in range(2):  # warm-up: compile, capture
        update(data[k])
        _, carry = act(carry, observations[k])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2):
            update(data[k])
            _, carry = act(carry, observations[k])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("warm", [0, WARM], ids=["fresh", "warm"])
@pytest.mark.parametrize("mode", ["compile", "graphs"])
def test_fp32_fast_updates_match_eager_on_cuda(mode, warm, fallback_random):
    """The fp32 comparisons above (compiled_run and the warm test, CPU only) on CUDA, where defer is on by default
    and graphs mode exists: the same loss and parameter bounds; gradients per tensor within 1e-4 relative in norm,
    as the fp32 Triton-core test below (fp32 in another summation order gave 1.7e-6 there), from a fresh agent except
    the actor's, for the reason the bf16 test gives. Both starts, because they tell two causes apart: from a fresh
    agent LaProp's first step is lr * sign(g), so a gradient sign two correct summation orders disagree on moves a
    parameter a whole lr; from the warm state a step is continuous in g. Failing fresh and passing warm points at
    that step (or another special case of a fresh agent: zero heads, slow critic = critic); the divergence rows of
    `bench.divergence` (sign flips, lr-steps) tell which (bench/LOG.md, sessions 11-14). One more such case: after a
    fresh agent's first update its two-hot heads are near uniform, where values are ill-conditioned, so a correct
    GEMM that rounds a bin and its mirror apart moves updates 1-2's policy loss past the bounds (the split-K test
    above; on the CPU by 2.8e-4 and 5.1e-4 against -1.3e-4 and -2.0e-4); the warm state's heads are settled and do
    not (`bench.divergence --warm 8 --unsettled` runs the warm state without settling)."""
    agent, opt = make("cuda", warm=warm)
    update = fast.make_update(update_step, agent, opt, "eager")
    torch.manual_seed(1)
    want = [{n: v.clone() for n, v in update(batch(k, "cuda"))[0].items()} for k in range(K)]
    fast_agent, fast_hist, _ = run_updates(mode, "cuda", "fp32", warm)
    history = [h[0] for h in fast_hist]
    skip = () if warm else ("actor.",)
    assert_updates_close(mode, history, want, fast_agent, agent, LOSS_TOL, PARAM_TOL, 1e-4, skip=skip)


@pytest.mark.parametrize("native", [True, False])
def test_defer_auto_is_on_for_cuda_and_for_a_cpu_with_native_bf16(native, monkeypatch):
    """FASTDREAMER_DEFER=auto: deferred weight gradients on CUDA, and on a CPU where the fast modes run bf16 by
    default (measured faster there, bench/LOG.md session 29), not on one without; 1 and 0 force it either way."""
    monkeypatch.setattr(fast, "native_bf16", lambda device: native)
    monkeypatch.setattr(fast, "DEFER", "auto")
    assert fast.defer_on(torch.device("cpu")) is native and fast.defer_on("cuda") is True
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setattr(fast, "DEFER", value)
        assert fast.defer_on("cpu") is want and fast.defer_on("cuda") is want


@pytest.mark.parametrize(
    "device,mode,defer_on,warm",
    [
        ("cpu", "compile", True, 0),
        ("cpu", "compile", False, 0),
        ("cpu", "compile", True, WARM),
        pytest.param("cuda", "compile", None, 0, marks=cuda),
        pytest.param("cuda", "graphs", None, 0, marks=cuda),
        pytest.param("cuda", "graphs", None, WARM, marks=cuda),
    ],
    ids=[
        "cpu-defer-fresh",
        "cpu-fan_out-fresh",
        "cpu-defer-warm",
        "cuda-compile-fresh",
        "cuda-graphs-fresh",
        "cuda-graphs-warm",
    ],
)
def test_bf16_fast_updates_match_eager_under_the_same_autocast(
    device, mode, defer_on, warm, fallback_random, monkeypatch
):
    # Eager under the same bf16 autocast as the fast mode, so the check is of compile/capture, not of precision;
    # eager records its draws and the fast mode replays them, both without free bits (taped_updates says why). On a
    # CPU without native bf16 oneDNN emulates it: slower, same check. On the CPU both observe-loop gradient paths
    # (fastdreamer/defer.py and fan_out), on CUDA the default (defer).
    if defer_on is not None:
        monkeypatch.setattr(fast, "DEFER", defer_on)
    tape = DrawTape()
    agent, opt = make(device, warm=warm)
    autocast = lambda: fast.autocast(torch.device(device), mode, "bf16")  # noqa: E731
    want = [m for m, _ in taped_updates(agent, opt, device, "eager", "auto", tape, autocast)]
    fast_agent, fast_opt = make(device, warm=warm)
    history = [m for m, _ in taped_updates(fast_agent, fast_opt, device, mode, "bf16", tape)]
    # Gradients: parameter moves (~lr) hide under BF16_TOL, so the gradient check is the one that sees a wrong
    # backward. bf16 against fp32 eager differs by <= 2.3% (median 0.7%) at this config on the CPU, and compiled bf16
    # against eager bf16 likewise; a dropped or flipped term is O(1). Not the actor's: in these first updates its
    # gradient is mostly bf16 rounding noise (see the Triton core test below: up to 8-40% between two bf16
    # computations), so where a backend rounds elsewhere (CUDA) it can differ by more than the bound with nothing
    # wrong; the fp32 compile test checks the actor. Nor from the warm state with a real signal (bench/LOG.md, session
    # 19): with the reward head tilted to imagined advantages of std 0.24-0.39 (an actor gradient 100x larger) the
    # actor's gradients stayed 12-43% apart between bf16 and fp32 eager, with the same imagined actions, and 3-47%
    # between compiled and eager bf16.
    assert_updates_close(mode, history, want, fast_agent, agent, BF16_TOL, BF16_TOL, GRAD_REL_TOL, skip=("actor.",))
    # bf16 really ran: the same update in fp32 eager gives other losses (bf16 keeps ~3 digits per matmul).
    agent32, opt32 = make(device, warm=warm)
    torch.manual_seed(1)
    fp32 = fast.make_update(update_step, agent32, opt32, "eager")(batch(0, device))[0]
    assert not torch.equal(fp32["loss/vector"], history[0]["loss/vector"]), "bf16 autocast did not apply"


@pytest.mark.parametrize(
    "device,mode,precision",
    [
        pytest.param("cpu", "eager", "fp32", marks=interpreter),
        pytest.param("cpu", "eager", "bf16", marks=interpreter),
        pytest.param("cpu", "compile", "fp32", marks=interpreter),
        pytest.param("cuda", "graphs", "bf16", marks=cuda),
    ],
)
def test_triton_core_in_the_update_matches_the_torch_core(device, mode, precision, fallback_random, monkeypatch):
    """The update with `--gru-impl triton` (Triton's interpreter on CPU) against the torch core, K updates from one
    seed. fp32: the same math in another summation order, so the fp32 bounds of the compile test, and every gradient
    within 1e-4 relative (measured 1.7e-6). bf16 (autocast; the fused core then computes in bf16 too): two bf16
    computations that round in different places (autocast also rounds each matmul's output), so the bf16 bounds of
    the test above, except for the actor's gradients: at this config and these first updates the returns are ~1e-5
    and the advantages ~1e-4, the size of bf16 rounding, so the actor's gradient (|g| ~ 5e-7; entropy adds none at
    a uniform policy) is mostly rounding noise. Measured, relative in norm: torch core bf16 vs fp32 up to 8%, fused
    bf16 vs torch bf16 up to 40%, in the same imagined trajectories (no action differs). The fp32 case checks the
    actor's gradient through the fused core. compile: the fast modes' observe loop (defer, with hoist_action and
    merge_deter handing the Triton core its branches' products and the action branch) under inductor, defer forced
    on so that this holds on a CPU without native bf16 too."""
    if mode == "compile":
        monkeypatch.setattr(fast, "DEFER", True)
    bf16 = precision == "bf16"
    ctx = (lambda: fast.autocast(torch.device(device), "compile", "bf16")) if bf16 else contextlib.nullcontext

    tape = DrawTape()

    def updates(agent, opt, update_mode):
        # eager runs under the autocast set here; a fast mode sets its own from `precision`.
        update_precision = "auto" if update_mode == "eager" else precision
        if bf16:  # two bf16 computations: the draws and free bits as taped_updates says (eager records, first)
            return [m for m, _ in taped_updates(agent, opt, device, update_mode, update_precision, tape, ctx)]
        update = fast.make_update(update_step, agent, opt, update_mode, update_precision)
        torch.manual_seed(1)
        return [{n: v.clone() for n, v in update(batch(k, device))[0].items()} for k in range(K)]

    agent, opt = make(device)
    want = updates(agent, opt, "eager")
    assert block_gru.set_impl("triton") == "triton"
    try:
        fused_agent, fused_opt = make(device)
        got = updates(fused_agent, fused_opt, mode)
        if mode != "eager":
            rssm = fused_agent.rssm
            assert rssm.defer and rssm.hoist_action and rssm.merge_deter, "the fast observe loop did not run"
    finally:
        block_gru.set_impl("torch")
    tols = (BF16_TOL, BF16_TOL, GRAD_REL_TOL, ("actor.",)) if bf16 else (LOSS_TOL, PARAM_TOL, 1e-4, ())
    assert_updates_close("triton core", got, want, fused_agent, agent, *tols)


@cuda
def test_graphed_imagination_draws_the_noise_an_eager_call_would(fallback_random):
    """The warm-up calls before a capture consume random numbers; _Graph rewinds the CUDA generator so the first
    replay draws what an eager call from the same seed draws (the benchmark's check relies on it). fp32, so the
    draws agree exactly unless a compiled kernel rounds a probability across a boundary (rare at 32 starts)."""
    agent, _ = make("cuda")
    gen = torch.Generator().manual_seed(7)
    N = CFG.batch_size * CFG.batch_length
    deter = torch.randn(N, 32, generator=gen).cuda()
    stoch = torch.nn.functional.one_hot(torch.randint(0, 4, (N, 4), generator=gen), 4).float().cuda()
    torch.manual_seed(3)
    feats_e, acts_e = agent.imagine(deter, stoch)
    imagine = fast.make_imagine(agent, "graphs", "fp32")
    torch.manual_seed(3)
    feats_g, acts_g = imagine(deter, stoch)
    assert torch.equal(acts_g, acts_e), "imagined actions differ"
    assert_close("imagined feats", feats_g, feats_e, FEAT_TOL)


@cuda
def test_graphed_acting_and_imagination_run_and_keep_shapes_on_cuda():
    agent, _ = make("cuda")
    act = fast.make_act(agent, "graphs")
    carry = agent.initial(3, "cuda")
    for step in range(3):
        action, carry = act(carry, obs(3, step, "cuda"))
        assert action.shape == (3, 3) and torch.all(action.sum(-1) == 1)
    imagine = fast.make_imagine(agent, "graphs")
    deter, stoch = torch.zeros(8, 32, device="cuda"), torch.full((8, 4, 4), 0.25, device="cuda")
    feats, acts = imagine(deter, stoch)
    assert feats.shape == (8, CFG.imag_length + 1, 48) and torch.isfinite(feats).all()


ALLOC_PROBE = """
import ctypes, ctypes.util, torch
from fastdreamer import defer, fast
from fastdreamer.kernels import block_gru
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
def mapped_by_64mb_block():
    before = libc.mallinfo2().hblks
    x = torch.ones(64 * 2**20, dtype=torch.uint8)
    return libc.mallinfo2().hblks - before
print(mapped_by_64mb_block(), fast.tune_cpu_allocator(), mapped_by_64mb_block())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cpu_allocator_tuning_keeps_large_blocks_in_the_heap():
    # A fresh process: tuning is process-wide, and other tests' Trainers apply it to this one.
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "True", "0"], out
