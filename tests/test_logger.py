import json

import torch

from fastdreamer.logger import Logger, to_host


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_one_json_line_per_call_and_config(tmp_path):
    logdir = tmp_path / "run"
    with Logger(logdir, {"seed": 3, "env": "cartpole", "lr": 4e-5}) as logger:
        logger.log(10, {"loss/dyn": 1.5, "fps/train": 200})
        logger.log(20, {"loss/dyn": 1.25})
        # Flushed per call: readable while the run is still going.
        assert len(read_jsonl(logdir / "metrics.jsonl")) == 2
    rows = read_jsonl(logdir / "metrics.jsonl")
    assert rows == [{"step": 10, "loss/dyn": 1.5, "fps/train": 200}, {"step": 20, "loss/dyn": 1.25}]
    config_text = (logdir / "config.json").read_text()
    assert json.loads(config_text) == {"env": "cartpole", "lr": 4e-5, "seed": 3}
    assert config_text.index('"env"') < config_text.index('"lr"') < config_text.index('"seed"')  # sorted keys


def test_reopening_appends_to_metrics(tmp_path):
    with Logger(tmp_path, {}) as logger:
        logger.log(1, {"a": 1.0})
    with Logger(tmp_path, {}) as logger:
        logger.log(2, {"a": 2.0})
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
    with Logger(tmp_path, {}) as logger:
        for step in (10, 20, 30):
            logger.log(step, {"a": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "a"')  # cut short by a crash
    with Logger(tmp_path, {}, resume_step=20) as logger:  # the checkpoint was written at step 20
        logger.log(22, {"a": 22.0})
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 22]
    assert not list(tmp_path.glob("*.tmp"))


def test_tensorboard_event_file_is_written(tmp_path):
    with Logger(tmp_path, {}) as logger:
        logger.log(5, {"episode/return": 3.0})
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_to_host_transfers_once(monkeypatch):
    metrics = {"loss/dyn": torch.tensor(1.5), "step": torch.tensor(7, dtype=torch.int64), "x": torch.ones(1) * 2}
    calls = []
    for name in ("cpu", "tolist", "item", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    host = to_host(metrics)
    monkeypatch.undo()
    assert len(calls) == 1, calls
    assert host == {"loss/dyn": 1.5, "step": 7.0, "x": 2.0}
    assert all(type(v) is float for v in host.values())
    assert to_host({}) == {}


def test_non_finite_values_are_null_in_the_jsonl_which_stays_strict_json(tmp_path):
    with Logger(tmp_path, {}) as log:
        log.log(1, {"episode/return": float("inf"), "loss/dyn": float("nan"), "updates": 3, "fps/env": 2.5})

    def refuse(name):  # what a strict JSON reader (JavaScript, jq) does with NaN and Infinity
        raise ValueError(f"not JSON: {name}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row == {"step": 1, "episode/return": None, "loss/dyn": None, "updates": 3, "fps/env": 2.5}


def test_a_resumed_run_drops_the_videos_written_after_its_checkpoint(tmp_path):
    import numpy as np

    frames = np.zeros((2, 4, 4, 3), np.uint8)
    with Logger(tmp_path, {}) as log:
        kept, dropped = log.video(10, "openloop/image", frames), log.video(20, "openloop/image", frames)
    Logger(tmp_path, {}, resume_step=10).close()
    assert kept.exists() and not dropped.exists()
