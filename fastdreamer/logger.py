"""Metrics to <logdir>/metrics.jsonl and TensorBoard, and the one host sync that fetches them from the device."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Self

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


class Logger:
    """Writes config.json once, then one JSON line and one TensorBoard scalar per metric at each `log`."""

    def __init__(self, logdir: str | Path, config: dict, resume_step: int | None = None) -> None:
        """resume_step: a resumed run's step (its checkpoint's); rows and TensorBoard events after it, logged by
        the run after its checkpoint, are dropped, so the resumed run's do not repeat their steps."""
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, sort_keys=True, indent=2, default=str)  # default=str: Paths, devices, dtypes
        (self.logdir / "config.json").write_text(text + "\n")
        path = self.logdir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _truncate_jsonl(path, resume_step)
        if resume_step is not None:  # the GIFs the run wrote after its checkpoint go with its rows and events
            for gif in self.logdir.glob("videos/*/*.gif"):
                if gif.stem.isdigit() and int(gif.stem) > resume_step:
                    gif.unlink(missing_ok=True)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.logdir), purge_step=purge)
        # Held open for the run; append so a resumed run continues the file.
        self.jsonl = open(path, "a")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float | int]) -> None:
        step = int(step)
        # JSON has no NaN or Infinity: a non-finite value is written as null (TensorBoard keeps it as it is).
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def video(self, step: int, tag: str, frames: np.ndarray, fps: float = 10.0) -> Path:
        """An animated GIF of frames (T, H, W, C) uint8 (encode_gif), written atomically to
        <logdir>/videos/<tag with / as _>/<step>.gif and to TensorBoard's images (which play GIFs). Returns the path."""
        path = self.logdir / "videos" / tag.replace("/", "_") / f"{int(step):010d}.gif"
        gif = write_gif(path, frames, fps)
        T, H, W, C = frames.shape
        image = Summary.Image(height=H, width=W, colorspace=3 if C >= 3 else 1, encoded_image_string=gif)
        # What SummaryWriter.add_video writes, without the moviepy it would need to encode the GIF.
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), int(step))
        self.writer.flush()
        return path

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of metrics.jsonl up to last_step (and none cut short by a crash), atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def encode_gif(frames: np.ndarray, fps: float = 10.0) -> bytes:
    """frames (T, H, W, C) uint8 -> the bytes of a looping animated GIF: RGB from the first three channels where
    there are three or more (RGBA, stacked frames), grey from the first one otherwise."""
    if frames.ndim != 4 or frames.dtype != np.uint8 or not len(frames) or not frames.shape[-1]:
        raise ValueError(f"a GIF takes frames (T, H, W, C) uint8, got {frames.shape} {frames.dtype}")
    from PIL import Image  # here, not at the top: a run without videos needs no Pillow (the GPU machine's stack)

    rgb = frames.shape[-1] >= 3
    images = [Image.fromarray(np.ascontiguousarray(f[..., :3] if rgb else f[..., 0])) for f in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return out.getvalue()


def write_gif(path: str | Path, frames: np.ndarray, fps: float = 10.0) -> bytes:
    """encode_gif's bytes written atomically to path (a temp file, then a rename), its folder made; returns them."""
    gif = encode_gif(frames, fps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(gif)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return gif


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
