"""Categorical draws that two computations rounding apart both make alike: for comparing a bf16 fast mode with bf16
eager from one seed.

Every latent and discrete action is drawn by inverse CDF (dists.sample_onehot): class k where cdf[k-1] <= u < cdf[k].
Two correct bf16 computations give log-probs ~1e-2 apart, so the class edges move by up to ~5e-3, and a uniform
within that of an edge picks another class in one of them. One such flip in an update of the tests' tiny agent
moves its world-model gradients by 20-30% (measured: torch 2.11's compiled bf16 update on the CPU, update 0, one
latent of 128 with u = 0.26764 between the two runs' edges 0.26757 and 0.26793), past any bound that a wrong gradient
would not also pass. A comparison from one seed then holds by luck, wherever the two computations round apart.

DrawTape records an eager run's draws and moves each uniform into the middle of a wide class interval as it is
used: its own class's if that is at least `min_width` wide, else the most probable class's. The recorded run is
the reference; a run that replays the tape takes every draw at least min_width / 2 (or half the widest class) away
from an edge, where rounding cannot reach it. The draws stay random in which class they pick (a drawn class of
probability >= min_width is kept).

The draws of an update come from two places, both eager in every mode (Agent.noise and the observe loop's
uniforms); the tape wraps both on the agent, before fast.compile_agent wraps them again, and serves each update's
draws from fixed buffers, so a CUDA graph captured over them replays the draws loaded for each update.
"""

from __future__ import annotations

import contextlib

import torch

from fastdreamer import dists


class DrawTape:
    def __init__(self, min_width: float = 0.1):
        self.min_width = min_width
        self.updates: list[dict[str, torch.Tensor]] = []  # per update: {"observe", "latent", "action"} uniforms
        self._buffers: dict[str, torch.Tensor] = {}
        self.moved = 0  # draws moved to the most probable class while recording

    def _safe(self, original):
        """sample_onehot that first writes into u (a view of a recorded draw) the middle of the interval it picks."""

        def sample(logp, u=None, last=None):
            if u is None:
                raise RuntimeError("DrawTape: a categorical draw without given uniforms; the tape cannot see it")
            probs = logp.detach().float().exp()
            cdf = probs.cumsum(-1)
            index = (cdf <= u).sum(-1)
            index = index.clamp_max(probs.shape[-1] - 1) if last is None else torch.minimum(index, last)
            index = index[..., None]
            narrow = probs.gather(-1, index) < self.min_width
            self.moved += int(narrow.sum())
            index = torch.where(narrow, probs.argmax(-1, keepdim=True), index)
            u.copy_(cdf.gather(-1, index) - probs.gather(-1, index) / 2)
            return original(logp, u, last)

        return sample

    def _wrap(self, agent, draw):
        """Instance attributes over agent.noise and agent.rssm.observe that take their uniforms from draw(kind, make),
        make() drawing them as the unwrapped method would."""
        noise, observe, rssm = agent.noise, agent.rssm.observe, agent.rssm

        def tape_noise(n, latent_steps, action_steps, device):
            made = []

            def make():
                if not made:
                    made.extend(noise(n, latent_steps, action_steps, device))
                return made

            return draw("latent", lambda: make()[0]), draw("action", lambda: make()[1])

        def tape_observe(deter, stoch, tokens, actions, is_first, u=None):
            if u is None:
                B, T = tokens.shape[:2]
                u = draw("observe", lambda: torch.rand((T, B, rssm.stoch, 1), device=tokens.device))
            return observe(deter, stoch, tokens, actions, is_first, u)

        agent.noise, agent.rssm.observe = tape_noise, tape_observe

    @contextlib.contextmanager
    def attached(self, agent):
        """While entered, `agent`'s draws go through the tape: an empty tape records them (eager updates; each draw
        moved as the module docstring says), a recorded one replays them from buffers, still making and dropping
        each draw so that the generators end where the recording's did. Yields before(k), to call before update k.
        Enter it before fast.make_update: compile_agent wraps the methods it sets."""
        record = not self.updates

        def draw(kind, make):
            if record:
                if kind in self.updates[-1]:
                    raise RuntimeError(f"DrawTape: two {kind} draws in one update")
                self.updates[-1][kind] = make()
                return self.updates[-1][kind]
            if kind not in self._buffers:
                raise RuntimeError(f"DrawTape: a {kind} draw the recorded updates did not make")
            make()  # drawn and dropped: the generators advance as in the recorded run
            return self._buffers[kind]

        saved = agent.noise, agent.rssm.observe
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: setattr(agent, "noise", saved[0]))
            stack.callback(lambda: setattr(agent.rssm, "observe", saved[1]))
            self._wrap(agent, draw)
            if record:
                original = dists.sample_onehot
                dists.sample_onehot = self._safe(original)
                stack.callback(lambda: setattr(dists, "sample_onehot", original))
            yield (lambda k: self.updates.append({})) if record else self._load

    def _load(self, k: int) -> None:
        """Make the replaying agent's next update draw what recorded update k drew."""
        for kind, recorded in self.updates[k].items():
            if kind not in self._buffers:
                self._buffers[kind] = torch.empty_like(recorded)
            self._buffers[kind].copy_(recorded)


@contextlib.contextmanager
def taped(agent, tape: DrawTape | None):
    """What a comparison of two bf16 computations runs under: `agent` without free bits (a KL within rounding of
    free_nats is clamped in one and not the other; bench/LOG.md, session 22) and its draws on `tape` (attached).
    Yields before(k), to call before update k; without a tape, nothing changes and before(k) does nothing."""
    if tape is None:
        yield lambda k: None
        return
    agent.rssm.free_nats = 0.0
    with tape.attached(agent) as before:
        yield before
