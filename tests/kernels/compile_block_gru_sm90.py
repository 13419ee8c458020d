"""Compile every block-GRU Triton kernel for sm_90 (H100/H200) without a GPU; print shared memory per kernel.

The interpreter runs the kernels' math on CPU but never lowers them, so type and layout errors that only the
compiler sees would first show on a GPU. This compiles each kernel at the widest tiles fused.py can choose, for
fp32 and bf16 weights (or those named on the command line), each in fp32 and in bf16 compute (the forward's
bf16 tensor-core dots are the GPU-only path: the interpreter emulates them in fp32), the kernels that read the
caller's branch inputs (fused.modes) also with those given (and writing the packed tap factors, FAC), and prints
{"kernel[weight dtype,compute]": shared bytes} as JSON. Must run with TRITON_INTERPRET unset.

    python tests/kernels/compile_block_gru_sm90.py [fp32] [bf16]
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS = ("w0", "b0", "s0", "w1", "b1", "s1", "w2", "b2", "s2", "wh_ptr", "bh_ptr", "sh_ptr", "wg_ptr", "bg_ptr")


def main(dtypes: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions")
    sys.path.insert(0, ROOT)
    import triton
    from fastdreamer.kernels.block_gru import fused
    from fastdreamer.kernels.block_gru import kernels_bwd as kb
    from fastdreamer.kernels.block_gru import kernels_fwd as kf
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    T, TK, TKB, BB, RB = fused.TILE, fused.TILE_K, fused.TILE_K_BWD, fused.BB, max(fused.ROW_TILES)
    computed = {"M0": 0, "M1": 0, "M2": 0, "RESET": False}
    # The observe loop's: both products and the action branch from the caller, the products reset on first rows.
    given = {"M0": 1, "M1": 1, "M2": 2, "RESET": True}
    cases = [
        (kf._fwd_branches, {"BB": RB, "BI": T, "BKC": TK}),  # the forward's widest row tile (large batches)
        (kf._fwd_hidden, {"BB": RB, "BI": T, "BJ": T, "BK": TK, "SAVE": True, "FAC": False, **computed}),
        (kf._fwd_gates, {"BB": RB, "BI": T, "BJ": T, "BP": 128, "SAVE": True, "FAC": False}),
        (kf._fwd_branches, {"BB": BB, "BI": T, "BKC": TK}),
        (kf._fwd_hidden, {"BB": BB, "BI": T, "BJ": T, "BK": TK, "SAVE": True, "FAC": False, **computed}),
        # The observe loop's tapped step: given branches, and the kernels write the packed factors (FAC).
        (kf._fwd_hidden, {"BB": BB, "BI": T, "BJ": T, "BK": TK, "SAVE": True, "FAC": True, **given}),
        (kf._fwd_gates, {"BB": BB, "BI": T, "BJ": T, "BP": 128, "SAVE": True, "FAC": False}),
        (kf._fwd_gates, {"BB": BB, "BI": T, "BJ": T, "BP": 128, "SAVE": True, "FAC": True}),
        (kb._bwd_gates, {"BB": BB, "BO": T, "BJ": T}),
        (kb._bwd_hidden, {"BB": BB, "BI": T, "BJ": T, "BP": 128}),
        (kb._bwd_dx, {"BB": BB, "BJ": T, "BKC": TKB}),
        (kb._bwd_branches, {"BB": BB, "BI": T, "BKC": TKB, **computed}),
        (kb._bwd_branches, {"BB": BB, "BI": T, "BKC": TKB, **given}),
    ]
    shared = {}
    for wdtype in dtypes:
        for (fn, consts), compute in ((c, m) for m in ("fp32", "bf16") for c in cases):
            consts = dict(consts, BF16=compute == "bf16")
            if "DOT_BF16" in fn.arg_names:
                consts["DOT_BF16"] = compute == "bf16"
            sig = {}
            for name in fn.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in WEIGHTS:
                    sig[name] = f"*{wdtype}"
                elif name.startswith("src") and not name.endswith("_stride") or name in ("g0_ptr", "g1_ptr"):
                    sig[name] = "*bf16"  # the caller's branch inputs (bf16 matmul outputs under autocast), their grads
                elif name == "first_ptr":
                    sig[name] = "*i1"
                elif name.endswith("_ptr"):
                    sig[name] = "*fp32"
                else:
                    sig[name] = "i32"
            opts = {"num_stages": fused.BWD_GATES_STAGES[compute == "bf16"]} if fn is kb._bwd_gates else {}
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
            rows = "" if consts["BB"] == BB else f"/BB{consts['BB']}"
            modes = "/given" if consts.get("M2") == 2 else ""
            fac = "/fac" if consts.get("FAC") else ""
            shared[f"{fn.__name__}{rows}{modes}{fac}[{wdtype},{compute}]"] = k.metadata.shared
    print(json.dumps(shared))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["fp32", "bf16"]))
