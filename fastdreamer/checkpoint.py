"""Atomic checkpoints with one-line errors, and the RNG state that makes a resumed run draw the same numbers.

A checkpoint is a dict of plain data (tensors, containers, numbers, strings) with payload["meta"] describing the run
(format version, env, model size, ...). It loads with weights_only=True, so it never executes pickled code.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name where it has none): for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_weights(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """module.load_state_dict(state), or a CheckpointError of one line naming the first weight that differs: the
    checkpoint's model was built for other observations, actions or sizes (torch's error puts that on later lines,
    which a one-line message drops)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != own[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"checkpoint {path} holds a model of another layout: {k} is {tuple(state[k].shape)} there, "
            f"{tuple(own[k].shape)} here (another env, observation layout or --size; {len(shapes)} weights differ)"
        )
    if missing or extra:
        which = f"{missing[0]} missing" if missing else f"{extra[0]} unexpected"
        raise CheckpointError(f"checkpoint {path} holds a model of another layout: {which}")
    module.load_state_dict(state)


def save(path: str | Path, payload: dict) -> None:
    """Writes payload to path atomically: a crash leaves either the old file or the new one, never a torn one.

    payload["meta"] (optional dict) gains "format": FORMAT_VERSION; the caller's dict is not modified.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(payload.get("meta") or {})
    meta.setdefault("format", FORMAT_VERSION)
    payload = {**payload, "meta": meta}
    # A temp file left by a process killed mid-save (SIGKILL, power loss) is as large as the replay: removed.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    # The temp file lives in the same directory so os.replace is a rename within one filesystem (atomic).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a checkpoint is as readable as any other output
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # A full disk or a file-size limit reaches torch's zip writer as an OSError, which it answers with a
        # RuntimeError ("[enforce fail at inline_container.cc:...] unexpected pos"): one OSError line instead.
        cause = _os_error(e)
        if cause is None:
            raise
        kept = "the previous checkpoint is kept" if path.exists() else "nothing was written"
        error = OSError(f"checkpoint {path} could not be written ({cause.strerror or cause}); {kept}")
        error.errno = cause.errno
        raise error from None
    _fsync_dir(path.parent)  # the rename itself is durable only once the directory entry is on disk


def _os_error(e: BaseException) -> OSError | None:
    """The first OSError in e's chain (e, then its cause or unsuppressed context, and so on), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(
    path: str | Path, expect: dict | None = None, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """Loads a checkpoint written by `save` and checks payload["meta"] against `expect` (e.g. env, size). mmap: the
    tensors stay in the file, mapped, and are read where they are used (eval reads the weights, not the replay)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; name the file in it (checkpoint.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as e:  # unreadable (permissions, I/O error): not the file's contents
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    # torch.load raises RuntimeError, UnpicklingError, EOFError, ValueError, ... for truncated zips, garbage bytes and
    # foreign pickles; all mean the same to the user.
    except Exception as e:  # noqa: BLE001
        reason = first_line(e)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastdreamer checkpoint ({reason})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict):
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastdreamer checkpoint (no meta dict)")
    meta = payload["meta"]
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format')}, this fastdreamer reads version "
            f"{FORMAT_VERSION}"
        )
    for key, want in (expect or {}).items():
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} does not record {key}, but this run has {key}={want}")
        if meta[key] != want:
            raise CheckpointError(f"checkpoint {path} was trained on {key}={meta[key]}, but this run has {key}={want}")
    return payload


def rng_state() -> dict:
    """Python, numpy (global), torch CPU and every CUDA device's generator, as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` captured; CUDA generators are restored for as many devices as both runs have."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        for device in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[device].cpu(), device)
