"""Batched environments whose observations, rewards and flags arrive as tensors on the training device.

Two backends share one step contract: envpool for every id it knows, Gymnasium's SyncVectorEnv for any other
registered id (including a user's "some.module:MyEnv-v0"). Both auto-reset on the call after an episode ends;
that call ignores its action and returns the first observation of the next episode, which we flag is_first=True
with reward 0 (the DreamerV3 / embodied convention).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import first_line

_ALIGN = 16  # byte alignment of each field inside the staging buffer, so any dtype can view its slice

# DreamerV3 reference Atari settings (danijar/dreamerv3 configs.yaml env.atari: repeat 4, sticky, gray, noops 30,
# full action space, no life-loss episodes, unclipped rewards) as envpool arguments. The frame size is image_size: 64
# by default, where main's env.atari says 96 (pass --image-size 96 for that).
ATARI_DEFAULTS: dict[str, Any] = {
    "frame_skip": 4,
    "repeat_action_probability": 0.25,
    "stack_num": 1,
    "gray_scale": True,
    "noop_max": 30,
    "full_action_space": True,
    "episodic_life": False,
    "reward_clip": False,
    "use_fire_reset": False,
}


@dataclass(frozen=True)
class EnvSpec:
    # 'vector': ((O,), float32), 'image': ((H, W, C), uint8), 'discrete': ((M,), int32) class indices
    obs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    discrete: bool
    act_dim: int  # number of discrete actions (G groups of K, concatenated one-hots), or continuous action dims
    env_id: str  # resolved id
    classes: int = 0  # the largest count of classes of the elements of 'discrete'
    act_classes: tuple[int, ...] = ()  # discrete: each group's count of actions (a MultiDiscrete's nvec), K the max
    obs_classes: tuple[int, ...] = ()  # each element of 'discrete''s count of classes; () is `classes` for all


def _envpool_ids() -> list[str]:
    try:
        import envpool
    except ImportError:
        return []
    return list(envpool.list_all_envs())


def _unknown_id_error(env_id: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(env_id, list(dict.fromkeys(known)), n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see envpool.list_all_envs() or gymnasium.registry"
    return ValueError(f"unknown environment '{env_id}'{hint}")


def _envpool_call(env_id: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), with envpool's failures to build an env (a missing asset or system library: its
    Sudoku-v0's puzzle file, its Procgen's Qt) as one line."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ImportError, OSError) as e:
        raise ValueError(f"envpool could not make {env_id}: {first_line(e)}") from None


class EnvError(RuntimeError):
    """An env raised while it reset or stepped: a bug in the env, raised from the env's own exception so that its
    traceback shows (not bad input to this trainer)."""


class EnvDataError(ValueError):
    """An env returned an observation outside its space (non-finite, a discrete value out of range), as the
    reference's CheckSpaces refuses; one line."""


def env_seeds(seed: int, num_envs: int) -> list[int]:
    """Env i's seed in a run of `seed`: a hash of (seed, i), as the reference seeds its envs, so that runs of
    adjacent seeds share no env stream (seed + i, what envpool and Gymnasium do with one seed, gives seeds 0 and 1
    all envs but one in common). 31 bits: envpool takes int32."""
    return [int(x) >> 1 for x in np.random.SeedSequence(seed).generate_state(num_envs)]


def make_env(
    env_id: str,
    num_envs: int,
    seed: int,
    device: torch.device | str,
    *,
    image_size: int = 64,
    atari: dict | None = None,
    env_kwargs: dict | None = None,
    gymnasium_only: bool = False,
) -> VecEnv:
    """Create N copies of `env_id` stepping in lockstep. `atari` overrides ATARI_DEFAULTS for envpool Atari ids;
    `env_kwargs` go to the backend's constructor as they are (e.g. max_episode_steps, or Gymnasium's render_mode).
    gymnasium_only: Gymnasium's env of that id even where envpool has one (Gymnasium's envs render)."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    env_kwargs = dict(env_kwargs or {})
    if seeded := sorted({"seed", "env_seed"} & set(env_kwargs)):
        raise ValueError(f"--env-kwargs cannot set {', '.join(seeded)}: the envs are seeded from --seed")
    pool_ids = [] if gymnasium_only else _envpool_ids()
    if env_id in pool_ids:
        import envpool

        # Atari is the only envpool family whose specs carry sticky actions; match by the option, not a name list.
        is_atari = "repeat_action_probability" in _envpool_call(env_id, envpool.make_spec, env_id)._config_keys
        if is_atari:
            env_kwargs = {
                **ATARI_DEFAULTS,
                "img_height": image_size,
                "img_width": image_size,
                **(atari or {}),
                **env_kwargs,
            }
        with warnings.catch_warnings():  # envpool builds float64 Box bounds that gymnasium warns about casting
            warnings.filterwarnings("ignore", message=".*precision lowered.*")
            pool = _envpool_call(
                env_id,
                envpool.make,
                env_id,
                env_type="gymnasium",
                num_envs=num_envs,
                env_seed=env_seeds(seed, num_envs),
                **env_kwargs,
            )
            return VecEnv(_EnvpoolBackend(pool), env_id, num_envs, device, image_size)
    if ":" in env_id or env_id in gymnasium.registry:
        try:
            envs = gymnasium.vector.SyncVectorEnv(
                [(lambda: gymnasium.make(env_id, **env_kwargs)) for _ in range(num_envs)],
                autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP,
            )
        # A module:Env id whose module or env does not exist, or an env whose dependency is missing (box2d, ...).
        except (gymnasium.error.Error, ImportError) as e:
            raise ValueError(f"{env_id} cannot be made: {first_line(e)}") from None
        except AttributeError as e:  # an env without an observation or action space: Gymnasium's checker says which
            if "must specify" not in str(e):
                raise  # a bug in the env's own code: its traceback
            raise ValueError(f"{env_id} cannot be made: {first_line(e)}") from None
        return VecEnv(_GymBackend(envs, env_seeds(seed, num_envs)), env_id, num_envs, device, image_size)
    raise _unknown_id_error(env_id, pool_ids + list(gymnasium.registry))


class _EnvpoolBackend:
    """send() returns at once and envpool's worker threads step the envs while the caller works (measured on the
    2-core CPU, 16 Pong envs: recv waits 3.1 ms right after send, 0.05 ms after 5 ms of other work)."""

    def __init__(self, pool: Any):
        self.pool, self.obs_space, self.act_space = pool, pool.observation_space, pool.action_space
        self.ids = np.arange(pool.config["num_envs"], dtype=np.int32)

    def reset(self) -> Any:
        return self.pool.reset()[0]

    def send(self, action: np.ndarray) -> None:
        self.pool.send(action, self.ids)

    def recv(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        obs, reward, terminated, truncated, info = self.pool.recv()
        # With batch_size == num_envs envpool answers in the order of the ids sent; anything else would mix envs up.
        if not np.array_equal(info["env_id"], self.ids):
            raise RuntimeError(f"envpool returned envs {info['env_id'].tolist()}, expected {self.ids.tolist()}")
        return obs, reward, terminated, truncated

    def close(self) -> None:
        self.pool.close()


class _GymBackend:
    def __init__(self, envs: gymnasium.vector.VectorEnv, seeds: list[int]):
        self.envs, self.seed = envs, seeds
        self.obs_space, self.act_space = envs.single_observation_space, envs.single_action_space

    def reset(self) -> Any:
        seed, self.seed = self.seed, None  # seed once; later resets continue the seeded streams
        return self.envs.reset(seed=seed)[0]

    def send(self, action: np.ndarray) -> None:
        self.action = action  # SyncVectorEnv steps in the caller's thread: recv() does the work, nothing overlaps

    def recv(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        obs, reward, terminated, truncated, _ = self.envs.step(self.action)
        return obs, reward, terminated, truncated

    def render(self, n: int) -> list[np.ndarray]:
        return [env.render() for env in self.envs.envs[:n]]

    def close(self) -> None:
        self.envs.close()


@dataclass
class _Field:
    key: str  # staging field name: 'image', 'vector' or 'discrete'
    src: tuple  # keys (Dict) and indices (Tuple) down to the array; () for a plain array
    cols: slice | None  # destination columns inside 'vector' or 'discrete'
    chw: bool = False  # source image is CHW
    gray: bool = False  # source image is (H, W): one channel added
    start: Any = 0  # a discrete space's first value (Discrete.start, MultiDiscrete.start), subtracted
    classes: Any = None  # a discrete space's number of values per element (nvec), to check what the env returns
    shape: tuple = ()  # the space's shape (one env's)


def _label(path: tuple) -> str:
    return f"observation {'/'.join(map(str, path))!r}" if path else "the observation"


def _leaf(obs: Any, path: tuple) -> Any:
    """The array at `path` (Dict keys and Tuple indices) in a batch of observations."""
    for key in path:
        obs = obs[key]
    return obs


def _leaves(space: gymnasium.Space, path: tuple = ()) -> list[tuple[tuple, gymnasium.Space]]:
    """(path, space) of every array in a space: Dict keys sorted, Tuple items by position, nested to any depth."""
    if isinstance(space, gymnasium.spaces.Dict):
        return [leaf for key, sub in sorted(space.spaces.items()) for leaf in _leaves(sub, (*path, key))]
    if isinstance(space, gymnasium.spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in _leaves(sub, (*path, i))]
    return [(path, space)]


# Integer-valued observations are categorical, as the reference reads them: one-hot in the encoder, one softmax per
# element over its own classes in the decoder (Taxi's 500 classes are 500 inputs). Past this many one-hot inputs in
# all, the layers are hundreds of MB (and a space of 2^31 values or more would not fit the int32 indices).
MAX_OBS_ONE_HOT = 1 << 16
# An integer Box (or bool Box, MultiBinary) whose one-hot would take more than this, or of more than
# MAX_ACTION_CLASSES values per element, is read as numbers (a vector) instead: BabyAI's 512-byte mission string
# would be 131,072 inputs. The reference one-hots any of them. MiniGrid's 96-byte mission is 24,576 inputs, which
# doubles a 12m model's parameters (the encoder's first layer and the decoder's logits).
MAX_INT_BOX_ONE_HOT = MAX_OBS_ONE_HOT // 2


def _obs_classes(sub: gymnasium.Space) -> tuple[np.ndarray, np.ndarray] | None:
    """(classes, first value) per element of an observation space the encoder reads as categorical, else None.
    Discrete and MultiDiscrete always (of any rank); an integer or bool Box, or a MultiBinary, of rank <= 2, of at
    most MAX_ACTION_CLASSES values per element and with a one-hot at most MAX_INT_BOX_ONE_HOT wide (the reference
    takes every integer and bool Box as categorical). A Box's high is its last value, as Gymnasium defines it:
    Box(0, 255) has 256 classes (the reference counts high - low, 255, and reads 255 as an all-zero one-hot)."""
    if not isinstance(sub, gymnasium.spaces.Discrete | gymnasium.spaces.MultiDiscrete):
        if not isinstance(sub, gymnasium.spaces.MultiBinary | gymnasium.spaces.Box) or len(sub.shape) > 2:
            return None
        if not (np.issubdtype(sub.dtype, np.integer) or np.issubdtype(sub.dtype, np.bool_)):
            return None
    groups = _action_groups(sub)
    if groups is None:
        return None
    nvec, start = (np.asarray(x, np.int64).reshape(-1) for x in groups)
    if not isinstance(sub, gymnasium.spaces.Discrete | gymnasium.spaces.MultiDiscrete) and (
        sum(map(int, nvec)) > MAX_INT_BOX_ONE_HOT
    ):
        return None
    return nvec, start


def _one_line(space: gymnasium.Space) -> str:
    return " ".join(str(space).split())  # a MultiDiscrete of rank >= 2 prints its nvec over several lines


def _layout_obs(space: gymnasium.Space, image_size: int) -> tuple[list[_Field], dict, dict, np.ndarray]:
    """Map an observation space to staging fields, as the reference's encoder reads them: one uint8 image ((H, W,
    C), CHW or (H, W)); integer-valued elements (Discrete, MultiDiscrete, integer or bool Box of rank <= 2) as class
    indices (one-hot in the encoder, categorical in the decoder); every other Box of rank <= 2 flattened into one
    float vector. Dict and Tuple spaces hold any mix, nested to any depth. Where the categorical elements would
    one-hot to more than MAX_OBS_ONE_HOT inputs, the integer and bool Boxes among them are read as numbers; past
    that, refused. Returns (fields, staged spec, final spec, classes of each discrete element)."""
    leaves = []  # (path, space, shape, image, (classes, start) or None)
    for name, sub in _leaves(space):
        shape = tuple(int(d) for d in np.atleast_1d(sub.shape)) if sub.shape is not None else ()
        is_image = sub.dtype == np.uint8 and (len(shape) == 3 or (len(shape) == 2 and min(shape) >= 16))
        leaves.append((name, sub, shape, is_image, None if is_image else _obs_classes(sub)))

    def one_hot_width() -> int:  # exact Python ints: a sum of 2^62-class spaces must not wrap
        return sum(sum(map(int, g[0])) for *_, g in leaves if g is not None)

    discrete = (gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete)
    if one_hot_width() > MAX_OBS_ONE_HOT:
        # The integer Boxes as numbers; the Discrete spaces alone must fit.
        leaves = [(n, sub, sh, img, g if isinstance(sub, discrete) else None) for n, sub, sh, img, g in leaves]
        total = one_hot_width()
        if total > MAX_OBS_ONE_HOT:
            name, _, _, _, (nvec, _) = max(
                (leaf for leaf in leaves if leaf[4] is not None), key=lambda leaf: int(leaf[4][0].max())
            )
            raise ValueError(
                f"{_label(name)} has {int(nvec.max()):,} classes: the discrete observations one-hot to {total:,} "
                f"encoder inputs, more than this trainer takes ({MAX_OBS_ONE_HOT:,}); wrap the env to return them as "
                "a float Box"
            )
    fields, vec_cols, disc_cols, image = [], 0, 0, None
    for name, sub, shape, is_image, groups in leaves:
        if groups is not None:
            nvec, start = groups
            width = len(nvec)
            fields.append(
                _Field("discrete", name, slice(disc_cols, disc_cols + width), start=start, classes=nvec, shape=shape)
            )
            disc_cols += width
            continue
        if not isinstance(sub, gymnasium.spaces.Box | gymnasium.spaces.MultiBinary):
            raise ValueError(f"{_label(name)} has unsupported space {_one_line(sub)}")
        if is_image:
            if image is not None:
                raise ValueError(f"more than one image observation in {_one_line(space)}")
            gray = len(shape) == 2
            chw = not gray and shape[0] < min(shape[1:])  # channels first, e.g. (3, 84, 84) or 4 stacked (12, 84, 84)
            image = shape + (1,) if gray else shape[1:] + shape[:1] if chw else shape  # (H, W, C)
            fields.append(_Field("image", name, None, chw, gray, shape=shape))
        elif len(shape) <= 2:
            width = int(np.prod(shape))
            fields.append(_Field("vector", name, slice(vec_cols, vec_cols + width), shape=shape))
            vec_cols += width
        else:
            raise ValueError(
                f"{_label(name)} {_one_line(sub)} is neither a uint8 image (H, W, C) nor of rank <= 2 (a vector); wrap "
                "the env to flatten or render it"
            )
    disc = [f for f in fields if f.key == "discrete"]
    classes = np.concatenate([f.classes for f in disc]) if disc else np.zeros(0, np.int64)
    staged, final = {}, {}
    if disc_cols:
        staged["discrete"] = final["discrete"] = ((disc_cols,), torch.int32)
    if vec_cols:
        staged["vector"] = final["vector"] = ((vec_cols,), torch.float32)
    if image is not None:
        staged["image"] = (image, torch.uint8)
        final["image"] = ((image_size, image_size, image[2]), torch.uint8)
    return fields, staged, final, classes


class _Staging:
    """Host staging for one step's data: all fields packed in one byte buffer, so one H2D copy per step.

    Two slots alternate; on CUDA each slot is pinned and guarded by an event recorded after its copy, so a slot is
    refilled only once its previous copy has finished."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], n: int, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.offsets, off = {}, 0
        for key, (shape, dtype) in spec.items():
            nbytes = n * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            self.offsets[key] = (off, nbytes, (n, *shape), dtype)
            off += -(-nbytes // _ALIGN) * _ALIGN
        self.slots = [torch.empty(off, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.views = [self._views(buf) for buf in self.slots]  # numpy views the backends write into
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.slot = 0

    def _views(self, buf: torch.Tensor) -> dict[str, np.ndarray]:
        raw = buf.numpy()
        return {
            key: raw[off : off + nbytes].view(torch.empty((), dtype=dtype).numpy().dtype).reshape(shape)
            for key, (off, nbytes, shape, dtype) in self.offsets.items()
        }

    def acquire(self) -> dict[str, np.ndarray]:
        self.slot ^= 1
        if self.cuda:
            self.events[self.slot].synchronize()  # no-op unless this slot's last copy is still in flight
        return self.views[self.slot]

    def upload(self) -> dict[str, torch.Tensor]:
        buf = self.slots[self.slot]
        if self.cuda:
            dev = buf.to(self.device, non_blocking=True)
            self.events[self.slot].record()
        else:
            dev = buf.clone()  # the caller may keep the tensors; the slot is overwritten two steps later
        return {
            key: dev[off : off + nbytes].view(dtype).view(shape)
            for key, (off, nbytes, shape, dtype) in self.offsets.items()
        }


MAX_ACTION_CLASSES = 1024  # an integer Box with more values per element is taken as continuous (rounded)


def _action_groups(act: gymnasium.Space) -> tuple[np.ndarray, np.ndarray] | None:
    """(classes, first value) per element of a Discrete (one element) or MultiDiscrete action space, of an integer
    Box of bounded range (Jumanji's Tetris-v0: Box(0, [3, 9], (2,), int32)), which the reference reads as discrete
    too, or of a boolean one (a MultiBinary, or a bool Box: two values each); None otherwise."""
    if isinstance(act, gymnasium.spaces.Discrete):
        return np.asarray(act.n), np.asarray(act.start)
    if isinstance(act, gymnasium.spaces.MultiDiscrete):
        return np.asarray(act.nvec), np.asarray(act.start)
    if isinstance(act, gymnasium.spaces.MultiBinary) or (
        isinstance(act, gymnasium.spaces.Box) and np.issubdtype(act.dtype, np.bool_)
    ):
        return np.full(act.shape, 2, np.int64), np.zeros(act.shape, np.int64)
    if isinstance(act, gymnasium.spaces.Box) and np.issubdtype(act.dtype, np.integer):
        span = np.asarray(act.high.astype(object) - act.low.astype(object) + 1)  # Python ints: no int64 wrap
        if span.max() <= MAX_ACTION_CLASSES:
            return span.astype(np.int64), act.low.astype(np.int64)
    return None


def _cast_limits(dtype: np.dtype, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 bounds within [low, high] that cast to `dtype` exactly: int64's max is 2**63 - 1, which float64
    rounds up to 2**63, past the type (the cast would wrap to its min)."""
    info = np.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    if int(hi) > info.max:
        hi = np.nextafter(hi, 0.0)
    return np.clip(low, lo, hi), np.clip(high, lo, hi)


class VecEnv:
    """N environments; reset/step return {obs keys, 'reward', 'is_first', 'is_last', 'is_terminal'} on `device`."""

    def __init__(self, backend: Any, env_id: str, num_envs: int, device: torch.device | str, image_size: int):
        self.backend, self.num_envs, self.device = backend, num_envs, torch.device(device)
        self._fields, staged, final, classes = _layout_obs(backend.obs_space, image_size)
        self._classes = classes  # per column of 'discrete'
        act = backend.act_space
        act_classes = ()
        groups = _action_groups(act)
        if groups is not None:  # G categoricals of K classes, padded (dists.Policy); Discrete is G = 1
            nvec, start = groups
            act_classes = tuple(int(c) for c in nvec.reshape(-1))
            discrete, act_dim = True, len(act_classes) * max(act_classes)
            if act_dim > MAX_ACTION_CLASSES * 64:
                raise ValueError(
                    f"action space {act} is {len(act_classes)} categoricals of up to {max(act_classes)} actions, "
                    f"{act_dim:,} policy outputs: more than this trainer takes ({MAX_ACTION_CLASSES * 64:,})"
                )
            self._act_offset = start.reshape(-1).astype(np.int64)
            self._act_shape, self._act_dtype = tuple(act.shape), act.dtype
        elif isinstance(act, gymnasium.spaces.Box):
            discrete, act_dim = False, int(np.prod(act.shape))
            low, high = act.low.astype(np.float64).reshape(-1), act.high.astype(np.float64).reshape(-1)
            # A bound past 1e30 is none (VizDoom's Box spans float64's range): infinite in float32, and its scale
            # would overflow.
            bounded = (np.abs(low) < 1e30) & (np.abs(high) < 1e30)
            # a in [-1, 1] -> low + (a + 1) / 2 * (high - low); unbounded dims pass through the clipped value.
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the unbounded dims, not used
                self._act_scale = np.where(bounded, (high - low) / 2, 1.0)
                self._act_shift = np.where(bounded, (high + low) / 2, 0.0)
            self._act_shape, self._act_dtype = tuple(act.shape), act.dtype
            self._act_buf = np.empty((num_envs, act_dim), np.float64)
            if np.issubdtype(act.dtype, np.integer):  # the rounded action is clipped to what the cast can hold
                self._act_limits = _cast_limits(act.dtype, low, high)
        else:
            raise ValueError(f"unsupported action space {act}")
        obs_classes = tuple(int(c) for c in classes)
        self.spec = EnvSpec(final, discrete, act_dim, env_id, max(obs_classes, default=0), act_classes, obs_classes)
        self._resize = "image" in staged and staged["image"][0] != final["image"][0]
        flags = {"reward": ((), torch.float32), **{k: ((), torch.bool) for k in ("is_first", "is_last", "is_terminal")}}
        self._staging = _Staging({**staged, **flags}, num_envs, self.device)
        self._done = np.ones(num_envs, bool)  # the next step auto-resets these envs
        self._ep_return = np.zeros(num_envs, np.float64)
        self._ep_length = np.zeros(num_envs, np.int64)
        self._episodes: list[tuple[float, int]] = []
        self.pending = False  # a step_async whose step_wait is still to come

    def reset(self) -> dict[str, torch.Tensor]:
        if self.pending:
            raise RuntimeError("reset called while a step_async is in flight; call step_wait first")
        obs = self._call("reset", self.backend.reset)
        self._check_shapes(obs)
        self._done[:] = False
        self._ep_return[:] = 0
        self._ep_length[:] = 0
        out = self._staging.acquire()
        self._fill_obs(out, obs)
        out["reward"][:] = 0
        out["is_first"][:] = True
        out["is_last"][:] = False
        out["is_terminal"][:] = False
        return self._upload()

    def step(self, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """action: (N,) int64 indices (or (N, A) one-hot) when discrete, (N, A) in [-1, 1] when continuous."""
        self.step_async(action)
        return self.step_wait()

    def step_async(self, action: torch.Tensor) -> None:
        """Start a step (the action's one device-to-host copy happens here); step_wait() returns its result. With
        envpool the envs step on its threads in between, so the trainer runs its updates there."""
        if self.pending:
            raise RuntimeError("step_async called twice without step_wait")
        self._call("step", self.backend.send, self._host_action(action))
        self.pending = True

    def step_wait(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            raise RuntimeError("step_wait called without a step_async before it")
        obs, reward, terminated, truncated = self._call("step", self.backend.recv)
        self.pending = False
        first = self._done  # these envs ignored the action and returned a reset observation
        last = terminated | truncated
        out = self._staging.acquire()
        self._fill_obs(out, obs)
        np.copyto(out["reward"], reward, casting="unsafe")
        out["reward"][first] = 0
        if not np.isfinite(out["reward"]).all():  # as an observation: it would end as a NaN loss, not named
            i = int(np.flatnonzero(~np.isfinite(out["reward"]))[0])
            raise EnvDataError(f"{self.spec.env_id} (env {i}) returned a reward of {out['reward'][i]}, not finite")
        np.copyto(out["is_first"], first)
        np.copyto(out["is_last"], last & ~first)
        np.copyto(out["is_terminal"], terminated & ~first)
        # Host-side episode accounting: a reset step starts an episode; every other step is one transition.
        self._ep_return[first] = 0
        self._ep_length[first] = 0
        self._ep_return += out["reward"]  # already 0 on reset steps
        self._ep_length += ~first
        ended = out["is_last"]
        if ended.any():
            for i in np.flatnonzero(ended):
                self._episodes.append((float(self._ep_return[i]), int(self._ep_length[i])))
        self._done = ended.copy()
        return self._upload()

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise EnvError(f"{self.spec.env_id} raised {type(e).__name__} in {what}: {e}") from e

    def pop_episodes(self) -> list[tuple[float, int]]:
        """(return, length) of the episodes that ended since the last call; length counts env transitions."""
        episodes, self._episodes = self._episodes, []
        return episodes

    def render(self, n: int) -> list[np.ndarray]:
        """Frames (H, W, 3) uint8 of the first n envs as they are now; a Gymnasium env made with render_mode
        'rgb_array' only (envpool's envs do not render)."""
        if not hasattr(self.backend, "render"):
            raise ValueError(f"{self.spec.env_id} runs on envpool, which does not render; make it gymnasium_only")
        return self.backend.render(n)

    def close(self) -> None:
        self.backend.close()

    def _host_action(self, action: torch.Tensor) -> np.ndarray:
        n = self.num_envs
        if self.spec.discrete:  # (N, G * K) concatenated one-hots, or indices (N, G) or shaped as the space
            g = len(self.spec.act_classes)
            if action.shape == (n, self.spec.act_dim):
                action = action.unflatten(-1, (g, -1)).argmax(-1)
            shapes = ((n, g), (n, *self._act_shape))
            assert action.shape in shapes, f"discrete actions must be indices {shapes}, got {tuple(action.shape)}"
            index = action.detach().reshape(n, g).to("cpu", torch.int64).numpy() + self._act_offset  # one D2H copy
            return index.astype(self._act_dtype).reshape(n, *self._act_shape)
        assert action.shape == (n, self.spec.act_dim), (
            f"action must be (N, A)={(n, self.spec.act_dim)}, got {tuple(action.shape)}"
        )
        buf = self._act_buf
        np.copyto(buf, action.detach().to("cpu", torch.float32).numpy())
        np.clip(buf, -1.0, 1.0, out=buf)
        buf *= self._act_scale
        buf += self._act_shift
        if np.issubdtype(self._act_dtype, np.integer):  # an integer Box (Jumanji's Tetris): nearest, not truncated,
            np.rint(buf, out=buf)  # so every value in [low, high] has interior actions, not only the clipped bound
            np.clip(buf, *self._act_limits, out=buf)
        return buf.astype(self._act_dtype, copy=False).reshape(n, *self._act_shape)

    def _fill_obs(self, out: dict[str, np.ndarray], obs: Any) -> None:
        n = self.num_envs
        for f in self._fields:
            src = _leaf(obs, f.src)
            if f.key == "image":
                np.copyto(out["image"], src.transpose(0, 2, 3, 1) if f.chw else src[..., None] if f.gray else src)
            elif f.key == "discrete":
                index = np.reshape(src, (n, -1)).astype(np.int64, copy=False) - f.start  # uint64 - int64 is float
                np.copyto(out["discrete"][:, f.cols], index, casting="unsafe")
            else:
                np.copyto(out["vector"][:, f.cols], np.reshape(src, (n, -1)), casting="unsafe")
        # One check per kind over all fields (the field at fault is looked for only when one fails): a class out of
        # range would be an all-zero one-hot, a non-finite value (in float32, as training reads it) a NaN loss.
        # Box bounds are not checked, unlike the reference's CheckSpaces: envpool declares low 0 for DMC's signed
        # observations (walker's orientations) and float32's smallest normal for Box2D's, so such a check would
        # refuse the walker preset (random rollouts of 3,000 steps, session 20).
        if "discrete" in out and ((out["discrete"] < 0) | (out["discrete"] >= self._classes)).any():
            self._bad_obs(out, "discrete", lambda v, f: (v < 0) | (v >= f.classes), "")
        if "vector" in out and not np.isfinite(out["vector"]).all():
            self._bad_obs(out, "vector", lambda v, f: ~np.isfinite(v), "not finite (in float32)")

    def _check_shapes(self, obs: Any) -> None:
        """Each observation leaf holds one array per env, of its space's shape (at reset: they do not change)."""
        n = self.num_envs
        for f in self._fields:
            src = _leaf(obs, f.src)
            got = tuple(np.shape(src))
            if got[1:] != f.shape or got[:1] != (n,):
                per = got[0] // n if got and got[0] > n and got[0] % n == 0 else 0
                hint = f" ({per} per env: one per player? multi-agent envs are not supported)" if per else ""
                raise EnvDataError(
                    f"{self.spec.env_id} returned {_label(f.src)} of shape {got} for {n} envs, not {(n, *f.shape)} as "
                    f"its space says{hint}"
                )

    def _bad_obs(self, out: dict[str, np.ndarray], kind: str, is_bad, why: str) -> None:
        """Name the first env, observation and element at fault, its value and what the space allows."""
        for f in self._fields:
            values = out[kind][:, f.cols] if f.key == kind else None
            if values is None or not (bad := is_bad(values, f)).any():
                continue
            i, j = (int(x[0]) for x in np.nonzero(bad))
            at = f" at {[int(x) for x in np.unravel_index(j, f.shape)]}" if np.prod(f.shape, dtype=int) > 1 else ""
            if kind == "discrete":
                start, classes = (np.broadcast_to(x, values.shape[1:])[j] for x in (f.start, f.classes))
                value, allowed = values[i, j] + start, f"{start}..{start + classes - 1}"
                raise EnvDataError(
                    f"{self.spec.env_id} (env {i}) returned {_label(f.src)} with {value}{at}, outside its space "
                    f"({allowed})"
                )
            raise EnvDataError(f"{self.spec.env_id} (env {i}) returned {_label(f.src)} with {values[i, j]}{at}, {why}")

    def _upload(self) -> dict[str, torch.Tensor]:
        data = self._staging.upload()
        if self._resize:
            size = self.spec.obs["image"][0][:2]
            img = data["image"].permute(0, 3, 1, 2).float()  # (N, C, H, W)
            img = F.interpolate(img, size=size, mode="nearest-exact")  # the reference's ResizeImage: PIL's NEAREST
            data["image"] = img.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
        return data
