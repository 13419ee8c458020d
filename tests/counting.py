"""A dispatcher-level matmul counter for the tests that count what a fast path saves."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MatmulCount(TorchDispatchMode):
    """Counts matmul calls (mm, bmm, addmm) at the dispatcher."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.OPS
        return func(*args, **(kwargs or {}))
