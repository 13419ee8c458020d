"""Evaluate a checkpoint: `python -m fastdreamer.eval --checkpoint PATH --episodes N` prints the return's mean,
std, median, worst and best episode and every episode's return as JSON. Runs one episode in each of N parallel envs,
so short episodes are not over-counted. `--video PATH` also films a few episodes to a GIF."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gymnasium
import numpy as np
import torch

from . import checkpoint
from .agent import Agent
from .checkpoint import CheckpointError, first_line
from .cli import Parser
from .config import Config, config_from_dict, env_id, env_kwargs
from .envs import make_env
from .logger import encode_gif, write_gif


@torch.no_grad()
def play(agent: Agent, env, seed: int, greedy: bool, max_steps: int, on_step=None):
    """The first episode of each of env's N envs, for at most max_steps steps: (returns, lengths, done), done[i] true
    where env i's episode ended within them. on_step(obs, live) sees the first observation
    and each step's, with live[i] true where the step belongs to env i's first episode.

    `seed` sets the agent's draws (latents, actions) in a forked generator: the same seed gives the same episodes in
    every process (torch seeds its default generator anew per process), and the caller's generator is left as it
    was (train's end-of-run eval)."""
    n, device = env.num_envs, env.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        obs = env.reset()
        carry = agent.initial(n, device)
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        if on_step is not None:
            on_step(obs, ~done)
        for _ in range(max_steps):
            action, carry = agent.act(carry, obs, greedy=greedy)
            obs = env.step(action)
            reward = obs["reward"].cpu().numpy()
            last = obs["is_last"].cpu().numpy()
            live = ~done
            returns[live] += reward[live]
            lengths[live] += 1
            done |= last
            if on_step is not None:
                on_step(obs, live)
            if done.all():
                break
    return returns, lengths, done


def evaluate(
    agent: Agent,
    env_name: str,
    cfg: Config,
    episodes: int,
    device: torch.device,
    seed: int = 12345,
    greedy: bool = False,
    max_steps: int = 100_000,
) -> dict:
    """Return {'mean', 'std', 'median', 'min', 'max', 'returns', 'lengths'} over the first episode of each of
    `episodes` envs. The median and the worst episode are there for heavy-tailed returns: a policy that fails a few
    starts (pendulum's stall, README Learning) moves the mean far more than its typical episode. `seed` sets the envs'
    starts and the agent's draws (play)."""
    env = make_env(env_name, episodes, seed, device, image_size=cfg.image_size, env_kwargs=env_kwargs(cfg))
    try:
        returns, lengths, _ = play(agent, env, seed, greedy, max_steps)
    finally:
        env.close()
    return {
        "mean": float(returns.mean()),
        "std": float(returns.std()),
        "median": float(np.median(returns)),
        "min": float(returns.min()),
        "max": float(returns.max()),
        "episodes": episodes,
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
    }


def _video_env(env_name: str, n: int, seed: int, device: torch.device, cfg: Config, spec=None):
    """(env, shoot): the env a video plays in and a function of (obs, env) giving each env's frame (n, H, W, C)
    uint8. Image observations are filmed as the agent sees them; vector observations through Gymnasium's rgb_array
    rendering of the same id, scaled to VIDEO_HEIGHT rows. spec: the agent's EnvSpec, which that Gymnasium env must
    match (envpool's and Gymnasium's envs of one id may observe differently)."""
    env = make_env(env_name, n, seed, device, image_size=cfg.image_size, env_kwargs=env_kwargs(cfg))
    if "image" in env.spec.obs:
        return env, lambda obs, env: obs["image"].cpu().numpy()
    env.close()
    if ":" not in env_name and env_name not in gymnasium.registry:
        raise ValueError(
            f"a video films image observations, or renders vector ones through Gymnasium, which has no '{env_name}'"
        )
    # rgb_array frames need neither a display nor sound; without these SDL looks for both and complains on stderr.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    try:
        kwargs = {**env_kwargs(cfg), "render_mode": "rgb_array"}
        env = make_env(env_name, n, seed, device, env_kwargs=kwargs, gymnasium_only=True)
    except (gymnasium.error.Error, TypeError, ValueError) as e:  # an env that takes no render_mode, cannot be made
        raise ValueError(f"a video of {env_name} renders through Gymnasium, which failed: {first_line(e)}") from None
    fields = ("obs", "classes", "obs_classes", "discrete", "act_dim", "act_classes")
    if spec is not None and any(getattr(env.spec, f) != getattr(spec, f) for f in fields):
        env.close()
        raise ValueError(
            f"Gymnasium's {env_name}, which a video renders, observes {env.spec.obs} (classes {env.spec.obs_classes}) "
            f"and acts {env.spec.act_dim} {env.spec.act_classes}; the agent was trained on {spec.obs} (classes "
            f"{spec.obs_classes}) and {spec.act_dim} {spec.act_classes}"
        )

    from PIL import Image  # as in logger.encode_gif: only videos need Pillow

    def shoot(obs, env):
        try:
            frames = env.render(n)
        except (gymnasium.error.Error, ImportError, OSError, RuntimeError) as e:  # no pygame, no OpenGL, ...
            raise ValueError(
                f"a video of {env_name} renders through Gymnasium, which failed: {first_line(e)} (classic control "
                "and Box2D render with pygame: pip install -e '.[video]')"
            ) from None
        if not all(isinstance(f, np.ndarray) and f.ndim == 3 and f.dtype == np.uint8 for f in frames):
            raise ValueError(f"Gymnasium's {env_name} renders no rgb_array frames: got {type(frames[0]).__name__}")
        shots = [Image.fromarray(f) for f in frames]
        width = round(shots[0].width * VIDEO_HEIGHT / shots[0].height)
        return np.stack([np.asarray(f.resize((width, VIDEO_HEIGHT), Image.BILINEAR)) for f in shots])

    return env, shoot


def check_video(env_name: str, cfg: Config, spec=None) -> None:
    """Raise ValueError, one line, if `film` cannot film env_name here for an agent of `spec` (no image
    observations and no Gymnasium env that renders them alike, or no renderer): one env made, reset and filmed
    once, its frame encoded."""
    env, shoot = _video_env(env_name, 1, 0, torch.device("cpu"), cfg, spec)
    try:
        encode_gif(shoot(env.reset(), env))
    finally:
        env.close()


VIDEO_HEIGHT = 160  # rows of a rendered frame in a video (Gymnasium's classic control renders at 400-500)


@torch.no_grad()
def film(
    agent: Agent,
    env_name: str,
    cfg: Config,
    episodes: int,
    device: torch.device,
    seed: int = 12345,
    greedy: bool = False,
    max_frames: int = 500,
) -> tuple[np.ndarray, dict]:
    """Play `episodes` episodes side by side for at most max_frames frames (the first observation's, then one per
    step); an env's picture stays still once its episode has ended. Returns the video (T, H, episodes * W, C) uint8
    and {'frames', 'returns', 'lengths', 'complete'}: the episodes' returns and lengths within the frames filmed,
    complete when every episode ended within them."""
    env, shoot = _video_env(env_name, episodes, seed, device, cfg, agent.spec)
    video, t = None, 0  # one array for the whole video, allocated at the first frame

    def on_step(obs, live):
        nonlocal video, t
        frame = shoot(obs, env)  # (episodes, H, W, C)
        n, H, W, C = frame.shape
        if video is None:
            video = np.empty((max_frames, H, n * W, C), np.uint8)
        for i in range(n):
            cols = slice(i * W, (i + 1) * W)
            video[t, :, cols] = frame[i] if t == 0 or live[i] else video[t - 1, :, cols]
        t += 1

    try:
        returns, lengths, done = play(agent, env, seed, greedy, max_frames - 1, on_step)
    finally:
        env.close()
    info = {"frames": t, "returns": returns.tolist(), "lengths": lengths.tolist(), "complete": bool(done.all())}
    return video[:t], info


def record(agent: Agent, env_name: str, cfg: Config, episodes: int, device, path, fps: float = 25.0, **kw) -> dict:
    """film()'s video written to `path` as a looping GIF; returns {'path', and film's dict}."""
    video, info = film(agent, env_name, cfg, episodes, device, **kw)
    write_gif(path, video, fps)
    return {"path": str(path), **info}


def load_agent(path: str, device: torch.device) -> tuple[Agent, Config]:
    # Mapped from the file on the host: a checkpoint holds the whole replay (tens of GB for an image run), of which
    # only the weights are read, and copied to the device by load_state_dict.
    state = checkpoint.load(path, map_location="cpu", mmap=True)
    try:
        cfg = config_from_dict(state["config"])
        env = make_env(env_id(cfg), 1, 0, device, image_size=cfg.image_size, env_kwargs=env_kwargs(cfg))
        spec = env.spec
        env.close()
        agent = Agent(cfg, spec).to(device)
        checkpoint.load_weights(agent, state.get("agent"), path)
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold a fastdreamer agent: {first_line(e)}") from None
    agent.eval()
    return agent, cfg


def check_video_path(video: Path, checkpoint: Path) -> None:
    """ValueError with one line unless `video` can take a GIF: a .gif name, not a directory, not the checkpoint."""
    if video.is_dir():
        raise ValueError(f"--video {video} is a directory; name the GIF to write")
    if video.suffix.lower() != ".gif":
        raise ValueError(f"--video {video} must name a .gif file (the video is written as a GIF)")
    if video.exists() and checkpoint.exists() and video.samefile(checkpoint):
        raise ValueError(f"--video {video} is the checkpoint being evaluated")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="fastdreamer.eval", description="Evaluate a fastdreamer checkpoint; prints JSON.")
    parser.add_argument("--checkpoint", required=True, help="path to checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--greedy", action="store_true", help="take the policy's mode instead of sampling")
    parser.add_argument(
        "--video",
        metavar="PATH",
        help="also write a GIF of --video-episodes more episodes side by side: image observations as the agent sees "
        "them, vector ones rendered by Gymnasium (classic control needs pygame: pip install -e '.[video]')",
    )
    parser.add_argument("--video-episodes", type=int, default=4)
    parser.add_argument("--video-frames", type=int, default=500, help="at most this many frames (25 per second)")
    args = parser.parse_args(argv)
    result = None
    try:
        for name in ("episodes", "video_episodes", "video_frames"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.seed < 0:
            raise ValueError(f"--seed must be 0 or positive, got {args.seed}")
        from .train import resolve_device

        if args.video:
            check_video_path(Path(args.video), Path(args.checkpoint))
        device = resolve_device(args.device)
        agent, cfg = load_agent(args.checkpoint, device)
        result = evaluate(agent, env_id(cfg), cfg, args.episodes, device, args.seed, args.greedy)
        result["env"] = env_id(cfg)
        if args.video:
            result["video"] = record(
                agent,
                env_id(cfg),
                cfg,
                args.video_episodes,
                device,
                args.video,
                seed=args.seed,
                greedy=args.greedy,
                max_frames=args.video_frames,
            )
    except (ValueError, CheckpointError, OSError) as e:  # OSError: the video cannot be written where --video says
        if result is not None:  # the evaluation finished and its result stands; the video failed
            print(json.dumps(result))
        print(f"fastdreamer: error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, OSError) else 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
