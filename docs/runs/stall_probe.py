"""What a pendulum agent's actor and critic do in the episodes it fails (README, Learning: the stall).

    python docs/runs/stall_probe.py CHECKPOINT [--episodes 64] [--seed 7] [--below -500]

Runs the episodes `python -m fastdreamer.eval --episodes N --seed S` runs (the same starts and draws: its
`mean_return` is eval's mean) and splits them at return `--below` (stalled, others). Prints JSON per group, medians
over steps 100-199 (after the swing-up): |pre-tanh actor mean|, the actor's std (its floor is minstd, 0.1),
|action|, |theta| (0 is upright, pi hanging), |theta dot|, the critic's value, and the discounted return-to-go from
step 100 (horizon 333, the critic's target) that the critic's value should match.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from fastdreamer import dists
from fastdreamer.checkpoint import CheckpointError
from fastdreamer.config import env_id, env_kwargs
from fastdreamer.envs import make_env
from fastdreamer.eval import load_agent


@torch.no_grad()
def probe(path: str, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Per step (T, N): obs (T, N, 3), pre-tanh mean, std, action, critic value, reward; one episode per env."""
    device = torch.device("cpu")
    agent, cfg = load_agent(path, device)
    if env_id(cfg) != "Pendulum-v1":
        raise ValueError(f"{path} is a {env_id(cfg)} agent; this probe reads Pendulum-v1's angle from its obs")
    env = make_env(env_id(cfg), episodes, seed, device, image_size=cfg.image_size, env_kwargs=env_kwargs(cfg))
    rec: dict[str, list] = {k: [] for k in ("obs", "mean", "std", "action", "value", "reward")}
    seen = {}
    policy = agent.policy

    def recording(f, y0=None):  # what Agent.act's policy step reads and returns
        seen["feat"], seen["pol"] = f, policy(f, y0)
        return seen["pol"]

    agent.policy = recording
    try:
        torch.manual_seed(seed)  # as fastdreamer.eval.evaluate seeds its draws
        obs = env.reset()
        carry = agent.initial(episodes, device)
        for _ in range(200):  # Pendulum-v1's time limit
            action, carry = agent.act(carry, obs)  # eval's step, draws and all
            f, pol = seen["feat"], seen["pol"]
            rec["obs"].append(obs["vector"].numpy().copy())
            rec["mean"].append(agent.actor(f).float().chunk(2, -1)[0][:, 0].numpy())
            rec["std"].append(pol.std[:, 0].numpy())
            rec["action"].append(action[:, 0].numpy())
            rec["value"].append(dists.twohot_pred(agent.critic(f), agent.bins).reshape(-1).numpy())
            obs = env.step(action)
            rec["reward"].append(obs["reward"].numpy().copy())
    finally:
        env.close()
    return {k: np.stack(v) for k, v in rec.items()}


def summarise(rec: dict[str, np.ndarray], mask: np.ndarray, horizon: int = 333) -> dict:
    steps = slice(100, 200)
    rtg, acc = np.zeros_like(rec["reward"]), np.zeros(rec["reward"].shape[1])
    for t in reversed(range(rec["reward"].shape[0])):  # the critic's target: discount 1 - 1/horizon
        acc = rec["reward"][t] + (1 - 1 / horizon) * acc
        rtg[t] = acc
    obs = rec["obs"][steps][:, mask]

    def med(x):
        return round(float(np.median(x)), 3)

    return {
        "episodes": int(mask.sum()),
        "abs_pre_tanh_mean": med(np.abs(rec["mean"][steps][:, mask])),
        "std": med(rec["std"][steps][:, mask]),
        "abs_action": med(np.abs(rec["action"][steps][:, mask])),
        "abs_theta": med(np.abs(np.arctan2(obs[..., 1], obs[..., 0]))),
        "abs_theta_dot": med(np.abs(obs[..., 2])),
        "critic_value": med(rec["value"][steps][:, mask]),
        "return_to_go_at_100": med(rtg[100][mask]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--below", type=float, default=-500.0, help="episodes with a lower return count as stalled")
    args = p.parse_args(argv)
    try:
        rec = probe(args.checkpoint, args.episodes, args.seed)
    except (ValueError, CheckpointError) as e:
        print(f"stall_probe: error: {e}", file=sys.stderr)
        sys.exit(2)
    returns = rec["reward"].sum(0)
    stalled = returns < args.below
    out = {"checkpoint": args.checkpoint, "mean_return": round(float(returns.mean()), 1)}
    for name, mask in (("stalled", stalled), ("others", ~stalled)):
        out[name] = summarise(rec, mask) if mask.any() else {"episodes": 0}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
