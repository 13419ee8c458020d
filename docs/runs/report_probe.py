"""The open-loop report (fastdreamer/report.py) of finished runs, from their checkpoints (README, Learning: is a
stalled agent's world model worse?).

    python docs/runs/report_probe.py CHECKPOINT [CHECKPOINT ...] [--batches 4]

Loads each checkpoint as a resumed run would (agent and replay), runs the trainer's report on `--batches` replay
batches (each drawn with its own seed) and prints one JSON line per checkpoint: the mean of every report metric.
Nothing is trained or written but a scratch logdir in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from fastdreamer.checkpoint import CheckpointError, load
from fastdreamer.config import config_from_dict
from fastdreamer.train import Trainer, read_checkpoint


def probe(path: str, batches: int) -> dict:
    state = load(path, map_location="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        cfg = dataclasses.replace(
            config_from_dict(state["config"]), logdir=scratch, resume=True, progress=False, device="cpu"
        )
        trainer = Trainer(cfg, log=lambda *_: None, resume=read_checkpoint(Path(path), cfg))
        try:
            sums: dict[str, list[float]] = {}
            for _ in range(batches):
                metrics, _ = trainer.report()
                for key, value in metrics.items():
                    sums.setdefault(key, []).append(value)
                trainer.updates += 1  # the report's seed: another batch next time
        finally:
            trainer.close()
    return {"checkpoint": path, "batches": batches, **{k: round(sum(v) / len(v), 4) for k, v in sums.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        for path in args.checkpoints:
            print(json.dumps(probe(path, args.batches)))
    except (ValueError, CheckpointError) as e:
        print(f"report_probe: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
