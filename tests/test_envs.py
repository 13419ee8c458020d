import dataclasses
import json
import sys
import textwrap

import envpool
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdreamer.envs import ATARI_DEFAULTS, env_seeds, make_env

# Raw envpool (the reference in several tests) builds float64 Box bounds that gymnasium warns about.
pytestmark = pytest.mark.filterwarnings("ignore:.*precision lowered")

FLAGS = ("is_first", "is_last", "is_terminal")

# A user's own environments, imported by gymnasium.make from "module:Id" — proof that the fallback handles them.
TINY_ENVS = textwrap.dedent(
    """
    import gymnasium as gym
    import numpy as np

    class Count(gym.Env):
        # obs [t, episode]; reward t after each step; action 1 terminates, a time limit of 5 truncates.
        observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t, self.episode = 0, getattr(self, "episode", -1) + 1
            return np.array([self.t, self.episode], np.float32), {}

        def step(self, action):
            self.t += 1
            obs = np.array([self.t, self.episode], np.float32)
            return obs, float(self.t), bool(action == 1), False, {}

    class Echo(gym.Env):
        # obs = the action it received, so the rescaling to the Box bounds is visible.
        check = True
        observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        action_space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32))

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            assert not self.check or self.action_space.contains(np.asarray(action)), action  # its dtype and bounds
            return np.asarray(action, np.float32).reshape(self.observation_space.shape), 0.0, False, False, {}

    class EchoWide(Echo):
        # VizDoom's action Box: bounds at float64's extremes, which mean none (its delta buttons take negative values
        # below the Box's tiny positive low).
        action_space = gym.spaces.Box(2.2250738585072014e-308, 1.7976931348623157e308, (2,), np.float64)
        check = False

    class EchoInt(Echo):
        # An integer Box, as Jumanji's Tetris-v0 has: Box(0, [3, 9], (2,), int32).
        action_space = gym.spaces.Box(0, np.array([3, 9]), (2,), np.int32)

    class EchoScalar(Echo):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        action_space = gym.spaces.Box(2, 5, (), np.int32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(1, np.float32), {}

    class EchoMulti(Echo):
        action_space = gym.spaces.MultiDiscrete([3, 5], start=[1, -2])

    class EchoCount(Echo):
        # An integer Box too wide for categoricals (envs.MAX_ACTION_CLASSES).
        action_space = gym.spaces.Box(0, 5000, (2,), np.int32)

    class EchoInt64(Echo):
        # An integer Box over all of int64: float64 rounds its max up past the type.
        action_space = gym.spaces.Box(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (2,), np.int64)

        def step(self, action):
            assert self.action_space.contains(np.asarray(action)), action
            return np.asarray(action, np.float64).astype(np.float32), 0.0, False, False, {}

    class EchoBool(Echo):
        action_space = gym.spaces.Box(0, 1, (2,), np.bool_)

    class EchoBinary(Echo):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        action_space = gym.spaces.MultiBinary(3)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(3, np.float32), {}

    class Clock(gym.Env):
        # An observation that is a function of the step count t (obs()), any action, no reward, no end.
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.obs(), {}

        def step(self, action):
            self.t += 1
            return self.obs(), 0.0, False, False, {}

    class Stacked(Clock):
        # Four stacked RGB frames channels first, as envpool's VizDoom gives them: (12, 20, 20); pixel (c, h, w) is
        # (c + 12 * (h + 20 * w) + t) % 256.
        observation_space = gym.spaces.Box(0, 255, (12, 20, 20), np.uint8)

        def obs(self):
            c, h, w = np.meshgrid(np.arange(12), np.arange(20), np.arange(20), indexing="ij")
            return ((c + 12 * (h + 20 * w) + self.t) % 256).astype(np.uint8)

    class Mixed(Clock):
        # Every kind of observation the encoder reads, each a function of the step count t; actions of two
        # categoricals of unequal counts (a padded policy).
        action_space = gym.spaces.MultiDiscrete([2, 3])
        observation_space = gym.spaces.Dict(
            {
                "cell": gym.spaces.Discrete(5, start=2),
                "dice": gym.spaces.MultiDiscrete([3, 4], start=[1, 5]),
                "one": gym.spaces.MultiDiscrete([4]),
                "grid": gym.spaces.Box(-np.inf, np.inf, (2, 2), np.float32),
                "bits": gym.spaces.MultiBinary(3),
                "frame": gym.spaces.Box(0, 255, (32, 32), np.uint8),
                "level": gym.spaces.Box(-1, 3, (2,), np.int32),
                "flag": gym.spaces.Box(0, 1, (1,), np.bool_),
                # An integer Box too wide to one-hot (200 x 256 classes): numbers, like a float Box.
                "mission": gym.spaces.Box(0, 255, (200,), np.uint8),
            }
        )

        def obs(self):
            t = self.t
            return {
                "cell": 2 + t % 5,
                "dice": np.array([1 + t % 3, 5 + (t + 1) % 4]),
                "one": np.array([t % 4]),
                "grid": np.full((2, 2), 0.5 * t, np.float32),
                "bits": np.array([t % 2, 1, 0], np.int8),
                "frame": np.full((32, 32), 10 * t % 256, np.uint8),
                "level": np.array([t % 5 - 1, 3], np.int32),
                "flag": np.array([t % 2 == 1]),
                "mission": np.full(200, t, np.uint8),
            }

    class Pair(gym.Env):
        # A Tuple observation: (Discrete(7), Box(2,)). Takes a render_mode, but renders nothing.
        observation_space = gym.spaces.Tuple((gym.spaces.Discrete(7), gym.spaces.Box(-1, 1, (2,), np.float32)))
        action_space = gym.spaces.Discrete(2)
        metadata = {"render_modes": ["rgb_array"]}

        def __init__(self, render_mode=None):
            self.render_mode = render_mode

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return (0, np.zeros(2, np.float32)), {}

        def step(self, action):
            self.t += 1
            return (self.t % 7, np.full(2, -0.5, np.float32)), 1.0, self.t >= 3, False, {}

    class Nested(Clock):
        # Dicts and Tuples inside each other, as envpool's Jumanji Maze-v0 and PacMan-v1 nest them.
        observation_space = gym.spaces.Dict(
            {
                "pos": gym.spaces.Dict({"row": gym.spaces.Discrete(4), "col": gym.spaces.Discrete(6)}),
                "pair": gym.spaces.Tuple(
                    (gym.spaces.Box(-9, 9, (2,), np.float32), gym.spaces.Dict({"bit": gym.spaces.MultiBinary(1)}))
                ),
            }
        )

        def obs(self):
            t = self.t
            return {
                "pos": {"row": t % 4, "col": (t + 3) % 6},
                "pair": (np.array([t, -t], np.float32), {"bit": np.array([t % 2], np.int8)}),
            }

    class Bad(Clock):
        # Misbehaves from step `at` on: "raise" in step, "nan" in a vector observation, "disc" a Discrete(3)
        # observation of 5.
        observation_space = gym.spaces.Dict(
            {
                "x": gym.spaces.Box(-1, 1, (2,), np.float32),
                "k": gym.spaces.Discrete(3),
                "g": gym.spaces.Box(0, 2, (10, 10), np.int8),
            }
        )

        def __init__(self, how="raise", at=3):
            self.how, self.at = how, at

        def obs(self):
            bad = self.t >= self.at
            grid = np.zeros((10, 10), np.int8)
            grid[5, 5] = 7 if bad and self.how == "grid" else 1
            return {"x": np.array([np.nan if bad and self.how == "nan" else 0.5, 0.0], np.float32),
                    "k": 5 if bad and self.how == "disc" else 1, "g": grid}

        def step(self, action):
            if self.t + 1 >= self.at and self.how == "raise":
                raise KeyError("level 3 is missing")
            obs, _, terminated, truncated, info = super().step(action)
            reward = np.inf if self.t >= self.at and self.how == "reward" else 0.0
            return obs, reward, terminated, truncated, info

    class Spaceless(gym.Env):
        def reset(self, *, seed=None, options=None):
            return np.zeros(2, np.float32), {}

    class Huge(Clock):
        # A Discrete observation too wide to one-hot (2^31 values would not fit int32 indices either).
        observation_space = gym.spaces.Dict({"k": gym.spaces.Discrete(2**31), "x": gym.spaces.Box(-1, 1, (2,))})

    class BrokenInit(Clock):
        observation_space = gym.spaces.Discrete(3)

        def __init__(self):
            self.size = None.size  # a bug in the env's own code

    class BigInt(Clock):
        # An integer Box far from zero: its 4 classes must be counted exactly (float64 cannot tell 2^60 from 2^60 + 3).
        observation_space = gym.spaces.Box(2**60, 2**60 + 3, (2,), np.uint64)

        def obs(self):
            return np.array([2**60 + 3, 2**60 + self.t % 4], np.uint64)

    gym.register("FdTinyBrokenInit-v0", entry_point=BrokenInit)
    gym.register("FdTinyBigInt-v0", entry_point=BigInt)
    gym.register("FdTinySpaceless-v0", entry_point=Spaceless)
    gym.register("FdTinyHuge-v0", entry_point=Huge)
    gym.register("FdTinyNested-v0", entry_point=Nested, max_episode_steps=50)
    gym.register("FdTinyBad-v0", entry_point=Bad)
    gym.register("FdTinyCount-v0", entry_point=Count, max_episode_steps=5)
    gym.register("FdTinyMixed-v0", entry_point=Mixed, max_episode_steps=50)
    gym.register("FdTinyPair-v0", entry_point=Pair)
    gym.register("FdTinyEcho-v0", entry_point=Echo)
    gym.register("FdTinyEchoWide-v0", entry_point=EchoWide)
    gym.register("FdTinyEchoInt-v0", entry_point=EchoInt)
    gym.register("FdTinyEchoMulti-v0", entry_point=EchoMulti)
    gym.register("FdTinyEchoScalar-v0", entry_point=EchoScalar)
    gym.register("FdTinyEchoCount-v0", entry_point=EchoCount)
    gym.register("FdTinyEchoInt64-v0", entry_point=EchoInt64)
    gym.register("FdTinyEchoBool-v0", entry_point=EchoBool)
    gym.register("FdTinyEchoBinary-v0", entry_point=EchoBinary)
    gym.register("FdTinyStacked-v0", entry_point=Stacked, max_episode_steps=50)
    """
)


@pytest.fixture(scope="module")
def tiny_envs(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_envs")
    (path / "fd_tiny_envs.py").write_text(TINY_ENVS)
    sys.path.insert(0, str(path))
    yield "fd_tiny_envs"
    sys.path.remove(str(path))


def _rollout(env, steps: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Reset, then `steps` random actions. Returns outputs stacked to (T+1, N, ...) and the actions taken."""
    gen = torch.Generator().manual_seed(seed)
    outs, actions = [env.reset()], []
    for _ in range(steps):
        if env.spec.discrete and len(env.spec.act_classes) > 1:
            act = torch.stack([torch.randint(c, (env.num_envs,), generator=gen) for c in env.spec.act_classes], -1)
        elif env.spec.discrete:
            act = torch.randint(env.spec.act_dim, (env.num_envs,), generator=gen)
        else:
            act = torch.rand(env.num_envs, env.spec.act_dim, generator=gen) * 2 - 1
        actions.append(act)
        outs.append(env.step(act))
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}, actions


def _check_flags(out: dict[str, torch.Tensor], episodes: list[tuple[float, int]], limit: int) -> tuple[int, int]:
    """The DreamerV3 flag contract, and episode accounting against a manual sum. Returns (#terminated, #truncated)."""
    first, last, terminal, reward = out["is_first"], out["is_last"], out["is_terminal"], out["reward"]
    for key in FLAGS:
        assert out[key].dtype == torch.bool
    assert reward.dtype == torch.float32
    assert first[0].all() and (reward[0] == 0).all(), "reset gives is_first and reward 0"
    assert not (terminal & ~last).any(), "is_terminal implies is_last"
    assert not (first & last).any()
    assert torch.equal(first[1:], last[:-1]), "the step after an episode's end is the auto-reset step"
    assert (reward[first] == 0).all(), "the auto-reset step has reward 0"
    expected, ret, length, kinds = [], np.zeros(first.shape[1]), np.zeros(first.shape[1], int), [0, 0]
    for t in range(first.shape[0]):
        for i in range(first.shape[1]):
            if first[t, i]:
                ret[i], length[i] = 0.0, 0
                continue
            ret[i] += float(reward[t, i])
            length[i] += 1
            if last[t, i]:
                expected.append((ret[i], length[i]))
                truncated = not terminal[t, i]
                kinds[truncated] += 1
                assert length[i] <= limit
                if truncated:
                    assert length[i] == limit, "truncation only at the time limit"
    assert [n for _, n in episodes] == [n for _, n in expected]
    np.testing.assert_allclose([r for r, _ in episodes], [r for r, _ in expected], rtol=1e-5)
    return kinds[0], kinds[1]


def test_envpool_cartpole_flags_terminal_vs_truncated_and_autoreset():
    limit, n = 12, 4
    env = make_env("CartPole-v1", n, seed=3, device="cpu", env_kwargs={"max_episode_steps": limit})
    out, actions = _rollout(env, 80)
    terminated, truncated = _check_flags(out, env.pop_episodes(), limit)
    assert terminated > 0 and truncated > 0, "the rollout must exercise both endings"
    assert env.pop_episodes() == []
    # The same seed and actions on raw envpool: our flags are its flags, and its auto-reset step is elapsed_step 0.
    pool = envpool.make(
        "CartPole-v1", env_type="gymnasium", num_envs=n, env_seed=env_seeds(3, n), max_episode_steps=limit
    )
    obs, info = pool.reset()
    assert np.array_equal(out["vector"][0].numpy(), obs)
    for t, act in enumerate(actions, start=1):
        obs, reward, term, trunc, info = pool.step(act.numpy())
        assert np.array_equal(out["vector"][t].numpy(), obs)
        assert np.array_equal(out["is_first"][t].numpy(), info["elapsed_step"] == 0)
        assert np.array_equal(out["is_last"][t].numpy(), term | trunc)
        assert np.array_equal(out["is_terminal"][t].numpy(), term)
        assert np.array_equal(out["reward"][t].numpy(), reward)
    env.close()
    pool.close()


def test_envpool_pendulum_only_truncates_and_sums_returns():
    env = make_env("Pendulum-v1", 3, seed=0, device="cpu", env_kwargs={"max_episode_steps": 7})
    out, _ = _rollout(env, 31)  # 4 episodes per env: 7 steps each plus an auto-reset step between them
    episodes = env.pop_episodes()
    terminated, truncated = _check_flags(out, episodes, 7)
    assert terminated == 0 and truncated == 3 * 4 and all(n == 7 for _, n in episodes)
    assert all(r < 0 for r, _ in episodes), "Pendulum's rewards are negative costs"
    env.close()


def test_gymnasium_fallback_user_module_env_has_the_same_flags(tiny_envs):
    env_id = f"{tiny_envs}:FdTinyCount-v0"
    assert env_id.split(":")[1] not in envpool.list_all_envs()
    env = make_env(env_id, 3, seed=0, device="cpu")
    assert env.spec.env_id == env_id and env.spec.discrete and env.spec.act_dim == 2
    assert env.spec.obs == {"vector": ((2,), torch.float32)}
    gen = torch.Generator().manual_seed(0)
    outs, actions = [env.reset()], []
    for _ in range(40):
        actions.append((torch.rand(3, generator=gen) < 0.25).long())  # mostly 0, so the time limit is reached too
        outs.append(env.step(actions[-1]))
    out = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    terminated, truncated = _check_flags(out, env.pop_episodes(), 5)
    assert terminated > 0 and truncated > 0
    t, episode = out["vector"][..., 0], out["vector"][..., 1]
    assert (t[out["is_first"]] == 0).all(), "the auto-reset step returns the next episode's first observation"
    assert torch.equal(out["reward"][~out["is_first"]], t[~out["is_first"]])
    new_episode = out["is_first"][1:]
    assert torch.equal(episode[1:][new_episode], episode[:-1][new_episode] + 1)
    # The action on an auto-reset step is ignored: the env did not step, so t stays 0 even for action 1.
    acts = torch.stack(actions)  # (T, N)
    assert (acts[out["is_first"][1:]] == 1).any()
    env.close()


def test_continuous_actions_are_clipped_and_rescaled_to_the_box(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyEcho-v0", 3, seed=0, device="cpu")
    assert not env.spec.discrete and env.spec.act_dim == 2
    env.reset()
    policy = torch.tensor([[-1.0, 1.0], [0.0, 0.5], [5.0, -3.0]])
    out = env.step(policy)
    expected = torch.tensor([[-2.0, 10.0], [0.0, 7.5], [2.0, 0.0]])  # low + (clip(a) + 1) / 2 * (high - low)
    torch.testing.assert_close(out["vector"], expected)
    assert torch.equal(policy, torch.tensor([[-1.0, 1.0], [0.0, 0.5], [5.0, -3.0]])), "the caller's tensor is untouched"
    env.close()


def test_action_bounds_at_float64s_extremes_are_no_bounds(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyEchoWide-v0", 2, seed=0, device="cpu")
    env.reset()
    out = env.step(torch.tensor([[-1.0, 0.25], [3.0, -0.5]]))
    torch.testing.assert_close(out["vector"], torch.tensor([[-1.0, 0.25], [1.0, -0.5]]))  # clipped, not rescaled
    env.close()


@pytest.mark.parametrize(
    "env_name, classes, offset",
    [
        ("FdTinyEchoInt-v0", (4, 10), (0, 0)),
        ("FdTinyEchoMulti-v0", (3, 5), (1, -2)),
        ("FdTinyEchoScalar-v0", (4,), (2,)),
        ("FdTinyEchoBool-v0", (2, 2), (0, 0)),  # False and True: it was continuous, cast to nearly always True
        ("FdTinyEchoBinary-v0", (2, 2, 2), (0, 0, 0)),
    ],
)
def test_multi_discrete_and_integer_box_actions_are_groups_of_one_hots(tiny_envs, env_name, classes, offset):
    env = make_env(f"{tiny_envs}:{env_name}", 3, seed=0, device="cpu")
    k, g = max(classes), len(classes)
    assert env.spec.discrete and env.spec.act_classes == classes and env.spec.act_dim == g * k
    env.reset()
    index = torch.tensor([[0, 0, 1], [classes[0] - 1, classes[-1] - 1, 0], [1, min(2, classes[1 % g] - 1), 1]])[:, :g]
    expected = (index + torch.tensor(offset)).float()
    onehot = torch.cat([F.one_hot(index[:, i], k) for i in range(g)], -1).float()  # as the policy gives them
    torch.testing.assert_close(env.step(onehot)["vector"], expected)  # the first value added
    if g > 1:
        torch.testing.assert_close(env.step(index)["vector"], expected)  # or as indices
    env.close()


def test_action_groups_of_multi_discrete_and_integer_box_spaces():
    from gymnasium.spaces import Box, MultiDiscrete

    from fastdreamer.envs import MAX_ACTION_CLASSES, _action_groups

    nvec, start = _action_groups(MultiDiscrete([[2, 3], [4, 5]], start=[[0, 1], [2, -3]]))
    assert nvec.tolist() == [[2, 3], [4, 5]] and start.tolist() == [[0, 1], [2, -3]]
    nvec, start = _action_groups(Box(-1, MAX_ACTION_CLASSES - 2, (3,), np.int16))  # exactly the most values
    assert nvec.tolist() == [MAX_ACTION_CLASSES] * 3 and start.tolist() == [-1] * 3
    assert _action_groups(Box(0, MAX_ACTION_CLASSES, (3,), np.int32)) is None  # one more: continuous
    i64 = np.iinfo(np.int64)
    assert _action_groups(Box(i64.min, i64.max, (2,), np.int64)) is None  # its span does not wrap to 0
    assert _action_groups(Box(-1.0, 1.0, (2,), np.float32)) is None


def test_integer_box_actions_too_wide_for_categoricals_take_the_nearest_value(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyEchoCount-v0", 3, seed=0, device="cpu")
    assert not env.spec.discrete and env.spec.act_dim == 2
    env.reset()
    out = env.step(torch.tensor([[-1.0, 1.0], [0.1001, 0.0999], [1.0, -0.5]]))  # 2500 + 2500 a, to the nearest
    torch.testing.assert_close(out["vector"], torch.tensor([[0.0, 5000.0], [2750.0, 2750.0], [5000.0, 1250.0]]))
    env.close()


def test_integer_box_actions_over_all_of_int64_do_not_wrap(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyEchoInt64-v0", 2, seed=0, device="cpu")
    assert not env.spec.discrete
    env.reset()
    out = env.step(torch.tensor([[1.0, -1.0], [2.0, 0.0]]))  # the top end went past int64's max and wrapped to its min
    assert (out["vector"][:, 0] > 9.2e18).all() and out["vector"][0, 1] < -9.2e18 and out["vector"][1, 1].abs() < 1e4
    env.close()


def test_channels_first_images_of_any_channel_count_are_read_as_such(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyStacked-v0", 2, seed=0, device="cpu", image_size=20)
    assert env.spec.obs == {"image": ((20, 20, 12), torch.uint8)}  # at the image size: not resized
    out, _ = _rollout(env, 2)
    c, h, w = np.meshgrid(np.arange(12), np.arange(20), np.arange(20), indexing="ij")
    for t in range(3):
        frame = ((c + 12 * (h + 20 * w) + t) % 256).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(out["image"][t, 0].numpy(), frame) and np.array_equal(out["image"][t, 1].numpy(), frame)
    env.close()


def test_discrete_actions_accept_one_hot():
    env = make_env("CartPole-v1", 2, seed=0, device="cpu")
    env.reset()
    a = env.step(torch.tensor([1, 0]))
    b = make_env("CartPole-v1", 2, seed=0, device="cpu")
    b.reset()
    torch.testing.assert_close(b.step(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))["vector"], a["vector"])


def test_an_envpool_env_that_cannot_be_built_is_one_clear_line(monkeypatch):
    # envpool's Sudoku-v0 wants an asset some wheels lack, its Procgen a system Qt: a RuntimeError or ImportError.
    def broken(*args, **kwargs):
        raise RuntimeError("failed to open Sudoku database: /x/10000_mixed_puzzles.npy\nmore detail")

    monkeypatch.setattr(envpool, "make", broken)
    with pytest.raises(ValueError, match=r"^envpool could not make CartPole-v1: failed to open Sudoku database") as e:
        make_env("CartPole-v1", 1, seed=0, device="cpu")
    assert "\n" not in str(e.value)


def test_unknown_env_id_suggests_close_names():
    with pytest.raises(ValueError, match=r"^unknown environment 'CartPol-v1'; did you mean: CartPole-v1, CartPole-v0"):
        make_env("CartPol-v1", 1, seed=0, device="cpu")


@pytest.mark.parametrize(
    "env_id, message",
    [  # real envpool envs whose observations the encoder cannot read: one line naming the space
        ("TicTacToe-v1", r"^the observation MultiBinary\(\(3, 3, 2\)\) is neither a uint8 image"),
        ("Snake-v1", r"^observation 'grid' Box\(0\.0, 1\.0, \(12, 12, 5\), float32\) is neither a uint8 image"),
    ],
)
def test_observations_of_rank_3_that_are_not_images_are_one_clear_line(env_id, message):
    if env_id not in envpool.list_all_envs():
        pytest.skip(f"this envpool build has no {env_id}")
    with pytest.raises(ValueError, match=message) as e:
        make_env(env_id, 1, seed=0, device="cpu")
    assert "\n" not in str(e.value)


def test_pong_is_64x64_gray_hwc_with_the_reference_settings():
    env = make_env("Pong-v5", 2, seed=0, device="cpu")
    assert env.spec.obs == {"image": ((64, 64, 1), torch.uint8)} and env.spec.discrete and env.spec.act_dim == 18
    out, _ = _rollout(env, 3)
    assert out["image"].shape == (4, 2, 64, 64, 1) and out["image"].float().std() > 0
    pool = envpool.make(
        "Pong-v5",
        env_type="gymnasium",
        num_envs=2,
        env_seed=env_seeds(0, 2),
        img_height=64,
        img_width=64,
        **ATARI_DEFAULTS,
    )
    obs, _ = pool.reset()  # (N, C, H, W)
    assert np.array_equal(out["image"][0].numpy(), obs.transpose(0, 2, 3, 1))
    env.close()
    pool.close()


def test_pong_at_the_reference_mains_96x96():
    env = make_env("Pong-v5", 2, seed=0, device="cpu", image_size=96)
    assert env.spec.obs == {"image": ((96, 96, 1), torch.uint8)}
    out, _ = _rollout(env, 2)
    assert out["image"].shape == (3, 2, 96, 96, 1) and out["image"].float().std() > 0
    env.close()


def test_carracing_is_resized_to_64x64x3():
    env = make_env("CarRacing-v3", 2, seed=0, device="cpu")
    assert env.spec.obs == {"image": ((64, 64, 3), torch.uint8)} and not env.spec.discrete and env.spec.act_dim == 3
    out, _ = _rollout(env, 2)
    assert out["image"].shape == (3, 2, 64, 64, 3) and out["image"].dtype == torch.uint8
    pool = envpool.make("CarRacing-v3", env_type="gymnasium", num_envs=2, env_seed=env_seeds(0, 2))
    obs, _ = pool.reset()  # (N, 96, 96, 3)
    # The reference's ResizeImage: PIL's NEAREST.
    ref = np.stack([np.asarray(Image.fromarray(o).resize((64, 64), Image.NEAREST)) for o in obs])
    assert torch.equal(out["image"][0], torch.from_numpy(ref))
    env.close()
    pool.close()


# envpool's dm_control family needs MuJoCo; PyPI's envpool has it (CI runs these), the carried GPU bundle does not.
needs_dmc = pytest.mark.skipif(
    "WalkerWalk-v1" not in envpool.list_all_envs(), reason="this envpool build has no dm_control envs"
)


@needs_dmc
def test_walker_walk_flattens_proprio_in_sorted_key_order():
    env = make_env("WalkerWalk-v1", 2, seed=0, device="cpu")
    assert env.spec.obs == {"vector": ((24,), torch.float32)} and not env.spec.discrete and env.spec.act_dim == 6
    out, _ = _rollout(env, 2)
    assert out["vector"].shape == (3, 2, 24) and out["vector"].dtype == torch.float32
    pool = envpool.make("WalkerWalk-v1", env_type="gymnasium", num_envs=2, env_seed=env_seeds(0, 2))
    obs, _ = pool.reset()
    flat = np.concatenate([obs[k].reshape(2, -1) for k in ("height", "orientations", "velocity")], axis=1)
    np.testing.assert_allclose(out["vector"][0].numpy(), flat.astype(np.float32))
    env.close()
    pool.close()


def test_outputs_are_fresh_tensors_not_views_of_a_reused_buffer():
    env = make_env("CartPole-v1", 2, seed=0, device="cpu")
    first = env.reset()
    kept = {k: v.clone() for k, v in first.items()}
    for _ in range(3):
        env.step(torch.zeros(2, dtype=torch.int64))
    for k, value in kept.items():
        assert torch.equal(first[k], value)


@needs_dmc
def test_dmc_auto_reset_step_has_reward_zero_although_envpool_repeats_the_last_reward():
    # envpool 1.2.5's dm_control envs return the previous step's reward on the auto-reset step (CartPole returns 0).
    env = make_env("WalkerWalk-v1", 2, seed=0, device="cpu", env_kwargs={"max_episode_steps": 3})
    out, actions = _rollout(env, 8)
    _check_flags(out, env.pop_episodes(), 3)
    assert out["is_first"][4].all() and not out["is_terminal"].any(), "DMC's time limit is a truncation"
    pool = envpool.make(
        "WalkerWalk-v1", env_type="gymnasium", num_envs=2, env_seed=env_seeds(0, 2), max_episode_steps=3
    )
    pool.reset()
    raw = [pool.step(act.numpy().astype(np.float64))[1] for act in actions]
    assert (raw[3] != 0).all(), "if envpool stops repeating the reward, this test no longer guards anything"
    assert (out["reward"][4] == 0).all()
    env.close()
    pool.close()


@pytest.mark.parametrize("env_id", ["Pong-v5", "fd_tiny_envs:FdTinyCount-v0"])
def test_step_async_then_wait_equals_step_while_the_caller_works(env_id, tiny_envs):
    # The trainer sends a step, runs its updates, then waits: the same outputs as a blocking step, in env order.
    kwargs = {"env_kwargs": {"max_episode_steps": 20}} if env_id == "Pong-v5" else {}
    sync, split = (make_env(env_id, 3, seed=4, device="cpu", **kwargs) for _ in range(2))
    want, actions = _rollout(sync, 30, seed=1)
    got = [split.reset()]
    for act in actions:
        split.step_async(act)
        assert split.pending
        torch.randn(256, 256) @ torch.randn(256, 256)  # the caller's work while the envs step
        got.append(split.step_wait())
        assert not split.pending
    for key, value in want.items():
        assert torch.equal(torch.stack([g[key] for g in got]), value), key
    assert split.pop_episodes() == sync.pop_episodes() != []
    sync.close()
    split.close()


def test_step_async_and_wait_refuse_to_run_out_of_turn():
    env = make_env("CartPole-v1", 2, seed=0, device="cpu")
    env.reset()
    with pytest.raises(RuntimeError, match="without a step_async"):
        env.step_wait()
    env.step_async(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="twice"):
        env.step_async(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="in flight"):
        env.reset()
    env.step_wait()
    env.close()


def test_every_kind_of_observation_lands_in_its_field(tiny_envs):
    """Integer-valued spaces as class indices (start or low subtracted), as the reference reads them: Discrete,
    MultiDiscrete, MultiBinary, integer and bool Box; float Boxes of rank <= 2 and an integer Box too wide to one-hot
    flattened into the vector; keys in sorted order; a 2-D uint8 array as a one-channel image (resized like any
    image)."""
    env = make_env(f"{tiny_envs}:FdTinyMixed-v0", 2, 0, "cpu")
    assert env.spec.obs == {
        "discrete": ((10,), torch.int32),
        "vector": ((204,), torch.float32),
        "image": ((64, 64, 1), torch.uint8),
    }
    # bits, cell, dice, flag, level (Box(-1, 3): 5 values), one
    assert env.spec.obs_classes == (2, 2, 2, 5, 3, 4, 2, 5, 5, 4) and env.spec.classes == 5
    out, _ = _rollout(env, 6)
    env.close()
    for t in range(7):
        disc = [t % 2, 1, 0, t % 5, t % 3, (t + 1) % 4, t % 2, t % 5, 4, t % 4]
        assert out["discrete"][t].tolist() == [disc] * 2, t
        assert out["vector"][t].tolist() == [[*[0.5 * t] * 4, *[t] * 200]] * 2, t  # grid, then mission
        assert (out["image"][t] == 10 * t % 256).all(), t


def test_a_tuple_observation_is_read_by_position(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyPair-v0", 1, 0, "cpu")
    assert env.spec.obs == {"discrete": ((1,), torch.int32), "vector": ((2,), torch.float32)}
    assert env.spec.classes == 7
    out, _ = _rollout(env, 2)
    env.close()
    assert out["discrete"][:, 0, 0].tolist() == [0, 1, 2] and out["vector"][2, 0].tolist() == [-0.5, -0.5]


def test_nested_dict_and_tuple_observations_are_read_leaf_by_leaf(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyNested-v0", 2, 0, "cpu")
    assert env.spec.obs == {"discrete": ((3,), torch.int32), "vector": ((2,), torch.float32)}
    assert env.spec.classes == 6 and env.spec.obs_classes == (2, 6, 4)
    out, _ = _rollout(env, 5)
    env.close()
    for t in range(6):  # sorted keys at every level, Tuple items by position: pair/0, pair/1/bit, pos/col, pos/row
        assert out["discrete"][t].tolist() == [[t % 2, (t + 3) % 6, t % 4]] * 2, t
        assert out["vector"][t].tolist() == [[t, -t]] * 2, t
    if "Maze-v0" in envpool.list_all_envs():
        # envpool's own nested Dict: the action mask and the 10 x 10 walls (MultiBinary) as two classes each, the
        # agent's and the target's positions and the step count (Discrete) as their own counts; all categorical.
        maze = make_env("Maze-v0", 1, 0, "cpu")
        assert maze.spec.obs == {"discrete": ((109,), torch.int32)}
        assert maze.spec.obs_classes == (2,) * 4 + (10, 10, 101, 10, 10) + (2,) * 100
        maze.close()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_an_agent_trains_reports_and_evaluates_on_every_kind_of_observation(tiny_envs, tmp_path, mode):
    import json

    from test_train import tiny_config

    from fastdreamer.eval import evaluate
    from fastdreamer.train import train

    cfg = tiny_config(
        tmp_path, env=f"{tiny_envs}:FdTinyMixed-v0", steps=40, mode=mode, precision="fp32", report_every=1e9
    )  # one report: the one at the end
    trainer = train(cfg, log=lambda *_: None)
    actions = trainer.replay.data["action"][:, : trainer.replay.count].unflatten(-1, (2, 3))  # MultiDiscrete([2, 3])
    assert trainer.agent.act_counts.tolist() == [2, 3]
    assert (actions.sum(-1) == 1).all() and (actions[..., 0, 2] == 0).all(), "one-hots, never the padding"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss/discrete" in r][-1]
    assert all(np.isfinite(losses[f"loss/{k}"]) for k in ("discrete", "vector", "image")), losses
    (report,) = [r for r in rows if "openloop/discrete_loss" in r]
    assert np.isfinite(report["openloop/discrete_loss"]) and np.isfinite(report["openloop/image_loss"])
    result = evaluate(trainer.agent, cfg.env, cfg, 2, torch.device("cpu"), max_steps=60)
    assert result["lengths"] == [50, 50]  # the time limit


def test_videos_of_envs_that_cannot_be_filmed_alike_are_one_clear_line(tiny_envs):
    from fastdreamer.config import Config
    from fastdreamer.eval import check_video

    for name in ("FdTinyCount-v0", "FdTinyPair-v0"):  # takes no render_mode; takes one, renders nothing
        with pytest.raises(ValueError, match="renders through Gymnasium, which failed") as e:
            check_video(f"{tiny_envs}:{name}", Config())
        assert "\n" not in str(e.value), name
    env = make_env("CartPole-v1", 1, 0, "cpu")  # envpool's
    spec = env.spec
    env.close()
    check_video("CartPole-v1", Config(), spec)  # Gymnasium's renders alike
    other = dataclasses.replace(spec, obs={"vector": ((5,), torch.float32)})
    with pytest.raises(ValueError, match="the agent was trained on"):
        check_video("CartPole-v1", Config(), other)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Gymnasium's passive checker sees the bad observations too
def test_an_env_that_fails_or_returns_what_its_space_does_not_hold_is_named(tiny_envs):
    """A NaN or an out-of-range class is refused as it arrives (the reference's CheckSpaces), in one line naming the
    env, the env index and the observation; an env that raises is an EnvError from the env's own exception."""
    from fastdreamer.envs import EnvDataError, EnvError

    cases = [
        ("nan", EnvDataError, "(env 0) returned observation 'x' with nan at [0], not finite (in float32)"),
        ("disc", EnvDataError, "(env 0) returned observation 'k' with 5, outside its space (0..2)"),
        ("grid", EnvDataError, "(env 0) returned observation 'g' with 7 at [5, 5], outside its space (0..2)"),
        ("reward", EnvDataError, "(env 0) returned a reward of inf, not finite"),
        ("raise", EnvError, "FdTinyBad-v0 raised KeyError in step: 'level 3 is missing'"),
    ]
    for how, error, message in cases:
        env = make_env(f"{tiny_envs}:FdTinyBad-v0", 2, 0, "cpu", env_kwargs={"how": how, "at": 2})
        env.reset()
        env.step(torch.zeros(2, dtype=torch.int64))
        with pytest.raises(error) as e:
            env.step(torch.zeros(2, dtype=torch.int64))
        assert message in str(e.value) and "\n" not in str(e.value), (how, str(e.value))
        if error is EnvError:
            assert isinstance(e.value.__cause__, KeyError)  # the env's traceback is kept
        env.close()


@pytest.mark.parametrize(
    "env_name, message",
    [
        ("FdTinySpaceless-v0", r"FdTinySpaceless-v0 cannot be made: The environment must specify an action space"),
        (
            "FdTinyHuge-v0",
            r"^observation 'k' has 2,147,483,648 classes: the discrete observations one-hot to "
            r"2,147,483,648 encoder inputs, more than this trainer takes \(65,536\)",
        ),
    ],
)
def test_an_env_without_spaces_or_with_too_many_observation_classes_is_one_clear_line(tiny_envs, env_name, message):
    with pytest.raises(ValueError, match=message) as e:
        make_env(f"{tiny_envs}:{env_name}", 1, 0, "cpu")
    assert "\n" not in str(e.value)


def test_integer_boxes_are_numbers_where_all_categoricals_would_not_fit_and_discrete_spaces_of_any_rank_are_read():
    from gymnasium import spaces

    from fastdreamer.envs import MAX_OBS_ONE_HOT, _layout_obs

    def layout(**leaves):
        fields, _, final, classes = _layout_obs(spaces.Dict(leaves), 64)
        return {f.key for f in fields}, final, classes

    byte = spaces.Box(0, 255, (100,), np.uint8)  # 25,600 one-hot inputs each: two fit, three do not
    assert layout(a=byte, b=byte)[1] == {"discrete": ((200,), torch.int32)}
    keys, final, classes = layout(a=byte, b=byte, c=byte, d=spaces.Discrete(9))
    assert final == {"discrete": ((1,), torch.int32), "vector": ((300,), torch.float32)} and classes.tolist() == [9]
    cube = spaces.MultiDiscrete(np.full((2, 2, 2), 3))  # rank 3: eight categoricals, as before integer Boxes were
    assert layout(m=cube)[1] == {"discrete": ((8,), torch.int32)}
    huge = spaces.Discrete(2**62)  # two of them sum past int64: still refused
    with pytest.raises(ValueError, match=f"more than this trainer takes \\({MAX_OBS_ONE_HOT:,}\\)"):
        layout(a=huge, b=huge)
    image = spaces.Box(0, 255, (16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="^more than one image observation in Dict") as e:
        layout(a=image, b=image, m=spaces.MultiDiscrete(np.full((2, 2), 3)))  # its nvec prints over two lines
    assert "\n" not in str(e.value)


def test_an_integer_box_far_from_zero_counts_its_classes_exactly(tiny_envs):
    env = make_env(f"{tiny_envs}:FdTinyBigInt-v0", 1, 0, "cpu")
    assert env.spec.obs_classes == (4, 4)
    out, _ = _rollout(env, 5)
    env.close()
    assert out["discrete"][:, 0].tolist() == [[3, t % 4] for t in range(6)]


def test_a_bug_in_a_user_env_s_constructor_keeps_its_traceback(tiny_envs):
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'size'"):
        make_env(f"{tiny_envs}:FdTinyBrokenInit-v0", 1, 0, "cpu")


def test_a_multi_player_env_is_one_line_at_reset():
    """envpool's two-player games return one observation per player: (2N, ...) for N envs."""
    from fastdreamer.envs import EnvDataError

    if "KuhnPoker-v1" not in envpool.list_all_envs():
        pytest.skip("this envpool build has no KuhnPoker-v1")
    env = make_env("KuhnPoker-v1", 2, 0, "cpu")
    with pytest.raises(
        EnvDataError,
        match=r"^KuhnPoker-v1 returned the observation of shape \(4, 7\) for 2 envs, "
        r"not \(2, 7\) as its space says \(2 per env: one per player\? multi-agent envs are not",
    ):
        env.reset()
    env.close()


def test_an_env_that_fails_mid_run_leaves_a_checkpoint_of_the_last_update_boundary(tiny_envs, tmp_path):
    from test_train import tiny_config

    from fastdreamer import checkpoint
    from fastdreamer.envs import EnvError
    from fastdreamer.train import train

    lines = []
    cfg = tiny_config(
        tmp_path, env=f"{tiny_envs}:FdTinyBad-v0", env_kwargs='{"how": "raise", "at": 30}', steps=100, log_every=1e9
    )  # no log line before the failure: the one it writes is the only one
    with pytest.raises(EnvError, match="raised KeyError in step"):
        train(cfg, log=lines.append)
    path = tmp_path / "run" / "checkpoint.pt"
    assert any(line.startswith(f"fastdreamer: the env failed; checkpoint {path}") for line in lines), lines
    state = checkpoint.load(path)
    # What the run did since its last log line is logged before the checkpoint (a resume cannot log it later).
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == state["counters"]["env_steps"] and "loss/dyn" in rows[0], rows
    # 2 envs, 30 steps sent, as a checkpoint at that update boundary counts them (the 30th is the one that raised:
    # in flight, not part of the state, as for an interrupted run).
    assert state["counters"]["env_steps"] == 2 * 30 and state["counters"]["updates"] > 0


@pytest.mark.parametrize("gymnasium_only", [False, True], ids=["envpool", "gymnasium"])
def test_runs_of_adjacent_seeds_share_no_env_stream(gymnasium_only):
    """Env i of a run of seed s is seeded by a hash of (s, i), as the reference's; seed + i (what one seed gives
    in envpool and Gymnasium) made runs of seeds s and s + 1 share all envs but one."""
    from fastdreamer.envs import env_seeds

    starts = {}
    for seed in (1, 2):
        env = make_env("CartPole-v1", 4, seed, "cpu", gymnasium_only=gymnasium_only)
        starts[seed] = env.reset()["vector"]
        env.close()
    assert not any(torch.equal(a, b) for a in starts[1] for b in starts[2])
    assert len(set(env_seeds(1, 4)) | set(env_seeds(2, 4))) == 8 and all(0 <= x < 2**31 for x in env_seeds(1, 4))
    # The same seed is the same run (test_video checks that env i starts as Gymnasium's env seeded env_seeds(s, n)[i]).
    env = make_env("CartPole-v1", 4, 1, "cpu", gymnasium_only=gymnasium_only)
    assert torch.equal(env.reset()["vector"], starts[1])
    env.close()
