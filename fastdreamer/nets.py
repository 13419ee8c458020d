"""Layers of the DreamerV3 reference (embodied/jax/nets.py): trunc-normal fan-in init, RMSNorm, MLPs, CNNs.

Images are stored and passed as uint8 HWC; convolutions run NCHW internally.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .dists import one_hot, symlog

NORM_EPS = 1e-4  # the reference's RMSNorm epsilon


def trunc_normal_(w: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """Truncated normal in [-2, 2] scaled by 1.1368 / sqrt(fan_in): unit variance after truncation."""
    with torch.no_grad():
        nn.init.trunc_normal_(w, 0.0, 1.0, -2.0, 2.0)
        w.mul_(1.1368 * math.sqrt(1.0 / fan_in) * scale)
    return w


class Linear(nn.Linear):
    """nn.Linear with the reference init: trunc-normal fan-in weights times `outscale`, zero bias."""

    def __init__(self, fin: int, fout: int, outscale: float = 1.0):
        super().__init__(fin, fout)
        trunc_normal_(self.weight, fin, outscale)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compiled, the bias is added after the matmul, in the matmul's dtype: under bf16 autocast the reference's
        bf16 Linear (x @ w rounded, plus the bias rounded, rounded again; an addmm rounds once), and on a GPU the add
        and the bias's cast go into the kernel that reads the output (the norm after it, a softmax), where an addmm
        needed the bias cast to bf16 by a kernel of its own in each layer (census, 12m update: -30 launches;
        bench/LOG.md, session 26). Eager keeps the addmm, the fp32 reference."""
        if torch.compiler.is_compiling():
            y = F.linear(x, self.weight)
            return y + self.bias.to(y.dtype)
        return super().forward(x)


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + 1e-4) over the last dim, in float32 (RMSNorm before its scale)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-4) * scale over the last dim, in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x) * self.scale).to(x.dtype)


class Dense(nn.Module):
    """Linear -> RMSNorm -> SiLU, the reference's hidden layer."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        self.linear = Linear(fin, fout)
        self.norm = RMSNorm(fout)

    def forward(self, x: torch.Tensor, taps=None, seen=None, site: str = "", y=None) -> torch.Tensor:
        """taps: deferred weight gradients (fastdreamer/defer.py): zeros at sites `{site}x` (the linear's output,
        a "linear" site) and `{site}n` (the scaled norm, a "scale" site); their other factors go into `seen`.
        y: the linear's output, computed by the caller (a matmul shared with other layers: RSSM.merge_deter,
        Agent.merged_rollout); x is then not read, or with taps only as the site's factor."""
        if y is None:
            y = self.linear(x)
        if taps is None:
            return F.silu(self.norm(y))
        seen[site + "x"] = x
        y = y + taps[site + "x"].to(y.dtype)
        n = rms_normalize(y)
        seen[site + "n"] = n
        return F.silu((n * self.norm.scale + taps[site + "n"]).to(y.dtype))


class MLP(nn.Sequential):
    def __init__(self, fin: int, units: int, layers: int):
        super().__init__(*[Dense(fin if i == 0 else units, units) for i in range(layers)])
        self.out_dim = units if layers else fin

    def forward(self, x: torch.Tensor, y0: torch.Tensor | None = None) -> torch.Tensor:
        """y0: the first layer's linear output, computed by the caller (Dense's y); x is then not read."""
        if y0 is not None and not len(self):
            raise ValueError("MLP: y0 is the first layer's output, and this MLP has no layers")
        for i, layer in enumerate(self):
            x = layer(x, y=y0 if i == 0 else None)
        return x


class BlockLinear(nn.Module):
    """Block-diagonal linear: G independent (I/G -> O/G) maps. Init fan-in is the full input size I, as in
    the reference (its fan computation multiplies by the number of blocks)."""

    def __init__(self, fin: int, fout: int, blocks: int, outscale: float = 1.0):
        super().__init__()
        if fin % blocks or fout % blocks:
            raise ValueError(f"BlockLinear: {fin} -> {fout} is not divisible into {blocks} blocks")
        self.blocks = blocks
        self.weight = nn.Parameter(trunc_normal_(torch.empty(blocks, fin // blocks, fout // blocks), fin, outscale))
        self.bias = nn.Parameter(torch.zeros(fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.blocks
        xb = x.reshape(-1, G, x.shape[-1] // G).transpose(0, 1)  # (G, N, I/G)
        y = torch.bmm(xb, self.weight).transpose(0, 1)  # (N, G, O/G)
        return y.reshape(*x.shape[:-1], -1) + self.bias


class ChannelNorm(RMSNorm):
    """RMSNorm over the channels of an NCHW tensor (the reference normalises NHWC over its last axis)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(1, keepdim=True) + NORM_EPS) * self.scale[:, None, None]
        return x.to(dtype)


def phase_taps(kernel: int) -> torch.Tensor:
    """(2, L, kernel) 0/1: which taps of a `kernel`-wide "same" conv over a nearest-upsampled (x2) axis read which of
    the L = 2 * ceil(p / 2) + 1 source pixels around an output's source (p = kernel // 2), per output phase (even,
    odd). Output 2i + a, tap t reads upsampled 2i + a + t - p, which is source i + floor((a + t - p) / 2); the zero
    padding of the upsampled axis is exactly the source's (2H and -1 map to H and -1)."""
    p = kernel // 2
    reach = (p + 1) // 2
    taps = torch.zeros(2, 2 * reach + 1, kernel)
    for a in range(2):
        for t in range(kernel):
            taps[a, (a + t - p) // 2 + reach, t] = 1.0
    return taps


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, kernel: int, outscale: float = 1.0):
        super().__init__(cin, cout, kernel, padding="same")
        trunc_normal_(self.weight, cin * kernel * kernel, outscale)
        nn.init.zeros_(self.bias)


class UpConv(Conv):
    """The reference decoder's upsampling conv: repeat each pixel 2 x 2, then a "same" conv (`reference`), computed
    at the input's resolution: each of the 4 output phases is an L x L conv of x (L = 3 for kernel 5) whose taps are
    sums of this conv's, as one conv to 4x the output channels, then pixel_shuffle interleaves the phases.
    (N, Cin, H, W) -> (N, Cout, 2H, 2W). At kernel 5: 36/100 of the multiply-adds, and neither pass reads or writes
    the 4x-larger upsampled input (`python -m bench.conv_ab --device cpu --size 12m --batch-size 2 --batch-length
    16`: the image part of the update, compile bf16, 84.2 -> 51.0 ms). The parameters are the reference conv's, so
    checkpoints are unchanged."""

    def __init__(self, cin: int, cout: int, kernel: int, outscale: float = 1.0):
        if kernel % 2 == 0:
            raise ValueError(f"UpConv: kernel {kernel} must be odd (a symmetric 'same' padding)")
        super().__init__(cin, cout, kernel, outscale)
        self.register_buffer("taps", phase_taps(kernel), persistent=False)  # a constant, not in checkpoints
        self.subpixel = True  # False: the reference's form (bench.conv_ab's `upsample` variant times the two)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subpixel:
            return self.reference(x)
        # The phase weights are built in the weight's dtype by multiplies and sums, which autocast leaves alone: under
        # bf16 autocast each is rounded once, as the conv reads it.
        taps = self.taps.to(self.weight.dtype)
        # (O, I, K, K) -> rows (O, I, 2, L, K) -> columns (O, I, 2, L, 2, L); (o, a, b) is pixel_shuffle's order
        w = (self.weight[:, :, None, None, :, :] * taps[:, :, :, None]).sum(4)
        w = (w[..., None, None, :] * taps).sum(-1)
        w = w.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)  # (O * 4, I, L, L)
        y = F.pixel_shuffle(F.conv2d(x, w, padding=taps.shape[1] // 2), 2)
        # The bias after the shuffle, in the conv's output dtype (autocast's conv would have cast it so too), not
        # repeated for the 4 phases as the conv's own bias: torch 2.11's inductor (the H200's) could not lower a conv
        # whose bias is computed in float32 (`freeze_layout` of a View), so compile and graphs failed on image
        # observations at fp32; added here it goes into the kernel that reads the shuffle.
        return y + self.bias.to(y.dtype)[:, None, None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


def vector_keys(obs_spec: dict) -> tuple[list[str], list[str]]:
    """The rank-1 keys of an observation spec: (float vectors, discrete class indices), each sorted."""
    keys = sorted(k for k, (shape, _) in obs_spec.items() if len(shape) == 1)
    return [k for k in keys if obs_spec[k][1].is_floating_point], [
        k for k in keys if not obs_spec[k][1].is_floating_point
    ]


def class_runs(obs_spec: dict, disc_keys: list[str], classes) -> list[list[tuple[int, int, int]]]:
    """Per discrete key, its elements as runs (first, end, classes) of consecutive elements with the same count of
    classes. `classes`: one count for every element, or each element's (the keys' elements in order)."""
    sizes = [obs_spec[k][0][0] for k in disc_keys]
    counts = [int(classes)] * sum(sizes) if isinstance(classes, numbers.Integral) else [int(c) for c in classes]
    if len(counts) != sum(sizes) or (counts and min(counts) < 1):
        raise ValueError(f"discrete observations {disc_keys} of {sizes} elements need their classes, got {classes}")
    runs, i = [], 0
    for size in sizes:
        key_runs = []
        for j in range(size):
            if key_runs and key_runs[-1][2] == counts[i + j]:
                key_runs[-1] = (key_runs[-1][0], j + 1, counts[i + j])
            else:
                key_runs.append((j, j + 1, counts[i + j]))
        runs.append(key_runs)
        i += size
    return runs


class Encoder(nn.Module):
    """Vector obs: symlog, discrete obs (class indices): each element one-hot of its own classes, concatenated ->
    MLP (the reference's DictConcat). Image obs (uint8 HWC): /255 - 0.5 -> [conv5 -> maxpool2 -> norm -> silu] x 4.
    Returns the concatenated token (..., E). classes: one count for every discrete element, or each element's."""

    def __init__(
        self, obs_spec: dict, units: int, layers: int, depth: int, mults=(2, 3, 4, 4), kernel: int = 5, classes=0
    ):
        super().__init__()
        self.vec_keys, self.disc_keys = vector_keys(obs_spec)
        self.img_keys = sorted(k for k, (shape, _) in obs_spec.items() if len(shape) == 3)
        self.disc_runs = class_runs(obs_spec, self.disc_keys, classes) if self.disc_keys else []
        self.out_dim = 0
        if self.vec_keys or self.disc_keys:
            fin = sum(obs_spec[k][0][0] for k in self.vec_keys)
            fin += sum((b - a) * n for runs in self.disc_runs for a, b, n in runs)
            self.mlp = MLP(fin, units, layers)
            self.out_dim += self.mlp.out_dim
        if self.img_keys:
            H, W, _ = obs_spec[self.img_keys[0]][0]
            cin = sum(obs_spec[k][0][2] for k in self.img_keys)
            depths = [depth * m for m in mults]
            convs, norms = [], []
            for d in depths:
                convs.append(Conv(cin, d, kernel))
                norms.append(ChannelNorm(d))
                cin = d
            self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
            factor = 2 ** len(depths)
            if not (3 <= H // factor <= 16 and 3 <= W // factor <= 16):
                raise ValueError(f"image size {H}x{W} is too small or large for {len(depths)} conv stages")
            self.out_dim += depths[-1] * (H // factor) * (W // factor)

    def forward(self, obs: dict[str, torch.Tensor], bdims: int = 2) -> torch.Tensor:
        outs = []
        bshape = None
        if self.vec_keys or self.disc_keys:
            parts = [symlog(torch.cat([obs[k].float() for k in self.vec_keys], -1))] if self.vec_keys else []
            parts += [
                one_hot(obs[k][..., a:b].long(), n).flatten(-2)
                for k, runs in zip(self.disc_keys, self.disc_runs)
                for a, b, n in runs
            ]
            x = torch.cat(parts, -1)
            bshape = x.shape[:bdims]
            outs.append(self.mlp(x).reshape(*bshape, -1))
        if self.img_keys:
            x = torch.cat([obs[k] for k in self.img_keys], -1)
            bshape = x.shape[:bdims]
            x = x.reshape(-1, *x.shape[bdims:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (N, C, H, W)
            for conv, norm in zip(self.convs, self.norms):
                x = F.silu(norm(F.max_pool2d(conv(x), 2)))
            outs.append(x.permute(0, 2, 3, 1).reshape(*bshape, -1))  # flatten HWC like the reference
        return torch.cat(outs, -1)


class Decoder(nn.Module):
    """Reconstructions from feat = (deter, stoch). Vector: MLP -> linear (symlog MSE target); discrete: the same
    MLP -> linear logits, each element's over its own classes, concatenated (..., sum of the classes) (categorical
    target: `discrete_nll`). Image: the
    reference's block-space projection of deter plus an MLP of stoch, then [upsample -> conv5 -> norm -> silu]
    and a sigmoid output."""

    def __init__(
        self,
        obs_spec: dict,
        deter: int,
        stoch_flat: int,
        units: int,
        layers: int,
        depth: int,
        mults=(2, 3, 4, 4),
        kernel: int = 5,
        bspace: int = 8,
        classes=0,
    ):
        super().__init__()
        self.vec_keys, self.disc_keys = vector_keys(obs_spec)
        self.img_keys = sorted(k for k, (shape, _) in obs_spec.items() if len(shape) == 3)
        self.disc_runs = class_runs(obs_spec, self.disc_keys, classes) if self.disc_keys else []
        if self.vec_keys or self.disc_keys:
            self.mlp = MLP(deter + stoch_flat, units, layers)
        if self.vec_keys:
            self.vec_sizes = [obs_spec[k][0][0] for k in self.vec_keys]
            self.vec_out = Linear(self.mlp.out_dim, sum(self.vec_sizes))
        if self.disc_keys:
            self.disc_widths = [sum((b - a) * n for a, b, n in runs) for runs in self.disc_runs]
            self.disc_out = Linear(self.mlp.out_dim, sum(self.disc_widths))
        if self.img_keys:
            H, W, _ = obs_spec[self.img_keys[0]][0]
            self.img_chans = [obs_spec[k][0][2] for k in self.img_keys]
            depths = [depth * m for m in mults]
            factor = 2 ** len(depths)
            self.minres = (H // factor, W // factor)
            self.bspace = bspace
            c = depths[-1]
            if deter % bspace or c % bspace:
                raise ValueError(f"decoder: deter {deter} and depth {c} must be divisible by {bspace}")
            u = self.minres[0] * self.minres[1] * c
            self.sp0 = BlockLinear(deter, u, bspace)
            self.sp1 = Dense(stoch_flat, 2 * units)
            self.sp2 = Linear(2 * units, u)
            self.spnorm = ChannelNorm(c)
            convs, norms = [], []
            cin = c
            for d in reversed(depths[:-1]):
                convs.append(UpConv(cin, d, kernel))
                norms.append(ChannelNorm(d))
                cin = d
            self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
            self.img_out = UpConv(cin, sum(self.img_chans), kernel)
            self.depth_last = c

    def use_subpixel(self, on: bool) -> None:
        """Every upsampling conv at the input's resolution (True, the default) or in the reference's form."""
        for m in self.modules():
            if isinstance(m, UpConv):
                m.subpixel = on

    def discrete_nll(self, key: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood of class indices target (..., M) under the logits (..., sum of the classes)
        of discrete key `key`: a softmax per element over its own classes, summed over the elements -> (...).
        Computed per run of elements with equal counts, so no element's softmax is padded to another's count."""
        runs = self.disc_runs[self.disc_keys.index(key)]
        nll, i = 0.0, 0
        for a, b, n in runs:
            logp = torch.log_softmax(logits[..., i : i + (b - a) * n].float().unflatten(-1, (b - a, n)), -1)
            nll = nll - logp.gather(-1, target[..., a:b].long().unsqueeze(-1)).squeeze(-1).sum(-1)
            i += (b - a) * n
        return nll

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor) -> dict[str, torch.Tensor]:
        """deter (..., D), stoch (..., S*C) -> {'vector': (..., O) symlog space, 'discrete': (..., sum of the
        classes) logits, 'image': (..., H, W, C) in [0, 1]}."""
        bshape = deter.shape[:-1]
        out = {}
        if self.vec_keys or self.disc_keys:
            h = self.mlp(torch.cat([stoch, deter], -1))
        if self.vec_keys:
            for k, v in zip(self.vec_keys, torch.split(self.vec_out(h), self.vec_sizes, -1)):
                out[k] = v
        if self.disc_keys:
            for k, v in zip(self.disc_keys, torch.split(self.disc_out(h), self.disc_widths, -1)):
                out[k] = v
        if self.img_keys:
            h, w = self.minres
            g, c = self.bspace, self.depth_last
            d, s = deter.reshape(-1, deter.shape[-1]), stoch.reshape(-1, stoch.shape[-1])
            x0 = self.sp0(d).reshape(-1, g, h, w, c // g).permute(0, 2, 3, 1, 4).reshape(-1, h, w, c)
            x1 = self.sp2(self.sp1(s)).reshape(-1, h, w, c)
            x = (x0 + x1).permute(0, 3, 1, 2)  # (N, C, h, w)
            x = F.silu(self.spnorm(x))
            for conv, norm in zip(self.convs, self.norms):
                x = F.silu(norm(conv(x)))  # (N, C', 2h, 2w)
            x = torch.sigmoid(self.img_out(x))
            x = x.permute(0, 2, 3, 1).reshape(*bshape, *x.shape[2:], x.shape[1])
            for k, v in zip(self.img_keys, torch.split(x, self.img_chans, -1)):
                out[k] = v
        return out
