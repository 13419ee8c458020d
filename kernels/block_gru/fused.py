"""The block-GRU core step as Triton kernels, with a backward pass and a no-grad rollout.

Math is reference.step's, to the letter; reference.py is the spec. One forward step is three launches:

    _fwd_branches  grid (B/BB, 3, K/BKC)   pre_i = inp_i @ w_i + b_i for the three input branches   -> pre (B, 3K)
    _fwd_hidden    grid (B/BB, G, DG/BJ)   x = silu(rms(pre_i) * s_i) (each program normalises the
                                           rows it needs itself: a row of pre is only 3K floats),
                                           hpre_g = [deter_g, x] @ wh[g] + bh_g, and partial sums of
                                           hpre^2 per (row, block, chunk)                           -> hpre (B, D)
    _fwd_gates     grid (B/BB, G, DG/BJ)   the RMSNorm over all of deter from those partials,
                                           h = silu(rms(hpre) * sh), gates = h_g @ wg[g] + bg_g,
                                           deter' = z * tanh(r * c) + (1 - z) * deter               -> (B, D)

A caller may hand over a branch (reference.step's x0p, x1p: the deter and stoch branches' products; x2: the whole
action branch; modes()): _fwd_branches then computes only the others (and is not launched when none is left),
_fwd_hidden reads the given ones (a product plus its bias, normalised; x2 as it is), and the backward hands back their
gradients (dpre_i for a product, dx_2 for x2) instead of multiplying them into the input they replace. With `first`
(the observe loop's is_first) a given product counts as zero on those rows: _fwd_hidden applies it as it loads the
product and _bwd_branches as it writes the product's gradient (in the product's dtype).

The norm over deter spans blocks, so it is split across launches: the hidden kernel writes partial sums of
squares, the gate kernel (which needs the whole of h_g anyway) finishes the reduction per row. The backward
pass mirrors this with four kernels that produce every per-row gradient (d deter, d stoch, d action and the
intermediate dgates, dhpre, dx, dpre):

    _bwd_gates     grid (B/BB, G, DG/BJ)   dgates (elementwise), dh = dgates_g @ wg[g]^T, dn, dy and partial sums
                                           of dy * y for the deter-wide norm; d deter = dout * (1 - z)
    _bwd_hidden    grid (B/BB, G, DG/BI)   dhpre from those partials; d deter += dhpre_g @ wh[g, :DG]^T
    _bwd_dx        grid (B/BB, 3K/BKC)     dx = sum over blocks of dhpre_g @ wh[g, DG:]^T
    _bwd_branches  grid (B/BB, 3, In/BI)   the branch norms' backward -> dpre; d input_i = dpre_i @ w_i^T

Weight gradients are then plain torch matmul/einsum/sum over the batch of those per-row grads, which cuBLAS does
well and which keeps the kernels small. Every loop is chunked (no full-width row in registers), so any K and D/G
work; tiles are 16-64 rows (16 in the backward) by 16-128 columns, masked at the edges (fwd_tiles, _col_tile).

Weights may be float32, bfloat16 or float16 (all the same dtype); they are upcast on load and every dot
accumulates in float32 with input_precision="ieee" (no TF32), because the spec computes in float32. With bf16=True
(reference.step's bf16 compute, chosen by the switch under bf16 autocast) every dot's operands are rounded to
bfloat16 first; on a GPU the forward's dots then run on the tensor cores (kernels_fwd.py).
Inputs may be any of those dtypes; the output is float32, gradients come back in each input's dtype.

Tolerances (tests/kernels/test_block_gru.py uses these numbers; never loosen them to make a test pass):
    what                        atol    rtol    why
    output, fp32 weights        2e-5    1e-5    same float32 math, different summation order (tiles of 16-64
                                                vs cuBLAS / MKL); outputs are convex mixes of tanh and deter, so
                                                O(1); measured max |error| 8e-7 over the test shapes (CPU)
    input grads, fp32 weights   1e-4    1e-4    summation order again, through two RMSNorm backwards, whose
                                                1/rms factors amplify rounding for rows with small norms;
                                                measured max |error| 1.1e-6 (CPU)
    weight grads, fp32 weights  1e-4    1e-4    sums over the batch of the above (B <= 17 in the CPU tests);
                                3e-3    1e-4    at B = 1000 (GPU-only test): 1000-term sums, ~sqrt(1000)x more
    anything, bf16 weights      same as fp32, compared with reference.step run on the same bf16 weights upcast to
                                float32: the kernel upcasts them on load, so the math is identical. Weight grads
                                come back in bf16 (the weights' dtype), which adds one bf16 rounding (at most 2^-8
                                = 3.9e-3 relative): rtol 8e-3, twice that, on those only.
    bf16 compute                the rows above, unchanged, against reference.step(bf16=True), which rounds the same
                                operands: products of bf16 values are exact in float32 (tensor cores included), so
                                only the summation order differs. One catch: an activation (x, h) that the two sides
                                compute a few float32 ulps apart can round to neighbouring bf16 values (a few times
                                per case at the larger test shapes), which moves its whole row by ~1e-4. The tests
                                pin the spec's x and h to the kernel's saved values (reference._pin) to remove that.
"""

from __future__ import annotations

import os

import torch
import triton

from . import reference
from .kernels_bwd import _bwd_branches, _bwd_dx, _bwd_gates, _bwd_hidden
from .kernels_fwd import _fwd_branches, _fwd_gates, _fwd_hidden
from .reference import ACTION_SITES, EPS, TAP_SITES, BlockGRUWeights, check_shapes

__all__ = ["DEBUG_POISON", "DTYPES", "backward", "forward", "rollout", "step", "validate"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this: every buffer a kernel should fully write starts as NaN, so an unwritten element shows.
DEBUG_POISON = os.environ.get("FASTDREAMER_KERNEL_POISON") == "1"
BB = 16  # rows per program; tl.dot needs every tile dimension >= 16
TILE = 64  # widest column tile over D/G and input widths
TILE_K = 128  # widest tile over K in the forward
# The branch backward holds a (K-tile, TILE) fp32 weight tile per pipeline stage: at 128 it needed 194 KiB of shared
# memory for sm_90 (more than an A100 has), at 64 it needs 97 KiB (tests/kernels compile it for sm_90 and check).
TILE_K_BWD = 64
# Software-pipeline stages of _bwd_gates by bf16 compute: rounding its three fp32 weight tiles in registers took
# 164 KiB of shared memory for sm_90 at Triton's default 3 stages, 96 KiB at 2 (148 KiB in fp32 compute at 3).
BWD_GATES_STAGES = {False: 3, True: 2}


def _np2(n: int, lo: int = 16, hi: int = TILE) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# Output-column tiles. At batch 16 a kernel has one row tile, so its grid is (1, 3 or G, columns / tile): with the
# widest tiles, 6 programs stream the 2 MB of w0 (12m) and 32 the 8 MB of wh, on a GPU with 132 SMs. "parallel"
# (default) narrows a kernel's output tile, down to 16, until its grid has MIN_PROGRAMS programs, so more SMs share the
# weight reads (each weight is still read once per row tile), and picks the forward's row tile (fwd_tiles, below);
# "wide" keeps the widest column tiles and 16-row tiles (the first version). At batch 1024 the column tiles of both
# are mostly the widest. FASTDREAMER_GRU_TILES picks one at import (benchmarks).
TILES = os.environ.get("FASTDREAMER_GRU_TILES", "parallel")
if TILES not in ("parallel", "wide"):
    raise ValueError(f"FASTDREAMER_GRU_TILES={TILES!r}: expected parallel or wide")
MIN_PROGRAMS = 132  # the SM count of an H100 / H200


def _col_tile(n: int, programs_per_column_tile: int, hi: int = TILE) -> int:
    """The tile over n output columns: the widest (up to hi), narrowed by halves under the "parallel" policy while the
    grid would have fewer than MIN_PROGRAMS programs."""
    t = _np2(n, hi=hi)
    while TILES == "parallel" and t > 16 and programs_per_column_tile * triton.cdiv(n, t) < MIN_PROGRAMS:
        t //= 2
    return t


# Forward row tiles. 16 rows per program (BB) is what tl.dot needs at least, and at batch 16 all there is. At batch
# 1024 (imagination) 16-row tiles make every weight be read from L2 once per 16 rows, 64 times per step (~1 GB at
# 12m), and on sm_90 a 16-row bf16 dot lowers to mma.sync; 64-row tiles read the weights 16 times and lower to
# wgmma (checked in the PTX for sm_90). So "parallel" takes the widest row tile (64, 32 or 16) whose grid still has
# MIN_PROGRAMS programs at the widest column tiles. The backward stays at 16 rows: training runs it at batch 16.
ROW_TILES = (64, 32)


def fwd_tiles(B: int, DG: int, G: int, K: int) -> dict[str, int]:
    """The forward's tiles for batch B: rows BB, column tiles BJ (hidden and gate outputs) and BKB (branch outputs),
    loop tiles BI (over D/G) and BK (over K)."""
    bb = BB
    if TILES == "parallel":
        per_row_tile = G * triton.cdiv(DG, _np2(DG))
        bb = next((t for t in ROW_TILES if triton.cdiv(B, t) * per_row_tile >= MIN_PROGRAMS), BB)
    nb = triton.cdiv(B, bb)
    return {
        "BB": bb,
        "BJ": _col_tile(DG, nb * G),
        "BKB": _col_tile(K, nb * 3, hi=TILE_K),
        "BI": _np2(DG),
        "BK": _np2(K, hi=TILE_K),
    }


def _empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def validate(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> None:
    """The reference's shape checks plus what these kernels need: dtypes, one device, contiguous weights."""
    check_shapes(deter, stoch, action, w)
    dtypes = {t.dtype for t in w}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(
            f"block_gru fused: weights must share one dtype of {DTYPES}, got "
            f"{ {n: str(t.dtype) for n, t in zip(w._fields, w)} }"
        )
    for name, t in (("deter", deter), ("stoch", stoch), ("action", action)):
        if t.dtype not in DTYPES:
            raise ValueError(f"block_gru fused: {name} {tuple(t.shape)} has dtype {t.dtype}, expected one of {DTYPES}")
    for name, t in zip(w._fields, w):
        if not t.is_contiguous():
            raise ValueError(
                f"block_gru fused: weight {name} {tuple(t.shape)} with stride {t.stride()} is not contiguous"
            )
    devices = {t.device for t in (deter, stoch, action, *w)}
    if len(devices) != 1:
        raise ValueError(
            f"block_gru fused: tensors on several devices {sorted(map(str, devices))}; deter {tuple(deter.shape)}"
        )
    B, D = deter.shape
    biggest = max(B * 3 * max(D, w.w0.shape[1]), *(t.numel() for t in w))
    if biggest >= 2**31:
        raise ValueError(f"block_gru fused: offsets are int32, but deter {tuple(deter.shape)} needs {biggest} elements")
    device = devices.pop()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"block_gru fused: deter {tuple(deter.shape)} is on {device}; the kernels need CUDA (or TRITON_INTERPRET=1)"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (B, N) view the kernels can read: any row stride, unit column stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def modes(x0p, x1p, x2) -> tuple[int, int, int]:
    """Where each input branch comes from (the kernels' M0, M1, M2): 0 computed by the kernels, 1 the caller's
    product (x0p = deter @ w0, x1p = stoch @ w1: the kernels add the bias, normalise and apply SiLU), 2 the caller's
    whole branch (x2 = reference.action_branch)."""
    return (0 if x0p is None else 1, 0 if x1p is None else 1, 0 if x2 is None else 2)


def validate_given(deter: torch.Tensor, w: BlockGRUWeights, **given: torch.Tensor | None) -> None:
    """The caller's branch inputs (x0p, x1p, x2) must be (B, K) of a supported dtype on deter's device."""
    B, K = deter.shape[0], w.w0.shape[1]
    for name, t in given.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (B, K) or t.dtype not in DTYPES or t.device != deter.device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"block_gru fused: {name} must be ({B}, {K}) of one of {DTYPES} on {deter.device}, got {got}"
            )


def forward(
    deter: torch.Tensor,
    stoch: torch.Tensor,
    action: torch.Tensor,
    w: BlockGRUWeights,
    save: bool = False,
    out: torch.Tensor | None = None,
    bf16: bool = False,
    x0p: torch.Tensor | None = None,
    x1p: torch.Tensor | None = None,
    x2: torch.Tensor | None = None,
    factors: bool = False,
    first: torch.Tensor | None = None,
):
    """One core step. Returns the new deter (B, D) float32 and, with save=True, the activations backward needs;
    with factors=True (save and x2 only) also the tap sites' factors the kernels compute, packed as
    reference.pack_factors packs them (B, packed width), which the kernels write as they compute the activations.
    first (B,) bool: the rows where x0p and x1p count as zero (reference.step's), applied as they are read.

    `out` may be any (B, D) float32 view with unit column stride (rollout writes into its (B, T, D) result).
    bf16=True rounds every dot's operands to bfloat16 (reference.step's bf16 compute). x0p, x1p, x2: reference.step's
    (the deter and stoch branches' products, the action branch's output, (B, K) each, computed by the caller); a
    branch given so is not computed here (modes)."""
    deter, stoch, action = _rows(deter), _rows(stoch), _rows(action)
    given = [None if t is None else _rows(t) for t in (x0p, x1p, x2)]
    mode = modes(x0p, x1p, x2)
    if factors and not (save and mode[2] == 2):
        raise ValueError("block_gru fused: the packed factors are for a saving step given the action branch (x2)")
    B, D = deter.shape
    G, DG, K = w.wh.shape[0], D // w.wh.shape[0], w.w0.shape[1]
    SC, A = stoch.shape[1], action.shape[1]
    dev = deter.device
    tiles = fwd_tiles(B, DG, G, K)
    RB, BJ, BKB, BI, BK = (tiles[k] for k in ("BB", "BJ", "BKB", "BI", "BK"))
    nb = triton.cdiv(B, RB)
    NJ = triton.cdiv(DG, BJ)
    # Tensor-core bf16 dots natively; the interpreter (on CPU tensors or CUDA ones) emulates them in fp32, because
    # its bf16 tl.dot returns garbage (README).
    native = dev.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    prec = {"BF16": bf16, "DOT_BF16": bf16 and native}
    pre = _empty((B, 3 * K), dev)
    hpre = _empty((B, D), dev)
    part = _empty((B, G * NJ), dev)
    if out is None:
        out = _empty((B, D), dev)
    if save:
        x, h, rs, gates = _empty((B, 3 * K), dev), _empty((B, D), dev), _empty((B,), dev), _empty((B, 3 * D), dev)
    else:
        x = h = rs = gates = pre  # never written: SAVE is off
    # The packed factors: n0 | n1 | x | nh | g (reference.PACKED_SITES); the kernels write n_i at i * K and x at 2K.
    widths = reference.packed_widths(w)
    fac = _empty((B, sum(widths.values())), dev) if factors else pre  # never written without
    computed = [i for i in range(3) if mode[i] == 0]
    if computed:
        _fwd_branches[(nb, len(computed), triton.cdiv(K, BKB))](
            deter,
            deter.stride(0),
            stoch,
            stoch.stride(0),
            action,
            action.stride(0),
            w.w0,
            w.b0,
            w.w1,
            w.b1,
            w.w2,
            w.b2,
            pre,
            B,
            D,
            SC,
            A,
            K,
            *(computed + [computed[-1]] * (3 - len(computed))),
            BB=RB,
            BI=_np2(max(D, SC, A)),
            BKC=BKB,
            **prec,
        )
    srcs = [a for t in given for a in ((pre, 0) if t is None else (t, t.stride(0)))]
    _fwd_hidden[(nb, G, NJ)](
        deter,
        deter.stride(0),
        pre,
        *srcs,
        w.b0,
        w.b1,
        w.b2,
        w.s0,
        w.s1,
        w.s2,
        w.wh,
        w.bh,
        hpre,
        part,
        x,
        fac,
        fac.stride(0),
        pre if first is None else first,
        0 if first is None else first.stride(0),
        B,
        DG,
        K,
        NJ,
        BB=RB,
        BI=BI,
        BJ=BJ,
        BK=BK,
        M0=mode[0],
        M1=mode[1],
        M2=mode[2],
        SAVE=save,
        FAC=factors,
        RESET=first is not None,
        **prec,
    )
    _fwd_gates[(nb, G, NJ)](
        deter,
        deter.stride(0),
        hpre,
        part,
        w.sh,
        w.wg,
        w.bg,
        out,
        out.stride(0),
        h,
        rs,
        gates,
        fac,
        fac.stride(0),
        widths["n0"] + widths["n1"] + widths["h"],
        B,
        DG,
        G * NJ,
        BB=RB,
        BI=BI,
        BJ=BJ,
        BP=triton.next_power_of_2(G * NJ),
        SAVE=save,
        FAC=factors,
        **prec,
    )
    if not save:
        return out
    if factors:
        return out, (pre, x, hpre, h, rs, gates), fac
    return out, (pre, x, hpre, h, rs, gates)


def _seen(
    deter: Tensor, stoch: Tensor, action: Tensor, saved, G: int, bf16: bool, mode=(0, 0, 0), fac: Tensor | None = None
) -> dict[str, Tensor]:
    """Each tap site's other factor (reference.step's `seen`) from the forward's saved activations: the dots' inputs
    as the dots saw them (rounded to bf16 with bf16), and the normalised values the norm scales multiply. A branch
    whose product the caller computed (mode 1) keeps its sites, with the product's input as its factor (as
    reference.step); one the caller computed whole (mode 2) has none. fac: forward's packed factors (with x2), which
    the factors the kernels compute are then views of."""
    pre, x, hpre, h, rs, _ = saved
    B, D = deter.shape
    K = pre.shape[1] // 3

    def op(t: Tensor) -> Tensor:
        return t.bfloat16().float() if bf16 else t.float()

    if fac is not None:
        n0, n1, xr, nh, g = fac.split([K, K, 3 * K, D, D], 1)  # reference.packed_widths
        x0 = op(deter)
        u = reference._block_inputs(x0.view(B, G, D // G), xr)
        return {"x0": x0, "n0": n0, "x1": op(stoch), "n1": n1, "h": u, "nh": nh, "g": g.view(B, G, D // G)}

    # Each branch's norm on its own (a whole-branch x2 leaves its pre columns unwritten): in the fast modes' step,
    # with all three given, one norm over the (B, 3, K) view took a Triton kernel more (census, session 31).
    seen = {}
    for i, inp in enumerate((deter, stoch, action)):
        if mode[i] != 2:
            p = pre[:, i * K : (i + 1) * K]
            seen[f"x{i}"], seen[f"n{i}"] = op(inp), p * torch.rsqrt(p.square().mean(-1, keepdim=True) + EPS)
    u = reference._block_inputs(seen["x0"].view(B, G, D // G), op(x))
    return {**seen, "h": u, "nh": hpre * rs[:, None], "g": op(h).view(B, G, D // G)}


def backward(
    dout: torch.Tensor, deter, stoch, action, w: BlockGRUWeights, saved, bf16: bool = False, given=(None, None, None)
) -> list[torch.Tensor]:
    """Gradients of one step for (deter, stoch, action, *w, *given), each in that tensor's dtype (None for a given
    input that is None). bf16: the forward's precision; the gradient passes straight through its roundings, so the
    dots use the rounded operands. given: forward's (x0p, x1p, x2); a weight its branch did not read gets zeros."""
    deter, stoch, action = _rows(deter), _rows(stoch), _rows(action)
    B, D = deter.shape
    G, DG, K = w.wh.shape[0], D // w.wh.shape[0], w.w0.shape[1]
    mode = modes(*given)
    ddeter, dstoch, daction, dpre, dn_x, dhpre, dn_h, dgates, dx, *gin = row_grads(
        dout, deter, stoch, action, w, saved, bf16, mode, given
    )

    # Weight grads: sums over the batch of the per-row grads above times each site's other factor (_seen: the dots'
    # rounded operands with bf16), as plain float32 matmuls. Autocast off: the trainer runs backward() inside its bf16
    # autocast, and the engine carries that into this op, which would round the per-row grads and the sums to bf16
    # (measured 1.2e-2 on wh at a test shape) where the spec sums in float32.
    with torch.autocast(deter.device.type, enabled=False):
        f = _seen(deter, stoch, action, saved, G, bf16, mode)
        wgrads = []
        for i in range(3):  # one tensor per parameter: outputs of a custom op must not alias each other
            wi = getattr(w, f"w{i}")
            if mode[i] == 2:
                wgrads += [
                    torch.zeros_like(wi, dtype=torch.float32),
                    *(torch.zeros(K, device=deter.device) for _ in range(2)),
                ]
                continue
            dp, dn = dpre[:, i * K : (i + 1) * K], dn_x[:, i * K : (i + 1) * K]
            dw = f[f"x{i}"].t() @ dp if mode[i] == 0 else torch.zeros_like(wi, dtype=torch.float32)
            wgrads += [dw, dp.sum(0), (dn * f[f"n{i}"]).sum(0)]
        wgrads += [
            torch.einsum("bgi,bgo->gio", f["h"], dhpre.view(B, G, DG)),
            dhpre.sum(0),
            (dn_h * f["nh"]).sum(0),
            torch.einsum("bgi,bgo->gio", f["g"], dgates.view(B, G, 3 * DG)),
            dgates.sum(0),
        ]
    # An input the kernels did not read (row_grads left its gradient unwritten) gets zeros: a custom op's outputs.
    dstoch, daction = (torch.zeros_like(g) if u else g for g, u in zip((dstoch, daction), unread(mode)))
    grads = [ddeter, dstoch, daction, *wgrads]
    out = [g.to(t.dtype) for g, t in zip(grads, (deter, stoch, action, *w))]
    return out + _given_grads(gin, dx, given, copy=True)


def unread(mode) -> tuple[bool, bool]:
    """Whether stoch and action go unread by the kernels under these branch sources (their branch given)."""
    return mode[1] != 0, mode[2] != 0


def _given_grads(gin, dx: Tensor, given, copy: bool) -> list[Tensor | None]:
    """The gradients of forward's x0p, x1p (row_grads' gin: their branches' dpre, masked by first, in their dtypes)
    and x2 (its part of dx, in its dtype); copy: never a view of dx (a custom op's outputs must not alias)."""
    K = dx.shape[1] // 3
    x2 = None if given[2] is None else dx[:, 2 * K :].to(given[2].dtype, copy=copy)
    return [*gin, x2]


def row_grads(
    dout: torch.Tensor,
    deter,
    stoch,
    action,
    w: BlockGRUWeights,
    saved,
    bf16: bool = False,
    mode=(0, 0, 0),
    given=(None, None, None),
    first: Tensor | None = None,
):
    """The per-row gradients of one step, float32: d deter, d stoch, d action, and the intermediate ones every
    weight gradient is a sum over rows of: dpre (B, 3K) of the branches' pre-activations, dn_x (B, 3K) of their
    scaled norms, dhpre (B, D) of the hidden layer's pre-activation, dn_h (B, D) of its scaled norm, dgates (B, 3D);
    and dx (B, 3K) of the branches' outputs; then the gradients of the given products x0p and x1p (given: forward's
    (x0p, x1p, x2)), their dpre masked by first (forward's) and in their dtypes, None where not given. Four kernel
    launches. mode: forward's branch sources (modes); the gradient of an input the kernels did not read (stoch with
    x1p given, action with x2: unread(mode)) is left unwritten, as are a branch given whole's (mode 2) dpre and dn_x
    columns: callers give those inputs no gradient."""
    pre, x, hpre, h, rs, gates = saved
    deter, stoch, action = _rows(deter), _rows(stoch), _rows(action)
    dout = dout.float().contiguous()
    B, D = deter.shape
    G, DG, K = w.wh.shape[0], D // w.wh.shape[0], w.w0.shape[1]
    SC, A = stoch.shape[1], action.shape[1]
    dev = deter.device
    nb = triton.cdiv(B, BB)
    BC = _col_tile(DG, nb * G)  # output-column tile over D/G of _bwd_gates and _bwd_hidden
    BL = _np2(DG)  # the tile their loops (and _bwd_dx's) step over D/G with
    NJ = triton.cdiv(DG, BC)
    dgates, ddeter = _empty((B, 3 * D), dev), _empty((B, D), dev)
    dn_h, dy_h, dhpre, part = _empty((B, D), dev), _empty((B, D), dev), _empty((B, D), dev), _empty((B, G * NJ), dev)
    dn_x, dpre = _empty((B, 3 * K), dev), _empty((B, 3 * K), dev)
    dstoch, daction = _empty((B, SC), dev), _empty((B, A), dev)
    gin = [_empty((B, K), dev, t.dtype) if m == 1 else None for m, t in zip(mode[:2], given[:2])]
    _bwd_gates[(nb, G, NJ)](
        dout,
        deter,
        deter.stride(0),
        gates,
        hpre,
        rs,
        w.sh,
        w.wg,
        dgates,
        ddeter,
        dn_h,
        dy_h,
        part,
        B,
        DG,
        NJ,
        BB=BB,
        BO=BL,
        BJ=BC,
        BF16=bf16,
        num_stages=BWD_GATES_STAGES[bf16],
    )
    _bwd_hidden[(nb, G, triton.cdiv(DG, BC))](
        dy_h,
        hpre,
        rs,
        part,
        w.wh,
        dhpre,
        ddeter,
        B,
        DG,
        K,
        G * NJ,
        BB=BB,
        BI=BC,
        BJ=BL,
        BP=triton.next_power_of_2(G * NJ),
        BF16=bf16,
    )
    BKC, BIN = _np2(K, hi=TILE_K_BWD), _np2(max(D, SC, A))
    dx = _empty((B, 3 * K), dev)
    BKX = _col_tile(3 * K, nb, hi=TILE_K_BWD)
    _bwd_dx[(nb, triton.cdiv(3 * K, BKX))](dhpre, w.wh, dx, B, DG, G, K, BB=BB, BJ=BL, BKC=BKX, BF16=bf16)
    read = [n for n, m in zip((D, SC, A), mode) if m == 0]  # inputs the kernels multiply gradients into
    if mode != (2, 2, 2):
        _bwd_branches[(nb, 3, triton.cdiv(max(read), BIN) if read else 1)](
            dx,
            pre,
            w.s0,
            w.s1,
            w.s2,
            w.w0,
            w.w1,
            w.w2,
            dn_x,
            dpre,
            ddeter,
            dstoch,
            daction,
            *(dpre if g is None else g for g in gin),
            dpre if first is None else first,
            0 if first is None else first.stride(0),
            B,
            D,
            SC,
            A,
            K,
            BB=BB,
            BI=BIN,
            BKC=BKC,
            M0=mode[0],
            M1=mode[1],
            M2=mode[2],
            RESET=first is not None,
            BF16=bf16,
        )
    return ddeter, dstoch, daction, dpre, dn_x, dhpre, dn_h, dgates, dx, *gin


# The kernels sit behind torch.library custom ops so torch.compile treats them as opaque calls (it runs the fake
# implementations to learn shapes) instead of tracing into Triton launches, and autograd sees one op per step. The
# caller's branch inputs (x0p, x1p, x2: forward's) are optional arguments of each.
Tensor = torch.Tensor
OptT = Tensor | None
SavedT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
TappedT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # SavedT and the packed factors


@torch.library.custom_op("fastdreamer::block_gru_step", mutates_args=())
def _step_op(
    deter: Tensor, stoch: Tensor, action: Tensor, ws: list[Tensor], bf16: bool, x0p: OptT, x1p: OptT, x2: OptT
) -> Tensor:
    return forward(deter, stoch, action, BlockGRUWeights(*ws), bf16=bf16, x0p=x0p, x1p=x1p, x2=x2)


@_step_op.register_fake
def _(deter, stoch, action, ws, bf16, x0p, x1p, x2):
    return deter.new_empty(deter.shape, dtype=torch.float32)


@torch.library.custom_op("fastdreamer::block_gru_step_train", mutates_args=())
def _train_op(
    deter: Tensor, stoch: Tensor, action: Tensor, ws: list[Tensor], bf16: bool, x0p: OptT, x1p: OptT, x2: OptT
) -> SavedT:
    """The step plus what backward needs: (out, pre, x, hpre, h, rs, gates)."""
    out, saved = forward(deter, stoch, action, BlockGRUWeights(*ws), save=True, bf16=bf16, x0p=x0p, x1p=x1p, x2=x2)
    return (out, *saved)


@_train_op.register_fake
def _train_op_fake(deter, stoch, action, ws, bf16, x0p, x1p, x2):
    B, D = deter.shape
    K = ws[0].shape[1]
    f32 = {"dtype": torch.float32}
    e = deter.new_empty
    return (
        e(B, D, **f32),
        e(B, 3 * K, **f32),
        e(B, 3 * K, **f32),
        e(B, D, **f32),
        e(B, D, **f32),
        e(B, **f32),
        e(B, 3 * D, **f32),
    )


@torch.library.custom_op("fastdreamer::block_gru_step_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    deter: Tensor,
    stoch: Tensor,
    action: Tensor,
    ws: list[Tensor],
    saved: list[Tensor],
    bf16: bool,
    x0p: OptT,
    x1p: OptT,
    x2: OptT,
) -> list[Tensor]:
    """backward()'s gradients, those of the given inputs that are None left out (a custom op returns tensors)."""
    grads = backward(dout, deter, stoch, action, BlockGRUWeights(*ws), saved, bf16, (x0p, x1p, x2))
    return [g for g in grads if g is not None]


@_bwd_op.register_fake
def _(dout, deter, stoch, action, ws, saved, bf16, x0p, x1p, x2):
    return [torch.empty_like(t) for t in (deter, stoch, action, *ws, x0p, x1p, x2) if t is not None]


def _given_back(given, grads: list[Tensor]) -> list[Tensor | None]:
    """The gradients of the given inputs, None where the input was None, from the op's list of the present ones."""
    it = iter(grads)
    return [None if t is None else next(it) for t in given]


def _train_setup(ctx, inputs, output):
    deter, stoch, action, ws, bf16, *given = inputs
    ctx.bf16, ctx.n_ws, ctx.has = bf16, len(ws), [t is not None for t in given]
    ctx.save_for_backward(deter, stoch, action, *ws, *output[1:], *(t for t in given if t is not None))


def _saved_given(ctx) -> tuple[list[Tensor], list[Tensor | None]]:
    """The saved tensors of a step op before the given inputs, and forward's (x0p, x1p, x2) with their Nones."""
    t = list(ctx.saved_tensors)
    n = sum(ctx.has)
    it = iter(t[len(t) - n :])
    return t[: len(t) - n], [next(it) if h else None for h in ctx.has]


def _train_backward(ctx, dout, *_saved_grads):
    t, given = _saved_given(ctx)
    n = 3 + ctx.n_ws
    g = _bwd_op(dout, t[0], t[1], t[2], t[3:n], t[n:], ctx.bf16, *given)
    no_stoch, no_action = unread(modes(*given))  # not read: no gradient (the op's zeros are not handed on)
    return g[0], None if no_stoch else g[1], None if no_action else g[2], list(g[3:n]), None, *_given_back(given, g[n:])


_train_op.register_autograd(_train_backward, setup_context=_train_setup)


# Deferred weight gradients (reference.step's taps, fastdreamer/defer.py): the same forward, and a backward that is
# only the four row-gradient kernels. It hands each tap its site's per-row gradient (the quantities the weight
# gradients above sum over rows) and computes no weight gradient; the step returns each site's other factor.
@torch.library.custom_op("fastdreamer::block_gru_step_tapped", mutates_args=())
def _tapped_op(
    deter: Tensor,
    stoch: Tensor,
    action: Tensor,
    ws: list[Tensor],
    taps: list[Tensor],
    bf16: bool,
    x0p: OptT,
    x1p: OptT,
    x2: OptT,
    first: OptT,
) -> TappedT:
    """_train_op with taps (zeros, in tap_sites order), which it does not read, and with x2 given the packed factors
    (forward's factors) after its outputs; without x2, a (B, 0) tensor there. first: forward's."""
    w = BlockGRUWeights(*ws)
    if x2 is None:
        out, saved = forward(deter, stoch, action, w, save=True, bf16=bf16, x0p=x0p, x1p=x1p, first=first)
        return (out, *saved, deter.new_empty((deter.shape[0], 0), dtype=torch.float32))
    out, saved, fac = forward(
        deter, stoch, action, w, save=True, bf16=bf16, x0p=x0p, x1p=x1p, x2=x2, factors=True, first=first
    )
    return (out, *saved, fac)


@_tapped_op.register_fake
def _(deter, stoch, action, ws, taps, bf16, x0p, x1p, x2, first):
    width = 0 if x2 is None else sum(reference.packed_widths(BlockGRUWeights(*ws)).values())
    fac = deter.new_empty((deter.shape[0], width), dtype=torch.float32)
    return (*_train_op_fake(deter, stoch, action, ws, bf16, x0p, x1p, x2), fac)


@torch.library.custom_op("fastdreamer::block_gru_step_rows", mutates_args=())
def _rows_op(
    dout: Tensor,
    deter: Tensor,
    stoch: Tensor,
    action: Tensor,
    ws: list[Tensor],
    saved: list[Tensor],
    bf16: bool,
    m2: int,
    x0p: OptT,
    x1p: OptT,
    first: OptT,
) -> list[Tensor]:
    """row_grads' gradients, the given products' last (those not given left out: a custom op returns tensors). The
    products are passed for their dtypes and presence (modes), not read."""
    mode = (*modes(x0p, x1p, None)[:2], m2)
    grads = row_grads(dout, deter, stoch, action, BlockGRUWeights(*ws), saved, bf16, mode, (x0p, x1p, None), first)
    return [g for g in grads if g is not None]


@_rows_op.register_fake
def _(dout, deter, stoch, action, ws, saved, bf16, m2, x0p, x1p, first):
    B, D = deter.shape
    K = ws[0].shape[1]
    widths = (D, stoch.shape[1], action.shape[1], 3 * K, 3 * K, D, D, 3 * D, 3 * K)
    rows = [deter.new_empty((B, n), dtype=torch.float32) for n in widths]
    return rows + [deter.new_empty((B, K), dtype=t.dtype) for t in (x0p, x1p) if t is not None]


def tap_sites(x2_given: bool) -> tuple[str, ...]:
    """The core's tap sites in TAP_SITES order; without the action branch's when the caller computed it (x2)."""
    return tuple(s for s in TAP_SITES if not (x2_given and s in ACTION_SITES))


def _tapped_setup(ctx, inputs, output):
    deter, stoch, action, ws, taps, bf16, *given = inputs
    ctx.bf16, ctx.n_ws, ctx.n_taps, ctx.has = bf16, len(ws), len(taps), [t is not None for t in given]
    ctx.save_for_backward(deter, stoch, action, *ws, *output[1:-1], *(t for t in given if t is not None))


def _tapped_backward(ctx, dout, *_output_grads):
    t, (*given, first) = _saved_given(ctx)
    deter, stoch, action = t[:3]
    mode = modes(*given)
    ddeter, dstoch, daction, dpre, dn_x, dhpre, dn_h, dgates, dx, *gin = _rows_op(
        dout, deter, stoch, action, t[3 : 3 + ctx.n_ws], t[3 + ctx.n_ws :], ctx.bf16, mode[2], *given[:2], first
    )
    gin = _given_back(given[:2], gin)
    K = dpre.shape[1] // 3
    per_site = {"h": dhpre, "nh": dn_h, "g": dgates}
    for i in range(3):
        per_site[f"x{i}"], per_site[f"n{i}"] = dpre[:, i * K : (i + 1) * K], dn_x[:, i * K : (i + 1) * K]
    taps = [per_site[s] for s in tap_sites(mode[2] == 2)]
    grads = [g.to(x.dtype) for g, x in zip((ddeter, dstoch, daction), (deter, stoch, action), strict=True)]
    no_stoch, no_action = unread(mode)  # row_grads left these unwritten: the inputs were not read
    grads = [grads[0], None if no_stoch else grads[1], None if no_action else grads[2]]
    return *grads, [None] * ctx.n_ws, taps, None, *_given_grads(gin, dx, given, copy=False), None


_tapped_op.register_autograd(_tapped_backward, setup_context=_tapped_setup)


def step(
    deter: torch.Tensor,
    stoch: torch.Tensor,
    action: torch.Tensor,
    w: BlockGRUWeights,
    bf16: bool = False,
    taps: dict[str, torch.Tensor] | None = None,
    x0p: torch.Tensor | None = None,
    x1p: torch.Tensor | None = None,
    x2: torch.Tensor | None = None,
    packed: bool = False,
    first: torch.Tensor | None = None,
):
    """One core step: deter (B, D), stoch (B, S*C), action (B, A) -> new deter (B, D) float32; differentiable
    (once: the backward itself is not). bf16: reference.step's bf16 compute. taps: as reference.step's (zeros at
    every site of TAP_SITES, less the action branch's with x2; the weights get no gradient here); then the return is
    (deter, seen). x0p, x1p, x2: reference.step's, computed by the caller (forward). packed (with taps and x2): the
    return is (deter, seen, the packed factors: reference.pack_factors(seen), as the kernels wrote them). first:
    reference.step's; the tapped kernels apply it as they read x0p and x1p and write their gradients masked (the
    observe loop's step then has no masking kernels of its own), the other paths mask the products here."""
    validate(deter, stoch, action, w)
    validate_given(deter, w, x0p=x0p, x1p=x1p, x2=x2)
    if taps is None:
        x0p, x1p = reference.reset_given(first, deter, x0p, x1p)
    else:
        reference.reset_given(first, deter, None, None)  # the check only: the tapped kernels apply first
    given = (x0p, x1p, x2)
    if packed and (taps is None or x2 is None):
        raise ValueError("block_gru fused: packed factors are for a tapped step given the action branch (taps and x2)")
    if taps is not None:
        sites = tap_sites(x2 is not None)
        if sorted(taps) != sorted(sites):
            raise ValueError(f"block_gru fused: taps at {sorted(taps)}, expected the sites {list(sites)}")
        outs = _tapped_op(deter, stoch, action, list(w), [taps[s] for s in sites], bf16, *given, first)
        fac = None if x2 is None else outs[-1]
        seen = _seen(deter, stoch, action, outs[1:-1], w.wh.shape[0], bf16, modes(*given), fac)
        return (outs[0], seen, fac) if packed else (outs[0], seen)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (deter, stoch, action, *w, *given) if t is not None):
        return _train_op(deter, stoch, action, list(w), bf16, *given)[0]
    return _step_op(deter, stoch, action, list(w), bf16, *given)


@torch.no_grad()
def rollout(
    deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights, bf16: bool = False
) -> torch.Tensor:
    """T steps with given inputs, no grad: deter (B, D), stoch (B, T, S*C), action (B, T, A) -> (B, T, D) float32.

    One step = three launches, T steps loop on the host; each step writes straight into the result and reads the
    previous step from it, so there is no stacking copy. Inside a CUDA graph the loop costs nothing on the host."""
    if stoch.dim() != 3 or action.dim() != 3 or stoch.shape[:2] != action.shape[:2]:
        raise ValueError(
            f"block_gru fused rollout: expected stoch (B, T, S*C) and action (B, T, A), got "
            f"{tuple(stoch.shape)}, {tuple(action.shape)}"
        )
    if stoch.shape[1] < 1:
        raise ValueError(f"block_gru fused rollout: no steps: stoch {tuple(stoch.shape)}")
    validate(deter, stoch[:, 0], action[:, 0], w)
    if max(stoch.numel(), action.numel(), stoch.shape[0] * stoch.shape[1] * deter.shape[1]) >= 2**31:
        raise ValueError(f"block_gru fused rollout: offsets are int32; stoch {tuple(stoch.shape)} is too long")
    return _rollout_op(deter, stoch, action, list(w), bf16)


@torch.library.custom_op("fastdreamer::block_gru_rollout", mutates_args=())
def _rollout_op(deter: Tensor, stoch: Tensor, action: Tensor, ws: list[Tensor], bf16: bool) -> Tensor:
    w = BlockGRUWeights(*ws)
    B, T = stoch.shape[:2]
    out = _empty((B, T, deter.shape[1]), deter.device)
    for t in range(T):
        forward(deter, stoch[:, t], action[:, t], w, out=out[:, t], bf16=bf16)
        deter = out[:, t]
    return out


@_rollout_op.register_fake
def _(deter, stoch, action, ws, bf16):
    return deter.new_empty((stoch.shape[0], stoch.shape[1], deter.shape[1]), dtype=torch.float32)
