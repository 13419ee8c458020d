"""The RSSM's recurrent core behind one switch: `torch` (reference.py, the eager spec) or `triton` (fused).

The RSSM calls only `step` and `rollout` from here. `set_impl` is called once at start; it returns the
implementation actually in use and logs one line when it has to fall back to the reference.

Precision follows torch.autocast: under bf16 autocast the reference's matmuls run in bf16 (autocast's own casts),
and the fused kernels run reference.step's bf16 compute (every matmul's operands rounded to bf16, products summed
in float32: tensor-core dots on a GPU). Outside autocast both are float32. Under fp16 autocast (which fastdreamer
never uses) the reference runs fp16 matmuls and the fused kernels stay float32.
"""

from __future__ import annotations

import logging

import torch

from . import reference
from .reference import BlockGRUWeights, check_shapes

__all__ = ["BlockGRUWeights", "check_shapes", "set_impl", "get_impl", "step", "rollout", "IMPLS"]

IMPLS = ("torch", "triton")
_impl = "torch"
log = logging.getLogger("fastdreamer")


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the fused kernels can run here (on `device`, where given), and why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"the run is on {torch.device(device)}, and the kernels need CUDA (or TRITON_INTERPRET=1)"
    return True, ""


def set_impl(impl: str, device: torch.device | str | None = None) -> str:
    """Select the core implementation for the whole process (for a run on `device`, where given); returns the one
    in use."""
    global _impl
    if impl not in IMPLS:
        raise ValueError(f"block_gru: unknown implementation {impl!r}; choose one of {IMPLS}")
    if impl == "triton":
        ok, why = triton_available(device)
        if not ok:
            log.warning("block_gru: triton requested but %s; using the torch reference", why)
            impl = "torch"
    _impl = impl
    return _impl


def get_impl() -> str:
    return _impl


def _bf16_autocast(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16


def step(
    deter: torch.Tensor,
    stoch: torch.Tensor,
    action,
    w: BlockGRUWeights,
    taps=None,
    x2=None,
    x0p=None,
    x1p=None,
    packed: bool = False,
    first=None,
):
    """One core step: deter (B, D), stoch (B, S*C), action (B, A) -> deter (B, D). taps (deferred weight gradients,
    reference.step); with them the return is (deter, seen). x2: the action branch computed by the caller
    (reference.action_branch). x0p: the deter branch's product deter @ w0, computed by the caller (reference.step);
    x1p the stoch branch's, stoch @ w1. Both implementations take them and then skip that work. packed (with taps
    and x2): the return is (deter, seen, reference.pack_factors(seen)), which the Triton core's kernels write as
    they run (no kernels of their own). first (B,) bool: the rows where x0p and x1p count as zero (reference.step's;
    the Triton core applies it as it reads them, and writes their gradients masked)."""
    if packed and (taps is None or x2 is None):
        raise ValueError("block_gru: packed factors are for a tapped step given the action branch (taps and x2)")
    if _impl == "triton":
        from . import fused

        bf16 = _bf16_autocast(deter.device)
        return fused.step(
            deter, stoch, action, w, bf16=bf16, taps=taps, x0p=x0p, x1p=x1p, x2=x2, packed=packed, first=first
        )
    out = reference.step(deter, stoch, action, w, taps=taps, x2=x2, x0p=x0p, x1p=x1p, first=first)
    return (*out, reference.pack_factors(out[1])) if packed else out


def rollout(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> torch.Tensor:
    """No-grad multi-step entry with given inputs: stoch (B, T, S*C), action (B, T, A) -> (B, T, D), under either
    implementation (the reference's would otherwise record a graph the fused one does not)."""
    if _impl == "triton":
        from . import fused

        return fused.rollout(deter, stoch, action, w, bf16=_bf16_autocast(deter.device))
    with torch.no_grad():
        return reference.rollout(deter, stoch, action, w)
