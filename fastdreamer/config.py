"""Configuration as data: one dataclass (its field docstrings are the CLI's --help), the model-size table of
the reference (dreamerv3/configs.yaml), and one preset per environment."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field

from . import fast


@dataclass(frozen=True)
class Size:
    deter: int
    hidden: int
    classes: int
    depth: int
    units: int
    stoch: int = 32
    blocks: int = 8


# The reference's size table; `debug` is ours, for tests.
SIZES: dict[str, Size] = {
    "debug": Size(deter=32, hidden=16, classes=4, depth=2, units=16, stoch=4, blocks=4),
    "1m": Size(deter=512, hidden=64, classes=4, depth=4, units=64),
    "12m": Size(deter=2048, hidden=256, classes=16, depth=16, units=256),
    "25m": Size(deter=3072, hidden=384, classes=24, depth=24, units=384),
    "50m": Size(deter=4096, hidden=512, classes=32, depth=32, units=512),
    "100m": Size(deter=6144, hidden=768, classes=48, depth=48, units=768),
    "200m": Size(deter=8192, hidden=1024, classes=64, depth=64, units=1024),
    "400m": Size(deter=12288, hidden=1536, classes=96, depth=96, units=1536),
}


@dataclass
class Config:
    env: str = "cartpole"
    """Preset name (cartpole, pendulum, pong, carracing, walker) or any envpool / Gymnasium id, e.g. 'Acrobot-v1'
    or 'my.module:MyEnv-v0'."""
    size: str = "12m"
    """Model size: debug, 1m, 12m, 25m, 50m, 100m, 200m, 400m."""
    steps: int = 100_000
    """Environment steps to train for (summed over all envs)."""
    train_ratio: float = 32.0
    """Replayed steps per environment step, as in the reference (batch_size * batch_length per update)."""
    num_envs: int = 16
    """Parallel environments."""
    seed: int = 0
    """Seeds the agent's initialisation, the replay's sampling and (hashed per env) the envs."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N."""
    threads: int = 0
    """CPU threads for torch's own ops (0: torch's default, one per core). On a CPU shared with other work use 1: a
    second OpenMP thread spinning at barriers on a busy core made updates 6x slower on a 2-core machine."""
    logdir: str = "logdir/{env}-{size}-seed{seed}"
    """Run directory: config.json, metrics.jsonl, TensorBoard events, checkpoint.pt."""
    resume: bool = False
    """Continue the run in --logdir from its checkpoint, exactly."""
    gru_impl: str = "torch"
    """Recurrent core implementation: torch (reference) or triton (fused kernels; in bf16 under the fast modes' bf16
    autocast). torch is the default until GPU timings show triton faster (kernels/block_gru/README.md)."""
    mode: str = "auto"
    """Execution mode of the update and acting step: eager (the reference), compile, graphs (CUDA), or auto (the
    fastest mode measured to work on the device: graphs on CUDA, compile on a CPU, eager on a CPU without a C++
    compiler)."""
    precision: str = "auto"
    """Matmul precision of the fast modes: bf16 (autocast; weights, norms and losses stay fp32, like the reference's
    bfloat16 compute), fp32, or auto (bf16 where the device has native bf16: CUDA, CPUs with AVX512-BF16 or AMX).
    Eager is always fp32."""

    batch_size: int = 16
    """Sequences per update."""
    batch_length: int = 64
    """Steps per training sequence (after the replay-context step)."""
    replay_context: int = 1
    """Steps of stored latent state that start each training sequence (0 or 1). With 0, each sequence starts from
    the zero state and action, as in the reference, whose sampler marks every batch's first step is_first, so the
    state it carries over from the previous update is reset."""
    replay_size: int = 1_000_000
    """Replay capacity in environment steps (all envs together). A run of fewer --steps allocates only those: the
    ring never fills, so it trains on the same windows either way."""
    replay_online: bool = True
    """Train on each env's every fresh chunk of batch_length + replay_context steps once, ahead of the uniform
    samples (the reference's replay.online)."""
    env_kwargs: str = ""
    """Keyword arguments of the env's constructor (envpool.make or gymnasium.make) as a JSON object, e.g.
    '{"max_episode_steps": 200}' for CartPole-v1, '{"episodic_life": true}' for Pong-v5."""
    image_size: int = 64
    """Image observations are resized to image_size x image_size (a multiple of 16 in 48..256)."""

    unimix: float = 0.01
    """Uniform mix of the RSSM's prior and posterior categoricals."""
    policy_unimix: float = 0.01
    """Uniform mix of the discrete actor: configs.yaml's policy.unimix. Some versions of main's Head.categorical
    drop it (danijar/dreamerv3 issue #219, open); 0 reproduces those."""
    free_nats: float = 1.0
    """Free bits: each KL loss is at least this many nats per step (summed over the latents first)."""
    imglayers: int = 2
    """Layers of the prior's MLP (deter -> stochastic logits)."""
    obslayers: int = 1
    """Layers of the posterior's MLP (deter and token -> stochastic logits)."""
    enc_layers: int = 3
    """Layers of the encoder's MLP over vector and discrete observations."""
    dec_layers: int = 3
    """Layers of the decoder's MLP for vector and discrete observations."""
    head_layers: int = 1
    """Layers of the reward and continue heads."""
    ac_layers: int = 3
    """Layers of the actor and critic."""
    bins: int = 255
    """Two-hot bins of the reward and critic heads (symexp-spaced over -20..20 in symlog)."""
    bspace: int = 8
    """Blocks of the image decoder's spatial projection."""
    loss_rec: float = 1.0
    """Scale of each decoded observation key's loss."""
    loss_rew: float = 1.0
    """Scale of the reward head's loss."""
    loss_con: float = 1.0
    """Scale of the continue head's loss."""
    loss_dyn: float = 1.0
    """Scale of the dynamics KL loss (prior towards the stop-gradient posterior)."""
    loss_rep: float = 0.1
    """Scale of the representation KL loss (posterior towards the stop-gradient prior)."""

    imag_length: int = 15
    """Imagination horizon: steps imagined from every posterior state of a batch."""
    horizon: int = 333
    """Discount horizon: the discount is 1 - 1/horizon."""
    lam: float = 0.95
    """Lambda of the lambda-returns."""
    actent: float = 3e-4
    """Actor entropy regulariser scale."""
    minstd: float = 0.1
    """Continuous actions: the policy's smallest standard deviation."""
    maxstd: float = 1.0
    """Continuous actions: the policy's largest standard deviation."""
    slow_rate: float = 0.02
    """Rate of the slow critic's exponential moving average, per update."""
    slowreg: float = 1.0
    """Scale of the critic's regulariser towards the slow critic."""
    retnorm_rate: float = 0.01
    """Rate of the return normaliser's moving percentiles."""
    retnorm_limit: float = 1.0
    """Returns are divided by max(retnorm_limit, high - low percentile)."""
    retnorm_lo: float = 5.0
    """Return normaliser's low percentile."""
    retnorm_hi: float = 95.0
    """Return normaliser's high percentile."""
    loss_policy: float = 1.0
    """Scale of the actor's loss."""
    loss_value: float = 1.0
    """Scale of the critic's loss on imagined returns."""
    loss_repval: float = 0.3
    """Scale of the critic's loss on replayed returns (repval)."""

    lr: float = 4e-5
    """Learning rate of LaProp (one optimizer for the world model, actor and critic)."""
    agc: float = 0.3
    """Adaptive gradient clipping: each tensor's gradient norm at most agc x max(1e-3, its parameter norm)."""
    eps: float = 1e-20
    """LaProp's epsilon."""
    beta1: float = 0.9
    """LaProp's momentum decay."""
    beta2: float = 0.999
    """LaProp's second-moment decay."""
    warmup: int = 1000
    """Updates over which the learning rate rises linearly from 0."""

    log_every: float = 30.0
    """Seconds between metric logs."""
    save_every: int = 5000
    """Updates between checkpoints (and one at the end, and one on Ctrl-C or SIGTERM)."""
    eval_episodes: int = 0
    """Episodes of evaluation at the end of training (0: none), sampling the policy as in training
    (`python -m fastdreamer.eval --greedy` takes its mode instead)."""
    video_episodes: int = 0
    """Episodes filmed side by side at the end of training (0: none), as `fastdreamer.eval --video` films them: a GIF
    in <logdir>/videos/eval_policy and TensorBoard. Vector observations render through Gymnasium (classic control
    needs pygame: pip install -e '.[video]'), checked before training starts."""
    report_every: float = 300.0
    """Seconds between open-loop reports of the world model, and one at the end of training (0: none): metrics
    openloop/* and a GIF in <logdir>/videos and TensorBoard: for image observations a video, for vector ones a chart
    (fastdreamer/report.py)."""
    report_context: int = 16
    """Observed steps before a report's open-loop prediction of as many (at most half the batch length each): 16 and
    16, as the reference's report of 32 steps."""
    progress: bool = True
    """Show a progress bar."""

    def resolved_logdir(self) -> str:
        try:
            return self.logdir.format(env=self.env.replace("/", "_").replace(":", "_"), size=self.size, seed=self.seed)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"--logdir {self.logdir!r} names fields other than {{env}}, {{size}}, {{seed}} ({e})"
            ) from None


# What a resumed run may set anew: where and how it runs, how long, and what it logs. Every other field decides what
# the run computes, and a resume keeps the checkpoint's (resume_differences).
RUN_FIELDS = frozenset(
    "steps device threads logdir resume gru_impl mode precision replay_size log_every save_every eval_episodes "
    "video_episodes report_every report_context progress".split()
)


def config_from_dict(saved: dict) -> Config:
    """The Config a checkpoint recorded; fields this version no longer has are dropped, new ones take defaults."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})


def resume_differences(saved: dict, cfg: Config) -> list[str]:
    """'--name run-value -> cfg-value' for each field outside RUN_FIELDS where cfg differs from a checkpoint's config
    (fields the checkpoint does not record are not compared)."""
    now = dataclasses.asdict(cfg)
    return [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k not in RUN_FIELDS and k in saved and saved[k] != now[k]
    ]


@dataclass(frozen=True)
class Preset:
    env_id: str
    overrides: dict = field(default_factory=dict)


# CartPole and Pendulum use the recipe measured on the 2-core CPU (README, Results): lr 3e-4 with a 100-update
# warmup, and smaller batches for CartPole. The image and DMC presets keep the reference's batch and optimizer
# settings. pong and carracing run 12m at 64x64, the size this project's speed targets are set at; the reference's
# atari config runs its default 200m at 96x96 (--size 200m --image-size 96).
CPU_RECIPE = dict(
    size="1m", batch_size=8, batch_length=32, train_ratio=64.0, lr=3e-4, warmup=100, num_envs=4, replay_size=200_000
)

PRESETS: dict[str, Preset] = {
    "cartpole": Preset("CartPole-v1", dict(CPU_RECIPE, steps=20_000)),
    # Pendulum at the reference's batch of 16 x 64 (README, Learning: seeds rank higher than at 8 x 32, same time).
    "pendulum": Preset("Pendulum-v1", dict(CPU_RECIPE, steps=40_000, batch_size=16, batch_length=64)),
    "pong": Preset("Pong-v5", dict(size="12m", train_ratio=32.0, num_envs=16, steps=5_000_000, replay_size=2_000_000)),
    "carracing": Preset(
        "CarRacing-v3", dict(size="12m", train_ratio=64.0, num_envs=16, steps=2_000_000, replay_size=1_000_000)
    ),
    # The reference's dmc_proprio: size 1m, train ratio 1024, its default 16 envs, 1.1M steps.
    "walker": Preset(
        "WalkerWalk-v1", dict(size="1m", train_ratio=1024.0, num_envs=16, steps=1_100_000, replay_size=1_100_000)
    ),
}


def preset_defaults(env: str) -> Config:
    """The Config a run of `env` starts from before command-line overrides."""
    preset = PRESETS.get(env)
    if preset is None:
        return Config(env=env)
    return dataclasses.replace(Config(env=env), **preset.overrides)


def env_id(cfg: Config) -> str:
    preset = PRESETS.get(cfg.env)
    return preset.env_id if preset else cfg.env


def env_kwargs(cfg: Config) -> dict:
    """--env-kwargs parsed: a dict (empty when not given); ValueError with one line when it is not a JSON object."""
    if not cfg.env_kwargs:
        return {}
    try:
        kwargs = json.loads(cfg.env_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--env-kwargs is not JSON ({e.msg} at character {e.pos}): {cfg.env_kwargs}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"--env-kwargs must be a JSON object like '{{\"max_episode_steps\": 200}}', got {cfg.env_kwargs}"
        )
    return kwargs


def replay_capacity(cfg: Config) -> int:
    """The steps (all envs) the replay allocates: --replay-size, or the steps the run will take when it takes fewer
    (at least one sequence per env). Nothing is overwritten in either ring, so a run samples the same windows from
    both; a resume with more --steps grows the ring (Replay.load_state_dict)."""
    run = max(-(-cfg.steps // cfg.num_envs), cfg.batch_length + cfg.replay_context)  # adds per env, rounded up
    return cfg.num_envs * min(cfg.replay_size // cfg.num_envs, run)


def validate(cfg: Config) -> None:
    """Raise ValueError with one clear line for a config that cannot run."""
    if cfg.size not in SIZES:
        close = difflib.get_close_matches(cfg.size, SIZES, 3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(SIZES)}"
        raise ValueError(f"unknown size {cfg.size!r}{hint}")
    positive = dict(
        train_ratio=cfg.train_ratio,
        num_envs=cfg.num_envs,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
        replay_size=cfg.replay_size,
        imag_length=cfg.imag_length,
        horizon=cfg.horizon,
        lr=cfg.lr,
    )
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")
    if cfg.batch_length < 2:
        raise ValueError("--batch-length must be at least 2 (the replay-value return needs a next step), got 1")
    if cfg.image_size % 16 or not 48 <= cfg.image_size <= 256:
        raise ValueError(
            f"--image-size must be a multiple of 16 from 48 to 256 (four stride-2 stages to 3..16 pixels), got "
            f"{cfg.image_size}"
        )
    if not 0 <= cfg.seed < 2**31:
        raise ValueError(f"--seed must be in [0, 2**31), got {cfg.seed}")
    if cfg.eval_episodes < 0 or cfg.video_episodes < 0:
        raise ValueError(
            f"--eval-episodes and --video-episodes must be 0 (none) or positive, got {cfg.eval_episodes} and "
            f"{cfg.video_episodes}"
        )
    if not (math.isfinite(cfg.log_every) and cfg.log_every >= 0):
        raise ValueError(f"--log-every must be 0 (every step) or a positive number of seconds, got {cfg.log_every}")
    if not cfg.report_every >= 0 or cfg.report_context < 1:  # not >= 0: NaN too
        raise ValueError(
            f"--report-every must be 0 (no reports) or positive and --report-context at least 1, got "
            f"{cfg.report_every} and {cfg.report_context}"
        )
    if cfg.threads < 0:
        raise ValueError(f"--threads must be 0 (torch's default) or positive, got {cfg.threads}")
    if cfg.warmup < 0 or cfg.save_every < 1:
        raise ValueError(
            f"--warmup must be 0 (none) or positive and --save-every at least 1, got {cfg.warmup} and {cfg.save_every}"
        )
    cfg.resolved_logdir()
    if cfg.replay_context not in (0, 1):
        raise ValueError(f"--replay-context must be 0 or 1, got {cfg.replay_context}")
    seq = cfg.batch_length + cfg.replay_context
    per_env = cfg.replay_size // cfg.num_envs
    if seq > per_env:
        raise ValueError(
            f"sequence of {seq} steps is longer than the replay capacity per env "
            f"({cfg.replay_size} // {cfg.num_envs} = {per_env}); raise --replay-size"
        )
    if not 0 <= cfg.unimix < 1 or not 0 <= cfg.policy_unimix < 1 or not 0 <= cfg.lam <= 1:
        raise ValueError("--unimix and --policy-unimix must be in [0, 1) and --lam in [0, 1]")
    env_kwargs(cfg)
    fast.check_precision(cfg.precision, cfg.mode)
    if cfg.gru_impl not in ("torch", "triton"):
        raise ValueError(f"--gru-impl must be torch or triton, got {cfg.gru_impl!r}")
