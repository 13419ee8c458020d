"""What ran a run or a benchmark: the code's commit, the library versions, the machine. Recorded next to results so
that a number can be traced to what produced it."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent  # the checkout, where fastdreamer is installed editable from one


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    return name


def git_info(root: Path = REPO) -> dict:
    """The commit of the checkout at `root` and whether its tracked files differ from it; None for both where git
    cannot tell: no git, or `root` is not a checkout's top (an installed copy inside some other repository, such as
    a virtual environment in a user's project, is not that repository's commit)."""

    def git(*cmd: str) -> str | None:
        try:
            run = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=10, check=True)
            return run.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return {"git_commit": None, "git_dirty": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    """The device's name, the thread counts and the versions of what computes and what simulates (not the host's
    name: run configs get published)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{package: version(package) for package in ("triton", "envpool", "gymnasium", "numpy")},
        **git_info(),
    }
