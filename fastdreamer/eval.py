"""Evaluate a checkpoint: `python -m fastdreamer.eval --checkpoint PATH --episodes N` prints the return's mean,
std, median, worst and best episode and every episode's return as JSON. Runs one episode in each of N parallel envs,
so short episodes are not over-counted."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from . import checkpoint
from .agent import Agent
from .checkpoint import CheckpointError
from .config import Config, env_id
from .envs import make_env


@torch.no_grad()
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
    starts (pendulum's stall, README Learning) moves the mean far more than its typical episode.

    `seed` sets the envs' starts and the agent's draws (latents, actions), in a forked generator: the same seed gives
    the same episodes in every process (torch seeds its default generator anew per process), and the caller's
    generator is left as it was (train's end-of-run eval)."""
    env = make_env(env_name, episodes, seed, device, image_size=cfg.image_size)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            obs = env.reset()
            carry = agent.initial(episodes, device)
            returns = np.zeros(episodes)
            lengths = np.zeros(episodes, dtype=np.int64)
            done = np.zeros(episodes, dtype=bool)
            for _ in range(max_steps):
                action, carry = agent.act(carry, obs, greedy=greedy)
                obs = env.step(action.argmax(-1) if env.spec.discrete else action)
                reward = obs["reward"].cpu().numpy()
                last = obs["is_last"].cpu().numpy()
                live = ~done
                returns[live] += reward[live]
                lengths[live] += 1
                done |= last
                if done.all():
                    break
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


def load_agent(path: str, device: torch.device) -> tuple[Agent, Config]:
    state = checkpoint.load(path, map_location=device)
    try:
        cfg = Config(**state["config"])
        env = make_env(env_id(cfg), 1, 0, device, image_size=cfg.image_size)
        spec = env.spec
        env.close()
        agent = Agent(cfg, spec).to(device)
        agent.load_state_dict(state["agent"])
    except (KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not hold a fastdreamer agent: {first}") from None
    agent.eval()
    return agent, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a fastdreamer checkpoint; prints JSON.")
    parser.add_argument("--checkpoint", required=True, help="path to checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--greedy", action="store_true", help="take the policy's mode instead of sampling")
    args = parser.parse_args(argv)
    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes must be at least 1, got {args.episodes}")
        from .train import resolve_device

        device = resolve_device(args.device)
        agent, cfg = load_agent(args.checkpoint, device)
        result = evaluate(agent, env_id(cfg), cfg, args.episodes, device, args.seed, args.greedy)
    except (ValueError, CheckpointError) as e:
        print(f"fastdreamer: error: {e}", file=sys.stderr)
        sys.exit(2)
    result["env"] = env_id(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
