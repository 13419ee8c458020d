"""DreamerV3 learns: CartPole from scratch on the 2-core CPU, in CI.

The recipe is the real trainer at a small scale: debug-size model, batches of 8×32, train ratio 64, lr 3e-4 with
a 100-update warmup (the reference's 4e-5 / 1000 is tuned for long runs and barely moves in 2,000 updates). On the
2-core CPU this run takes about 4 minutes; seed 0 reached a mean training return of 113-139 by 8,000 env steps
(random play: ~22).
"""

import dataclasses

import pytest
import torch

from fastdreamer.config import preset_defaults
from fastdreamer.eval import evaluate
from fastdreamer.train import train

THRESHOLD = 75.0  # mean return over 8 evaluation episodes; random play scores ~22


@pytest.mark.slow
def test_cartpole_learns_on_cpu(tmp_path):
    # One thread: at this model size a second OpenMP thread buys nothing, and on a busy box its barriers spin
    # (bench/LOG.md measured 6x slower eager updates at 2 threads under load). 213 s on the 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_and_check(tmp_path)
    finally:
        torch.set_num_threads(threads)


def run_and_check(tmp_path):
    cfg = dataclasses.replace(
        preset_defaults("cartpole"), size="debug", batch_size=8, batch_length=32, train_ratio=64.0, lr=3e-4,
        warmup=100, steps=8000, num_envs=4, replay_size=100_000, mode="eager", progress=False, log_every=30.0,
        seed=0, logdir=str(tmp_path / "cartpole"))
    trainer = train(cfg, log=lambda *_: None)
    assert trainer.updates >= 1900
    result = evaluate(trainer.agent, "CartPole-v1", cfg, episodes=8, device=trainer.device)
    assert result["mean"] >= THRESHOLD, result
