"""Train DreamerV3: `python -m fastdreamer.train --env cartpole` (or `fastdreamer-train`).

The loop, top to bottom: act in N envs, store the step, and whenever the train ratio asks for it sample a
batch, update, and write the refreshed latents back to replay; log once per interval; checkpoint atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .agent import Agent
from .checkpoint import CheckpointError, first_line
from .config import (
    PRESETS,
    SIZES,
    Config,
    config_from_dict,
    env_id,
    env_kwargs,
    preset_defaults,
    replay_capacity,
    resume_differences,
    validate,
)
from .envs import EnvDataError, EnvError, make_env
from .kernels import block_gru
from .logger import Logger, to_host
from .optim import LaProp
from .replay import Replay
from .report import openloop

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FORMAT = 1


class TrainingDiverged(RuntimeError):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at an update boundary, after a checkpoint was written there."""


class _StopSignals:
    """While entered (in the main thread): the first SIGINT or SIGTERM asks the run to stop at its next update
    boundary, where it saves; a second one stops at once (KeyboardInterrupt), the checkpoint on disk as it was. A
    signal the caller ignores stays ignored."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                # Ignored by the caller (a script's background job `cmd &`: a Ctrl-C meant for the foreground must
                # leave it running): stays ignored.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def parse(argv: list[str] | None = None) -> Config:
    """Command-line config: the preset named by --env gives the defaults, every field can be overridden."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    unknown_flags(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=Config.env)
    known, _ = pre.parse_known_args(argv)
    presets = ", ".join(f"{k} ({p.env_id})" for k, p in PRESETS.items())

    def cli(default: Config) -> Config:
        description = f"Train DreamerV3. Presets: {presets}. Sizes: {', '.join(SIZES)}."
        return tyro.cli(Config, default=default, args=argv, description=description, prog="fastdreamer.train")

    cfg = cli(preset_defaults(known.env))
    if cfg.resume:
        # A resumed run starts from the settings its logdir recorded (config.json, the last start's), so that
        # `--logdir L --resume` continues it and `--resume --steps N` extends it; flags given here still override
        # (and read_checkpoint refuses those that change what the run computes).
        try:
            logdir = cfg.resolved_logdir()
        except ValueError:  # a bad --logdir template: validate reports it in one line
            return cfg
        saved = saved_config(Path(logdir))
        if saved is not None:
            cfg = cli(saved)
    return cfg


def unknown_flags(argv: list[str]) -> None:
    """A mistyped flag is one line naming the closest ones and exit code 2 (tyro's answer is a box of ten)."""
    fields = dataclasses.fields(Config)
    flags = {f"--{f.name.replace('_', '-')}" for f in fields}
    flags |= {f"--no-{f.name.replace('_', '-')}" for f in fields if f.type in (bool, "bool")}
    for arg in argv:
        flag = arg.split("=", 1)[0]
        spelled = "--" + flag[2:].replace("_", "-")  # tyro takes --batch_size as --batch-size
        if flag.startswith("--") and spelled not in flags | {"--help"} and not flag.startswith("--tyro-"):
            close = difflib.get_close_matches(spelled, sorted(flags), 3, 0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; --help lists them"
            print(f"fastdreamer: error: unknown flag {flag}{hint}", file=sys.stderr)
            sys.exit(2)


# Where and how a run computes on this machine: a resumed run takes this start's (auto unless given), not the
# recorded ones, which may name a device or a mode the machine it resumes on does not have.
MACHINE_FIELDS = ("device", "threads", "mode", "precision", "gru_impl")


def saved_config(logdir: Path) -> Config | None:
    """The Config in logdir/config.json, with logdir set to the folder it was read from (a moved or copied run
    continues where it is) and MACHINE_FIELDS at their defaults; None where there is none that reads (the
    checkpoint's checks then report what is wrong)."""
    try:
        saved = json.loads((logdir / "config.json").read_text())
        if not isinstance(saved, dict):
            return None
        cfg = config_from_dict(saved)
    except (OSError, ValueError, TypeError):
        return None
    machine = {name: getattr(Config(), name) for name in MACHINE_FIELDS}
    return dataclasses.replace(cfg, logdir=str(logdir), **machine)


def resolve_device(name: str) -> torch.device:
    """The device --device names; a CUDA one becomes the current device, because streams, events and graph captures
    that name no device take the current one (on cuda:1 with cuda:0 current, a capture recorded nothing)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA devices"
            )
        if device.index is not None:  # set_device refuses a device without an index ("cuda": the current one)
            torch.cuda.set_device(device.index)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resume_seed(seed: int, env_steps: int) -> int:
    """The env seed of a run of `seed` resumed at `env_steps` (the run's own seed at 0)."""
    return (seed + 1_000_003 * env_steps) % 2**31


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_env_or_explain(cfg: Config, device: torch.device, seed: int | None = None):
    """make_env (seeded with cfg.seed unless `seed` is given), with preset names among the suggestions when the id
    is unknown."""
    seed = cfg.seed if seed is None else seed
    try:
        return make_env(env_id(cfg), cfg.num_envs, seed, device, image_size=cfg.image_size, env_kwargs=env_kwargs(cfg))
    except TypeError as e:  # gymnasium.make's or envpool's answer to a keyword the env does not take
        if not cfg.env_kwargs:  # none given: the env itself is broken (spaces that are not spaces, ...)
            raise ValueError(f"{env_id(cfg)} cannot be made: {e}") from None
        raise ValueError(f"{env_id(cfg)} does not take --env-kwargs {cfg.env_kwargs}: {e}") from None
    except ValueError as e:
        close = difflib.get_close_matches(cfg.env.lower(), PRESETS, 3, 0.6)
        if str(e).startswith("unknown environment") and close:
            raise ValueError(f"{e} (presets: {', '.join(close)})") from None
        raise


def replay_spec(agent: Agent, env_spec) -> dict:
    """Everything stored per step: observation, reward and flags, the action taken, and the posterior latent
    state after this observation (replay context), deter in bf16 and stoch as class indices."""
    rssm = agent.rssm
    return {
        **env_spec.obs,
        "reward": ((), torch.float32),
        "is_first": ((), torch.bool),
        "is_last": ((), torch.bool),
        "is_terminal": ((), torch.bool),
        "action": ((env_spec.act_dim,), torch.float32),
        "deter": ((rssm.deter,), torch.bfloat16),
        "stoch": ((rssm.stoch,), torch.uint8),
    }


def update_step(agent: Agent, opt: LaProp, data: dict[str, torch.Tensor]):
    """One gradient update: the whole loss, backward, LaProp step, slow-critic EMA. Returns device-scalar metrics
    and the refreshed latents. This is the function the fast modes wrap (fastdreamer/fast.py)."""
    loss, metrics, latents = agent.loss(data)
    opt.zero_grad()
    loss.backward()
    metrics.update({f"opt/{k}": v for k, v in opt.step().items()})
    agent.update_slow_critic()
    return metrics, latents


def _describe_actions(spec) -> str:
    if len(spec.act_classes) > 1:
        return f"discrete actions of {list(spec.act_classes)} (one categorical each)"
    return f"{'discrete' if spec.discrete else 'continuous'} actions of {spec.act_dim}"


def check_run(cfg: Config) -> tuple[torch.device, str, str]:
    """The settings' checks that need no env, agent or replay: validate, then the device, --mode and --precision it
    resolves to (ValueError with one line for any that cannot run here)."""
    from . import fast

    validate(cfg)
    device = resolve_device(cfg.device)
    mode = fast.resolve_mode(cfg.mode, device)
    return device, mode, fast.resolve_precision(cfg.precision, mode, device)


class Trainer:
    """Owns the env, agent, optimizer, replay and counters of one run."""

    def __init__(self, cfg: Config, log=print, resume: dict | None = None):
        """resume: a checkpoint's state from read_checkpoint, restored once everything is built; the envs start
        seeded by its resume point (made once, not made and then remade)."""
        self.device, self.mode, self.precision = check_run(cfg)
        self.cfg = cfg
        self.log = log
        self.logdir = Path(cfg.resolved_logdir())
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # fp32 means fp32: cuDNN would otherwise run fp32 convolutions in TF32 (matmuls already default to fp32), so
        # eager, the reference, would not be on a GPU; bf16 runs cast under autocast and are unaffected.
        torch.backends.cudnn.allow_tf32 = False
        from . import fast

        if self.device.type == "cpu":
            fast.tune_cpu_allocator()
        seed_everything(cfg.seed)
        impl = block_gru.set_impl(cfg.gru_impl, self.device)
        from .provenance import machine

        # What this start resolved `auto` to, and what it runs on: config.json records it beside the settings.
        self.resolved = {"device": str(self.device), "mode": self.mode, "precision": self.precision, "gru_impl": impl}
        self.resolved |= machine(self.device)
        env_seed = None if resume is None else resume_seed(cfg.seed, resume["counters"]["env_steps"])
        self.env = make_env_or_explain(cfg, self.device, seed=env_seed)
        try:
            self._build(impl, resume)
        except BaseException:  # nothing else holds the envs' threads and processes
            self.env.close()
            raise

    def _build(self, impl: str, resume: dict | None) -> None:
        """Everything but the envs, then the checkpoint's state when resuming."""
        cfg, log = self.cfg, self.log
        if cfg.video_episodes:  # before training, not after it: a video that cannot be made is bad input
            from .eval import check_video

            check_video(env_id(cfg), cfg, self.env.spec)
        self.agent = Agent(cfg, self.env.spec).to(self.device)
        self.opt = LaProp(
            self.agent.trainable(),
            lr=cfg.lr,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            eps=cfg.eps,
            agc=cfg.agc,
            warmup=cfg.warmup,
        )
        self.replay = Replay(
            replay_spec(self.agent, self.env.spec),
            replay_capacity(cfg),
            cfg.num_envs,
            cfg.batch_length + cfg.replay_context,
            self.device,
            seed=cfg.seed,
            online=cfg.replay_online,
            place_for=cfg.replay_size,  # where a resume with more --steps would grow it to
        )
        from . import fast

        self.update_fn = fast.make_update(update_step, self.agent, self.opt, self.mode, self.precision)
        self.act_fn = fast.make_act(self.agent, self.mode, self.precision)
        nparams = sum(p.numel() for p in self.agent.trainable())
        log(
            f"fastdreamer: env {self.env.spec.env_id} ({cfg.num_envs} envs, obs "
            f"{ {k: s for k, (s, _) in self.env.spec.obs.items()} }, "
            f"{_describe_actions(self.env.spec)}), "
            f"size {cfg.size} ({nparams / 1e6:.2f}M params), device {self.device}, mode {self.mode} "
            f"({self.precision} matmuls), block_gru {impl}"
        )
        capacity = self.replay.length * cfg.num_envs
        sized = capacity < cfg.replay_size // cfg.num_envs * cfg.num_envs
        note = f" (sized to --steps; --replay-size {cfg.replay_size:,})" if sized else ""
        log(
            f"fastdreamer: replay of {capacity:,} steps{note} holds {self.replay.nbytes / 2**30:.2f} GiB in "
            f"{self.replay.location} memory; logdir {self.logdir}"
        )
        self.env_steps = 0
        self.updates = 0
        # Compile and graphs: _warn_graph_breaks after this process's first update (a resume included).
        self.breaks_checked = self.mode == "eager"
        self.updates_due = 0.0
        # Updates owed per step of all N envs: train_ratio replayed steps per env step, B*T replayed per update.
        self.updates_per_step = cfg.num_envs * cfg.train_ratio / (cfg.batch_size * cfg.batch_length)
        # Updates start once the replay holds batch_size * batch_length sequences, as in the reference's train loop
        # (len(replay) counts sampleable windows), or all a small ring can hold. The ring of --replay-size, not the
        # one allocated: a run trains as it would with the whole ring.
        self.train_after = min(
            cfg.batch_size * cfg.batch_length,
            cfg.num_envs * (cfg.replay_size // cfg.num_envs - self.replay.seq_len + 1),
        )
        self.episodes = 0
        self.metric_keys: list[str] | None = None
        self.metric_sum: torch.Tensor | None = None
        self.metric_count = 0
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.obs = self.env.reset()
        self.carry = self.agent.initial(cfg.num_envs, self.device)
        self.restarted = False
        if resume is not None:
            self._restore(resume)

    # One environment step for all envs: the policy on the last observation, then the env step is sent and runs
    # (envpool's threads) while the caller does its updates; the next act() or observe() receives it.
    def act(self) -> None:
        self.observe()
        action, self.carry = self.act_fn(self.carry, self.obs)
        deter, stoch, _ = self.carry
        # Sent first: an env that fails on it does so before the replay or the counters change.
        self.env.step_async(action)  # one-hots (discrete) become indices in the env, on the device
        if self.restarted:  # not at the restore: until a new step is stored, the updates are the uninterrupted run's
            self.replay.end_episodes()
            self.restarted = False
        self.replay.add(
            {**self.obs, "action": action, "deter": deter.to(torch.bfloat16), "stoch": stoch.argmax(-1).to(torch.uint8)}
        )
        self.env_steps += self.cfg.num_envs
        if self.replay.windows() >= self.train_after:
            self.updates_due += self.updates_per_step

    def observe(self) -> None:
        """Receive the env step in flight, if any: the next observation and the episodes it ended."""
        if not self.env.pending:
            return
        self.obs = self.env.step_wait()
        for ret, length in self.env.pop_episodes():
            self.returns.append(ret)
            self.lengths.append(length)
            self.episodes += 1

    # One gradient update on a replay batch, with the replay-context write-back.
    def update(self) -> None:
        data, idx = self.replay.sample(self.cfg.batch_size)
        metrics, latents = self.update_fn(data)
        ctx = self.cfg.replay_context
        self.replay.write(idx[:, ctx:], {"deter": latents["deter"], "stoch": latents["stoch"]})
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
        if self.metric_sum is None:
            self.metric_keys = list(metrics)
            self.metric_sum = torch.zeros_like(values)
        self.metric_sum += values
        self.metric_count += 1
        self.updates += 1
        self.updates_due -= 1
        if not self.breaks_checked:  # once per process: a resumed run starts from the checkpoint's update count
            self.breaks_checked = True
            self._warn_graph_breaks()

    def _warn_graph_breaks(self) -> None:
        """Once, after the first fast update (everything an update and an acting step compile is traced by then): a
        line if dynamo broke a graph that compile mode means to be whole. Same results, less speed; it happens on some
        torch versions only (fastdreamer.fast.unplanned_graph_breaks)."""
        from . import fast

        breaks = fast.unplanned_graph_breaks()
        if breaks:
            first = next(iter(breaks)).split(" Explanation:")[0]
            self.log(
                f"fastdreamer: warning: torch {torch.__version__} broke the compiled graphs {sum(breaks.values())} "
                f"times more than planned (slower, same results; first: {first}); `python -m bench.graph_breaks` "
                "lists them"
            )

    def read_metrics(self) -> dict[str, float]:
        """Means since the last read (one host transfer); raises TrainingDiverged naming a non-finite loss."""
        out = {}
        if self.metric_count:
            out = to_host(dict(zip(self.metric_keys, (self.metric_sum / self.metric_count).unbind())))
            self.metric_sum.zero_()
            self.metric_count = 0
            self._check_finite(out)
        if self.returns:
            out["episode/return"] = float(np.mean(self.returns))
            out["episode/length"] = float(np.mean(self.lengths))
            out["episode/count"] = self.episodes
            self.returns, self.lengths = [], []
        return out

    def report(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """The world model's open-loop report (fastdreamer/report.py) on a batch of the replay, drawn with a
        generator of the report's own: finite metrics on the host and videos (T, H, W, C) uint8. Training is left
        exactly as it was."""
        seed = self.cfg.seed * 1_000_003 + self.updates
        data = self.replay.peek(self.cfg.batch_size, seed)
        metrics, videos = openloop(self.agent, data, self.cfg.report_context, seed, horizon=self.cfg.imag_length)
        # A balance statistic is NaN where the batch lacks its group: left out. A non-finite loss is kept: it is news.
        host = {k: v for k, v in to_host(metrics).items() if math.isfinite(v) or not ("_pos_" in k or "_neg_" in k)}
        return host, {k: v.cpu().numpy() for k, v in videos.items()}

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Raise TrainingDiverged naming the first non-finite loss or optimizer statistic among host metrics (a
        finite loss can still carry an infinite gradient, which makes the parameters NaN)."""
        bad = [k for k, v in metrics.items() if k.startswith(("loss/", "opt/")) and not math.isfinite(v)]
        if bad:
            path = self.logdir / CHECKPOINT
            kept = f"the last good checkpoint is kept in {path}" if path.exists() else "no checkpoint was written"
            raise TrainingDiverged(
                f"{bad[0]} became {metrics[bad[0]]} by update {self.updates}; training stopped, {kept}"
            )

    def state(self) -> dict:
        cfg = self.cfg
        return {
            "meta": {"format": FORMAT, "env": cfg.env, "env_id": env_id(cfg), "size": cfg.size},
            "config": dataclasses.asdict(cfg),
            "agent": self.agent.state_dict(),
            "opt": self.opt.state_dict(),
            "replay": self.replay.state_dict(),
            "counters": {
                "env_steps": self.env_steps,
                "updates": self.updates,
                "updates_due": self.updates_due,
                "episodes": self.episodes,
            },
            "rng": checkpoint.rng_state(),
        }

    def save(self) -> Path:
        """Atomic checkpoint; refuses to overwrite the last good one with a diverged state."""
        pending = self.metric_sum is not None and self.metric_count
        if pending:
            self._check_finite(to_host(dict(zip(self.metric_keys, self.metric_sum.unbind()))))
        path = self.logdir / CHECKPOINT
        checkpoint.save(path, self.state())
        return path

    def _restore(self, state: dict) -> None:
        """Agent, optimizer, replay, counters and generators from a checkpoint's state (read_checkpoint), into a
        trainer whose envs were just made (seeded by the resume point) and reset: __init__'s `resume`."""
        cfg, path = self.cfg, state["path"]
        checkpoint.load_weights(self.agent, state.get("agent"), path)
        try:
            self.opt.load_state_dict(state["opt"])
            length = self.replay.length
            self.replay.load_state_dict(state["replay"])
            if self.replay.length != length:  # the checkpoint holds more steps than --steps would: its ring kept
                self.log(f"fastdreamer: replay of {self.replay.length * cfg.num_envs:,} steps, as the checkpoint's")
            counters = state["counters"]
            checkpoint.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {first_line(e)}") from None
        self.env_steps, self.updates = counters["env_steps"], counters["updates"]
        self.updates_due, self.episodes = counters["updates_due"], counters["episodes"]
        # The envs were made for the resume (envpool cannot save them), seeded by the resume point, so that they do
        # not play the run's first episodes again at every resume.
        self.restarted = True  # the next act() stores a first step: the step stored before it ends its episode

    def close(self) -> None:
        self.env.close()


def read_checkpoint(path: Path, cfg: Config) -> dict:
    """The state saved at `path`, in host memory, checked against `cfg` (env, size, and every setting outside
    RUN_FIELDS), with "path" added; a CheckpointError names what does not fit."""
    # Mapped from the file (mmap), read where it is copied into the live tensors (every load_state_dict here
    # copies): no second copy of the replay in host memory, nor on the GPU, while the trainer is built.
    state = checkpoint.load(path, expect={"env": cfg.env, "size": cfg.size}, map_location="cpu", mmap=True)
    changed = resume_differences(state.get("config", {}), cfg)
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was trained with other settings ({', '.join(changed)}); a resumed run keeps them "
            f"(only where and how long it runs and what it logs may change): pass the run's values or start "
            f"another --logdir"
        )
    counters = state.get("counters") if isinstance(state.get("counters"), dict) else {}
    missing = [k for k in ("env_steps", "updates", "updates_due", "episodes") if k not in counters]
    missing += [k for k in ("agent", "opt", "replay", "rng") if k not in state]
    if missing or not isinstance(counters["env_steps"], int):
        raise CheckpointError(
            f"checkpoint {path} does not fit this run: it records no {', '.join(missing or ['env_steps'])}"
        )
    return {**state, "path": path}


class _LogdirLock:
    """An exclusive lock on a run directory while `train` uses it (flock on LOGDIR/.lock, released by the OS if the
    process dies): a second trainer started on the same --logdir is refused with one line instead of writing into
    the first one's logs and checkpoint. Making the directory and the lock file here also finds a logdir that cannot
    be written before anything is built. A start that fails before writing anything removes what it made; a
    filesystem without locks (some NFS, Lustre or FUSE mounts) runs without the guard, with a warning."""

    NAME = ".lock"
    UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

    def __init__(self, logdir: Path, warn=print):
        self.logdir, self.path, self.warn = logdir, logdir / self.NAME, warn

    def __enter__(self):
        import fcntl

        self.created = not self.logdir.exists()
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 128, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ValueError(
                f"{self.logdir} is in use by another fastdreamer run ({holder}); wait for it to finish or choose "
                f"another --logdir"
            ) from None
        except OSError as e:
            if e.errno not in self.UNSUPPORTED:
                os.close(self.fd)
                raise
            self.warn(
                f"fastdreamer: warning: {self.logdir} cannot be locked ({e.strerror}); nothing stops a second run there"
            )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        # A start that failed before writing anything (an unknown env, a refused resume) leaves no empty run behind.
        if self.created and [p.name for p in self.logdir.iterdir()] == [self.NAME]:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.logdir.rmdir()
        os.close(self.fd)  # releases the lock; the file stays, unlocked, for the next run


def train(cfg: Config, log=print) -> Trainer:
    # The settings, the logdir and the checkpoint are checked before the envs, the agent and the replay are built.
    check_run(cfg)
    logdir = Path(cfg.resolved_logdir())
    with _LogdirLock(logdir, warn=log):
        return _train(cfg, logdir, log)


def _train(cfg: Config, logdir: Path, log) -> Trainer:
    state = None
    if cfg.resume:
        state = read_checkpoint(logdir / CHECKPOINT, cfg)
    elif (logdir / CHECKPOINT).exists():
        raise ValueError(f"{logdir} already holds a run; pass --resume to continue it or choose another --logdir")
    elif (logdir / METRICS).exists():
        raise ValueError(
            f"{logdir} holds the logs of a run that stopped before its first checkpoint; remove them or choose another "
            f"--logdir"
        )
    trainer = Trainer(cfg, log, resume=state)
    del state  # the mapped checkpoint: the trainer holds its own copy
    if cfg.resume:
        path = logdir / CHECKPOINT
        log(f"fastdreamer: resumed from {path} at {trainer.env_steps:,} env steps, {trainer.updates:,} updates")
    # A resumed run's logs continue from its checkpoint: what the run logged after it is dropped, not repeated.
    config = {**dataclasses.asdict(cfg), "resolved": trainer.resolved}
    logger = Logger(logdir, config, resume_step=trainer.env_steps if cfg.resume else None)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.env_steps, unit="step", dynamic_ncols=True, smoothing=0.1)
    last = {"time": time.time(), "steps": trainer.env_steps, "updates": trainer.updates, "report": time.time()}
    last_save = trainer.updates
    latest_return = float("nan")

    def write_log() -> None:
        nonlocal latest_return
        if trainer.env_steps == last["steps"] and trainer.updates == last["updates"]:
            return  # nothing happened since the last row: no second row at its step
        now = time.time()
        metrics = trainer.read_metrics()
        dt = max(now - last["time"], 1e-9)
        metrics["fps/env"] = (trainer.env_steps - last["steps"]) / dt
        metrics["fps/train"] = (trainer.updates - last["updates"]) / dt
        metrics["updates"] = trainer.updates
        latest_return = metrics.get("episode/return", latest_return)
        logger.log(trainer.env_steps, metrics)
        if bar is not None:
            bar.set_postfix(
                {
                    "env/s": f"{metrics['fps/env']:.0f}",
                    "upd/s": f"{metrics['fps/train']:.1f}",
                    "return": f"{latest_return:.1f}",
                },
                refresh=False,
            )
        last.update(time=now, steps=trainer.env_steps, updates=trainer.updates)

    def write_report() -> None:
        metrics, videos = trainer.report()
        logger.log(trainer.env_steps, metrics)
        for key, frames in videos.items():
            logger.video(trainer.env_steps, f"openloop/{key}", frames)
        last["report"] = time.time()

    stop = _StopSignals()
    try:
        with stop:
            while True:
                # The updates run while the env step that act() sent is in flight. Checkpoint only at update
                # boundaries, before the update: a resumed run performs the very update the uninterrupted one would
                # have performed next (its env restarts; the in-flight step is not part of the state).
                while trainer.updates_due >= 1 and stop.signal is None:
                    if trainer.updates - last_save >= cfg.save_every:
                        write_log()  # logged up to the checkpoint: a resume from it leaves no hole in the rows
                        trainer.save()
                        last_save = trainer.updates
                    trainer.update()
                if stop.signal is not None:
                    write_log()
                    path = trainer.save()
                    raise Interrupted(
                        f"stopped at {trainer.env_steps:,} env steps and {trainer.updates:,} updates; checkpoint "
                        f"{path}: continue with --resume"
                    )
                # An env that fails does so receiving its step (the state is then this update boundary's, as an
                # interrupted run keeps it) or taking the next one (act() sends it before the replay and the counters
                # change; only the policy step's draws are spent): a checkpoint of either resumes consistently.
                try:
                    trainer.observe()
                    if trainer.env_steps >= cfg.steps:
                        break
                    trainer.act()
                except (EnvError, EnvDataError):
                    with contextlib.suppress(Exception):  # neither may hide the env's error
                        write_log()
                        path = trainer.save()
                        log(f"fastdreamer: the env failed; checkpoint {path}: fix it, then continue with --resume")
                    raise
                if time.time() - last["time"] >= cfg.log_every and trainer.env_steps < cfg.steps:  # else: the last row
                    write_log()
                if cfg.report_every and trainer.updates and time.time() - last["report"] >= cfg.report_every:
                    write_report()
                if bar is not None:
                    bar.update(cfg.num_envs)
        write_log()
        path = trainer.save()
        log(f"fastdreamer: done, {trainer.env_steps:,} env steps and {trainer.updates:,} updates; checkpoint {path}")
        if cfg.report_every and trainer.updates:
            write_report()
        if cfg.video_episodes:
            from .eval import film

            video, info = film(trainer.agent, env_id(cfg), cfg, cfg.video_episodes, trainer.device)
            path = logger.video(trainer.env_steps, "eval/policy", video, fps=25.0)
            log(f"fastdreamer: filmed {cfg.video_episodes} episodes, {info['frames']} frames, to {path}")
        if cfg.eval_episodes:
            from .eval import evaluate

            result = evaluate(trainer.agent, env_id(cfg), cfg, cfg.eval_episodes, trainer.device)
            logger.log(
                trainer.env_steps,
                {
                    "eval/return": result["mean"],
                    "eval/return_std": result["std"],
                    "eval/return_median": result["median"],
                    "eval/return_min": result["min"],
                },
            )
            log(
                f"fastdreamer: eval over {cfg.eval_episodes} episodes: {result['mean']:.2f} ± {result['std']:.2f} "
                f"(median {result['median']:.2f}, worst {result['min']:.2f})"
            )
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        trainer.close()
    return trainer


def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    try:
        train(cfg)
    except (ValueError, CheckpointError, TrainingDiverged) as e:
        print(f"fastdreamer: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, TrainingDiverged) else 2)
    except OSError as e:  # the logdir cannot be written (disk full, permissions, a file in the way)
        print(f"fastdreamer: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"fastdreamer: interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        path = Path(cfg.resolved_logdir()) / CHECKPOINT  # validated before anything ran long enough to interrupt
        kept = f"its last checkpoint {path} is kept: continue with --resume" if path.exists() else "no checkpoint"
        print(f"fastdreamer: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
