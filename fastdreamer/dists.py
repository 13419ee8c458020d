"""Output distributions of the reference (embodied/jax/outs.py, heads.py), without torch.distributions:
no argument validation and no host syncs, so they are safe inside captured and compiled steps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


def unimix_logits(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Log of (1 - unimix) * softmax(logits) + unimix / C."""
    if not unimix:
        return torch.log_softmax(logits.float(), -1)
    probs = torch.softmax(logits.float(), -1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F.one_hot(index, n).to(dtype) for indices in [0, n), which every caller here guarantees by construction: a
    comparison, so the compiler fuses it into its neighbours, where F.one_hot checks the indices on the device (a
    min/max reduction and an assert kernel per call, compiled too)."""
    return (index[..., None] == torch.arange(n, device=index.device)).to(dtype)


def onehot_index(onehot: torch.Tensor) -> torch.Tensor:
    """argmax(-1) of exactly one-hot vectors (..., C), C <= 256, as uint8 (the replay's latent dtype): the float sum
    of class index times one-hot, exact for such indices. Compiled, an argmax is an int64 reduction result stored
    from the kernel, the pattern that breaks Triton 3.6 (twohot_nll_masked says more); this has no integer until
    the final cast."""
    classes = torch.arange(onehot.shape[-1], device=onehot.device, dtype=onehot.dtype)
    return (onehot * classes).sum(-1).to(torch.uint8)


def sample_onehot(logp: torch.Tensor, u: torch.Tensor | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot categorical sample from log-probs (..., C), straight-through gradient to the probs. `u` (..., 1):
    the uniforms to use, drawn here when None (a rollout passes the ones it drew up front). `last`: the last class
    that may be drawn, broadcast against (...,), where classes past it are padding of probability 0 (C - 1 when
    None)."""
    probs = logp.exp()
    # Inverse CDF instead of torch.multinomial (a host sync, not capturable): class k where cdf[k-1] <= u < cdf[k],
    # one uniform per distribution. Gumbel-max drew C uniforms and two logs per distribution: compiled on the CPU,
    # 1024x32 latents took 1.85 ms with Gumbel-max vs 0.84 ms (4 classes) and 8.5 vs 2.5 ms (16 classes).
    # The clamp catches u beyond a last cdf that rounds below 1; a zero-probability class is never drawn.
    if u is None:
        u = torch.rand((*probs.shape[:-1], 1), dtype=probs.dtype, device=probs.device)
    index = (probs.detach().cumsum(-1) <= u).sum(-1)
    index = index.clamp_max(probs.shape[-1] - 1) if last is None else torch.minimum(index, last)
    onehot = one_hot(index, probs.shape[-1], probs.dtype)
    return onehot + (probs - probs.detach())  # exactly one-hot in value: p - p is exactly 0


def categorical_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, both given as log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def categorical_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def twohot_bins(n: int = 255, device=None) -> torch.Tensor:
    """The reference's symexp-spaced bins: symexp(linspace(-20, 20)), built from one half so they are exactly
    symmetric around zero."""
    if n % 2 == 1:
        half = symexp(torch.linspace(-20.0, 0.0, (n - 1) // 2 + 1, device=device))
        return torch.cat([half, -half[:-1].flip(0)])
    half = symexp(torch.linspace(-20.0, 0.0, n // 2, device=device))
    return torch.cat([half, -half.flip(0)])


def mirrored_pairs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last axis of x (n bins) as its mirrored pairs over antisymmetric bins: (upper half, lower half reversed),
    element j of each the bins b_hi[j] and -b_hi[j]; an odd n's middle bin (zero) is in neither."""
    m = n // 2
    return x[..., n - m :], x[..., :m].flip(-1)


def twohot_pred(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Expected value under softmax(logits) over bins. The bins are exactly antisymmetric, so the sum is taken over
    mirrored pairs, (p_hi - p_lo) * b_hi: uniform probabilities give exactly zero, as the reference's symmetric sum
    does (a left-to-right sum does not).

    Each pair's difference is computed from the logits' difference d = x_hi - x_lo, as sign(d) * max(p_hi, p_lo) *
    (1 - exp(-|d|)) (the same number: the smaller probability is the larger one times exp(-|d|)), not by subtracting
    two rounded probabilities. The bins reach 4.9e8 and a probability near 1/255 carries an absolute rounding of
    ~2e-10, so the subtraction gave an absolute error of ~0.6 whatever the value (float32 against float64, random
    logits of any scale), and two computations that round the softmax one ulp apart (a fused kernel, FMA contraction
    on a GPU) gave values ~1e-2 apart where the true ones were ~4e-4 (bench.divergence --fp-contract fast); early in
    training every head is near uniform. Here each pair's error is relative to its term (tests/test_dists.py bounds
    it). 1 - exp(-a) is 2t / (1 + t) with t = tanh(a / 2): accurate for small a, in [0, 1) (no overflow), and the
    same in compiled code, where inductor's vectorised CPU expm1 is exp(x) - 1 (pytorch/pytorch#189803; relative
    error 1.0 for tiny x in torch 2.13). Float32 under bf16 autocast too, as the reference's float32 output heads: a
    matmul with the bins there ran in bf16 and rounded every value, return and advantage to ~0.4%.

    Values only: through sign and abs at d = 0 the gradient would not be the expectation's, so logits that require
    grad are refused (every caller detaches them or runs under no_grad)."""
    if logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("twohot_pred computes values only (no gradient): pass detached logits or use torch.no_grad()")
    x = logits.to(bins.dtype)
    n = bins.shape[0]
    x_hi, x_lo = mirrored_pairs(x, n)
    d = torch.where(x_hi == x_lo, 0.0, x_hi - x_lo)  # both -inf: a pair of zero probabilities, not NaN
    p = torch.maximum(*mirrored_pairs(torch.softmax(x, -1), n))
    t = torch.tanh(d.abs() / 2)
    b_hi = mirrored_pairs(bins, n)[0]
    return (torch.sign(d) * p * (2 * t / (1 + t)) * b_hi).sum(-1)  # not a matmul: autocast would make it bf16


def _twohot_pair(target: torch.Tensor, bins: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's neighbouring bins of each target (...,): (below, above) indices by counting bins, clamped to
    the bins (past an end, both the end bin). dtype: the counts' dtype (None: int64; float32 counts are exact up to
    2^24, for code that must hold no integer tensor)."""
    n = bins.shape[0]
    le, gt = bins <= target[..., None], bins > target[..., None]
    if dtype is not None:
        le, gt = le.to(dtype), gt.to(dtype)
    return (le.sum(-1) - 1).clamp(0, n - 1), (n - gt.sum(-1)).clamp(0, n - 1)


def _twohot_weights(
    b_below: torch.Tensor, b_above: torch.Tensor, target: torch.Tensor, equal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the pair's bins (values b_below, b_above) for target, linear in the raw value; a clamped pair
    (equal) gets half on each."""
    to_below = torch.where(equal, 1.0, (b_below - target).abs())
    to_above = torch.where(equal, 1.0, (b_above - target).abs())
    total = to_below + to_above
    return to_above / total, to_below / total


def twohot_encode(target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encoding of scalar targets (...,) over bins (n,): weights on the two neighbouring bins,
    linear in the raw value; values outside the range go fully to the end bin."""
    n = bins.shape[0]
    target = target.to(bins.dtype)
    below, above = _twohot_pair(target, bins)
    w_below, w_above = _twohot_weights(bins[below], bins[above], target, below == above)
    return one_hot(below, n, bins.dtype) * w_below[..., None] + one_hot(above, n, bins.dtype) * w_above[..., None]


def twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(logits) against the two-hot target, (...,)."""
    return twohot_nll(torch.log_softmax(logits.float(), -1), target, bins)


def twohot_nll(logp: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """twohot_loss from log-probs (..., n), which may be a strided view: the weighted log-probs of the target's two
    neighbouring bins, without building the (..., n) two-hot tensor of twohot_encode (the plain form). Eager runs
    the reference's form (count, clamp, gather); compiled code runs twohot_nll_masked, which run eagerly gives
    bitwise the same loss and gradient (tests/test_dists.py) and has no integer tensors for Triton to mishandle.
    target must have logp's shape less its last axis (the two forms broadcast differently)."""
    if target.shape != logp.shape[:-1]:
        raise ValueError(f"twohot_nll: target {tuple(target.shape)} for log-probs {tuple(logp.shape)}")
    if torch.compiler.is_compiling():
        return twohot_nll_masked(logp, target, bins)
    return twohot_nll_gather(logp, target, bins)


def twohot_nll_gather(logp: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The reference's form: the neighbours' indices by counting bins, clamped, and their log-probs gathered."""
    target = target.detach().to(bins.dtype)
    below, above = _twohot_pair(target, bins)
    w_below, w_above = _twohot_weights(bins[below], bins[above], target, below == above)
    lp_below = logp.gather(-1, below[..., None]).squeeze(-1)
    lp_above = logp.gather(-1, above[..., None]).squeeze(-1)
    return -(lp_below * w_below + lp_above * w_above)


def twohot_nll_masked(logp: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """twohot_nll_gather with no integer tensor: the same counts, clamps and pair as the gather form (_twohot_pair),
    in float32 (exact: counts up to 2^24), the pair's log-probs and bin values taken by masked sums over the bins
    (exact: one term and zeros), and the weights by the gather form's own operations on the same operands
    (_twohot_weights). Run eagerly it gives bitwise the gather form's loss and gradient (tests/test_dists.py). Why:
    compiled for CUDA, the gather form's int64 indices, stored for the backward straight out of the counting
    reduction, make Triton 3.6 (torch 2.11) fail to compile the fused loss kernel for Hopper at small batches
    (bench/LOG.md, 2026-11-26). Until session 28 each bin's weight was computed from its neighbours (bins.roll, two
    divisions per bin): compiled on the CPU, forward and backward with the log-softmax at 16,384 x 255, 31.7 ms
    against 13.4 now (the gather form 21.8), alternated in one process (bench/LOG.md, session 28)."""
    t = target.detach().to(bins.dtype)
    index = torch.arange(bins.shape[0], device=bins.device, dtype=bins.dtype)
    below, above = _twohot_pair(t, bins, bins.dtype)
    lower, upper = index == below[..., None], index == above[..., None]
    lp_below, lp_above = (torch.where(mask, logp, 0.0).sum(-1) for mask in (lower, upper))
    b_below, b_above = (torch.where(mask, bins, 0.0).sum(-1) for mask in (lower, upper))
    w_below, w_above = _twohot_weights(b_below, b_above, t, below == above)
    return -(lp_below * w_below + lp_above * w_above)


def binary_logp(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of a soft binary target under sigmoid(logit)."""
    logit = logit.float()
    return target * F.logsigmoid(logit) + (1 - target) * F.logsigmoid(-logit)


class Policy:
    """The actor's output: categoricals with unimix (discrete) or a bounded normal (continuous). `raw` is the head
    output: mean and pre-std stacked as (..., 2A), or logits (..., G * K) of `groups` categoricals of K classes,
    of which `counts` (G,) (a device tensor; None: all K) are real and the rest padding. An action is G one-hots
    of K (padding never drawn) concatenated, or (..., A) unclipped."""

    PAD = -1e30  # the log-prob of a padding class: exp() is 0 and 0 * PAD is 0, so sums over K need no mask

    def __init__(
        self,
        raw: torch.Tensor,
        discrete: bool,
        unimix: float = 0.01,
        minstd: float = 0.1,
        maxstd: float = 1.0,
        groups: int = 1,
        counts: torch.Tensor | None = None,
    ):
        self.discrete = discrete
        if discrete:
            logits = raw.unflatten(-1, (groups, raw.shape[-1] // groups))  # (..., G, K)
            self.last = None  # sample(): the last class that may be drawn in each group, where there is padding
            if counts is None:
                self.logp_all = unimix_logits(logits, unimix)
            else:  # unimix over each group's own classes; the padding gets probability 0 and log-prob PAD
                valid = torch.arange(logits.shape[-1], device=raw.device) < counts[:, None]
                masked = torch.where(valid, logits.float(), -torch.inf)
                self.last = counts - 1
                if unimix:
                    probs = (1.0 - unimix) * torch.softmax(masked, -1) + valid * (unimix / counts[:, None])
                    # log of 1 at the padding, then replaced: log(0)'s infinite gradient would meet where's 0 as NaN
                    logp = torch.log(torch.where(valid, probs, 1.0))
                else:  # log_softmax, as unimix_logits: a valid class far below the others keeps a finite log-prob
                    logp = torch.log_softmax(masked, -1)
                self.logp_all = torch.where(valid, logp, self.PAD)
        else:
            mean, std = raw.float().chunk(2, -1)
            self.mean = torch.tanh(mean)
            self.std = (maxstd - minstd) * torch.sigmoid(std + 2.0) + minstd

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """G concatenated one-hots (..., G * K) for discrete actions, (..., A) unclipped for continuous. No gradient.
        `noise`: drawn here when None, else the draw to use, shaped as Policy.noise makes it: uniforms (discrete)
        or standard normals."""
        with torch.no_grad():
            if self.discrete:
                return sample_onehot(self.logp_all, noise, self.last).detach().flatten(-2)
            if noise is None:
                noise = torch.randn_like(self.mean)
            return self.mean + self.std * noise

    @staticmethod
    def noise(shape: tuple[int, ...], act_dim: int, discrete: bool, device, groups: int = 1) -> torch.Tensor:
        """The random numbers sample() takes for a batch of `shape` policies: (*shape, G, 1) uniforms for G discrete
        actions (one per categorical), (*shape, act_dim) standard normals for continuous ones."""
        if discrete:
            return torch.rand((*shape, groups, 1), device=device)
        return torch.randn((*shape, act_dim), device=device)

    def mode(self) -> torch.Tensor:
        if self.discrete:
            return one_hot(self.logp_all.argmax(-1), self.logp_all.shape[-1]).flatten(-2)
        return self.mean

    def logp(self, action: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return (action.unflatten(-1, self.logp_all.shape[-2:]) * self.logp_all).sum((-2, -1))
        z = (action - self.mean) / self.std
        return (-0.5 * z.square() - torch.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        if self.discrete:
            return categorical_entropy(self.logp_all).sum(-1)
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.std)).sum(-1)
