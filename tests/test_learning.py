"""DreamerV3 learns: CartPole from scratch on the 2-core CPU, in CI.

The recipe is the real trainer at a small scale: debug-size model, batches of 8x32, train ratio 64, lr 3e-4 with
a 100-update warmup (the reference's 4e-5 / 1000 is tuned for long runs and barely moves in 2,000 updates). On the
2-core CPU this run takes about 4 minutes with AVX512, 10 on the CI machine (a 2-core EPYC without it: 596-609 s).

What is asserted is the training curve: the mean return of 20 consecutive training episodes must reach 75 (random
play: ~22). Over seeds 0-3 the best such mean was 98, 95, 167 and 86 (with the reference's online replay queue and
its later start of training; 101, 110, 125 and 95 before them), and a run that does not learn stays near 22, so the
check separates the two with a margin. The final policy is not asserted: at 8,000 steps its
evaluation varies from seed to seed far more than the curve does (seeds 0-3 evaluated 72, 10, 148 and 263 over 8
episodes; the earlier Gumbel-max sampler gave 143, 23 and 164 for seeds 0-2): in seed 1, under either sampler,
the policy collapsed after its best stretch. That late collapse is an open problem of the CPU recipe (README).
"""

import dataclasses

import pytest
import torch

from fastdreamer.config import preset_defaults
from fastdreamer.envs import VecEnv
from fastdreamer.train import train

THRESHOLD = 75.0  # best mean return over 20 consecutive training episodes; random play scores ~22
WINDOW = 20


@pytest.mark.slow
def test_cartpole_learns_on_cpu(tmp_path, monkeypatch):
    # One thread: at this model size a second OpenMP thread buys nothing, and on a busy box its barriers spin
    # (bench/LOG.md measured 6x slower eager updates at 2 threads under load). ~230-610 s on 2 cores.
    returns, pop = [], VecEnv.pop_episodes

    def recording_pop(self):
        episodes = pop(self)
        returns.extend(ret for ret, _ in episodes)
        return episodes

    monkeypatch.setattr(VecEnv, "pop_episodes", recording_pop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dataclasses.replace(
            preset_defaults("cartpole"),
            size="debug",
            batch_size=8,
            batch_length=32,
            train_ratio=64.0,
            lr=3e-4,
            warmup=100,
            steps=8000,
            num_envs=4,
            replay_size=100_000,
            mode="eager",
            device="cpu",  # the thresholds below were measured on the CPU; a GPU draws other random streams
            progress=False,
            log_every=30.0,
            seed=0,
            logdir=str(tmp_path / "cartpole"),
        )
        trainer = train(cfg, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert trainer.updates >= 1900  # 1,905: one per 4-env step from the 96th on (a batch's 256 sequences stored)
    assert len(returns) >= 2 * WINDOW, f"only {len(returns)} episodes ended"
    first = sum(returns[:WINDOW]) / WINDOW
    best = max(sum(returns[i : i + WINDOW]) / WINDOW for i in range(len(returns) - WINDOW + 1))
    assert first < 40, f"the first {WINDOW} episodes average {first:.1f}: not a run from scratch"
    assert best >= THRESHOLD, f"best mean over {WINDOW} training episodes {best:.1f} < {THRESHOLD}"
