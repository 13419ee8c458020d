"""Execution modes of the update and the acting step. `eager` is the reference and the CPU fallback; the fast
modes wrap the very same functions (agent.loss via train.update_step, agent.act) without reimplementing them."""

from __future__ import annotations

import functools

import torch

MODES = ("eager", "compile", "graphs")


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "eager"
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of auto, {', '.join(MODES)}")
    if mode != "eager":
        raise ValueError(f"--mode {mode} is not implemented yet; use --mode eager")
    return mode


def make_update(update_step, agent, opt, mode: str):
    """A callable data -> (metrics, latents) running one update in `mode`."""
    return functools.partial(update_step, agent, opt)


def make_act(agent, mode: str):
    """A callable (carry, obs) -> (action, carry) running one acting step for all envs in `mode`."""
    return agent.act
