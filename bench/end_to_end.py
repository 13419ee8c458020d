"""Env steps/s of the real training loop: fastdreamer.train.Trainer with its envpool envs, policy, replay and
updates at a preset's train ratio, timed over whole loop iterations (not a sum of separately timed parts).

    python -m bench.end_to_end --preset pong --size 12m --mode graphs --device cuda [--no-overlap] [--seconds 20]

The loop body is the one train() runs: the updates that are due, while the env step sent by the last act() is in
flight, then act() (receive it, policy step, replay add, send the next one). --no-overlap receives each env step
right after sending it, as a blocking env.step would, so the two numbers side by side are the overlap's gain.
`python -m bench` calls measure() for its end_to_end row.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time

import torch

from fastdreamer import fast
from fastdreamer.config import preset_defaults
from fastdreamer.train import Trainer

from .common import count_arg, device_arg, size_arg, sync, threads_arg


def iteration(trainer: Trainer, overlap: bool) -> None:
    while trainer.updates_due >= 1:
        trainer.update()
    trainer.act()
    if not overlap:
        trainer.observe()


def timed_iteration(trainer: Trainer, acc: dict[str, float]) -> None:
    """One loop iteration in phases, the device synchronised after each: the due updates, the wait for the env step
    in flight, then act() (policy step, replay add, sending the next env step). The env step still runs during the
    updates, as in the overlapped loop (also under --no-overlap); the synchronisations stop host and device work
    from overlapping, so the sum exceeds an iteration's time and the phases say what an iteration waits for."""
    dev = trainer.device
    t0 = time.perf_counter()
    while trainer.updates_due >= 1:
        trainer.update()
        acc["updates"] += 1
    sync(dev)
    t1 = time.perf_counter()
    trainer.observe()
    t2 = time.perf_counter()
    trainer.act()
    sync(dev)
    t3 = time.perf_counter()
    acc["update_s"] += t1 - t0
    acc["env_wait_s"] += t2 - t1
    acc["act_s"] += t3 - t2
    acc["iterations"] += 1


def measure(
    preset: str,
    size: str,
    mode: str,
    device: str,
    *,
    overlap: bool = True,
    gru_impl: str = "torch",
    precision: str = "auto",
    seconds: float = 5.0,
    min_chunks: int = 5,
    warmup_updates: int = 3,
    breakdown_updates: int = 8,
    **overrides,
) -> dict:
    """Median and spread of env steps/s over chunks of loop iterations that each hold ~4 updates; then, unless
    breakdown_updates is 0, the loop's phases (timed_iteration) over iterations holding that many updates."""
    with tempfile.TemporaryDirectory() as logdir:
        cfg = dataclasses.replace(
            preset_defaults(preset),
            size=size,
            mode=mode,
            device=device,
            gru_impl=gru_impl,
            precision=precision,
            logdir=logdir,
            progress=False,
            replay_size=50_000,  # the ring's size does not change the time of a step; 50k keeps Pong's at 0.2 GiB
            steps=2**62,
            **overrides,
        )
        trainer = Trainer(cfg, log=lambda *_: None)
        dev = trainer.device
        try:
            t0 = time.perf_counter()
            while trainer.updates < warmup_updates:  # replay fill, then the updates that compile and capture
                iteration(trainer, overlap)
            sync(dev)
            warmup_s = time.perf_counter() - t0
            per_step = trainer.updates_per_step
            chunk = max(1, math.ceil(4 / per_step))
            rates, start = [], time.perf_counter()
            while len(rates) < min_chunks or (time.perf_counter() - start < seconds and len(rates) < 1000):
                steps0 = trainer.env_steps
                t = time.perf_counter()
                for _ in range(chunk):
                    iteration(trainer, overlap)
                sync(dev)  # the env step in flight carries into the next chunk, as in a run: steady state
                rates.append((trainer.env_steps - steps0) / (time.perf_counter() - t))
            acc = dict.fromkeys(("update_s", "env_wait_s", "act_s", "iterations", "updates"), 0)
            while breakdown_updates and (acc["updates"] < breakdown_updates or acc["iterations"] < 2):
                timed_iteration(trainer, acc)
            trainer.observe()
        finally:
            trainer.close()
    rates.sort()
    q = len(rates) // 4
    mid = rates[q : len(rates) - q] or rates
    median = statistics.median(rates)
    return {
        "env_steps_per_s": median,
        "env_steps_per_s_spread": mid[-1] - mid[0],
        "median_ms": cfg.num_envs / median * 1e3,  # per loop iteration (one step of all N envs)
        "chunks": len(rates),
        "iterations_per_chunk": chunk,
        "updates_per_env_step": per_step,
        "train_ratio": cfg.train_ratio,
        "num_envs": cfg.num_envs,
        "overlap": overlap,
        "warmup_s": warmup_s,
        # ms per loop iteration, each phase synchronised (timed_iteration); update_ms also per update
        "phases_ms": {k[:-2]: acc[k] / acc["iterations"] * 1e3 for k in ("update_s", "env_wait_s", "act_s")}
        if acc["iterations"]
        else {},
        "update_ms": acc["update_s"] / acc["updates"] * 1e3 if acc["updates"] else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pong")
    p.add_argument("--size", default="12m", type=size_arg)
    p.add_argument("--mode", default="compile", choices=("eager", "compile", "graphs"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--gru-impl", default="torch", choices=("torch", "triton"))
    p.add_argument("--precision", default="auto", choices=fast.PRECISIONS)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--batch-size", type=count_arg, default=None)
    p.add_argument("--batch-length", type=count_arg, default=None)
    p.add_argument("--no-overlap", action="store_true", help="also measure the loop with blocking env steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k in ("batch_size", "batch_length") if (v := getattr(args, k)) is not None}
    runs = [True, False] if args.no_overlap else [True]
    for overlap in runs:
        r = measure(
            args.preset,
            args.size,
            args.mode,
            args.device,
            overlap=overlap,
            gru_impl=args.gru_impl,
            precision=args.precision,
            seconds=args.seconds,
            **overrides,
        )
        print(
            f"{args.preset} {args.size} {args.mode} ({args.precision}) {args.device} overlap={overlap}: "
            f"{r['env_steps_per_s']:.0f} env steps/s (spread {r['env_steps_per_s_spread']:.0f}, {r['chunks']} chunks, "
            f"N{r['num_envs']}, ratio {r['train_ratio']:g}, warmup {r['warmup_s']:.1f} s)",
            file=sys.stdout,
            flush=True,
        )
        if r["phases_ms"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items())
            print(f"  phases, synchronised, ms per iteration: {phases}; {r['update_ms']:.2f} ms per update", flush=True)


if __name__ == "__main__":
    main()
