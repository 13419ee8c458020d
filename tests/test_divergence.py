"""bench.divergence on the CPU: the script runs and finds the compiled updates where tests/test_fast.py finds them (no
divergence), and its comparison names a planted difference as the first divergence."""

from __future__ import annotations

import json

import pytest
import torch

from bench import divergence
from bench.common import warm_state
from fastdreamer import fast
from fastdreamer.dists import symlog
from fastdreamer.train import update_step

LOSS_TOL = dict(rtol=1e-4, atol=1e-5)  # tests/test_fast.py's: fp32 reassociation in fused reductions


@pytest.fixture
def one_thread():
    # One CPU thread: inductor's OpenMP kernels spin at barriers on a shared 2-core box (bench/test_bench_fast.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The compile: ~20 s with inductor's cache warm, 100-130 s cold on the 2-core CPU with another process on it.
@pytest.mark.slow
def test_compiled_updates_with_gpu_like_rounding_do_not_diverge_from_eager(tmp_path, one_thread):
    """With FMA contraction in the compiled CPU kernels (--fp-contract fast: GPU code contracts multiplies and adds,
    the CPU default does not), so that they round as a GPU's do. This is where twohot_pred's former form failed (the
    resync variant, update 2: ac/adv_std 1.4e3 relative, ac/value 1.2e-2 against 4.2e-4): a softmax rounded one ulp
    apart, times bins up to 4.9e8; without contraction it passed."""
    path = tmp_path / "divergence.json"
    # --defer 1: the observe loop CUDA runs (defer, and merge_deter, which needs it; no_merge is then a real variant)
    argv = ["--device", "cpu", "--mode", "compile", "--precision", "fp32", "--updates", "3", "--fp-contract", "fast"]
    argv += ["--defer", "1"]
    out = divergence.main([*argv, "--variants", "default,no_merge,resync", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["complete"] and not saved["errors"], saved["errors"]
    assert saved["meta"]["fp_contract"] == "fast" and saved["meta"]["defer"], saved["meta"]
    assert [r["variant"] for r in saved["rows"]] == ["default", "no_merge", "resync"]
    assert out["reference"]["eager_repeat"]["bitwise"], "eager does not repeat itself on the CPU"
    for row in saved["rows"]:
        assert len(row["updates"]) == 3
        assert row["first_divergence"] is None, (row["variant"], row["first_divergence"])
    (default,) = [r for r in saved["rows"] if r["variant"] == "default"]
    for k, update in enumerate(default["updates"]):
        for name in divergence.LOSSES:
            m = update["metrics"][name]
            got, want = torch.tensor(m["got"]), torch.tensor(m["want"])
            torch.testing.assert_close(got, want, **LOSS_TOL, msg=lambda s, k=k, n=name: f"update {k} {n}: {s}")
        assert all(update["rng"].values()), f"update {k}: the generators differ"


def test_fp_contract_is_refused_off_the_cpu(monkeypatch):
    # As on a machine with CUDA (--device cuda is refused first where there is none): the flag is what is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="fp-contract"):
        divergence.main(["--device", "cuda", "--fp-contract", "fast"])


def eager_snapshots(updates: int) -> list[dict]:
    agent, opt = divergence.make("cpu")
    return divergence.run(agent, opt, fast.make_update(update_step, agent, opt, "eager"), "cpu", updates)


def planted(snaps: list[dict], update: int, group: str, name: str, fn) -> list[dict]:
    """Copies of `snaps` with fn applied to one entry."""
    out = [{g: {n: t.clone() for n, t in entries.items()} for g, entries in s.items()} for s in snaps]
    out[update][group][name] = fn(out[update][group][name])
    return out


def first(got: list[dict], want: list[dict]) -> dict | None:
    return divergence.first_divergence([divergence.compare(g, w, "fp32") for g, w in zip(got, want)], "fp32")


def test_a_planted_difference_is_the_first_divergence():
    want = eager_snapshots(2)
    assert first(want, want) is None
    buffer = "slow_critic.mlp.0.linear.weight"
    got = planted(want, 1, "buffers", buffer, lambda t: t * (1 + 1e-3))
    found = first(got, want)
    assert found["update"] == 1 and found["group"] == "buffers" and found["name"] == buffer, found
    assert found["rel"] == pytest.approx(1e-3, rel=1e-3)  # t * (1 + 1e-3) rounds to fp32
    assert divergence.describe(found) == f"update 1, buffers {buffer} rel 0.001"
    # Below the fp32 bound it is no divergence; the generators are compared exactly.
    assert first(planted(want, 0, "buffers", buffer, lambda t: t * (1 + 1e-5)), want) is None
    rng = first(planted(want, 0, "rng", "cpu", lambda s: torch.roll(s, 1)), want)
    assert rng == {"update": 0, "group": "rng", "name": "cpu", "rel": None}


def test_a_flipped_gradient_sign_and_a_whole_lr_step_are_counted():
    # LaProp's first step is lr * sign(g): one flipped element moves its parameter 2 lr away.
    (want,) = eager_snapshots(1)
    name = "critic.out.weight"
    got = planted([want], 0, "grads", name, lambda g: torch.where(torch.arange(g.numel()).view_as(g) == 0, -g, g))
    got = planted(got, 0, "params", name, lambda p: p + torch.where(torch.arange(p.numel()).view_as(p) == 0, 2e-3, 0))
    # The reward head's MLP gets exactly zero gradients at update 0 (its output layer starts at zero): a tiny value
    # there is a flip too, and would move the weight a whole lr.
    hidden = "reward.mlp.0.linear.weight"
    assert not want["grads"][hidden].any() and want["grads"][name].flatten()[0] != 0
    got = planted(got, 0, "grads", hidden, lambda g: torch.where(torch.arange(g.numel()).view_as(g) == 0, 1e-30, g))
    cmp = divergence.compare(got[0], want, "fp32")
    assert sum(cmp["flips"].values()) == 2 and cmp["flips"][name] == cmp["flips"][hidden] == 1
    assert sum(cmp["zeros"].values()) == cmp["zeros"][hidden] == 1
    assert sum(cmp["lr_steps"].values()) == cmp["lr_steps"][name] == 1
    assert "flips 2 (most" in divergence.summary(0, cmp)[1]


def test_restore_puts_a_snapshot_state_back_in_place():
    """resync's restore: after it, an agent and optimizer that ran other updates snapshot as the restored state, and
    their tensors are the same objects (compiled code and captured graphs keep theirs)."""
    snaps = eager_snapshots(2)
    agent, opt = divergence.make("cpu")
    update = fast.make_update(update_step, agent, opt, "eager")
    update(divergence.batch(5, "cpu"))  # some other state
    ids = [id(p) for p in agent.parameters()] + [id(x) for x in opt.nu + opt.mu]
    divergence.restore(agent, opt, snaps[0], "cpu")
    assert ids == [id(p) for p in agent.parameters()] + [id(x) for x in opt.nu + opt.mu]
    now = divergence.snapshot(agent, opt, {}, {})
    for group in ("params", "buffers", "optim", "rng"):
        assert now[group].keys() == snaps[0][group].keys(), group
        for name, t in snaps[0][group].items():
            assert torch.equal(now[group][name], t), (group, name)
    # And the next update from there is the reference's update 1, bitwise (eager repeats itself on the CPU).
    torch.manual_seed(0)  # restore sets the generator: this draw must not matter
    divergence.restore(agent, opt, snaps[0], "cpu")
    metrics, _ = update(divergence.batch(1, "cpu"))
    for name in divergence.LOSSES:
        assert torch.equal(metrics[name], snaps[1]["metrics"][name]), name


def test_the_warm_start_is_one_state_for_every_agent_and_leaves_the_generators_alone(tmp_path):
    """bench.common.warm_state (the warm fast-vs-eager tests and `--warm`): every agent asking for it starts from the
    same trained state, LaProp included, and asking does not move the global generator (the compared runs seed their
    own updates, but a cache hit must not differ from a miss)."""
    fresh, _ = divergence.make("cpu")
    plain = torch.get_rng_state()  # where make() leaves the generator: seeded, then the agent's initialisation
    a, opt_a = divergence.make("cpu", warm=3)  # computes the warm state
    assert torch.equal(torch.get_rng_state(), plain), "computing the warm state moved the generator"
    start = {n: x.clone() for n, x in a.state_dict().items()}
    update = fast.make_update(update_step, a, opt_a, "eager")
    update(divergence.batch(0, "cpu"))  # `a` trains on: what `b` loads must not move with it
    b, opt_b = divergence.make("cpu", warm=3)  # loads it from the cache
    assert torch.equal(torch.get_rng_state(), plain)
    agent_state, opt_state = warm_state.__wrapped__("cpu", 0, 3)  # computed anew, without the cache
    assert int(opt_b.step_count) == int(opt_state["step"]) == 3
    for name, x in b.state_dict().items():
        assert torch.equal(x, agent_state[name]), f"{name}: the cached warm state is not the computed one"
        assert torch.equal(x, start[name]), f"{name}: two warm agents start apart"
    for key in ("nu", "mu"):
        for i, (x, y) in enumerate(zip(opt_b.state_dict()[key], opt_state[key], strict=True)):
            assert torch.equal(x, y), f"LaProp {key}[{i}]: the cached warm state is not the computed one"
    moved = [n for (n, x), z in zip(b.state_dict().items(), fresh.state_dict().values()) if not torch.equal(x, z)]
    assert "critic.out.weight" in moved and "retnorm_hi" in moved, moved
    out = divergence.main(["--variants", "", "--updates", "1", "--warm", "3", "--json", str(tmp_path / "d.json")])
    assert out["meta"]["warm"] == 3 and out["meta"]["settled"] and out["reference"]["eager_repeat"]["bitwise"]
    # The two-hot heads settled (bench.common.settle_twohot_heads), unless asked not to.
    bias = b.critic.out.bias
    assert torch.equal(bias, -2 * symlog(b.bins).abs()) and bias.min() < -39, "the warm critic is not settled"
    unsettled, _ = divergence.make("cpu", warm=3, settled=False)
    assert unsettled.critic.out.bias.abs().max() < 0.1, "settled=False still settled the heads"
    out = divergence.main(["--variants", "", "--updates", "1", "--warm", "3", "--unsettled"])
    assert not out["meta"]["settled"]
    with pytest.raises(SystemExit, match="--unsettled .* needs --warm"):
        divergence.main(["--variants", "", "--unsettled"])


def test_taped_draws_replay_the_reference_bit_for_bit():
    """--taped (bench/draws.py): the reference records its draws and the repeat replays them; the repeat is the
    reference bit for bit, generators included (a replay still makes and drops each draw)."""
    out = divergence.main(["--variants", "", "--updates", "2", "--precision", "bf16", "--taped"])
    assert out["meta"]["taped"] and out["reference"]["eager_repeat"]["bitwise"], out["reference"]
