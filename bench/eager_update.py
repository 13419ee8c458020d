"""Per-update time of the eager trainer at a preset's data shapes: `python bench/eager_update.py --size 12m`.

Times Trainer.update (replay sample, whole loss, backward, LaProp step, slow critic, latent write-back) after
filling replay just enough to sample; prints one line and optionally appends a JSON row."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: bench is a package of the checkout
from bench.common import count_arg, device_arg, size_arg, threads_arg  # noqa: E402
from fastdreamer.config import preset_defaults  # noqa: E402
from fastdreamer.provenance import cpu_name, git_info  # noqa: E402
from fastdreamer.train import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--env", default="cartpole")
    p.add_argument("--size", default="debug", type=size_arg)
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--repeats", type=count_arg, default=5)
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
        "cpu": cpu_name(),
        **git_info(),
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
