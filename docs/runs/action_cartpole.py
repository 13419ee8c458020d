"""CartPole with other discrete action spaces, for the learning check of MultiBinary and MultiDiscrete actions.

`python -m fastdreamer.train --env docs.runs.action_cartpole:BinaryCartPole-v0 ...` (from the repo root) imports this
module, which registers two Gymnasium ids:

- BinaryCartPole-v0: MultiBinary(2). Element 0 pushes (1 right, 0 left); element 1 is ignored by the env, a
  distractor the policy has to leave alone without being confused by it.
- MultiCartPole-v0: MultiDiscrete([2, 3]). Element 0 pushes, element 1 (three values) is ignored.

The trainer reads both as categoricals per element (fastdreamer.envs._action_groups), so these runs check that path
end to end: the policy's padded groups, the env-side conversion, and learning through a group that does nothing.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv


class _PushByFirstElement(gymnasium.ActionWrapper):
    def __init__(self, env: gymnasium.Env, space: gymnasium.Space):
        super().__init__(env)
        self.action_space = space

    def action(self, action):
        return int(np.asarray(action).reshape(-1)[0])


def binary_cartpole(**kwargs) -> gymnasium.Env:
    return _PushByFirstElement(CartPoleEnv(**kwargs), gymnasium.spaces.MultiBinary(2))


def multi_cartpole(**kwargs) -> gymnasium.Env:
    return _PushByFirstElement(CartPoleEnv(**kwargs), gymnasium.spaces.MultiDiscrete([2, 3]))


for _id, _entry in (("BinaryCartPole-v0", binary_cartpole), ("MultiCartPole-v0", multi_cartpole)):
    if _id not in gymnasium.registry:
        gymnasium.register(_id, entry_point=_entry, max_episode_steps=500)
