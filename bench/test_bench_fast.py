"""pytest-benchmark timings of the update, imagination and acting step per mode at a tiny size, so they run on CPU:
`pytest bench/ --benchmark-only`. Each fast mode is checked against eager before it is timed, as in the table."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config

from fastdreamer import fast
from fastdreamer.train import update_step

from .common import make_agent, make_config, random_batch, random_obs, rollout_close

CFG = make_config("debug", batch_size=4, batch_length=8, imag_length=3, num_envs=4)
MODES = [
    "eager",
    "compile",
    pytest.param("graphs", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tol(mode: str) -> dict:
    """fp32 reassociation, or bf16 autocast matmuls where the mode runs them (fast.resolve_precision)."""
    bf16 = fast.resolve_precision("auto", mode, DEVICE) == "bf16"
    return dict(rtol=5e-2, atol=5e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def fallback_random_one_thread():
    # One CPU thread: on a shared or oversubscribed CPU, inductor's OpenMP kernels spin at barriers (measured 2.8 s
    # vs 14 ms per tiny compiled update at 2 threads on a loaded 2-core box). CUDA timings are unaffected.
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    with inductor_config.patch(fallback_random=True):
        yield
    torch.set_num_threads(threads)


def synced(fn):
    """pytest-benchmark reads the host clock: wait for the device inside the timed call."""

    def call(*args):
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    return call


def fresh():
    agent, opt = make_agent(CFG, "vector", DEVICE)
    return agent, opt, random_batch(agent, CFG.batch_size, CFG.batch_length + CFG.replay_context, DEVICE)


@pytest.mark.parametrize("mode", MODES)
def test_bench_full_update(benchmark, mode):
    agent, opt, data = fresh()
    update = fast.make_update(update_step, agent, opt, mode)
    ref, ref_opt, _ = fresh()
    torch.manual_seed(0)
    with fast.autocast(DEVICE, mode):
        want, _ = update_step(ref, ref_opt, data)
    torch.manual_seed(0)
    got, _ = update(data)
    # The losses check the forward; the gradient's norm and the step's size, the backward and LaProp (as the table).
    for key in [k for k in want if k.startswith("loss/")] + ["opt/grad_norm", "opt/update_rms"]:
        torch.testing.assert_close(got[key], want[key], **tol(mode), msg=lambda m, key=key: f"{key}: {m}")
    benchmark.pedantic(synced(update), args=(data,), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("mode", MODES)
def test_bench_imagine(benchmark, mode):
    agent, _, _ = fresh()
    n = CFG.batch_size * CFG.batch_length
    deter = torch.zeros(n, agent.rssm.deter, device=DEVICE)
    stoch = torch.full((n, agent.rssm.stoch, agent.rssm.classes), 1.0 / agent.rssm.classes, device=DEVICE)
    ref = fresh()[0]  # built before seeding: building an agent draws from the generator
    imagine = fast.make_imagine(agent, mode)
    torch.manual_seed(0)
    with fast.autocast(DEVICE, mode):
        want = ref.imagine(deter, stoch)
    torch.manual_seed(0)
    got = imagine(deter, stoch)
    if fast.resolve_precision("auto", mode, DEVICE) == "fp32":
        torch.testing.assert_close(got[0], want[0], **tol(mode))  # the features
        torch.testing.assert_close(got[1], want[1], **tol(mode))  # and the actions drawn in them
    else:  # bf16 rounding can tip a sampled draw (bench/common.py)
        ok, outside = rollout_close(got, want, tol(mode))
        assert ok, f"{outside:.2%} of the rollout outside bf16 tolerance"
    benchmark.pedantic(synced(imagine), args=(deter, stoch), rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("mode", MODES)
def test_bench_act_step(benchmark, mode):
    agent, _, _ = fresh()
    obs = random_obs(agent, CFG.num_envs, DEVICE)
    carry = agent.initial(CFG.num_envs, DEVICE)
    act = fast.make_act(agent, mode)
    ref = fresh()[0]
    torch.manual_seed(6)
    with fast.autocast(DEVICE, mode):
        want_action, want_carry = ref.act(carry, obs)
    torch.manual_seed(6)
    got_action, got_carry = act(carry, obs)
    torch.testing.assert_close(got_carry[0], want_carry[0], **tol(mode))  # the deter state after the observation
    if DEVICE.type == "cpu" and fast.resolve_precision("auto", mode, DEVICE) == "fp32":
        assert torch.equal(got_action, want_action)  # bf16 or CUDA kernels can tip a draw (bench/common.py)
    benchmark.pedantic(synced(act), args=(carry, obs), rounds=50, warmup_rounds=2)
