"""Per-update time of the eager trainer at a preset's data shapes: `python bench/eager_update.py --size 12m`.

Times Trainer.update (replay sample, whole loss, backward, LaProp step, slow critic, latent write-back) after
filling replay just enough to sample; prints one line and optionally appends a JSON row."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import time

import torch

from fastdreamer.config import preset_defaults
from fastdreamer.train import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--env", default="cartpole")
    p.add_argument("--size", default="debug")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    args = p.parse_args()
    # The reference's batch (16 x 64) whatever the preset trains with, so sizes and envs compare.
    cfg = dataclasses.replace(
        preset_defaults(args.env),
        size=args.size,
        device=args.device,
        num_envs=4,
        batch_size=16,
        batch_length=64,
        replay_size=20_000,
        mode="eager",
        progress=False,
        logdir="/tmp/fastdreamer-bench",
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    while not trainer.replay.ready():
        trainer.act()
    trainer.update()  # warm-up
    times = []
    for _ in range(args.repeats):
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        trainer.update()
        sync()
        times.append(time.perf_counter() - t)
    trainer.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {
        "env": args.env,
        "size": args.size,
        "device": str(trainer.device),
        "batch": f"{cfg.batch_size}x{cfg.batch_length}",
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "commit": commit,
    }
    print(
        f"{args.env} {args.size} eager update ({row['batch']}, {row['device']}, {row['threads']} threads): "
        f"median {row['median_ms']:.0f} ms (min {row['min_ms']:.0f}, max {row['max_ms']:.0f}, n={args.repeats})"
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
