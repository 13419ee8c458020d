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

The norm over deter spans blocks, so it is split across launches: the hidden kernel writes partial sums of
squares, the gate kernel (which needs the whole of h_g anyway) finishes the reduction per row. The backward
pass mirrors this with three kernels (gates, hidden, branches) that produce every per-row gradient
(d deter, d stoch, d action and the intermediate dgates, dhpre, dpre); weight gradients are then plain torch
matmul/einsum/sum over the batch, which cuBLAS does well and which keeps the kernels small.

Weights may be float32, bfloat16 or float16 (all the same dtype); they are upcast on load and every dot
accumulates in float32 with input_precision="ieee" (no TF32), because the spec computes in float32.
Inputs may be any of those dtypes; the output is float32, gradients come back in each input's dtype.

Tolerances (tests/kernels/test_block_gru.py uses these numbers; never loosen them to make a test pass):
    what                        atol    rtol    why
    output, fp32 weights        2e-5    1e-5    same float32 math, different summation order (tiles of 16-64
                                                vs cuBLAS / MKL); outputs are convex mixes of tanh and deter, so
                                                O(1); measured max error ~1e-6 at D<=40
    input grads, fp32 weights   1e-4    1e-4    summation order again, through two RMSNorm backwards, whose
                                                1/rms factors amplify rounding for rows with small norms
    weight grads, fp32 weights  1e-4    1e-4    sums over the batch of the above
    anything, bf16 weights      same as fp32, compared with reference.step run on the same bf16 weights upcast to
                                float32: the kernel upcasts them on load, so the math is identical. Weight grads
                                come back in bf16 (the weights' dtype), which adds one bf16 rounding: rtol 8e-3
                                (2 ulp at 2^-8) on those only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import EPS, BlockGRUWeights, check_shapes

__all__ = ["DEBUG_POISON", "DTYPES", "backward", "forward", "rollout", "step", "validate"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 4096  # the branch backward keeps a full row of K in registers
# Tests set this: every buffer a kernel should fully write starts as NaN, so an unwritten element shows.
DEBUG_POISON = os.environ.get("FASTDREAMER_KERNEL_POISON") == "1"
BB = 16  # rows per program; tl.dot needs every tile dimension >= 16


def _np2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 * sigmoid(2x) - 1: absolute error ~1e-7, which is what the tolerance table asks of it.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _silu_grad(n):
    sg = 1.0 / (1.0 + tl.exp(-n))
    return sg * (1.0 + n * (1.0 - sg))


# ---------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _branch_pre(inp_ptr, inp_stride, w_ptr, b_ptr, pre_ptr, br, B, N_IN, K, row0, k0,
                BB: tl.constexpr, BI: tl.constexpr, BKC: tl.constexpr):
    rows = row0 + tl.arange(0, BB)
    ks = k0 + tl.arange(0, BKC)
    rmask = rows < B
    kmask = ks < K
    acc = tl.zeros((BB, BKC), tl.float32)
    for i0 in range(0, N_IN, BI):
        ii = i0 + tl.arange(0, BI)
        imask = ii < N_IN
        a = tl.load(inp_ptr + rows[:, None] * inp_stride + ii[None, :], mask=rmask[:, None] & imask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ii[:, None] * K + ks[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    acc += tl.load(b_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    tl.store(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], acc, mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _fwd_branches(deter_ptr, deter_stride, stoch_ptr, stoch_stride, action_ptr, action_stride,
                  w0, b0, w1, b1, w2, b2, pre_ptr, B, D, SC, A, K,
                  BB: tl.constexpr, BI: tl.constexpr, BKC: tl.constexpr):
    row0 = tl.program_id(0) * BB
    br = tl.program_id(1)
    k0 = tl.program_id(2) * BKC
    if br == 0:
        _branch_pre(deter_ptr, deter_stride, w0, b0, pre_ptr, 0, B, D, K, row0, k0, BB, BI, BKC)
    elif br == 1:
        _branch_pre(stoch_ptr, stoch_stride, w1, b1, pre_ptr, 1, B, SC, K, row0, k0, BB, BI, BKC)
    else:
        _branch_pre(action_ptr, action_stride, w2, b2, pre_ptr, 2, B, A, K, row0, k0, BB, BI, BKC)


@triton.jit
def _x_part(acc, pre_ptr, s_ptr, wh_blk, x_ptr, write_x, br: tl.constexpr, rows, rmask, js, jmask, K, DG,
            BB: tl.constexpr, BK: tl.constexpr, SAVE: tl.constexpr):
    """acc += silu(rms(pre_br) * s) @ wh[g, DG + br*K : DG + (br+1)*K, js] for one block's output chunk."""
    ss = tl.zeros((BB,), tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        p = tl.load(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :],
                    mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
        ss += tl.sum(p * p, 1)
    rs = 1.0 / tl.sqrt(ss / K + 1e-4)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        p = tl.load(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], mask=m, other=0.0)
        s = tl.load(s_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        n = p * rs[:, None] * s[None, :]
        x = tl.where(m, n * _sigmoid(n), 0.0)
        if SAVE:  # noqa: SIM102 (SAVE is a compile-time constant, write_x a runtime one)
            if write_x:
                tl.store(x_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], x, mask=m)
        w = tl.load(wh_blk + (DG + br * K + ks[:, None]) * DG + js[None, :], mask=kmask[:, None] & jmask[None, :],
                    other=0.0)
        acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _fwd_hidden(deter_ptr, deter_stride, pre_ptr, s0, s1, s2, wh_ptr, bh_ptr, hpre_ptr, part_ptr, x_ptr,
                B, DG, K, NJ,
                BB: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, SAVE: tl.constexpr):
    row0 = tl.program_id(0) * BB
    g = tl.program_id(1)
    pj = tl.program_id(2)
    rows = row0 + tl.arange(0, BB)
    js = pj * BJ + tl.arange(0, BJ)
    rmask = rows < B
    jmask = js < DG
    D = DG * tl.num_programs(1)
    wh_blk = wh_ptr + g * (DG + 3 * K) * DG
    acc = tl.zeros((BB, BJ), tl.float32)
    for i0 in range(0, DG, BI):
        ii = i0 + tl.arange(0, BI)
        imask = ii < DG
        a = tl.load(deter_ptr + rows[:, None] * deter_stride + g * DG + ii[None, :],
                    mask=rmask[:, None] & imask[None, :], other=0.0).to(tl.float32)
        w = tl.load(wh_blk + ii[:, None] * DG + js[None, :], mask=imask[:, None] & jmask[None, :], other=0.0)
        acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    write_x = (g == 0) & (pj == 0)
    acc = _x_part(acc, pre_ptr, s0, wh_blk, x_ptr, write_x, 0, rows, rmask, js, jmask, K, DG, BB, BK, SAVE)
    acc = _x_part(acc, pre_ptr, s1, wh_blk, x_ptr, write_x, 1, rows, rmask, js, jmask, K, DG, BB, BK, SAVE)
    acc = _x_part(acc, pre_ptr, s2, wh_blk, x_ptr, write_x, 2, rows, rmask, js, jmask, K, DG, BB, BK, SAVE)
    m = rmask[:, None] & jmask[None, :]
    hpre = tl.where(m, acc + tl.load(bh_ptr + g * DG + js, mask=jmask, other=0.0).to(tl.float32)[None, :], 0.0)
    tl.store(hpre_ptr + rows[:, None] * D + g * DG + js[None, :], hpre, mask=m)
    tl.store(part_ptr + rows * (tl.num_programs(1) * NJ) + g * NJ + pj, tl.sum(hpre * hpre, 1), mask=rmask)


@triton.jit
def _fwd_gates(deter_ptr, deter_stride, hpre_ptr, part_ptr, sh_ptr, wg_ptr, bg_ptr, out_ptr, out_stride,
               h_ptr, rs_ptr, gates_ptr, B, DG, NP,
               BB: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BP: tl.constexpr, SAVE: tl.constexpr):
    row0 = tl.program_id(0) * BB
    g = tl.program_id(1)
    pj = tl.program_id(2)
    rows = row0 + tl.arange(0, BB)
    js = pj * BJ + tl.arange(0, BJ)
    rmask = rows < B
    jmask = js < DG
    D = DG * tl.num_programs(1)
    ps = tl.arange(0, BP)
    part = tl.load(part_ptr + rows[:, None] * NP + ps[None, :], mask=rmask[:, None] & (ps < NP)[None, :], other=0.0)
    rs = 1.0 / tl.sqrt(tl.sum(part, 1) / D + 1e-4)
    first = (g == 0) & (pj == 0)
    if SAVE:  # noqa: SIM102 (SAVE is a compile-time constant, first a runtime one)
        if first:
            tl.store(rs_ptr + rows, rs, mask=rmask)
    wg_blk = wg_ptr + g * DG * 3 * DG
    acc_r = tl.zeros((BB, BJ), tl.float32)
    acc_c = tl.zeros((BB, BJ), tl.float32)
    acc_z = tl.zeros((BB, BJ), tl.float32)
    for i0 in range(0, DG, BI):
        ii = i0 + tl.arange(0, BI)
        imask = ii < DG
        m = rmask[:, None] & imask[None, :]
        hp = tl.load(hpre_ptr + rows[:, None] * D + g * DG + ii[None, :], mask=m, other=0.0)
        sh = tl.load(sh_ptr + g * DG + ii, mask=imask, other=0.0).to(tl.float32)
        n = hp * rs[:, None] * sh[None, :]
        h = tl.where(m, n * _sigmoid(n), 0.0)
        if SAVE:  # noqa: SIM102 (SAVE is a compile-time constant, pj a runtime one)
            if pj == 0:
                tl.store(h_ptr + rows[:, None] * D + g * DG + ii[None, :], h, mask=m)
        wm = imask[:, None] & jmask[None, :]
        wp = wg_blk + ii[:, None] * (3 * DG) + js[None, :]
        acc_r = tl.dot(h, tl.load(wp, mask=wm, other=0.0).to(tl.float32), acc_r, input_precision="ieee")
        acc_c = tl.dot(h, tl.load(wp + DG, mask=wm, other=0.0).to(tl.float32), acc_c, input_precision="ieee")
        acc_z = tl.dot(h, tl.load(wp + 2 * DG, mask=wm, other=0.0).to(tl.float32), acc_z, input_precision="ieee")
    bp = bg_ptr + g * 3 * DG + js
    gr = acc_r + tl.load(bp, mask=jmask, other=0.0).to(tl.float32)[None, :]
    gc = acc_c + tl.load(bp + DG, mask=jmask, other=0.0).to(tl.float32)[None, :]
    gz = acc_z + tl.load(bp + 2 * DG, mask=jmask, other=0.0).to(tl.float32)[None, :]
    m = rmask[:, None] & jmask[None, :]
    if SAVE:
        gp = gates_ptr + rows[:, None] * (3 * D) + g * 3 * DG + js[None, :]
        tl.store(gp, gr, mask=m)
        tl.store(gp + DG, gc, mask=m)
        tl.store(gp + 2 * DG, gz, mask=m)
    d = tl.load(deter_ptr + rows[:, None] * deter_stride + g * DG + js[None, :], mask=m, other=0.0).to(tl.float32)
    r = _sigmoid(gr)
    c = _tanh(r * gc)
    z = _sigmoid(gz - 1.0)
    tl.store(out_ptr + rows[:, None] * out_stride + g * DG + js[None, :], z * c + (1.0 - z) * d, mask=m)


# ---------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_gates(dout_ptr, deter_ptr, deter_stride, gates_ptr, hpre_ptr, rs_ptr, sh_ptr, wg_ptr,
               dgates_ptr, ddeter_ptr, dn_ptr, dy_ptr, part_ptr, B, DG, NJ,
               BB: tl.constexpr, BO: tl.constexpr, BJ: tl.constexpr):
    """dgates (elementwise), dh_g = dgates_g @ wg[g]^T for a chunk of h, then the first half of the norm's
    backward: dn = dh * silu'(n), dy = dn * sh and partial sums of dy * y for the row reduction."""
    row0 = tl.program_id(0) * BB
    g = tl.program_id(1)
    pj = tl.program_id(2)
    rows = row0 + tl.arange(0, BB)
    js = pj * BJ + tl.arange(0, BJ)
    rmask = rows < B
    jmask = js < DG
    D = DG * tl.num_programs(1)
    wg_blk = wg_ptr + g * DG * 3 * DG
    dh = tl.zeros((BB, BJ), tl.float32)
    for o0 in range(0, DG, BO):
        oo = o0 + tl.arange(0, BO)
        omask = oo < DG
        m = rmask[:, None] & omask[None, :]
        gp = gates_ptr + rows[:, None] * (3 * D) + g * 3 * DG + oo[None, :]
        gr = tl.load(gp, mask=m, other=0.0)
        gc = tl.load(gp + DG, mask=m, other=0.0)
        gz = tl.load(gp + 2 * DG, mask=m, other=0.0)
        d = tl.load(deter_ptr + rows[:, None] * deter_stride + g * DG + oo[None, :], mask=m, other=0.0)
        do = tl.load(dout_ptr + rows[:, None] * D + g * DG + oo[None, :], mask=m, other=0.0)
        d = d.to(tl.float32)
        r = _sigmoid(gr)
        c = _tanh(r * gc)
        z = _sigmoid(gz - 1.0)
        dgz = tl.where(m, do * (c - d) * z * (1.0 - z), 0.0)
        drc = do * z * (1.0 - c * c)  # through tanh, to the product r * c
        dgc = tl.where(m, drc * r, 0.0)
        dgr = tl.where(m, drc * gc * r * (1.0 - r), 0.0)
        if pj == 0:
            dgp = dgates_ptr + rows[:, None] * (3 * D) + g * 3 * DG + oo[None, :]
            tl.store(dgp, dgr, mask=m)
            tl.store(dgp + DG, dgc, mask=m)
            tl.store(dgp + 2 * DG, dgz, mask=m)
            tl.store(ddeter_ptr + rows[:, None] * D + g * DG + oo[None, :], do * (1.0 - z), mask=m)
        wm = omask[:, None] & jmask[None, :]
        wp = wg_blk + js[None, :] * (3 * DG) + oo[:, None]  # wg[g, js, oo] read as (BO, BJ)
        dh = tl.dot(dgr, tl.load(wp, mask=wm, other=0.0).to(tl.float32), dh, input_precision="ieee")
        dh = tl.dot(dgc, tl.load(wp + DG, mask=wm, other=0.0).to(tl.float32), dh, input_precision="ieee")
        dh = tl.dot(dgz, tl.load(wp + 2 * DG, mask=wm, other=0.0).to(tl.float32), dh, input_precision="ieee")
    m = rmask[:, None] & jmask[None, :]
    hp = tl.load(hpre_ptr + rows[:, None] * D + g * DG + js[None, :], mask=m, other=0.0)
    rs = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
    sh = tl.load(sh_ptr + g * DG + js, mask=jmask, other=0.0).to(tl.float32)
    y = hp * rs[:, None]
    dn = tl.where(m, dh * _silu_grad(y * sh[None, :]), 0.0)
    dy = dn * sh[None, :]
    tl.store(dn_ptr + rows[:, None] * D + g * DG + js[None, :], dn, mask=m)
    tl.store(dy_ptr + rows[:, None] * D + g * DG + js[None, :], dy, mask=m)
    tl.store(part_ptr + rows * (tl.num_programs(1) * NJ) + g * NJ + pj, tl.sum(dy * y, 1), mask=rmask)


@triton.jit
def _bwd_hidden(dy_ptr, hpre_ptr, rs_ptr, part_ptr, wh_ptr, dhpre_ptr, ddeter_ptr, B, DG, K, NP,
                BB: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BP: tl.constexpr):
    """Finish the norm's backward (dhpre = rs * (dy - y * mean(dy * y))) and add dhpre_g @ wh[g, :DG]^T to
    d deter for a chunk of the block's deter inputs."""
    row0 = tl.program_id(0) * BB
    g = tl.program_id(1)
    pi = tl.program_id(2)
    rows = row0 + tl.arange(0, BB)
    ii = pi * BI + tl.arange(0, BI)
    rmask = rows < B
    imask = ii < DG
    D = DG * tl.num_programs(1)
    ps = tl.arange(0, BP)
    part = tl.load(part_ptr + rows[:, None] * NP + ps[None, :], mask=rmask[:, None] & (ps < NP)[None, :], other=0.0)
    mean = tl.sum(part, 1) / D
    rs = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
    wh_blk = wh_ptr + g * (DG + 3 * K) * DG
    acc = tl.zeros((BB, BI), tl.float32)
    for j0 in range(0, DG, BJ):
        jj = j0 + tl.arange(0, BJ)
        jmask = jj < DG
        m = rmask[:, None] & jmask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * D + g * DG + jj[None, :], mask=m, other=0.0)
        y = tl.load(hpre_ptr + rows[:, None] * D + g * DG + jj[None, :], mask=m, other=0.0) * rs[:, None]
        dhp = tl.where(m, rs[:, None] * (dy - y * mean[:, None]), 0.0)
        if pi == 0:
            tl.store(dhpre_ptr + rows[:, None] * D + g * DG + jj[None, :], dhp, mask=m)
        w = tl.load(wh_blk + ii[None, :] * DG + jj[:, None], mask=jmask[:, None] & imask[None, :], other=0.0)
        acc = tl.dot(dhp, w.to(tl.float32), acc, input_precision="ieee")
    m = rmask[:, None] & imask[None, :]
    dp = ddeter_ptr + rows[:, None] * D + g * DG + ii[None, :]
    tl.store(dp, tl.load(dp, mask=m, other=0.0) + acc, mask=m)


@triton.jit
def _branch_bwd(dhpre_ptr, pre_ptr, s_ptr, w_ptr, wh_ptr, dn_ptr, dpre_ptr, dinp_ptr, br, B, N_IN, K, DG, G, row0,
                BB: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, ACCUM: tl.constexpr):
    rows = row0 + tl.arange(0, BB)
    ks = tl.arange(0, BK)
    rmask = rows < B
    kmask = ks < K
    D = DG * G
    dx = tl.zeros((BB, BK), tl.float32)
    for g in range(G):
        wh_blk = wh_ptr + g * (DG + 3 * K) * DG
        for j0 in range(0, DG, BJ):
            jj = j0 + tl.arange(0, BJ)
            jmask = jj < DG
            dhp = tl.load(dhpre_ptr + rows[:, None] * D + g * DG + jj[None, :], mask=rmask[:, None] & jmask[None, :],
                          other=0.0)
            w = tl.load(wh_blk + (DG + br * K + ks[None, :]) * DG + jj[:, None], mask=jmask[:, None] & kmask[None, :],
                        other=0.0)  # wh[g, DG + br*K + ks, jj] read as (BJ, BK)
            dx = tl.dot(dhp, w.to(tl.float32), dx, input_precision="ieee")
    m = rmask[:, None] & kmask[None, :]
    p = tl.load(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], mask=m, other=0.0)
    rs = 1.0 / tl.sqrt(tl.sum(p * p, 1) / K + 1e-4)
    s = tl.load(s_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    y = p * rs[:, None]
    dn = tl.where(m, dx * _silu_grad(y * s[None, :]), 0.0)
    dy = dn * s[None, :]
    mean = tl.sum(dy * y, 1) / K
    dpre = tl.where(m, rs[:, None] * (dy - y * mean[:, None]), 0.0)
    tl.store(dn_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], dn, mask=m)
    tl.store(dpre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], dpre, mask=m)
    for i0 in range(0, N_IN, BI):
        ii = i0 + tl.arange(0, BI)
        imask = ii < N_IN
        w = tl.load(w_ptr + ii[None, :] * K + ks[:, None], mask=kmask[:, None] & imask[None, :], other=0.0)
        di = tl.dot(dpre, w.to(tl.float32), input_precision="ieee")  # (BB, BI)
        om = rmask[:, None] & imask[None, :]
        op = dinp_ptr + rows[:, None] * N_IN + ii[None, :]
        if ACCUM:
            di += tl.load(op, mask=om, other=0.0)
        tl.store(op, di, mask=om)


@triton.jit
def _bwd_branches(dhpre_ptr, pre_ptr, s0, s1, s2, w0, w1, w2, wh_ptr, dn_ptr, dpre_ptr,
                  ddeter_ptr, dstoch_ptr, daction_ptr, B, D, SC, A, K, DG, G,
                  BB: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """d x_i = dhpre @ wh[:, DG + i*K : DG + (i+1)*K]^T summed over blocks, the branch norm's backward, and
    d input_i = dpre_i @ w_i^T (added to d deter for branch 0)."""
    row0 = tl.program_id(0) * BB
    br = tl.program_id(1)
    if br == 0:
        _branch_bwd(dhpre_ptr, pre_ptr, s0, w0, wh_ptr, dn_ptr, dpre_ptr, ddeter_ptr, 0, B, D, K, DG, G, row0,
                    BB, BI, BJ, BK, True)
    elif br == 1:
        _branch_bwd(dhpre_ptr, pre_ptr, s1, w1, wh_ptr, dn_ptr, dpre_ptr, dstoch_ptr, 1, B, SC, K, DG, G, row0,
                    BB, BI, BJ, BK, False)
    else:
        _branch_bwd(dhpre_ptr, pre_ptr, s2, w2, wh_ptr, dn_ptr, dpre_ptr, daction_ptr, 2, B, A, K, DG, G, row0,
                    BB, BI, BJ, BK, False)


# ---------------------------------------------------------------------------------------------------------------
# host side


def validate(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> None:
    """The reference's shape checks plus what these kernels need: dtypes, one device, contiguous weights."""
    check_shapes(deter, stoch, action, w)
    dtypes = {t.dtype for t in w}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"block_gru fused: weights must share one dtype of {DTYPES}, got "
                         f"{ {n: str(t.dtype) for n, t in zip(w._fields, w)} }")
    for name, t in (("deter", deter), ("stoch", stoch), ("action", action)):
        if t.dtype not in DTYPES:
            raise ValueError(f"block_gru fused: {name} {tuple(t.shape)} has dtype {t.dtype}, expected one of {DTYPES}")
    for name, t in zip(w._fields, w):
        if not t.is_contiguous():
            raise ValueError(f"block_gru fused: weight {name} {tuple(t.shape)} with stride {t.stride()} is not "
                             "contiguous")
    devices = {t.device for t in (deter, stoch, action, *w)}
    if len(devices) != 1:
        raise ValueError(f"block_gru fused: tensors on several devices {sorted(map(str, devices))}; deter "
                         f"{tuple(deter.shape)}")
    device = devices.pop()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"block_gru fused: deter {tuple(deter.shape)} is on {device}; the kernels need CUDA "
                         "(or TRITON_INTERPRET=1)")
    K = w.w0.shape[1]
    if K > MAX_HIDDEN:
        raise ValueError(f"block_gru fused: hidden {K} (w0 {tuple(w.w0.shape)}) exceeds {MAX_HIDDEN}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (B, N) view the kernels can read: any row stride, unit column stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights, save: bool = False,
            out: torch.Tensor | None = None):
    """One core step. Returns the new deter (B, D) float32 and, with save=True, the activations backward needs.

    `out` may be any (B, D) float32 view with unit column stride (rollout writes into its (B, T, D) result)."""
    deter, stoch, action = _rows(deter), _rows(stoch), _rows(action)
    B, D = deter.shape
    G, DG, K = w.wh.shape[0], D // w.wh.shape[0], w.w0.shape[1]
    SC, A = stoch.shape[1], action.shape[1]
    dev = deter.device
    BJ, BI, BK = _np2(DG), _np2(DG), _np2(K, hi=128)
    NJ = triton.cdiv(DG, BJ)
    nb = triton.cdiv(B, BB)
    pre = _empty((B, 3 * K), dev)
    hpre = _empty((B, D), dev)
    part = _empty((B, G * NJ), dev)
    if out is None:
        out = _empty((B, D), dev)
    if save:
        x, h, rs, gates = _empty((B, 3 * K), dev), _empty((B, D), dev), _empty((B,), dev), _empty((B, 3 * D), dev)
    else:
        x = h = rs = gates = pre  # never written: SAVE is off
    _fwd_branches[(nb, 3, triton.cdiv(K, BK))](
        deter, deter.stride(0), stoch, stoch.stride(0), action, action.stride(0),
        w.w0, w.b0, w.w1, w.b1, w.w2, w.b2, pre, B, D, SC, A, K, BB=BB, BI=_np2(max(D, SC, A)), BKC=BK)
    _fwd_hidden[(nb, G, NJ)](
        deter, deter.stride(0), pre, w.s0, w.s1, w.s2, w.wh, w.bh, hpre, part, x, B, DG, K, NJ,
        BB=BB, BI=BI, BJ=BJ, BK=BK, SAVE=save)
    _fwd_gates[(nb, G, NJ)](
        deter, deter.stride(0), hpre, part, w.sh, w.wg, w.bg, out, out.stride(0), h, rs, gates, B, DG, G * NJ,
        BB=BB, BI=BI, BJ=BJ, BP=triton.next_power_of_2(G * NJ), SAVE=save)
    if not save:
        return out
    return out, (pre, x, hpre, h, rs, gates)


def backward(dout: torch.Tensor, deter, stoch, action, w: BlockGRUWeights, saved, needs: tuple[bool, ...]):
    """Gradients of one step for (deter, stoch, action, *w); None where `needs` is False."""
    pre, x, hpre, h, rs, gates = saved
    deter, stoch, action = _rows(deter), _rows(stoch), _rows(action)
    dout = dout.float().contiguous()
    B, D = deter.shape
    G, DG, K = w.wh.shape[0], D // w.wh.shape[0], w.w0.shape[1]
    SC, A = stoch.shape[1], action.shape[1]
    dev = deter.device
    BJ, BI = _np2(DG), _np2(DG)
    NJ = triton.cdiv(DG, BJ)
    nb = triton.cdiv(B, BB)
    dgates, ddeter = _empty((B, 3 * D), dev), _empty((B, D), dev)
    dn_h, dy_h, dhpre, part = _empty((B, D), dev), _empty((B, D), dev), _empty((B, D), dev), _empty((B, G * NJ), dev)
    dn_x, dpre = _empty((B, 3 * K), dev), _empty((B, 3 * K), dev)
    dstoch, daction = _empty((B, SC), dev), _empty((B, A), dev)
    _bwd_gates[(nb, G, NJ)](dout, deter, deter.stride(0), gates, hpre, rs, w.sh, w.wg, dgates, ddeter, dn_h, dy_h,
                            part, B, DG, NJ, BB=BB, BO=BI, BJ=BJ)
    _bwd_hidden[(nb, G, triton.cdiv(DG, BI))](dy_h, hpre, rs, part, w.wh, dhpre, ddeter, B, DG, K, G * NJ,
                                              BB=BB, BI=BI, BJ=BJ, BP=triton.next_power_of_2(G * NJ))
    _bwd_branches[(nb, 3)](dhpre, pre, w.s0, w.s1, w.s2, w.w0, w.w1, w.w2, w.wh, dn_x, dpre, ddeter, dstoch, daction,
                           B, D, SC, A, K, DG, G, BB=BB, BI=_np2(max(D, SC, A)), BJ=BJ,
                           BK=max(16, triton.next_power_of_2(K)))
    grads: list[torch.Tensor | None] = [
        ddeter.to(deter.dtype) if needs[0] else None,
        dstoch.to(stoch.dtype) if needs[1] else None,
        daction.to(action.dtype) if needs[2] else None,
    ]
    if not any(needs[3:]):
        return grads + [None] * 14
    # Weight grads: sums over the batch of the per-row grads above, as plain matmuls.
    rs_x = torch.rsqrt(pre.view(B, 3, K).square().mean(-1) + EPS)  # (B, 3)
    y_x = (pre.view(B, 3, K) * rs_x[..., None])  # (B, 3, K)
    ds_x = (dn_x.view(B, 3, K) * y_x).sum(0)  # (3, K)
    db_x = dpre.view(B, 3, K).sum(0)
    dp = dpre.view(B, 3, K)
    dw = [inp.float().t() @ dp[:, i] for i, inp in enumerate((deter, stoch, action))]
    dhp = dhpre.view(B, G, DG)
    dwh = torch.cat([torch.einsum("bgi,bgo->gio", deter.float().view(B, G, DG), dhp),
                     torch.einsum("bk,bgo->gko", x, dhp)], 1)
    dsh = (dn_h * hpre * rs[:, None]).sum(0)
    dwg = torch.einsum("bgi,bgo->gio", h.view(B, G, DG), dgates.view(B, G, 3 * DG))
    wgrads = [dw[0], db_x[0], ds_x[0], dw[1], db_x[1], ds_x[1], dw[2], db_x[2], ds_x[2],
              dwh, dhpre.sum(0), dsh, dwg, dgates.sum(0)]
    return grads + [g.to(t.dtype) if need else None for g, t, need in zip(wgrads, w, needs[3:])]


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, deter, stoch, action, *weights):
        w = BlockGRUWeights(*weights)
        out, saved = forward(deter, stoch, action, w, save=True)
        ctx.save_for_backward(deter, stoch, action, *weights, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        t = ctx.saved_tensors
        return tuple(backward(dout, t[0], t[1], t[2], BlockGRUWeights(*t[3:17]), t[17:], ctx.needs_input_grad))


def step(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> torch.Tensor:
    """One core step: deter (B, D), stoch (B, S*C), action (B, A) -> new deter (B, D) float32; differentiable."""
    validate(deter, stoch, action, w)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (deter, stoch, action, *w)):
        return _Step.apply(deter, stoch, action, *w)
    return forward(deter, stoch, action, w)


@torch.no_grad()
def rollout(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> torch.Tensor:
    """T steps with given inputs, no grad: deter (B, D), stoch (B, T, S*C), action (B, T, A) -> (B, T, D) float32.

    One step = three launches, T steps loop on the host; each step writes straight into the result and reads the
    previous step from it, so there is no stacking copy. Inside a CUDA graph the loop costs nothing on the host."""
    if stoch.dim() != 3 or action.dim() != 3 or stoch.shape[:2] != action.shape[:2]:
        raise ValueError(f"block_gru fused rollout: expected stoch (B, T, S*C) and action (B, T, A), got "
                         f"{tuple(stoch.shape)}, {tuple(action.shape)}")
    validate(deter, stoch[:, 0], action[:, 0], w)
    B, T = stoch.shape[:2]
    out = _empty((B, T, deter.shape[1]), deter.device)
    for t in range(T):
        forward(deter, stoch[:, t], action[:, t], w, out=out[:, t])
        deter = out[:, t]
    return out
