"""The block-GRU core of DreamerV3's RSSM: the spec, in plain PyTorch, and the eager implementation.

One core step (danijar/dreamerv3 rssm.py `_core`, BlockLinear in embodied/jax/nets.py):

    x0 = silu(rms(deter  @ w0 + b0) * s0)        # (B, K)   three input branches
    x1 = silu(rms(stoch  @ w1 + b1) * s1)        # (B, K)   stoch is flat (B, S*C)
    x2 = silu(rms(action @ w2 + b2) * s2)        # (B, K)   action already divided by max(1, |a|)
    u  = per block g: concat(deter_g, x0, x1, x2) # (B, G, D/G + 3K)
    h  = silu(rms(blocklinear(u, wh) + bh) * sh)  # (B, D)    the norm spans all blocks
    r, c, z = split_per_block(blocklinear(h, wg) + bg)   # each (B, D), block-major
    deter' = sigmoid(z - 1) * tanh(sigmoid(r) * c) + (1 - sigmoid(z - 1)) * deter

rms(x) = x * rsqrt(mean(x^2) + 1e-4). Computed in float32 whatever the weight dtype.

bf16=True is the bf16 compute the fast modes use (bf16 matmuls, as the reference's bfloat16 compute): both operands of
each of the five matmuls are rounded to bfloat16 (nearest, ties to even) and their products summed in float32;
everything else stays float32, and the gradient passes straight through the roundings (as autocast's casts do).
Unlike torch.autocast, the matmul's float32 result is not rounded again: this is the fused kernel's spec.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

EPS = 1e-4  # the reference's RMSNorm epsilon


class BlockGRUWeights(NamedTuple):
    """All parameters of one core, in the order every implementation takes them."""

    w0: torch.Tensor  # (D, K)            deter branch
    b0: torch.Tensor  # (K,)
    s0: torch.Tensor  # (K,)              norm scale
    w1: torch.Tensor  # (S*C, K)          stoch branch
    b1: torch.Tensor  # (K,)
    s1: torch.Tensor  # (K,)
    w2: torch.Tensor  # (A, K)            action branch
    b2: torch.Tensor  # (K,)
    s2: torch.Tensor  # (K,)
    wh: torch.Tensor  # (G, D/G + 3K, D/G) block-diagonal hidden layer
    bh: torch.Tensor  # (D,)
    sh: torch.Tensor  # (D,)              norm scale over all of deter
    wg: torch.Tensor  # (G, D/G, 3D/G)    block-diagonal gate layer
    bg: torch.Tensor  # (3D,)


class _RoundBF16(torch.autograd.Function):
    """Forward: round to the nearest bfloat16, kept as float32. Backward: the gradient unchanged (straight through)."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().float()

    @staticmethod
    def backward(ctx, g):
        return g


def _operand(t: torch.Tensor, bf16: bool) -> torch.Tensor:
    if bf16:
        return _RoundBF16.apply(t.float())
    if t.dtype == torch.bfloat16 and torch.is_autocast_enabled(t.device.type):
        # Autocast multiplies it in bf16 as it is; .float() would only be cast back, one copy per step (the bf16
        # weights the fast modes' observe loop passes in, fastdreamer/fanout.py). Same values either way.
        return t
    return t.float()


def _pin(name: str, t: torch.Tensor) -> torch.Tensor:
    """The activations that bf16 compute rounds (x, h) pass through here. Identity; the kernel tests replace it to
    pin them to the kernel's own values, because two float32 computations of one value can round to neighbouring
    bf16 values and that difference would otherwise propagate into everything downstream."""
    return t


def _block_inputs(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """u_g = concat(blocks_g, x) for every block g: blocks (B, G, D/G), x (B, 3K) -> (B, G, D/G + 3K). Compiled, it
    is the sum of the two parts zero-padded to the full width: the same values (each element is one part plus an
    exact zero; a -0 comes out +0, the same number to the matmul), as one pointwise expression that inductor writes
    straight into the matmul's bf16 operand. A cat of an expand is a copy per part into the cat's buffer and then the
    cast (with the observe step's lean record, rssm._ObserveRecord: 14 -> 10 forward launches per step in torch
    2.13's GPU code, 11 -> 10 in torch 2.11's; bench/LOG.md, session 25)."""
    B, G, _ = blocks.shape
    xg = x[:, None, :].expand(B, G, x.shape[-1])
    if torch.compiler.is_compiling():
        return F.pad(blocks, (0, x.shape[-1])) + F.pad(xg, (blocks.shape[-1], 0))
    return torch.cat([blocks, xg], -1)


# Whether a compiled step without gradients splits its block layer (_split_hidden). Read while dynamo traces (it
# guards on it, so a function traced with each value keeps both graphs); bench.rollout_ab's merged_u variant clears it
# to time the u form beside the split one.
SPLIT_HIDDEN = True


def _split_hidden(deter: torch.Tensor, x: torch.Tensor, w: BlockGRUWeights, bf16: bool) -> torch.Tensor:
    """block_linear(_block_inputs(deter blocks, x), wh, bh) of step() without taps, as the deter blocks' batched
    matmul plus one dense matmul of x by the x rows of every block side by side: the same products summed in another
    order, under bf16 autocast two rounded bf16 products summed in float32 instead of one rounding of their sum (as
    Agent.merged_rollout's actor). What a compiled step without gradients runs (imagination, acting; with gradients
    the observe step keeps u, its tap's factor under deferred weight gradients): the block layer's operand u
    repeats x for each of the G blocks (at 12m B 1024, a 16.8 MB bf16 tensor written and read per step), and its
    product's norm took a reduction and a pointwise kernel; split, the deter operand is written by the gate kernel
    of the step before, the norm is one kernel, and a step launches one kernel fewer (census, 12m rollout: 433 ->
    419 launches with _one_cast_each merging the x rows' copy; bench/LOG.md, session 26). On a CPU too (since
    session 28): inductor's C++ code built u with a scalar loop (an index division and remainder per element), and
    split the compiled merged rollout at 1m from 1,024 starts took 102 ms against 147 (bench.rollout_ab, merged
    against merged_u in one process; bench/LOG.md)."""
    B, D = deter.shape
    G, _, out = w.wh.shape
    Dg = D // G
    wh = _operand(w.wh, bf16)
    yd = torch.bmm(_operand(deter, bf16).view(B, G, Dg).transpose(0, 1), wh[:, :Dg])  # (G, B, out)
    yx = _operand(x, bf16) @ wh[:, Dg:].permute(1, 0, 2).reshape(x.shape[1], G * out)  # (B, G*out)
    return (yx.view(B, G, out).float() + yd.transpose(0, 1).float()).reshape(B, G * out) + w.bh.float()


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32: rms(x) of the module docstring before its scale."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)


def block_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """x (B, G, I) with w (G, I, O) -> (B, G*O) plus bias (G*O,)."""
    return _add_block_bias(torch.einsum("bgi,gio->bgo", _operand(x, bf16), _operand(w, bf16)), b)


def _add_block_bias(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """block_linear's product y (B, G, O) flattened to (B, G*O), plus the bias (G*O,) in float32."""
    return y.reshape(y.shape[0], -1) + b.float()


def reset_given(first: torch.Tensor | None, deter: torch.Tensor, x0p, x1p):
    """step()'s first applied to the given products: (x0p, x1p) zeroed on the rows where first (B,) bool is true
    (None stays None); a bad first is a ValueError naming its shape. A float32 mask, as a caller's mask promotes a
    bf16 product."""
    if first is None:
        return x0p, x1p
    if not (
        isinstance(first, torch.Tensor)
        and first.shape == deter.shape[:1]
        and first.dtype == torch.bool
        and first.device == deter.device
    ):
        got = f"{tuple(first.shape)} {first.dtype} on {first.device}" if isinstance(first, torch.Tensor) else first
        raise ValueError(f"block_gru: first must be ({deter.shape[0]},) bool on {deter.device}, got {got}")
    keep = (~first).float()[:, None]
    return tuple(None if t is None else t * keep for t in (x0p, x1p))


def check_shapes(deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights) -> None:
    """Raise ValueError naming the shape when inputs and weights disagree, or a width is 0 (the fused backward
    writes a branch's gradient from its input tiles, of which a width of 0 has none)."""
    if not all(isinstance(t, torch.Tensor) for t in (deter, stoch, action)):
        kinds = [type(t).__name__ for t in (deter, stoch, action)]
        raise ValueError(f"block_gru: deter, stoch and action must be tensors, got {kinds}")
    if deter.dim() != 2 or stoch.dim() != 2 or action.dim() != 2:
        raise ValueError(
            f"block_gru: expected 2-d deter, stoch, action; got {tuple(deter.shape)}, "
            f"{tuple(stoch.shape)}, {tuple(action.shape)}"
        )
    B, D = deter.shape
    if min(B, D, stoch.shape[1], action.shape[1]) < 1:
        raise ValueError(
            f"block_gru: batch and widths must be >= 1: deter {tuple(deter.shape)}, stoch {tuple(stoch.shape)}, "
            f"action {tuple(action.shape)}"
        )
    if stoch.shape[0] != B or action.shape[0] != B:
        raise ValueError(
            f"block_gru: mismatched batch: deter {tuple(deter.shape)}, stoch {tuple(stoch.shape)}, "
            f"action {tuple(action.shape)}"
        )
    if w.wh.dim() != 3 or w.wh.shape[0] < 1:
        raise ValueError(f"block_gru: wh must be (G, D/G + 3K, D/G) with G >= 1, got {tuple(w.wh.shape)}")
    if w.w0.dim() != 2 or w.w0.shape[1] < 1:
        raise ValueError(f"block_gru: w0 must be (D, K) with K >= 1, got {tuple(w.w0.shape)}")
    G = w.wh.shape[0]
    K = w.w0.shape[1]
    if D % G != 0:
        raise ValueError(f"block_gru: deter {D} is not divisible by {G} blocks")
    expect = {
        "w0": (D, K),
        "b0": (K,),
        "s0": (K,),
        "w1": (stoch.shape[1], K),
        "b1": (K,),
        "s1": (K,),
        "w2": (action.shape[1], K),
        "b2": (K,),
        "s2": (K,),
        "wh": (G, D // G + 3 * K, D // G),
        "bh": (D,),
        "sh": (D,),
        "wg": (G, D // G, 3 * D // G),
        "bg": (3 * D,),
    }
    for name, shape in expect.items():
        got = tuple(getattr(w, name).shape)
        if got != shape:
            raise ValueError(
                f"block_gru: weight {name} has shape {got}, expected {shape} for deter {D}, {G} blocks, hidden {K}"
            )


# Where step() takes taps (deferred weight gradients, fastdreamer/defer.py): site -> (kind, parameters). A tap is a
# zero tensor added to the site's value; its gradient is that value's gradient, from which, with the factor step()
# returns for the site, the parameters' gradients follow: "mm" y = x @ w + b, "block" y = blocklinear(x, w) + b,
# "scale" y = x * s (x the normalised pre-activation). Every parameter of the core is at exactly one site.
TAP_SITES = {
    "x0": ("mm", "w0", "b0"),
    "n0": ("scale", "s0"),
    "x1": ("mm", "w1", "b1"),
    "n1": ("scale", "s1"),
    "x2": ("mm", "w2", "b2"),
    "n2": ("scale", "s2"),
    "h": ("block", "wh", "bh"),
    "nh": ("scale", "sh"),
    "g": ("block", "wg", "bg"),
}


# The action branch's sites: absent when the caller computed the branch itself (step's x2, action_branch).
ACTION_SITES = ("x2", "n2")


# The core's own tap factors that an observe loop records at each step when it gives the action branch (x2) and
# gathers the deter and stoch branches' factors (its own inputs) after the loop: pack_factors packs them in this order,
# h's without its deter blocks (only x, which every block reads alike).
PACKED_SITES = ("n0", "n1", "h", "nh", "g")


def packed_widths(w: BlockGRUWeights) -> dict[str, int]:
    """The width of each PACKED_SITES factor in pack_factors' result, in order."""
    D, K = w.bh.shape[0], w.w0.shape[1]
    return {"n0": K, "n1": K, "h": 3 * K, "nh": D, "g": D}


def pack_factors(seen: dict[str, torch.Tensor]) -> torch.Tensor:
    """step()'s factors (seen, with taps and x2) of PACKED_SITES as one (B, sum of packed_widths) tensor."""
    x_width = 3 * seen["n0"].shape[1]
    h = seen["h"][:, 0, seen["h"].shape[2] - x_width :]  # block 0's x, after its deter part
    return torch.cat([seen["n0"], seen["n1"], h, seen["nh"], seen["g"].flatten(1)], 1)


def tap_widths(w: BlockGRUWeights) -> dict[str, int]:
    """The width of each tap site's value (its shape is (B, width))."""
    D, K = w.bh.shape[0], w.w0.shape[1]
    return {"x0": K, "n0": K, "x1": K, "n1": K, "x2": K, "n2": K, "h": D, "nh": D, "g": 3 * D}


def _no_tap(site: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y


def _branch(inp, wt, b, s, bf16: bool, tap=None, i: int = 0, prod=None) -> torch.Tensor:
    """silu(rms(inp @ wt + b) * s), one input branch; tap(site, value, factor) adds the taps of step(). prod: inp @ wt
    computed by the caller (step's x0p)."""
    # `is None`, not `tap or ...`: torch 2.11's dynamo cannot take the truth of a closure (2.13's can) and broke the
    # compiled observe step's graph there on the H200 (bench/LOG.md, session 21; bench/graph_breaks.py shows it on
    # any machine with torch 2.11).
    tap = _no_tap if tap is None else tap
    pre = tap(f"x{i}", _branch_product(inp, wt, bf16, prod) + b.float(), inp)
    n = rms_normalize(pre)
    return F.silu(tap(f"n{i}", n * s.float(), n))


def _branch_product(inp, wt, bf16: bool, prod=None) -> torch.Tensor:
    """A branch's product inp @ wt, or `prod` where the caller computed it (step's x0p, x1p)."""
    return _operand(inp, bf16) @ _operand(wt, bf16) if prod is None else prod


def _joint_branches(inps, w: BlockGRUWeights, bf16: bool, prods) -> torch.Tensor:
    """cat([x0, x1, x2], -1) of step() without taps, the three branches normalised as one (B, 3, K) tensor: the same
    math per element. What a compiled step runs (imagination, acting): inductor then writes the three norms and
    their SiLU as one reduction kernel, where it wrote a reduction per branch and a fourth kernel joining them
    (census, 12m rollout: 4 -> 1 launch per step; bench/LOG.md, session 26). Eager keeps the branches apart, the
    spec's order."""
    pres = [
        _branch_product(inp, getattr(w, f"w{i}"), bf16, prod) + getattr(w, f"b{i}").float()
        for i, (inp, prod) in enumerate(zip(inps, prods, strict=True))
    ]
    n = rms_normalize(torch.stack(pres, 1))  # (B, 3, K)
    s = torch.stack([w.s0.float(), w.s1.float(), w.s2.float()])
    return F.silu(n * s).flatten(1)


def action_branch(action: torch.Tensor, w: BlockGRUWeights, bf16: bool = False) -> torch.Tensor:
    """The action branch x2 of step(), for any rows: action (N, A) -> (N, K), float32. Its input does not depend on
    the recurrence, so a caller that knows a sequence's actions up front can compute it for all steps at once (one
    matmul over all rows instead of one per step) and pass each step its rows as step()'s x2."""
    return _branch(action, w.w2, w.b2, w.s2, bf16)


def step(
    deter: torch.Tensor,
    stoch: torch.Tensor,
    action: torch.Tensor | None,
    w: BlockGRUWeights,
    bf16: bool = False,
    taps: dict[str, torch.Tensor] | None = None,
    x2: torch.Tensor | None = None,
    x0p: torch.Tensor | None = None,
    x1p: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
):
    """One core step. deter (B, D), stoch (B, S*C), action (B, A) -> new deter (B, D), float32. bf16: the bf16
    compute of the module docstring. taps: {site: (B, width) zeros} for every site of TAP_SITES; then the return is
    (deter, seen), seen[site] the other factor of the site's parameter gradients (the matmul's input, before any
    bf16 rounding, or the normalised value a scale multiplies). Without taps the computation is the same, tap-free.
    x2: the action branch already computed (action_branch of this step's action, (B, K)); then action is not read
    and the branch's sites (ACTION_SITES) take no taps. x0p: the deter branch's product deter @ w0 (B, K), computed
    by the caller (the RSSM's observe loop computes it with the matmul that also reads deter for its posterior,
    RSSM.merge_deter); then w0 is not read (its tap site still is: its factor is deter). x1p: likewise stoch @ w1
    (Agent.merged_rollout). first (B,) bool: the rows where x0p and x1p count as zero (the first step of a sequence,
    where the observe loop resets deter and stoch: their products are then zero, and the caller need not zero them
    itself; the Triton core does it on load)."""
    x0p, x1p = reset_given(first, deter, x0p, x1p)
    if x2 is not None and taps is not None and (given := [s for s in ACTION_SITES if s in taps]):
        raise ValueError(f"block_gru: taps at the action branch's sites {given} with x2: they would get no gradient")
    B, D = deter.shape
    G = w.wh.shape[0]
    deter = deter.float()
    seen = {}

    def tap(site: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if taps is None:
            return y
        seen[site] = x
        return y + taps[site].to(y.dtype)

    if taps is None and x2 is None and torch.compiler.is_compiling():
        x = _pin("x", _joint_branches((deter, stoch, action), w, bf16, (x0p, x1p, None)))
    else:
        x0 = _branch(deter, w.w0, w.b0, w.s0, bf16, tap, 0, x0p)
        x1 = _branch(stoch, w.w1, w.b1, w.s1, bf16, tap, 1, x1p)
        x2 = _branch(action, w.w2, w.b2, w.s2, bf16, tap, 2) if x2 is None else x2.float()
        x = _pin("x", torch.cat([x0, x1, x2], -1))  # (B, 3K)
    if SPLIT_HIDDEN and taps is None and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        nh = rms_normalize(_split_hidden(deter, x, w, bf16))
    else:
        u = _block_inputs(deter.reshape(B, G, D // G), x)  # (B, G, D/G + 3K)
        nh = rms_normalize(tap("h", block_linear(u, w.wh, w.bh, bf16), u))
    h = _pin("h", F.silu(tap("nh", nh * w.sh.float(), nh)))  # (B, D)
    hb = h.reshape(B, G, D // G)
    if taps is not None and torch.compiler.is_compiling():
        # The gate layer's product (block_linear without its bias), then its bias, tap and gate math recomputed in
        # the backward (_gate_tail).
        y = torch.einsum("bgi,gio->bgo", _operand(hb, bf16), _operand(w.wg, bf16))
        seen["g"] = hb
        out = torch.utils.checkpoint.checkpoint(_gate_tail, y, w.bg, taps["g"], deter, use_reentrant=False)
        return out, seen
    gates = tap("g", block_linear(hb, w.wg, w.bg, bf16), hb).reshape(B, G, 3, D // G)
    out = _gate_math(gates, deter)
    return out if taps is None else (out, seen)


def _gate_tail(y: torch.Tensor, bg: torch.Tensor, tap_g: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    """step()'s gates from the gate layer's product y (B, G, 3D/G), with its bias and tap added as step() adds them,
    then the gate math. A compiled step with taps (the observe loop under deferred weight gradients) runs it under
    activation checkpointing: the backward recomputes it from y, so the forward keeps no (B, 3D) float32 gate
    pre-activation, which it wrote from a kernel of its own (the gate math iterates over (B, D); census, 12m step:
    9 -> 8 forward launches, the backward's 9 unchanged; bench/LOG.md, session 26). The same ops, the same values."""
    gates = (_add_block_bias(y, bg) + tap_g.to(torch.float32)).reshape(y.shape[0], y.shape[1], 3, -1)
    return _gate_math(gates, deter)


def _gate_math(gates: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    """deter' of the module docstring from the gate pre-activations (B, G, 3, D/G) and deter (B, D)."""
    B, G, _, Dg = gates.shape
    # The gate math on (B, G, D/G) views, flattened only at the end: compiled on the CPU, reading the gates through
    # (B, D) reshapes (div/mod indexing) took 2.3 ms vs 1.8 ms at B1024, D512, G8.
    reset, cand, update = gates.unbind(2)
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1.0)
    return (update * cand + (1.0 - update) * deter.reshape(B, G, Dg)).reshape(B, G * Dg)


def rollout(
    deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, w: BlockGRUWeights, bf16: bool = False
) -> torch.Tensor:
    """Several core steps with given inputs: stoch (B, T, S*C), action (B, T, A) -> deters (B, T, D)."""
    out = []
    for t in range(stoch.shape[1]):
        deter = step(deter, stoch[:, t], action[:, t], w, bf16)
        out.append(deter)
    return torch.stack(out, 1)


def random_weights(
    D: int, G: int, K: int, SC: int, A: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> BlockGRUWeights:
    """Random float32 weights at roughly unit activation scale: fan-in scaled matrices, norm scales near 1, small
    biases. For tests and benchmarks of the implementations against each other."""

    def r(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(*shape, generator=generator)).to(device)

    DG = D // G
    return BlockGRUWeights(
        r(D, K, scale=D**-0.5),
        r(K, scale=0.1),
        r(K, scale=0.1, mean=1.0),
        r(SC, K, scale=SC**-0.5),
        r(K, scale=0.1),
        r(K, scale=0.1, mean=1.0),
        r(A, K, scale=A**-0.5),
        r(K, scale=0.1),
        r(K, scale=0.1, mean=1.0),
        r(G, DG + 3 * K, DG, scale=(DG + 3 * K) ** -0.5),
        r(D, scale=0.1),
        r(D, scale=0.1, mean=1.0),
        r(G, DG, 3 * DG, scale=DG**-0.5),
        r(3 * D, scale=0.1),
    )
