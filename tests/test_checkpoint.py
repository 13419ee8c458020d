import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdreamer import checkpoint
from fastdreamer.checkpoint import CheckpointError, load, rng_state, save, set_rng_state


def payload(value: float, env: str = "pong") -> dict:
    return {
        "meta": {"env": env, "size": "12m"},
        "model": {"w": torch.full((3, 4), value), "b": torch.arange(5)},
        "step": 1234,
        "name": "run",
    }


def test_round_trip_and_meta_gets_format(tmp_path):
    path = tmp_path / "ckpt.pt"
    original = payload(1.5)
    save(path, original)
    loaded = load(path, expect={"env": "pong", "size": "12m"})
    assert torch.equal(loaded["model"]["w"], original["model"]["w"]) and loaded["step"] == 1234
    assert loaded["meta"]["format"] == checkpoint.FORMAT_VERSION
    assert "format" not in original["meta"]  # the caller's dict is left alone


def test_crash_during_write_keeps_old_checkpoint_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save(path, payload(1.0))
    old_bytes = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, payload(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(load(path)["model"]["w"], torch.full((3, 4), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_file_size_limit_mid_save_is_one_oserror_line_and_keeps_the_old_checkpoint(tmp_path):
    """A real write failure from the kernel (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk), in a child process:
    torch's zip writer answers the OSError with a RuntimeError, which save turns into one OSError line."""
    path = tmp_path / "ckpt.pt"
    save(path, payload(1.0))
    old_bytes = path.read_bytes()
    code = f"""
import errno, resource, signal, torch
from fastdreamer import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    checkpoint.save({str(path)!r}, {{"meta": {{}}, "big": torch.zeros(1 << 20)}})
except OSError as e:
    print(e)
    assert e.errno == errno.EFBIG, e.errno  # kept for callers that tell errors apart
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
    assert (
        proc.stdout.strip()
        == f"checkpoint {path} could not be written (File too large); the previous checkpoint is kept"
    )
    assert path.read_bytes() == old_bytes and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_temp_file_left_by_a_killed_save_is_removed_by_the_next(tmp_path):
    path = tmp_path / "ckpt.pt"
    (tmp_path / ".ckpt.pt.abc123.tmp").write_bytes(b"half a replay")  # SIGKILL mid-save leaves it
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"not ours")
    save(path, payload(1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp", "ckpt.pt"]


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "ckpt.pt"
    save(path, payload(1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt or not a fastdreamer checkpoint") as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint"])
def test_garbage_file_is_reported_as_corrupt(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is corrupt or not a fastdreamer checkpoint"):
        load(path)


def test_torch_file_without_meta_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"not a fastdreamer checkpoint \(no meta dict\)"):
        load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"^checkpoint not found: {path}$"):
        load(path)


def test_mismatch_names_both_values(tmp_path):
    path = tmp_path / "ckpt.pt"
    save(path, payload(1.0, env="pong"))
    with pytest.raises(CheckpointError) as info:
        load(path, expect={"env": "cartpole"})
    assert str(info.value) == f"checkpoint {path} was trained on env=pong, but this run has env=cartpole"


def draws() -> tuple:
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(4).tolist()


def test_rng_state_round_trip_through_a_checkpoint_reproduces_draws(tmp_path):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    np.random.standard_normal(1)  # odd count: leaves a cached gaussian in numpy's state
    path = tmp_path / "ckpt.pt"
    save(path, {"meta": {}, "rng": rng_state()})
    first = draws()
    assert draws() != first  # the generators do advance, so equality below is not vacuous
    set_rng_state(load(path)["rng"])
    assert draws() == first


def test_weights_of_another_model_layout_name_the_first_weight_that_differs():
    """An agent saved before the observation layout changed (discrete elements of unequal counts were padded to the
    largest, so the encoder read 2 x 5 one-hot inputs where it now reads 2 + 5): one line that says which weight."""
    from fastdreamer.agent import Agent
    from fastdreamer.config import Config
    from fastdreamer.envs import EnvSpec

    obs = {"discrete": ((2,), torch.int32)}
    old = Agent(Config(size="debug"), EnvSpec(obs=obs, discrete=True, act_dim=2, env_id="t", classes=5))
    new = Agent(Config(size="debug"), EnvSpec(obs, True, 2, "t", classes=5, obs_classes=(2, 5)))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_weights(new, old.state_dict(), "c.pt")
    assert str(e.value).startswith(
        "checkpoint c.pt holds a model of another layout: encoder.mlp.0.linear.weight is (16, 10) there, (16, 7) here"
    ), str(e.value)
    state = old.state_dict()
    del state["reward.out.weight"]
    with pytest.raises(CheckpointError, match="another layout: reward.out.weight missing$"):
        checkpoint.load_weights(old, state, "c.pt")
    checkpoint.load_weights(old, old.state_dict(), "c.pt")  # the same layout loads


def test_cuda_generators_round_trip_through_a_checkpoint_for_the_devices_both_runs_have(tmp_path, monkeypatch):
    """The CUDA generators' part of the RNG state (a GPU run's exact resume), with torch.cuda faked on the CPU: saved
    for every device, restored for as many as the resuming machine has."""
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the resuming machine has one GPU
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s.clone()))
    save(tmp_path / "c.pt", {"rng": rng_state()})
    state = load(tmp_path / "c.pt")["rng"]
    assert [s.tolist() for s in state["cuda"]] == [[1, 2], [3, 4]]
    set_rng_state(state)
    assert list(restored) == [0] and restored[0].tolist() == [1, 2]
