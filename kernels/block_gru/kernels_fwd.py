"""Forward Triton kernels of the block-GRU step (launched from fused.py, which documents the plan and tolerances).

Two precisions, as reference.step's `bf16` flag (a compile-time BF16 here):
- fp32 (the spec's default): every dot upcasts its tiles to float32 and accumulates in float32 with
  input_precision="ieee" (no TF32).
- bf16: both operands of every dot are first rounded to bfloat16 (to nearest, ties to even), products accumulate in
  float32. On a GPU (DOT_BF16) the rounded tiles go to the tensor cores as bfloat16, whose products of bf16 values
  are exact, so only the summation order differs from the float32 emulation that the interpreter runs (its bf16 dot
  is not usable: it returns garbage, and its float32 -> bfloat16 cast truncates instead of rounding).
1e-4 inside the kernels is reference.EPS, the RMSNorm epsilon.
"""

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 * sigmoid(2x) - 1: absolute error ~1e-7, which is what the tolerance table asks of it.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept as float32; on the bits, so the interpreter and
    the GPU agree with torch's .bfloat16(). Finite inputs only (the kernels never see inf or NaN operands)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _seen_op(x, BF16: tl.constexpr):
    """A dot's float32 operand as the dot reads it, kept as float32: rounded to bfloat16 in bf16 compute."""
    if BF16:
        x = _round_bf16(x)
    return x


@triton.jit
def _row_keep(first_ptr, first_stride, rows, rmask, BB: tl.constexpr, RESET: tl.constexpr):
    """(BB,) float32: 0 on the rows where first_ptr (B,) is true (with RESET), else 1; fused.forward's first."""
    keep = tl.full((BB,), 1.0, tl.float32)
    if RESET:
        keep = tl.where(tl.load(first_ptr + rows * first_stride, mask=rmask, other=0) != 0, 0.0, 1.0)
    return keep


@triton.jit
def _operand(x, BF16: tl.constexpr, DOT_BF16: tl.constexpr):
    """A dot operand: float32, or rounded to bfloat16 in bf16 compute (as bfloat16 for the tensor cores)."""
    x = x.to(tl.float32)
    if BF16:
        x = _round_bf16(x)
        if DOT_BF16:
            x = x.to(tl.bfloat16)  # exact: x is already a bfloat16 value
    return x


@triton.jit
def _dot(a, b, acc, DOT_BF16: tl.constexpr):
    """acc + a @ b in float32: bf16 tensor-core dots, or float32 without TF32."""
    if DOT_BF16:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _silu_grad(n):
    sg = 1.0 / (1.0 + tl.exp(-n))
    return sg * (1.0 + n * (1.0 - sg))


@triton.jit
def _branch_pre(
    inp_ptr,
    inp_stride,
    w_ptr,
    b_ptr,
    pre_ptr,
    br,
    B,
    N_IN,
    K,
    row0,
    k0,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BKC: tl.constexpr,
    BF16: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    rows = row0 + tl.arange(0, BB)
    ks = k0 + tl.arange(0, BKC)
    rmask = rows < B
    kmask = ks < K
    acc = tl.zeros((BB, BKC), tl.float32)
    for i0 in range(0, N_IN, BI):
        ii = i0 + tl.arange(0, BI)
        imask = ii < N_IN
        a = tl.load(inp_ptr + rows[:, None] * inp_stride + ii[None, :], mask=rmask[:, None] & imask[None, :], other=0.0)
        w = tl.load(w_ptr + ii[:, None] * K + ks[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(_operand(a, BF16, DOT_BF16), _operand(w, BF16, DOT_BF16), acc, DOT_BF16)
    acc += tl.load(b_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    tl.store(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], acc, mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _fwd_branches(
    deter_ptr,
    deter_stride,
    stoch_ptr,
    stoch_stride,
    action_ptr,
    action_stride,
    w0,
    b0,
    w1,
    b1,
    w2,
    b2,
    pre_ptr,
    B,
    D,
    SC,
    A,
    K,
    br0,
    br1,
    br2,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BKC: tl.constexpr,
    BF16: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """Grid (B/BB, branches computed here, K/BKC): program_id(1) = j computes branch br_j (the others' products come
    from the caller, fused.forward's x0p, x1p, x2)."""
    row0 = tl.program_id(0) * BB
    j = tl.program_id(1)
    br = tl.where(j == 0, br0, tl.where(j == 1, br1, br2))
    k0 = tl.program_id(2) * BKC
    if br == 0:
        _branch_pre(deter_ptr, deter_stride, w0, b0, pre_ptr, 0, B, D, K, row0, k0, BB, BI, BKC, BF16, DOT_BF16)
    elif br == 1:
        _branch_pre(stoch_ptr, stoch_stride, w1, b1, pre_ptr, 1, B, SC, K, row0, k0, BB, BI, BKC, BF16, DOT_BF16)
    else:
        _branch_pre(action_ptr, action_stride, w2, b2, pre_ptr, 2, B, A, K, row0, k0, BB, BI, BKC, BF16, DOT_BF16)


@triton.jit
def _branch_tile(pre_ptr, src_ptr, src_stride, b_ptr, br: tl.constexpr, rows, ks, m, K, keep, MODE: tl.constexpr):
    """A tile of branch br's pre-activation: from pre (MODE 0, _fwd_branches wrote it) or the caller's product times
    keep (the rows' 0/1 reset, fused.forward's first) plus the bias (MODE 1), float32, 0 outside m."""
    if MODE == 1:
        p = tl.load(src_ptr + rows[:, None] * src_stride + ks[None, :], mask=m, other=0.0).to(tl.float32)
        p = p * keep[:, None]
        p = tl.where(m, p + tl.load(b_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :], 0.0)
    else:
        p = tl.load(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], mask=m, other=0.0)
    return p


@triton.jit
def _x_part(
    acc,
    pre_ptr,
    src_ptr,
    src_stride,
    b_ptr,
    s_ptr,
    wh_blk,
    x_ptr,
    write_x,
    fac_ptr,
    fac_stride,
    keep,
    br: tl.constexpr,
    rows,
    rmask,
    js,
    jmask,
    K,
    DG,
    BB: tl.constexpr,
    BK: tl.constexpr,
    MODE: tl.constexpr,
    SAVE: tl.constexpr,
    FAC: tl.constexpr,
    BF16: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """acc += x_br @ wh[g, DG + br*K : DG + (br+1)*K, js] for one block's output chunk, x_br = silu(rms(pre_br) * s)
    with pre_br from _branch_tile (MODE 0 or 1; under MODE 1 the program that writes x also writes pre for the
    backward), or x_br the caller's (MODE 2, src). FAC (with SAVE): the program that writes x also writes the tap
    factors (fused.forward's fac): the branch's normalised pre_br (MODE 0 or 1, at column br*K) and x_br as the dot
    reads it (rounded to bf16 in bf16 compute), at 2K + br*K."""
    rs = tl.zeros((BB,), tl.float32)
    if MODE != 2:
        ss = tl.zeros((BB,), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            p = _branch_tile(
                pre_ptr, src_ptr, src_stride, b_ptr, br, rows, ks, rmask[:, None] & (ks < K)[None, :], K, keep, MODE
            )
            ss += tl.sum(p * p, 1)
        rs = 1.0 / tl.sqrt(ss / K + 1e-4)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        if MODE == 2:
            x = tl.load(src_ptr + rows[:, None] * src_stride + ks[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            p = _branch_tile(pre_ptr, src_ptr, src_stride, b_ptr, br, rows, ks, m, K, keep, MODE)
            s = tl.load(s_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            n = p * rs[:, None] * s[None, :]
            x = tl.where(m, n * _sigmoid(n), 0.0)
            if SAVE and MODE == 1:  # noqa: SIM102 (SAVE and MODE are compile-time constants, write_x a runtime one)
                if write_x:
                    tl.store(pre_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], p, mask=m)
            if SAVE and FAC:  # noqa: SIM102 (as above)
                if write_x:
                    tl.store(fac_ptr + rows[:, None] * fac_stride + br * K + ks[None, :], p * rs[:, None], mask=m)
        if SAVE:  # noqa: SIM102 (SAVE is a compile-time constant, write_x a runtime one)
            if write_x:
                tl.store(x_ptr + rows[:, None] * (3 * K) + br * K + ks[None, :], x, mask=m)
                if FAC:
                    tl.store(
                        fac_ptr + rows[:, None] * fac_stride + (2 + br) * K + ks[None, :], _seen_op(x, BF16), mask=m
                    )
        w = tl.load(
            wh_blk + (DG + br * K + ks[:, None]) * DG + js[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0
        )
        acc = _dot(_operand(x, BF16, DOT_BF16), _operand(w, BF16, DOT_BF16), acc, DOT_BF16)
    return acc


@triton.jit
def _fwd_hidden(
    deter_ptr,
    deter_stride,
    pre_ptr,
    src0,
    src0_stride,
    src1,
    src1_stride,
    src2,
    src2_stride,
    b0,
    b1,
    b2,
    s0,
    s1,
    s2,
    wh_ptr,
    bh_ptr,
    hpre_ptr,
    part_ptr,
    x_ptr,
    fac_ptr,
    fac_stride,
    first_ptr,
    first_stride,
    B,
    DG,
    K,
    NJ,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    BK: tl.constexpr,
    M0: tl.constexpr,
    M1: tl.constexpr,
    M2: tl.constexpr,
    SAVE: tl.constexpr,
    FAC: tl.constexpr,
    RESET: tl.constexpr,
    BF16: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """RESET: the given products (MODE 1) count as zero on the rows where first_ptr (B,) is true."""
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
        a = tl.load(
            deter_ptr + rows[:, None] * deter_stride + g * DG + ii[None, :],
            mask=rmask[:, None] & imask[None, :],
            other=0.0,
        )
        w = tl.load(wh_blk + ii[:, None] * DG + js[None, :], mask=imask[:, None] & jmask[None, :], other=0.0)
        acc = _dot(_operand(a, BF16, DOT_BF16), _operand(w, BF16, DOT_BF16), acc, DOT_BF16)
    write_x = (g == 0) & (pj == 0)
    keep = _row_keep(first_ptr, first_stride, rows, rmask, BB, RESET)
    acc = _x_part(
        acc,
        pre_ptr,
        src0,
        src0_stride,
        b0,
        s0,
        wh_blk,
        x_ptr,
        write_x,
        fac_ptr,
        fac_stride,
        keep,
        0,
        rows,
        rmask,
        js,
        jmask,
        K,
        DG,
        BB,
        BK,
        M0,
        SAVE,
        FAC,
        BF16,
        DOT_BF16,
    )
    acc = _x_part(
        acc,
        pre_ptr,
        src1,
        src1_stride,
        b1,
        s1,
        wh_blk,
        x_ptr,
        write_x,
        fac_ptr,
        fac_stride,
        keep,
        1,
        rows,
        rmask,
        js,
        jmask,
        K,
        DG,
        BB,
        BK,
        M1,
        SAVE,
        FAC,
        BF16,
        DOT_BF16,
    )
    acc = _x_part(
        acc,
        pre_ptr,
        src2,
        src2_stride,
        b2,
        s2,
        wh_blk,
        x_ptr,
        write_x,
        fac_ptr,
        fac_stride,
        keep,
        2,
        rows,
        rmask,
        js,
        jmask,
        K,
        DG,
        BB,
        BK,
        M2,
        SAVE,
        FAC,
        BF16,
        DOT_BF16,
    )
    m = rmask[:, None] & jmask[None, :]
    hpre = tl.where(m, acc + tl.load(bh_ptr + g * DG + js, mask=jmask, other=0.0).to(tl.float32)[None, :], 0.0)
    tl.store(hpre_ptr + rows[:, None] * D + g * DG + js[None, :], hpre, mask=m)
    tl.store(part_ptr + rows * (tl.num_programs(1) * NJ) + g * NJ + pj, tl.sum(hpre * hpre, 1), mask=rmask)


@triton.jit
def _fwd_gates(
    deter_ptr,
    deter_stride,
    hpre_ptr,
    part_ptr,
    sh_ptr,
    wg_ptr,
    bg_ptr,
    out_ptr,
    out_stride,
    h_ptr,
    rs_ptr,
    gates_ptr,
    fac_ptr,
    fac_stride,
    fac_nh,
    B,
    DG,
    NP,
    BB: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    BP: tl.constexpr,
    SAVE: tl.constexpr,
    FAC: tl.constexpr,
    BF16: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """FAC (with SAVE): the programs that write h also write the tap factors (fused.forward's fac) hpre * rs, the
    normalised hidden layer, at column fac_nh, and h as the dots read it (rounded to bf16 in bf16 compute) at
    fac_nh + D."""
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
                if FAC:
                    fp = fac_ptr + rows[:, None] * fac_stride + fac_nh + g * DG + ii[None, :]
                    tl.store(fp, hp * rs[:, None], mask=m)
                    tl.store(fp + D, _seen_op(h, BF16), mask=m)
        wm = imask[:, None] & jmask[None, :]
        wp = wg_blk + ii[:, None] * (3 * DG) + js[None, :]
        hd = _operand(h, BF16, DOT_BF16)
        acc_r = _dot(hd, _operand(tl.load(wp, mask=wm, other=0.0), BF16, DOT_BF16), acc_r, DOT_BF16)
        acc_c = _dot(hd, _operand(tl.load(wp + DG, mask=wm, other=0.0), BF16, DOT_BF16), acc_c, DOT_BF16)
        acc_z = _dot(hd, _operand(tl.load(wp + 2 * DG, mask=wm, other=0.0), BF16, DOT_BF16), acc_z, DOT_BF16)
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
