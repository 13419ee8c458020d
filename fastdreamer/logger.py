"""Metrics to <logdir>/metrics.jsonl and TensorBoard, and the one host sync that fetches them from the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import torch
from torch.utils.tensorboard import SummaryWriter


class Logger:
    """Writes config.json once, then one JSON line and one TensorBoard scalar per metric at each `log`."""

    def __init__(self, logdir: str | Path, config: dict) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, sort_keys=True, indent=2, default=str)  # default=str: Paths, devices, dtypes
        (self.logdir / "config.json").write_text(text + "\n")
        self.writer = SummaryWriter(str(self.logdir))
        # Held open for the run; append so a resumed run continues the file.
        self.jsonl = open(self.logdir / "metrics.jsonl", "a")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float | int]) -> None:
        step = int(step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_host(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fetches a dict of device scalars with a single device-to-host transfer (one sync, not one per metric)."""
    if not metrics:
        return {}
    values = list(metrics.values())
    device = values[0].device
    for key, v in metrics.items():
        assert v.numel() == 1, f"metric {key} has shape {tuple(v.shape)}, expected a scalar"
    # float64: integer counters stay exact up to 2^53.
    stacked = torch.stack([v.detach().reshape(()).to(device=device, dtype=torch.float64) for v in values])
    return dict(zip(metrics.keys(), stacked.tolist(), strict=True))
