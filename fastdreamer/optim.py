"""LaProp with adaptive gradient clipping, the DreamerV3 optimizer, as foreach ops with device-side state.

The update chain follows danijar/dreamerv3 (embodied/jax/opt.py, agent.py `_make_opt`), per update t = 0, 1, ...
and per parameter tensor p with gradient g:

    g    <- g / max(1, |g| / (agc * max(pmin, |p|)))           clip_by_agc, norms per tensor
    nu   <- b2 nu + (1 - b2) g^2;   u = g / (sqrt(nu / (1 - b2^(t+1))) + eps)      scale_by_rms
    mu   <- b1 mu + (1 - b1) u;     m = mu / (1 - b1^(t+1))                        scale_by_momentum
    p    <- p - lr * min(1, t / warmup) * m                      optax.linear_schedule(0, lr, warmup) at count t

The step counter and the learning rate are 0-dim device tensors and every bias correction is a tensor op of the
step, so `step()` never reads a value back to the host and can sit inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _stacked_norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor of xs, stacked: (len(xs),) float32."""
    return torch.stack(torch._foreach_norm(xs)).float()


@torch.library.custom_op("fastdreamer::norms", mutates_args=())
def norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """_stacked_norms as one op to torch.compile, so that the compiled step runs the eager foreach norm and stack (a
    few launches) where inductor wrote one copy kernel per tensor to stack the norms: 3 x 79 launches per 12m LaProp
    step (bench/LOG.md, session 24)."""
    return _stacked_norms(xs)


@norms.register_fake
def _(xs):
    return xs[0].new_empty((len(xs),), dtype=torch.float32)


def _norms(xs: list[torch.Tensor]) -> torch.Tensor:
    """norms(xs) when torch.compile traces the step; eager, the same without the custom op's dispatch."""
    return norms(xs) if torch.compiler.is_compiling() else _stacked_norms(xs)


class LaProp:
    """LaProp + AGC over one flat list of parameters (all modules share one optimizer).

    Moments are fp32 whatever the parameter dtype. Parameters whose `.grad` is None at a step are skipped (their
    moments neither decay nor move); the set is read from Python attributes only, so choosing it never syncs.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 4e-5,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-20,
        agc: float = 0.3,
        pmin: float = 1e-3,
        warmup: int = 1000,
    ) -> None:
        self.params: list[torch.Tensor] = list(params)
        assert self.params, "LaProp got an empty parameter list"
        assert warmup >= 0, f"warmup must be >= 0, got {warmup}"
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.agc, self.pmin, self.warmup = agc, pmin, warmup
        device = self.params[0].device
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)  # updates done so far
        self.lr = torch.tensor(lr, dtype=torch.float32, device=device)  # peak lr; copy_ into it to change it
        self.nu = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format) for p in self.params]
        self.mu = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format) for p in self.params]
        # Index lists per (device, dtype): the foreach kernels need homogeneous lists for their fast path.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = list(groups.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor]:
        """Apply one update from `p.grad`; returns 0-dim device tensors: grad_norm (global, before AGC),
        update_rms and param_rms (over all elements, param_rms before the update) and lr (the lr used)."""
        home = self.step_count.device
        t = self.step_count.to(torch.float32)
        # b^(t+1) as a power of the step tensor: no host value, so one captured graph serves every step. fp32 like
        # optax's bias_correction.
        bc2 = 1 - torch.pow(self.beta2, t + 1)
        bc1 = 1 - torch.pow(self.beta1, t + 1)
        ramp = torch.clamp(t / self.warmup, max=1.0) if self.warmup > 0 else torch.ones_like(t)
        lr = self.lr * ramp
        rms_scale = torch.rsqrt(bc2)  # sqrt(nu_hat) = sqrt(nu) * rsqrt(bc2): one scalar, no nu_hat list
        step_scale = -lr / bc1

        gsq, psq, usq = [], [], []
        count = 0
        for idx in self._groups:
            idx = [i for i in idx if self.params[i].grad is not None]
            if not idx:
                continue
            params = [self.params[i] for i in idx]
            grads = [self.params[i].grad.float() for i in idx]  # no copy for fp32 grads; never written to
            nu = [self.nu[i] for i in idx]
            mu = [self.mu[i] for i in idx]
            dev = params[0].device
            count += sum(p.numel() for p in params)

            gnorm = _norms(grads)  # (P,)
            pnorm = _norms([p.float() for p in params])  # (P,)
            gsq.append(gnorm.square().sum().to(home))
            psq.append(pnorm.square().sum().to(home))
            clip = 1 / torch.clamp(gnorm / (self.agc * torch.clamp(pnorm, min=self.pmin)), min=1.0)  # (P,)
            grads = torch._foreach_mul(grads, list(clip.unbind()))

            torch._foreach_mul_(nu, self.beta2)
            torch._foreach_addcmul_(nu, grads, grads, value=1 - self.beta2)
            denom = torch._foreach_sqrt(nu)
            torch._foreach_mul_(denom, rms_scale.to(dev))
            torch._foreach_add_(denom, self.eps)
            u = torch._foreach_div(grads, denom)

            torch._foreach_mul_(mu, self.beta1)
            torch._foreach_add_(mu, u, alpha=1 - self.beta1)
            upd = torch._foreach_mul(mu, step_scale.to(dev))  # fp32 update, -lr_t * mu_hat
            usq.append(_norms(upd).square().sum().to(home))
            if params[0].dtype == torch.float32:
                torch._foreach_add_(params, upd)
            else:
                torch._foreach_add_(params, [x.to(p.dtype) for x, p in zip(upd, params, strict=True)])

        self.step_count.add_(1)
        n = max(count, 1)
        zero = torch.zeros((), device=home)
        return {
            "grad_norm": torch.stack(gsq).sum().sqrt() if gsq else zero,
            "update_rms": (torch.stack(usq).sum() / n).sqrt() if usq else zero,
            "param_rms": (torch.stack(psq).sum() / n).sqrt() if psq else zero,
            "lr": lr,
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step_count.clone(),
            "lr": self.lr.clone(),
            "nu": [x.clone() for x in self.nu],
            "mu": [x.clone() for x in self.mu],
            "hparams": {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "eps": self.eps,
                "agc": self.agc,
                "pmin": self.pmin,
                "warmup": self.warmup,
            },
        }

    def load_state_dict(self, d: dict) -> None:
        """Copies into the existing state tensors, so buffers captured by a CUDA graph stay valid."""
        nu, mu = d["nu"], d["mu"]
        if len(nu) != len(self.nu) or len(mu) != len(self.mu):
            raise ValueError(f"optimizer state has {len(nu)} tensors, this optimizer has {len(self.nu)} parameters")
        for dst, src in zip(self.nu + self.mu, list(nu) + list(mu), strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"optimizer state shape {tuple(src.shape)} != parameter {tuple(dst.shape)}")
            dst.copy_(src)
        self.step_count.copy_(d["step"])
        self.lr.copy_(d["lr"])
        for k, v in d.get("hparams", {}).items():
            setattr(self, k, v)
