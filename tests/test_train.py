"""The train and eval commands end to end: presets, exact resume, divergence, and bad input."""

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import envpool
import pytest
import torch

from fastdreamer import checkpoint
from fastdreamer import train as train_mod
from fastdreamer.checkpoint import CheckpointError
from fastdreamer.config import PRESETS, Config, preset_defaults
from fastdreamer.train import Trainer, TrainingDiverged, read_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--size",
    "debug",
    "--num-envs",
    "2",
    "--batch-size",
    "2",
    "--batch-length",
    "8",
    "--imag-length",
    "3",
    "--replay-size",
    "1000",
    "--train-ratio",
    "8",
    "--no-progress",
    "--log-every",
    "0",
    "--mode",
    "eager",
]


def run(module, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def tiny_config(tmp_path, **kw) -> Config:
    base = dict(
        size="debug",
        num_envs=2,
        batch_size=2,
        batch_length=8,
        imag_length=3,
        replay_size=1000,
        train_ratio=8.0,
        progress=False,
        log_every=0.0,
        mode="eager",
        logdir=str(tmp_path / "run"),
    )
    return dataclasses.replace(preset_defaults("cartpole"), **{**base, **kw})


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param(
            p,
            marks=pytest.mark.skipif(
                p == "walker" and "WalkerWalk-v1" not in envpool.list_all_envs(),
                reason="this envpool build has no dm_control envs (the carried GPU bundle)",
            ),
        )
        for p in sorted(PRESETS)
    ],
)
def test_cli_trains_every_preset_at_debug_size(preset, tmp_path):
    logdir = tmp_path / preset
    # --report-every far away: the report checked below is the one at the end, once whatever the machine's load.
    args = ["--env", preset, *TINY, "--steps", "40", "--logdir", str(logdir), "--report-every", "1e9"]
    proc = run("fastdreamer.train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (logdir / "checkpoint.pt").is_file()
    config = json.loads((logdir / "config.json").read_text())
    assert config["env"] == preset and config["size"] == "debug"
    # Beside the settings as given (device "auto"), what this start resolved them to and what it ran on.
    resolved = config["resolved"]
    assert resolved["device"] == "cpu" and resolved["mode"] in ("eager", "compile") and resolved["gru_impl"] == "torch"
    assert resolved["torch"] == torch.__version__ and resolved["envpool"] == envpool.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert resolved["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    lines = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in line for line in lines)
    logs = [line for line in lines if "updates" in line]
    assert logs[-1]["updates"] > 0 and all(k in logs[-1] for k in ("loss/dyn", "loss/policy", "fps/env"))
    # The open-loop report at the end (fastdreamer/report.py): its metrics, and a video for image observations.
    (report,) = [line for line in lines if "openloop/rew_loss" in line]
    videos = list((logdir / "videos" / "openloop_image").glob("*.gif"))
    charts = list((logdir / "videos" / "openloop_vector").glob("*.gif"))
    image = preset in ("pong", "carracing")
    assert len(videos) == image and ("openloop/image_loss" in report) == image
    assert len(charts) == (not image) and ("openloop/vector_loss" in report) == (not image)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logdir))


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(tmp_path, seed=3, steps=40)  # a ring of the run's 20 steps per env (of 500), regrown below
    a = Trainer(cfg, log=lambda *_: None)
    assert a.replay.length == 20
    first_obs = a.obs["vector"].clone()
    while a.updates_due < 1:
        a.act()
    a.update()
    a.update() if a.updates_due >= 1 else a.act()
    while a.updates_due < 1:
        a.act()
    a.read_metrics()  # metric means restart here, as they do for the resumed run
    a.save()  # saved before an update, as the loop does
    # Two updates with no act() between them: an env step after the resume differs (envpool restarts its envs), and
    # the online queue trains on the newest chunk first, so a batch drawn after an act() may hold that step.
    a.update()
    a.update()
    a_params = [p.detach().clone() for p in a.agent.parameters()]
    a_metrics = a.read_metrics()
    a_consumed = a.replay.consumed
    a.close()

    resumed = dataclasses.replace(cfg, resume=True, steps=400)  # resumed with more steps
    b = Trainer(resumed, log=lambda *_: None, resume=read_checkpoint(a.logdir / "checkpoint.pt", resumed))
    assert b.replay.length == 200
    assert not torch.equal(b.obs["vector"], first_obs), "the envs restart seeded by the resume point"
    b.update()
    b.update()
    b_metrics = b.read_metrics()
    # The envs restarted at the resume; the step stored before it ends its episode once the restart's first step is
    # stored (not at the restore: the two updates above are the uninterrupted run's).
    newest = (b.replay.head - 1) % b.replay.length
    cut = b.replay.data["is_last"][:, newest].clone()
    b.act()
    assert b.replay.data["is_last"][:, newest].all() and b.replay.data["is_first"][:, b.replay.head - 1].all()
    b.act()
    assert b.replay.data["is_last"][:, newest].all() and not b.restarted
    b.close()
    assert not cut.all(), "the episodes were cut, not ended by the envs"
    assert a_consumed > 0, "the online queue took part in the updates compared"
    assert b.replay.consumed == a_consumed
    for pa, pb in zip(a_params, b.agent.parameters()):
        assert torch.equal(pa, pb.detach())
    assert a_metrics["loss/total"] == b_metrics["loss/total"]


def test_a_ring_sized_to_the_run_trains_as_the_whole_ring(tmp_path):
    # config.replay_capacity allocates only the steps a run takes: the same windows, draws and updates as the whole
    # --replay-size ring, which a run of more steps allocates.
    params, rings = [], []
    for steps in (60, 10**6):
        t = Trainer(tiny_config(tmp_path / str(steps), seed=5, steps=steps), log=lambda *_: None)
        try:
            for _ in range(30):
                t.act()
                while t.updates_due >= 1:
                    t.update()
            params.append([p.detach().clone() for p in t.agent.parameters()])
            rings.append((t.replay.length, t.updates, {k: v[:, :30].clone() for k, v in t.replay.data.items()}))
        finally:
            t.close()
    for k in rings[0][2]:
        assert torch.equal(rings[0][2][k], rings[1][2][k]), k  # the stored steps, refreshed latents included
    for pa, pb in zip(*params):
        assert torch.equal(pa, pb)
    assert rings[0][0] == 30 and rings[1][0] == 500 and rings[0][1] == rings[1][1] > 10


def test_a_run_fills_its_ring_without_wrapping_and_resumes_with_fewer_steps(tmp_path):
    lines = []
    cfg = tiny_config(tmp_path, steps=41)  # 2 envs: 21 adds each, the last one past --steps
    first = train(cfg, log=lines.append)
    assert first.replay.length == 21 and first.replay.count == 21, "sized to the run, never wrapped"
    assert any("replay of 42 steps (sized to --steps; --replay-size 1,000)" in line for line in lines), lines
    again = train(dataclasses.replace(cfg, resume=True, steps=10), log=lines.append)  # fewer steps than taken
    assert again.replay.length == 21 and again.replay.count == 21 and again.env_steps == 42
    assert "fastdreamer: replay of 42 steps, as the checkpoint's" in lines


def test_resume_through_the_cli_appends(tmp_path):
    logdir = tmp_path / "run"
    first = run("fastdreamer.train", *TINY, "--steps", "40", "--logdir", str(logdir))
    assert first.returncode == 0, first.stderr[-2000:]
    n = len((logdir / "metrics.jsonl").read_text().splitlines())
    again = run("fastdreamer.train", *TINY, "--steps", "40", "--logdir", str(logdir))
    assert again.returncode == 2 and "--resume" in again.stderr
    second = run("fastdreamer.train", *TINY, "--steps", "80", "--logdir", str(logdir), "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    lines = [json.loads(x) for x in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) > n and lines[-1]["step"] >= 80


def test_updates_start_once_the_replay_holds_a_batch_of_sequences(tmp_path):
    cfg = tiny_config(tmp_path, batch_size=3, batch_length=8)  # 2 envs, seq 9: 2 * (n - 8) >= 24 sequences at n = 20
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        assert trainer.train_after == 24
        for n in range(1, 21):
            trainer.act()
            assert trainer.replay.windows() == 2 * max(0, n - 8)
            assert (trainer.updates_due > 0) == (n >= 20), f"after {n} steps per env"
        small = Trainer(tiny_config(tmp_path / "small", replay_size=20), log=lambda *_: None)
        small.close()
        assert small.train_after == 2 * (10 - 9 + 1), "a ring smaller than a batch of sequences trains when full"
    finally:
        trainer.close()


def test_updates_run_while_the_env_step_is_in_flight(tmp_path, monkeypatch):
    pending, original = [], Trainer.update

    def update(self):
        pending.append(self.env.pending)
        original(self)

    monkeypatch.setattr(Trainer, "update", update)
    trainer = train(tiny_config(tmp_path, steps=40), log=lambda *_: None)
    assert pending and all(pending), "every update overlaps an env step sent before it"
    assert not trainer.env.pending, "the last step is received before the run ends"


def test_threads_option_sets_torchs_cpu_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(tiny_config(tmp_path, threads=1), log=lambda *_: None).close()
        assert torch.get_num_threads() == 1
        Trainer(tiny_config(tmp_path / "b", threads=0), log=lambda *_: None).close()
        assert torch.get_num_threads() == 1, "0 leaves the count as it is"
    finally:
        torch.set_num_threads(before)


def test_nan_loss_stops_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, steps=40)
    train(cfg, log=lambda *_: None)
    ckpt = Path(cfg.logdir) / "checkpoint.pt"
    good = ckpt.read_bytes()
    original = train_mod.Agent.loss

    def poisoned(self, data):
        total, metrics, latents = original(self, data)
        metrics["loss/rew"] = metrics["loss/rew"] * float("nan")
        return total * float("nan"), metrics, latents

    monkeypatch.setattr(train_mod.Agent, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss/rew"):
        train(dataclasses.replace(cfg, resume=True, steps=80, save_every=1), log=lambda *_: None)
    assert ckpt.read_bytes() == good


def test_an_infinite_gradient_under_a_finite_loss_stops_the_run_too(tmp_path, monkeypatch):
    original = train_mod.update_step

    def poisoned(agent, opt, data):
        metrics, latents = original(agent, opt, data)
        metrics["opt/grad_norm"] = metrics["opt/grad_norm"] * float("inf")  # the parameters go NaN next
        return metrics, latents

    monkeypatch.setattr(train_mod, "update_step", poisoned)
    cfg = tiny_config(tmp_path, steps=80)
    with pytest.raises(TrainingDiverged, match="opt/grad_norm became inf .* no checkpoint was written"):
        train(cfg, log=lambda *_: None)
    assert not (Path(cfg.logdir) / "checkpoint.pt").exists()


def test_eval_prints_mean_std_median_and_extremes(tmp_path):
    logdir = tmp_path / "run"
    assert run("fastdreamer.train", *TINY, "--steps", "40", "--logdir", str(logdir)).returncode == 0
    proc = run("fastdreamer.eval", "--checkpoint", str(logdir / "checkpoint.pt"), "--episodes", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    again = run("fastdreamer.eval", "--checkpoint", str(logdir / "checkpoint.pt"), "--episodes", "3")
    assert json.loads(again.stdout.strip().splitlines()[-1]) == result, "one seed, two evals, other episodes"
    assert result["episodes"] == 3 and len(result["returns"]) == 3
    assert result["mean"] == pytest.approx(sum(result["returns"]) / 3)
    returns = sorted(result["returns"])
    assert (result["min"], result["median"], result["max"]) == pytest.approx((returns[0], returns[1], returns[2]))
    assert all(r >= 1 for r in result["returns"])  # CartPole pays 1 per step


def test_env_kwargs_reach_the_env_in_training_and_in_eval(tmp_path):
    logdir = tmp_path / "run"
    args = [*TINY, "--steps", "40", "--logdir", str(logdir), "--env-kwargs", '{"max_episode_steps": 4}']
    assert run("fastdreamer.train", *args).returncode == 0
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["episode/length"] for r in rows if "episode/length" in r) <= 4
    proc = run("fastdreamer.eval", "--checkpoint", str(logdir / "checkpoint.pt"), "--episodes", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(json.loads(proc.stdout.strip().splitlines()[-1])["lengths"]) <= 4


def test_train_evaluates_at_the_end_when_asked(tmp_path):
    logdir = tmp_path / "run"
    proc = run("fastdreamer.train", *TINY, "--steps", "40", "--logdir", str(logdir), "--eval-episodes", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"eval over 3 episodes: [-\d.]+ ± [\d.]+ \(median [-\d.]+, worst [-\d.]+\)", proc.stdout), (
        proc.stdout
    )
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in rows if "eval/return" in r]
    assert last["eval/return_min"] <= last["eval/return_median"] and last["eval/return_min"] >= 1  # CartPole: 1/step


def test_the_stall_probe_runs_on_a_pendulum_checkpoint(tmp_path):
    # docs/runs/stall_probe.py backs README's account of the pendulum stall; it reads the agent's internals.
    logdir = tmp_path / "run"
    assert (
        run("fastdreamer.train", *TINY, "--env", "pendulum", "--steps", "40", "--logdir", str(logdir)).returncode == 0
    )
    probe = [sys.executable, str(ROOT / "docs/runs/stall_probe.py"), str(logdir / "checkpoint.pt"), "--episodes", "3"]
    proc = subprocess.run([*probe, "--below", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["stalled"]["episodes"] == 3 and out["others"] == {"episodes": 0}  # pendulum's rewards are <= 0
    ev = run("fastdreamer.eval", "--checkpoint", str(logdir / "checkpoint.pt"), "--episodes", "3", "--seed", "7")
    assert out["mean_return"] == round(json.loads(ev.stdout.strip().splitlines()[-1])["mean"], 1)  # eval's episodes
    assert 0.1 <= out["stalled"]["std"] <= 1.0 and 0 <= out["stalled"]["abs_theta"] <= 3.1416, out
    bad = subprocess.run([*probe[:2], str(tmp_path / "missing.pt")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # docs/runs/report_probe.py: the trainer's open-loop report from a checkpoint, averaged over batches.
    report = [sys.executable, str(ROOT / "docs/runs/report_probe.py"), str(logdir / "checkpoint.pt"), "--batches", "2"]
    proc = subprocess.run(report, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["batches"] == 2 and out["openloop/vector_loss"] > 0 and "openloop/vector_loss_h3" in out, out


def main_exit(main, args, capsys):
    """Run a command's main() in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "CartPol-v1"], "did you mean"),
        (["--bach-size", "3"], "unknown flag --bach-size; did you mean --batch-size"),
        (["--no-progres"], "unknown flag --no-progres; did you mean --no-progress"),
        (["--env-kwargs", '{"seed": 3}'], "--env-kwargs cannot set seed: the envs are seeded from --seed"),
        (["--log-every", "-5"], "--log-every must be 0 (every step) or a positive number of seconds"),
        (["--report-every", "nan"], "--report-every must be 0 (no reports) or positive"),
        (["--train-ratio", "-1"], "--train-ratio must be positive"),
        (["--train-ratio", "inf"], "--train-ratio must be positive and finite, got inf"),
        (["--lr", "nan"], "--lr must be positive and finite, got nan"),
        (["--batch-length", "1"], "--batch-length must be at least 2"),
        (["--image-size", "63"], "--image-size must be a multiple of 16 from 48 to 256"),
        (["--seed", "-1"], "--seed must be in [0, 2**31)"),
        (["--env", "math:Foo-v0"], "math:Foo-v0 cannot be made: Environment `Foo` doesn't exist"),
        (["--env", "nosuchmodule.sub:Baz-v0"], "cannot be made: No module named 'nosuchmodule'"),
        (["--size", "13m"], "unknown size '13m'"),
        (["--threads", "-1"], "--threads must be 0"),
        (["--report-context", "0"], "--report-context at least 1"),
        (["--video-episodes", "-1"], "--video-episodes must be 0"),
        (["--env-kwargs", "[1]"], "--env-kwargs must be a JSON object"),
        (["--env-kwargs", "{'a': 1}"], "--env-kwargs is not JSON"),
        (["--env-kwargs", '{"foo": 1}'], "CartPole-v1 does not take --env-kwargs"),
        pytest.param(
            ["--env", "walker", "--video-episodes", "2"],
            "Gymnasium, which has no 'WalkerWalk-v1'",
            marks=pytest.mark.skipif("WalkerWalk-v1" not in envpool.list_all_envs(), reason="no dm_control envs"),
        ),
        (["--report-every", "-5"], "--report-every must be 0"),
        (["--precision", "fp16"], "unknown --precision 'fp16'"),
        (["--precision", "bf16"], "--precision bf16 needs a fast mode"),  # TINY runs --mode eager
        (["--warmup", "-1"], "--warmup must be 0"),
        (["--save-every", "0"], "--save-every at least 1"),
        (["--logdir", "runs/{name}"], "names fields other than {env}, {size}, {seed}"),
        (["--batch-length", "600", "--replay-size", "1000"], "longer than the replay capacity"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"], "device"),
    ],
)
def test_bad_train_input_is_one_clear_line(args, message, tmp_path, capsys):
    code, err = main_exit(train_mod.main, [*TINY, "--steps", "40", "--logdir", str(tmp_path / "x"), *args], capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("name", ["FAN_OUT", "DEFER", "COMBO_KERNELS", "PDL"])
def test_a_bad_observe_loop_switch_is_one_clear_line(name, tmp_path, monkeypatch, capsys):
    from fastdreamer import fast

    monkeypatch.setattr(fast, name, "yes")  # as read from FASTDREAMER_<name>=yes
    args = [*TINY, "--steps", "40", "--logdir", str(tmp_path / "x"), "--mode", "compile"]
    code, err = main_exit(train_mod.main, args, capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and f"FASTDREAMER_{name}='yes'" in lines[0], err


def test_bad_checkpoints_are_one_clear_line(tmp_path, capsys):
    from fastdreamer import eval as eval_mod

    code, err = main_exit(eval_mod.main, ["--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "checkpoint not found" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(corrupt)], capsys)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    cfg = tiny_config(tmp_path, steps=40)
    train(cfg, log=lambda *_: None)
    resume = [*TINY, "--steps", "80", "--logdir", cfg.logdir, "--resume"]
    code, err = main_exit(train_mod.main, [*resume, "--env", "pendulum"], capsys)
    assert code == 2 and "env=cartpole" in err, err
    code, err = main_exit(train_mod.main, [*resume, "--size", "1m"], capsys)
    assert code == 2 and "size=debug" in err, err
    # Settings that decide what the run computes stay the checkpoint's; run settings (--steps here) may change.
    code, err = main_exit(train_mod.main, [*resume, "--lr", "0.01", "--loss-rep", "5"], capsys)
    assert code == 2 and "(--loss-rep 0.1 -> 5.0, --lr 0.0003 -> 0.01)" in err and len(err.strip().splitlines()) == 1
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(corrupt), "--video", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(corrupt), "--seed", "-1"], capsys)
    assert code == 2 and "--seed must be 0 or positive, got -1" in err and len(err.strip().splitlines()) == 1
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(tmp_path)], capsys)
    assert code == 2 and f"checkpoint {tmp_path} is a directory" in err and len(err.strip().splitlines()) == 1
    # The video is a GIF: another name is refused, and so is the checkpoint itself (it would be overwritten).
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(corrupt), "--video", str(tmp_path / "v.txt")], capsys)
    assert code == 2 and "must name a .gif file" in err and len(err.strip().splitlines()) == 1
    gif_named = tmp_path / "run.gif"
    gif_named.write_bytes(b"checkpoint bytes")
    code, err = main_exit(eval_mod.main, ["--checkpoint", str(gif_named), "--video", str(gif_named)], capsys)
    assert code == 2 and "is the checkpoint being evaluated" in err and gif_named.read_bytes() == b"checkpoint bytes"


def test_training_rows_have_one_step_each_and_reach_every_checkpoint(tmp_path):
    """Rows of the training loop (those with fps/env): no step twice, also at the end and across a resume; and a row
    at each checkpoint (logged before it), so that a run killed after a checkpoint and resumed from it has no hole."""
    cfg = tiny_config(tmp_path, steps=40, log_every=0.0, save_every=7)
    train(cfg, log=lambda *_: None)
    train(dataclasses.replace(cfg, resume=True, steps=80), log=lambda *_: None)
    rows = [json.loads(line) for line in (Path(cfg.logdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "fps/env" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 80, steps
    logged = {(r["step"], r["updates"]) for r in rows if "fps/env" in r}
    state = checkpoint.load(Path(cfg.logdir) / "checkpoint.pt")
    assert (state["counters"]["env_steps"], state["counters"]["updates"]) in logged
    quiet = tiny_config(tmp_path / "quiet", steps=40, log_every=1e9, save_every=2)
    train(quiet, log=lambda *_: None)
    rows = [json.loads(line) for line in (Path(quiet.logdir) / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "fps/env" in r]) >= 2  # one per periodic checkpoint, and the last


def test_flags_tyro_answers_itself_are_not_taken_for_typos():
    train_mod.unknown_flags(["--tyro-print-completion", "bash", "--help", "--batch_size=3", "--no-progress"])


def test_a_resume_starts_from_the_settings_its_logdir_recorded(tmp_path):
    cfg = tiny_config(tmp_path, steps=40)
    train(cfg, log=lambda *_: None)
    # Only where, how long and a changed run setting are given: everything else is the run's, not cartpole's preset.
    resumed = train_mod.parse(["--logdir", cfg.logdir, "--resume", "--steps", "80", "--log-every", "5"])
    # Where and how it runs on this machine is this start's (the defaults here), not the recorded --mode eager.
    machine = {name: getattr(Config(), name) for name in train_mod.MACHINE_FIELDS}
    assert cfg.mode == "eager" and machine["mode"] == "auto"
    assert resumed == dataclasses.replace(cfg, resume=True, steps=80, log_every=5.0, **machine)
    # A run moved or copied elsewhere continues where it is, not in the folder its config.json names.
    moved = tmp_path / "moved"
    shutil.copytree(cfg.logdir, moved)
    assert train_mod.parse(["--logdir", str(moved), "--resume"]).resolved_logdir() == str(moved)
    train_mod.main(["--logdir", cfg.logdir, "--resume", "--steps", "80", "--mode", "eager"])
    state = checkpoint.load(Path(cfg.logdir) / "checkpoint.pt")
    assert state["counters"]["env_steps"] == 80 and state["config"]["batch_size"] == cfg.batch_size
    # Without a config.json that reads, the preset's defaults as before (and the checkpoint's checks say what differs).
    (Path(cfg.logdir) / "config.json").write_text("{not json")
    assert train_mod.parse(["--logdir", cfg.logdir, "--resume"]).size == preset_defaults("cartpole").size


def test_a_logdir_that_cannot_be_locked_trains_with_a_warning(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):  # what flock answers on an NFS mount without a lock daemon
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lines = []
    cfg = tiny_config(tmp_path, steps=40)
    train(cfg, log=lines.append)
    assert f"fastdreamer: warning: {cfg.logdir} cannot be locked (No locks available)" in lines[0], lines
    assert checkpoint.load(Path(cfg.logdir) / "checkpoint.pt")["counters"]["env_steps"] == 40


def test_a_second_trainer_on_a_logdir_in_use_is_refused(tmp_path, capsys):
    logdir = tmp_path / "run"
    with train_mod._LogdirLock(logdir):  # as a trainer running there holds it
        code, err = main_exit(train_mod.main, [*TINY, "--steps", "40", "--logdir", str(logdir)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        assert f"{logdir} is in use by another fastdreamer run ({holder})" in err, err
        assert sorted(p.name for p in logdir.iterdir()) == [".lock"]  # nothing of the refused run was written
    # A start refused after the lock (here the env) leaves no folder behind where it made one.
    other = tmp_path / "other"
    code, err = main_exit(train_mod.main, [*TINY, "--env", "CartPol-v1", "--logdir", str(other)], capsys)
    assert code == 2 and "did you mean" in err and not other.exists(), err
    # Released with the run: the same logdir trains, and the lock is free again after it.
    train(tiny_config(tmp_path, steps=40, logdir=str(logdir)), log=lambda *_: None)
    with train_mod._LogdirLock(logdir):
        pass


def test_a_resume_is_checked_before_anything_is_built_and_makes_its_envs_once(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, steps=40)
    train(cfg, log=lambda *_: None)
    made, original = [], train_mod.make_env_or_explain

    def counting(*args, seed=None, **kwargs):
        made.append(seed)
        return original(*args, seed=seed, **kwargs)

    monkeypatch.setattr(train_mod, "make_env_or_explain", counting)
    with pytest.raises(CheckpointError, match="other settings"):
        train(dataclasses.replace(cfg, resume=True, steps=80, lr=0.01), log=lambda *_: None)
    assert made == [], "a refused resume built its envs first"
    path = Path(cfg.logdir) / "checkpoint.pt"
    state = checkpoint.load(path)
    del state["rng"], state["counters"]["updates"]
    checkpoint.save(tmp_path / "partial" / "checkpoint.pt", state)
    partial = dataclasses.replace(cfg, resume=True, steps=80, logdir=str(tmp_path / "partial"))
    with pytest.raises(CheckpointError, match="does not fit this run: it records no updates, rng$"):
        train(partial, log=lambda *_: None)
    assert made == [], "a refused resume built its envs first"
    steps = checkpoint.load(path)["counters"]["env_steps"]
    train(dataclasses.replace(cfg, resume=True, steps=80), log=lambda *_: None)
    assert made == [train_mod.resume_seed(cfg.seed, steps)], "made once, seeded by the resume point"


def test_a_checkpoints_config_loads_without_the_fields_this_version_dropped():
    from fastdreamer.config import config_from_dict

    cfg = Config(env="pendulum", lr=1e-4)
    assert config_from_dict({**dataclasses.asdict(cfg), "prefill": 0}) == cfg  # prefill: never used, removed


@pytest.fixture
def interactive_sigint():
    """SIGINT as an interactive Python has it (KeyboardInterrupt), whatever the test runner inherited: a background
    job of a script starts with it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_at_the_next_update_boundary_with_a_checkpoint(tmp_path, monkeypatch, capsys, interactive_sigint):
    original = Trainer.update

    def update(self):
        original(self)
        if self.updates == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third update

    monkeypatch.setattr(Trainer, "update", update)
    logdir = tmp_path / "run"
    code, err = main_exit(train_mod.main, [*TINY, "--steps", "4000", "--logdir", str(logdir)], capsys)
    assert code == 130 and "stopped at" in err and "continue with --resume" in err, err
    assert checkpoint.load(logdir / "checkpoint.pt")["counters"]["updates"] == 3, "saved before the next update"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is the caller's again"
    monkeypatch.undo()
    train_mod.main([*TINY, "--steps", "60", "--logdir", str(logdir), "--resume"])
    assert "resumed from" in capsys.readouterr().out


def test_a_signal_the_caller_ignores_stays_ignored_during_a_run(tmp_path, monkeypatch):
    """A script's background jobs (`cmd &` in sh) start with SIGINT ignored, so that a Ctrl-C meant for the foreground
    leaves them running: the trainer keeps that, and handles only the signals it is left (here SIGTERM)."""
    seen, original = [], Trainer.update

    def update(self):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        original(self)

    monkeypatch.setattr(Trainer, "update", update)
    term = signal.getsignal(signal.SIGTERM)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        train(tiny_config(tmp_path, steps=40), log=lambda *_: None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen and all(i is signal.SIG_IGN for i, _ in seen), "the run took over an ignored SIGINT"
    handler = [getattr(t, "__func__", None) for _, t in seen]
    assert all(h is train_mod._StopSignals._handle for h in handler), "SIGTERM was not the trainer's"
    assert signal.getsignal(signal.SIGTERM) is term, "SIGTERM is not the caller's again"


def test_a_logdir_with_logs_but_no_checkpoint_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, steps=40)
    Path(cfg.logdir).mkdir(parents=True)
    (Path(cfg.logdir) / "metrics.jsonl").write_text('{"step": 10}\n')  # a run that died before its first save
    with pytest.raises(ValueError, match="stopped before its first checkpoint"):
        train(cfg, log=lambda *_: None)


def test_a_cuda_device_becomes_the_current_one(monkeypatch):
    """--device cuda:1 makes GPU 1 current (a capture or stream that names no device takes the current one), and
    --device cuda or auto takes the current one, with torch.cuda faked on the CPU; a GPU the machine lacks is one
    line. (torch.cuda.set_device("cuda") raises: every GPU run since 639dff1 would have stopped at start.)"""
    from torch.cuda._utils import _get_device_index

    current = [0]

    def set_device(device):  # what torch.cuda.set_device reads of its argument: it refuses "cuda" without an index
        current[0] = _get_device_index(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    assert train_mod.resolve_device("cuda:1") == torch.device("cuda", 1) and current == [1]
    assert train_mod.resolve_device("auto") == torch.device("cuda", 1)  # "cuda": the current one
    with pytest.raises(ValueError, match=r"^device 'cuda:2' asked for, but this machine has 2 CUDA devices$"):
        train_mod.resolve_device("cuda:2")


def test_a_compile_run_warns_once_when_torch_breaks_a_graph_it_means_whole(tmp_path, monkeypatch):
    """The trainer's check after its first fast update (fastdreamer.fast.unplanned_graph_breaks): a data-dependent
    branch planted in the core's RMSNorm breaks every compiled step that runs the core, and the run says so in one
    line, once. Dynamo's eager backend stands in for inductor (the check reads dynamo's counters, which both fill)."""
    import torch._dynamo
    from fastdreamer.kernels.block_gru import reference

    from bench.graph_breaks import eager_compile

    real_norm = reference.rms_normalize

    def branching(x):
        return real_norm(x) if x.sum() > 0 else real_norm(-x)

    monkeypatch.setattr(reference, "rms_normalize", branching)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = tiny_config(tmp_path, steps=40, mode="compile")
    lines, resumed = [], []
    try:
        with eager_compile():
            train(cfg, log=lines.append)
            # A resumed run starts from the checkpoint's update count and warns after its own first update too.
            train(dataclasses.replace(cfg, resume=True, steps=80), log=resumed.append)
    finally:
        torch._dynamo.reset()
    warned = [x for x in lines if "broke the compiled graphs" in x]
    assert len(warned) == 1 and "Data-dependent branching" in warned[0], lines
    assert "python -m bench.graph_breaks" in warned[0], warned
    assert len([x for x in resumed if "broke the compiled graphs" in x]) == 1, resumed
