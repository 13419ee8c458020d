"""Builders shared by `python -m bench` and the pytest-benchmark files: an agent of a given size on a fake env spec,
a replay-shaped random batch, and a timer that synchronises the device around each call."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import torch

from fastdreamer.agent import Agent
from fastdreamer.config import Config
from fastdreamer.dists import symlog
from fastdreamer.envs import EnvSpec
from fastdreamer.optim import LaProp

OBS = {
    # The layouts of the presets' envs: CartPole-v1 (4 floats, 2 actions) and envpool Pong-v5 as fastdreamer.envs
    # makes it (64x64 grey, full action space of 18).
    "vector": EnvSpec(obs={"vector": ((4,), torch.float32)}, discrete=True, act_dim=2, env_id="bench-vector"),
    "image": EnvSpec(obs={"image": ((64, 64, 1), torch.uint8)}, discrete=True, act_dim=18, env_id="bench-image"),
}


def size_arg(value: str) -> str:
    """argparse type of --size: one of the model sizes, or a one-line usage error."""
    import argparse

    from fastdreamer.config import SIZES

    if value not in SIZES:
        raise argparse.ArgumentTypeError(f"unknown size {value!r}; choose one of {', '.join(SIZES)}")
    return value


def device_arg(value: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, and CUDA only where it is available."""
    import argparse

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value}: these benchmarks run on cpu or cuda")
    return value


def count_arg(value: str) -> int:
    """argparse type of a count (--repeat, --rounds, --batch-size, ...): an integer of at least 1."""
    import argparse

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def threads_arg(value: str) -> int:
    """argparse type of --threads: 0 (torch's default) or a positive count."""
    import argparse

    try:
        return 0 if value.strip() == "0" else count_arg(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 0 (torch's default) or a positive count, got {value!r}") from None


def json_arg(value: str) -> str:
    """argparse type of --json: a file path whose folder is or can be a folder (checked before the run, not after)."""
    import argparse
    from pathlib import Path

    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a directory; name the JSON file to write")
    parent = next((q for q in path.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, not a folder")
    return value


def ab_parser(description: str, repeat: int, what: str):
    """The argument parser of an A/B script (observe_ab, rollout_ab) with the arguments they share; `repeat`: the
    default number of timed calls of `what` per variant and round."""
    import argparse

    from fastdreamer import fast

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--size", default="debug", type=size_arg)
    p.add_argument("--obs", default="vector", choices=["vector", "image"])
    p.add_argument("--mode", default="compile", choices=["compile", "graphs"])
    p.add_argument("--precision", default="auto", choices=fast.PRECISIONS)
    p.add_argument("--rounds", type=count_arg, default=3)
    p.add_argument("--repeat", type=count_arg, default=repeat, help=f"timed {what} per variant and round")
    p.add_argument("--threads", type=threads_arg, default=0)
    p.add_argument("--batch-size", type=count_arg, default=None)
    p.add_argument("--batch-length", type=count_arg, default=None)
    p.add_argument("--imag-length", type=count_arg, default=None)
    p.add_argument("--json", default=None, type=json_arg)
    return p


def ab_run(prog: str, args) -> tuple[torch.device, str, str, Config]:
    """What an A/B script's common arguments (--threads, --device, --mode, --precision, --size and the optional
    --batch-size, --batch-length, --imag-length) resolve to: (device, mode, precision, config), after setting the
    thread count; a device or mode that cannot run here is a one-line SystemExit naming `prog`."""
    from fastdreamer import fast

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device cuda asked for, but CUDA is not available here")
    try:
        mode = fast.resolve_mode(args.mode, device)
        precision = fast.resolve_precision(args.precision, mode, device)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
    shape = {k: getattr(args, k) for k in ("batch_size", "batch_length", "imag_length") if getattr(args, k)}
    return device, mode, precision, make_config(args.size, **shape)


def make_config(size: str, **overrides) -> Config:
    return dataclasses.replace(Config(env="bench", size=size, device="cpu"), **overrides)


def make_agent(cfg: Config, obs: str | EnvSpec, device: torch.device | str, seed: int = 0) -> tuple[Agent, LaProp]:
    """A seeded agent of `cfg` on OBS[obs] (or the spec given) and its LaProp."""
    torch.manual_seed(seed)
    agent = Agent(cfg, OBS[obs] if isinstance(obs, str) else obs).to(device)
    opt = LaProp(
        agent.trainable(), lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, agc=cfg.agc, warmup=cfg.warmup
    )
    return agent, opt


# The tests' tiny config (tests/test_fast.py; bench.divergence runs it on a GPU): a cold inductor compile of its
# update stays near a minute on the CPU. lr 1e-3 without warmup: parameter moves (~1e-3) dwarf fp32 reassociation
# noise (~1e-7), so a wrong gradient in a compiled backward shows in the parameters and not only in the losses.
TINY_SPEC = EnvSpec(obs={"vector": ((5,), torch.float32)}, discrete=True, act_dim=3, env_id="test")
WARM_BATCH = 10_000  # warm_state's batches and seed: apart from the compared updates' tiny_batch(0, 1, ...)
TINY_CFG = dataclasses.replace(
    Config(env="test", size="debug", device="cpu"), batch_size=4, batch_length=8, imag_length=3, lr=1e-3, warmup=0
)


def tiny_agent(
    device: torch.device | str = "cpu", seed: int = 0, warm: int = 0, settled: bool = True
) -> tuple[Agent, LaProp]:
    """A seeded agent of TINY_CFG and its LaProp; with `warm` > 0, in the state `warm` eager fp32 updates leave it in,
    its two-hot heads settled unless `settled` is False (see warm_state)."""
    agent, opt = make_agent(TINY_CFG, TINY_SPEC, device, seed)
    if warm:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # one cache entry per GPU: "cuda" and "cuda:0" are one state
            dev = torch.device("cuda", torch.cuda.current_device())
        agent_state, opt_state = warm_state(str(dev), seed, warm, settled)
        agent.load_state_dict(agent_state)
        opt.load_state_dict(opt_state)
    return agent, opt


@functools.lru_cache(maxsize=8)  # (device, seed, updates, settled): a few per process
def warm_state(device: str, seed: int, updates: int, settled: bool = True) -> tuple[dict, dict]:
    """The agent's and LaProp's state after `updates` eager fp32 updates of tiny_agent(device, seed) on batches of
    their own (tiny_batch(WARM_BATCH + k)), then, when `settled`, its two-hot heads settled (settle_twohot_heads),
    computed once per process and loaded by every agent that asks for it, so that the runs compared start from the
    same values bitwise (CUDA eager need not repeat itself bitwise). The cached dicts are shared: read them, load
    them, never write into them.

    Why: from a fresh LaProp the first step is exactly lr * sign(g) (nu_hat = g^2), so a gradient element whose sign
    two correct summation orders disagree on, or that is exactly zero on one side (the reward and critic MLPs' at
    update 0: their output layers start at zero), moves its parameter a whole lr apart; from a warm state a step is
    about g / rms(past g), continuous in g. The generators are left as they were."""
    from fastdreamer import fast
    from fastdreamer.train import update_step

    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        agent, opt = make_agent(TINY_CFG, TINY_SPEC, dev, seed)
        update = fast.make_update(update_step, agent, opt, "eager", "fp32")
        torch.manual_seed(WARM_BATCH + seed)
        for k in range(updates):
            update(tiny_batch(WARM_BATCH + k, dev))
        if settled:
            settle_twohot_heads(agent)
    return {k: v.detach().clone() for k, v in agent.state_dict().items()}, opt.state_dict()


def settle_twohot_heads(agent: Agent) -> None:
    """Give the two-hot heads (reward, critic, slow critic) the shape of trained ones: each output bias falls by 2 per
    unit of |symlog(bin)|, so the far bins keep almost no probability, as a head that has learned where its targets
    lie puts on them (the weights stay as trained).

    Why: a few updates leave these heads near uniform, and there a value, sum_j p_j b_j over bins up to 4.85e8, is
    ill-conditioned: d value / d logit_j = p_j (b_j - value) ~ 1.9e6, so one float32 ulp of one logit moves it by
    ~1e-2, and independent relative logit noise of 1e-7 by ~0.1 at this config, where values are ~1e-3 (bench/
    LOG.md, session 17). Two correct computations that round one logit apart (another GEMM kernel, a fused or
    compiled one) then give other values, returns and advantages, and a fast-vs-eager comparison measures that
    condition number instead of the compilation. A slope of 2 makes p_j |b_j| fall as exp(-|s_j|) (any slope above 1
    makes it fall): the same noise then moves values by ~1e-7."""
    bias = -2.0 * symlog(agent.bins).abs()  # mirrored bins get equal biases: the bins are exactly antisymmetric
    with torch.no_grad():
        for head in (agent.reward, agent.critic, agent.slow_critic):
            head.out.bias.copy_(bias)


def tiny_batch(
    step: int, device="cpu", B: int = TINY_CFG.batch_size, L: int = TINY_CFG.batch_length + TINY_CFG.replay_context
) -> dict[str, torch.Tensor]:
    """Update `step`'s replay batch of TINY_CFG from its own generator (the same batch on any device)."""
    gen = torch.Generator().manual_seed(100 + step)
    data = {
        "vector": torch.randn((B, L, 5), generator=gen),
        "action": torch.nn.functional.one_hot(torch.randint(0, 3, (B, L), generator=gen), 3).float(),
        "reward": torch.randn((B, L), generator=gen),
        "is_first": torch.rand((B, L), generator=gen) < 0.2,
        "is_last": torch.rand((B, L), generator=gen) < 0.2,
        "deter": torch.randn((B, L, 32), generator=gen).to(torch.bfloat16),
        "stoch": torch.randint(0, 4, (B, L, 4), generator=gen).to(torch.uint8),
    }
    data["is_terminal"] = data["is_last"] & (torch.rand((B, L), generator=gen) < 0.5)
    return {k: v.to(device) for k, v in data.items()}


def random_batch(agent: Agent, batch: int, length: int, device: torch.device | str, seed: int = 0):
    """A replay batch (B, length, ...) with the replay context fields (deter bf16, stoch uint8 indices)."""
    gen = torch.Generator().manual_seed(seed)
    spec, rssm = agent.spec, agent.rssm
    B, L = batch, length
    data = {}
    for key, (shape, dtype) in spec.obs.items():
        if dtype == torch.uint8:
            data[key] = torch.randint(0, 256, (B, L, *shape), generator=gen, dtype=torch.uint8)
        elif not dtype.is_floating_point:  # class indices, each element below its own count
            counts = torch.tensor(spec.obs_classes or [spec.classes] * shape[0])
            data[key] = (torch.rand((B, L, *shape), generator=gen) * counts).long().to(dtype)
        else:
            data[key] = torch.randn((B, L, *shape), generator=gen)
    act = torch.randint(0, spec.act_dim, (B, L), generator=gen)
    data["action"] = torch.nn.functional.one_hot(act, spec.act_dim).float()
    data["reward"] = torch.randn((B, L), generator=gen)
    data["is_first"] = torch.rand((B, L), generator=gen) < 0.05
    data["is_last"] = torch.rand((B, L), generator=gen) < 0.05
    data["is_terminal"] = data["is_last"] & (torch.rand((B, L), generator=gen) < 0.5)
    data["deter"] = torch.randn((B, L, rssm.deter), generator=gen).to(torch.bfloat16)
    data["stoch"] = torch.randint(0, rssm.classes, (B, L, rssm.stoch), generator=gen).to(torch.uint8)
    return {k: v.to(device) for k, v in data.items()}


def random_obs(agent: Agent, n: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = random_batch(agent, n, 1, device, seed)
    return {k: v[:, 0] for k, v in batch.items() if k in agent.spec.obs or k == "is_first"}


def rollout_starts(agent: Agent, n: int, device, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """n imagination starts: random deter (n, D), random one-hot latents (n, S, C)."""
    rssm = agent.rssm
    gen = torch.Generator().manual_seed(seed)
    deter = torch.randn(n, rssm.deter, generator=gen).to(device)
    index = torch.randint(0, rssm.classes, (n, rssm.stoch), generator=gen)
    return deter, torch.nn.functional.one_hot(index, rssm.classes).float().to(device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want|, in norm: the A/B scripts' gradient checks."""
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, warmup: int = 2, repeat: int = 10, min_time: float = 0.0):
    """Median and spread (max - min over the middle half) in ms of `repeat` timed calls after `warmup` calls."""
    if repeat < 1:
        raise ValueError(f"timeit needs at least one timed call, got repeat={repeat}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = len(times) // 4
    mid = times[q : len(times) - q] or times
    return statistics.median(times), mid[-1] - mid[0]


# Sampled rollouts under bf16: a draw whose uniform falls within rounding of a class boundary can go the other way,
# and that rollout then follows another trajectory. Measured, compiled bf16 against eager bf16 from the same noise,
# B16xT64 starts, 15 steps: 0.047% (debug) and 0.052% (1m) of the feature elements outside BF16 tolerance, 99.98%
# of the actions equal. A wrong graph puts most elements outside; the bound leaves a 20x margin over the tips.
ROLLOUT_MISMATCH_FRAC = 0.01


def rollout_close(got, want, tol) -> tuple[bool, float]:
    """(ok, fraction of elements outside tol) for (feats, actions) from two rollouts given the same noise."""
    outside = max(float((~torch.isclose(g.float(), w.float(), **tol)).float().mean()) for g, w in zip(got, want))
    return outside <= ROLLOUT_MISMATCH_FRAC, outside
