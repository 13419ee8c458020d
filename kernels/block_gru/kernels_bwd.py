"""Backward Triton kernels of the block-GRU step: every per-row gradient (fused.py turns them into weight grads).

In bf16 compute (BF16) the forward rounded each dot's operands to bfloat16 and the gradient goes straight through
that rounding (reference.py): so the backward dots use the rounded weights, and the incoming gradients stay float32.
Every dot here is float32 without TF32.
"""

import triton
import triton.language as tl

from .kernels_fwd import _operand, _row_keep, _sigmoid, _silu_grad, _tanh


@triton.jit
def _bwd_gates(
    dout_ptr,
    deter_ptr,
    deter_stride,
    gates_ptr,
    hpre_ptr,
    rs_ptr,
    sh_ptr,
    wg_ptr,
    dgates_ptr,
    ddeter_ptr,
    dn_ptr,
    dy_ptr,
    part_ptr,
    B,
    DG,
    NJ,
    BB: tl.constexpr,
    BO: tl.constexpr,
    BJ: tl.constexpr,
    BF16: tl.constexpr,
):
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
        dh = tl.dot(dgr, _operand(tl.load(wp, mask=wm, other=0.0), BF16, False), dh, input_precision="ieee")
        dh = tl.dot(dgc, _operand(tl.load(wp + DG, mask=wm, other=0.0), BF16, False), dh, input_precision="ieee")
        dh = tl.dot(dgz, _operand(tl.load(wp + 2 * DG, mask=wm, other=0.0), BF16, False), dh, input_precision="ieee")
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
def _bwd_hidden(
    dy_ptr,
    hpre_ptr,
    rs_ptr,
    part_ptr,
    wh_ptr,
    dhpre_ptr,
    ddeter_ptr,
    B,
    DG,
    K,
    NP,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    BP: tl.constexpr,
    BF16: tl.constexpr,
):
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
        acc = tl.dot(dhp, _operand(w, BF16, False), acc, input_precision="ieee")
    m = rmask[:, None] & imask[None, :]
    dp = ddeter_ptr + rows[:, None] * D + g * DG + ii[None, :]
    tl.store(dp, tl.load(dp, mask=m, other=0.0) + acc, mask=m)


@triton.jit
def _bwd_dx(
    dhpre_ptr, wh_ptr, dx_ptr, B, DG, G, K, BB: tl.constexpr, BJ: tl.constexpr, BKC: tl.constexpr, BF16: tl.constexpr
):
    """dx = dhpre @ Wx^T for a chunk of the 3K branch outputs, Wx (3K, D) being every block's wh[g, DG:, :] side
    by side: x feeds every block, so its gradient sums over all of them."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    ks = tl.program_id(1) * BKC + tl.arange(0, BKC)
    rmask = rows < B
    kmask = ks < 3 * K
    D = DG * G
    dx = tl.zeros((BB, BKC), tl.float32)
    for g in range(G):
        wh_blk = wh_ptr + g * (DG + 3 * K) * DG
        for j0 in range(0, DG, BJ):
            jj = j0 + tl.arange(0, BJ)
            jmask = jj < DG
            dhp = tl.load(
                dhpre_ptr + rows[:, None] * D + g * DG + jj[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0
            )
            w = tl.load(
                wh_blk + (DG + ks[None, :]) * DG + jj[:, None], mask=jmask[:, None] & kmask[None, :], other=0.0
            )  # wh[g, DG + ks, jj] read as (BJ, BKC)
            dx = tl.dot(dhp, _operand(w, BF16, False), dx, input_precision="ieee")
    tl.store(dx_ptr + rows[:, None] * (3 * K) + ks[None, :], dx, mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _branch_bwd(
    dx_ptr,
    pre_ptr,
    s_ptr,
    w_ptr,
    dn_ptr,
    dpre_ptr,
    dinp_ptr,
    gin_ptr,
    keep,
    br,
    B,
    N_IN,
    K,
    row0,
    pi,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BKC: tl.constexpr,
    ACCUM: tl.constexpr,
    MODE: tl.constexpr,
    BF16: tl.constexpr,
):
    """The branch norm's backward for these rows (three chunked passes: rms, mean(dy * y), dpre) and, with MODE 0,
    d input[:, chunk pi] = dpre @ w[chunk]^T (otherwise the caller computed the branch's product, whose gradient is
    dpre times the rows' keep, which chunk 0 writes to gin (B, K) in gin's dtype: only chunk 0 runs). Every input
    chunk recomputes the row scalars, which costs two reads of a K-wide row instead of a launch."""
    rows = row0 + tl.arange(0, BB)
    rmask = rows < B
    base = rows[:, None] * (3 * K) + br * K
    ss = tl.zeros((BB,), tl.float32)
    for k0 in range(0, K, BKC):
        ks = k0 + tl.arange(0, BKC)
        p = tl.load(pre_ptr + base + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
        ss += tl.sum(p * p, 1)
    rs = 1.0 / tl.sqrt(ss / K + 1e-4)
    dyy = tl.zeros((BB,), tl.float32)
    for k0 in range(0, K, BKC):
        ks = k0 + tl.arange(0, BKC)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        y = tl.load(pre_ptr + base + ks[None, :], mask=m, other=0.0) * rs[:, None]
        s = tl.load(s_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + base + ks[None, :], mask=m, other=0.0)
        dyy += tl.sum(dx * _silu_grad(y * s[None, :]) * s[None, :] * y, 1)
    mean = dyy / K
    ii = pi * BI + tl.arange(0, BI)
    imask = ii < N_IN
    di = tl.zeros((BB, BI), tl.float32)
    for k0 in range(0, K, BKC):
        ks = k0 + tl.arange(0, BKC)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        y = tl.load(pre_ptr + base + ks[None, :], mask=m, other=0.0) * rs[:, None]
        s = tl.load(s_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + base + ks[None, :], mask=m, other=0.0)
        dn = tl.where(m, dx * _silu_grad(y * s[None, :]), 0.0)
        dpre = tl.where(m, rs[:, None] * (dn * s[None, :] - y * mean[:, None]), 0.0)
        if pi == 0:
            tl.store(dn_ptr + base + ks[None, :], dn, mask=m)
            tl.store(dpre_ptr + base + ks[None, :], dpre, mask=m)
            if MODE == 1:
                gp = gin_ptr + rows[:, None] * K + ks[None, :]
                tl.store(gp, (dpre * keep[:, None]).to(gin_ptr.dtype.element_ty), mask=m)
        if MODE == 0:
            w = tl.load(w_ptr + ii[None, :] * K + ks[:, None], mask=kmask[:, None] & imask[None, :], other=0.0)
            di = tl.dot(dpre, _operand(w, BF16, False), di, input_precision="ieee")  # w[ii, ks] read as (BKC, BI)
    if MODE == 0:
        om = rmask[:, None] & imask[None, :]
        op = dinp_ptr + rows[:, None] * N_IN + ii[None, :]
        if ACCUM:
            di += tl.load(op, mask=om, other=0.0)
        tl.store(op, di, mask=om)


@triton.jit
def _bwd_branches(
    dx_ptr,
    pre_ptr,
    s0,
    s1,
    s2,
    w0,
    w1,
    w2,
    dn_ptr,
    dpre_ptr,
    ddeter_ptr,
    dstoch_ptr,
    daction_ptr,
    g0_ptr,
    g1_ptr,
    first_ptr,
    first_stride,
    B,
    D,
    SC,
    A,
    K,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BKC: tl.constexpr,
    M0: tl.constexpr,
    M1: tl.constexpr,
    M2: tl.constexpr,
    RESET: tl.constexpr,
    BF16: tl.constexpr,
):
    """Grid (B/BB, 3, max(D, S*C, A)/BI): branch norm backward and d input_i = dpre_i @ w_i^T, added to d deter for
    branch 0. Programs past a branch's input width have nothing to do, except chunk 0 which always writes dpre.
    M_i is branch i's source as in _fwd_hidden: 0 computed here (as above), 1 the caller's product (dpre only, by
    chunk 0, and the product's gradient, dpre times keep (0 on the rows where first_ptr is true with RESET, as
    _fwd_hidden), to g0 or g1), 2 the caller's x (nothing: its gradient is dx)."""
    row0 = tl.program_id(0) * BB
    br = tl.program_id(1)
    pi = tl.program_id(2)
    rows = row0 + tl.arange(0, BB)
    keep = _row_keep(first_ptr, first_stride, rows, rows < B, BB, RESET)
    if br == 0:
        if _runs(pi, BI, D, M0):
            _branch_bwd(
                dx_ptr,
                pre_ptr,
                s0,
                w0,
                dn_ptr,
                dpre_ptr,
                ddeter_ptr,
                g0_ptr,
                keep,
                0,
                B,
                D,
                K,
                row0,
                pi,
                BB,
                BI,
                BKC,
                True,
                M0,
                BF16,
            )
    elif br == 1:
        if _runs(pi, BI, SC, M1):
            _branch_bwd(
                dx_ptr,
                pre_ptr,
                s1,
                w1,
                dn_ptr,
                dpre_ptr,
                dstoch_ptr,
                g1_ptr,
                keep,
                1,
                B,
                SC,
                K,
                row0,
                pi,
                BB,
                BI,
                BKC,
                False,
                M1,
                BF16,
            )
    elif _runs(pi, BI, A, M2):
        _branch_bwd(
            dx_ptr,
            pre_ptr,
            s2,
            w2,
            dn_ptr,
            dpre_ptr,
            daction_ptr,
            dpre_ptr,
            keep,
            2,
            B,
            A,
            K,
            row0,
            pi,
            BB,
            BI,
            BKC,
            False,
            M2,
            BF16,
        )


@triton.jit
def _runs(pi, BI: tl.constexpr, N_IN, MODE: tl.constexpr):
    """Whether input chunk pi of a branch of source MODE (_bwd_branches) has work."""
    if MODE == 0:
        ok = pi * BI < N_IN
    elif MODE == 1:
        ok = pi == 0
    else:
        ok = pi < 0
    return ok
