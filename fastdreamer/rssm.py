"""The RSSM of the reference (dreamerv3/rssm.py): block-GRU core, 1-layer posterior, 2-layer prior,
S categorical latents of C classes with 1% unimix and straight-through samples, KL with free bits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import defer, dists, fanout
from .kernels import block_gru
from .nets import MLP, Linear, trunc_normal_


class BlockGRUCore(nn.Module):
    """Parameters of one block-GRU core; the math lives in kernels/block_gru (one switch: torch | triton)."""

    def __init__(self, deter: int, stoch_flat: int, act_dim: int, hidden: int, blocks: int):
        super().__init__()
        if deter % blocks:
            raise ValueError(f"deter {deter} is not divisible by {blocks} blocks")
        D, K, G = deter, hidden, blocks

        def weight(fin, fout):
            return nn.Parameter(trunc_normal_(torch.empty(fin, fout), fin))

        self.w0, self.b0, self.s0 = weight(D, K), nn.Parameter(torch.zeros(K)), nn.Parameter(torch.ones(K))
        self.w1, self.b1, self.s1 = weight(stoch_flat, K), nn.Parameter(torch.zeros(K)), nn.Parameter(torch.ones(K))
        self.w2, self.b2, self.s2 = weight(act_dim, K), nn.Parameter(torch.zeros(K)), nn.Parameter(torch.ones(K))
        # Block layers: fan-in is the whole input width, as in the reference's BlockLinear.
        self.wh = nn.Parameter(trunc_normal_(torch.empty(G, D // G + 3 * K, D // G), D + 3 * K * G))
        self.bh, self.sh = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.ones(D))
        self.wg = nn.Parameter(trunc_normal_(torch.empty(G, D // G, 3 * D // G), D))
        self.bg = nn.Parameter(torch.zeros(3 * D))

    def weights(self) -> block_gru.BlockGRUWeights:
        return block_gru.BlockGRUWeights(*(getattr(self, n) for n in block_gru.BlockGRUWeights._fields))

    def forward(
        self,
        deter: torch.Tensor,
        stoch: torch.Tensor,
        action,
        taps=None,
        action_x=None,
        x0p=None,
        x1p=None,
        packed=False,
        first=None,
    ):
        """deter (N, D), stoch (N, S*C), action (N, A) -> deter (N, D); with taps (block_gru.step) (deter, seen).
        action_x: the action branch already computed (action_branch; block_gru.step's x2); then action is not
        read. x0p, x1p: deter @ w0 and stoch @ w1 already computed (block_gru.step's). packed (taps and action_x):
        (deter, seen, packed factors) (block_gru.step's). first: the rows where x0p and x1p count as zero
        (block_gru.step's)."""
        if action_x is None:
            action = _scale_action(action)
        w = self.weights()
        return block_gru.step(
            deter, stoch, action, w, taps=taps, x2=action_x, x0p=x0p, x1p=x1p, packed=packed, first=first
        )

    def action_branch(self, action: torch.Tensor) -> torch.Tensor:
        """The core's action branch for any rows, (N, A) -> (N, K): forward's action_x."""
        return block_gru.reference.action_branch(_scale_action(action), self.weights())

    # The action branch's parameters (those of its tap sites, ACTION_SITES): what hoisting it takes out of the steps.
    action_params = tuple(
        f"core.{p}" for s in block_gru.reference.ACTION_SITES for p in block_gru.reference.TAP_SITES[s][1:]
    )


def _scale_action(action: torch.Tensor) -> torch.Tensor:
    """The core's action input: action / max(1, |action|) elementwise (the reference's scaling), no gradient
    through the divisor."""
    return action / action.abs().clamp_min(1.0).detach()


class RSSM(nn.Module):
    def __init__(
        self,
        token_dim: int,
        act_dim: int,
        deter: int,
        hidden: int,
        stoch: int,
        classes: int,
        blocks: int,
        unimix: float = 0.01,
        obslayers: int = 1,
        imglayers: int = 2,
        free_nats: float = 1.0,
    ):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.unimix, self.free_nats = unimix, free_nats
        self.core = BlockGRUCore(deter, stoch * classes, act_dim, hidden, blocks)
        self.obs_net = MLP(deter + token_dim, hidden, obslayers)
        self.obs_logit = Linear(self.obs_net.out_dim, stoch * classes)
        self.img_net = MLP(deter, hidden, imglayers)
        self.img_logit = Linear(self.img_net.out_dim, stoch * classes)
        # Under bf16 autocast, observe() hands each step views of one copy of its parameters (fastdreamer/fanout.py):
        # one cast and one gradient sum per update instead of one per step. Off in eager (the reference); the fast
        # modes set it.
        self.fan_out = False
        # Deferred weight gradients (fastdreamer/defer.py): the observe steps run on parameters without gradient and
        # every parameter's gradient is one reduction over all B*T rows after the loop's backward. Off in eager;
        # the fast modes set it (on CUDA). Where it runs, fan_out is not used.
        self.defer = False
        # Each observe step's deter and sample feed both the next step and the output stack, and its log-probs only
        # the stack. Autograd meets those two gradients with an add kernel per step (and deter's and stoch's per
        # step), and a compiled step copies the strided (B, T, ...) stack's gradient slices to contiguous ones (logp).
        # With emit_copies, each step returns copies of deter and the sample for the stack (the same fused kernel
        # stores both), so the two gradients are summed inside the step's compiled backward, and the stack hands
        # each step contiguous gradients (stack_steps). Off in eager (two copies per step and nothing to fuse them
        # into); the fast modes set it.
        self.emit_copies = False
        # The core's action branch (Linear -> RMSNorm -> SiLU of the action taken before each step) does not depend
        # on the recurrence: with hoist_action, observe computes it for all B*T rows at once (one matmul, its
        # backward one weight-gradient matmul) and the steps take it as action_x, instead of a cast, a 16-row matmul
        # and a norm per step (either core: the Triton core's kernels then skip the branch). Off in eager (the plain
        # loop is the reference); the fast modes set it.
        self.hoist_action = False
        # Two matmuls of each observe step read the step's new deter: the posterior's first layer (of concat(deter,
        # token)) and, in the next step, the core's deter branch (deter @ w0; the next step's is_first mask zeroes
        # rows of the product as it would zero rows of deter). With merge_deter, observe multiplies deter once by
        # both weights side by side, (D, U + K), and hands the product's w0 part to the next step (x0p); the
        # posterior layer's token part does not depend on the recurrence and is one matmul over all B*T rows before
        # the loop (token_x). One matmul fewer per step forward, and one fewer backward (deter's gradient from both
        # uses is one product). Likewise each step multiplies its sample by w1 for the next step's stoch branch
        # (x1p): the sample's bf16 cast then fuses into the kernel that draws it, instead of a masking and casting
        # kernel at the start of the next step. Under defer only (the merged weight is a copy without gradient; the
        # taps give the weights theirs), either core (the Triton core's kernels then skip the two branches' products).
        # Off in eager; the fast modes set it.
        self.merge_deter = False

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        deter = torch.zeros(batch, self.deter, device=device)
        return deter, torch.zeros(batch, self.stoch, self.classes, device=device)

    def _logp(self, logit: torch.Tensor) -> torch.Tensor:
        """Flat logits (..., S*C) -> unimixed log-probs (..., S, C)."""
        return dists.unimix_logits(logit.reshape(*logit.shape[:-1], self.stoch, self.classes), self.unimix)

    def obs_step(self, deter, stoch, action, token, is_first, u=None, params=None, **options):
        """Posterior step. deter (N, D), stoch (N, S, C), action (N, A) taken before this obs, token (N, E),
        is_first (N,), u: the latent draw's uniforms (N, S, 1) or None to draw them here; params: per-step views
        of some parameters ({name: tensor}, names relative to this module) to use in their place; options: forward's
        keyword-only options. Returns deter, stoch sample (N, S, C), posterior log-probs (N, S, C), then what the
        options add."""
        args = (deter, stoch, action, token, is_first, u)
        if params is None:
            return self(*args, **options)
        return torch.func.functional_call(self, params, args, options)

    def forward(
        self,
        deter,
        stoch,
        action,
        token,
        is_first,
        u=None,
        *,
        taps=None,
        emit=False,
        action_x=None,
        x0p=None,
        x1p=None,
        merged=None,
        token_x=None,
        next_first=None,
    ):
        """The posterior step of obs_step: a module's forward so that torch.func.functional_call can run it on
        per-step parameter views (observe with fan_out or defer). taps: one step's zeros for all sites of
        tap_sites() (deferred weight gradients, fastdreamer/defer.py); the return then has the sites' other factors,
        packed, after the log-probs. emit: copies of deter and the sample at the end of the return (emit_copies).
        action_x: the core's action branch of this step's action (masked by is_first), computed by the caller
        (hoist_action); then action is not read. merge_deter (with taps): x0p deter @ w0 (N, K) and x1p flat
        stoch @ w1 (N, K) from the previous step (this step masks them as it masks deter and stoch), merged
        deter_inputs' pair of weights (the (D, U + K) merged one, w1 in the posterior's dtype) and token_x (N, U)
        this step's row of its token part; the return then
        has, after the factors, the next step's x0p and x1p. next_first (N,) (merge_deter with emit): the next
        step's is_first; this step then takes its deter masked already (by the step before, or by observe for the
        first) and returns the new deter masked by next_first, its copy for the stack unmasked. The masked deter is
        then an input of the compiled step, not a kernel of its own (the backward keeps it, and two kernels of other
        shapes read it), and the mask is one more store of the kernel that computes the new deter."""
        merge = (x0p, x1p, merged, token_x)
        out = self._posterior(deter, stoch, action, token, is_first, u, taps, action_x, merge, next_first is None)
        if not emit:
            return out
        out = (*out, out[0].clone(), out[1].clone())
        if x1p is not None:
            # merge_deter: the next step reads the carried sample only as its stoch branch's factor (the branch's
            # product comes as x1p) and the stack its copy, so no gradient reaches it; detached, the compiled
            # backward gets no zero-filled gradient for it each step.
            out = (out[0], out[1].detach(), *out[2:])
        if next_first is not None:
            out = (out[0] * (~next_first).to(out[0].dtype)[:, None], *out[1:])
        return out

    def _posterior(self, deter, stoch, action, token, is_first, u, taps, action_x, merge, mask_deter=True):
        x0p, x1p, merged, token_x = merge
        keep = (~is_first).to(deter.dtype)[:, None]
        if mask_deter:
            deter = deter * keep
        if action_x is None:
            action = action * keep
        if x1p is None:  # with x1p the core does not read stoch (either core; the Triton op still takes it)
            stoch = stoch * keep[:, :, None]
        if taps is None:
            if any(m is not None for m in merge):
                raise ValueError("RSSM: merge_deter's inputs are for the deferred-gradient path (taps)")
            deter = self.core(deter, stoch.flatten(1), action, action_x=action_x)
            logp = self._logp(self.obs_logit(self.obs_net(torch.cat([deter, token], -1))))
            return deter, dists.sample_onehot(logp, u), logp
        hoisted = action_x is not None
        sites = self.tap_sites(check=False, hoisted=hoisted)  # the layout only: widths and order
        core_taps = {s: taps[f"core.{s}"] for s in self._core_sites if f"core.{s}" in sites}
        # Hoisted, the core's own factors come packed as the record keeps them (the Triton core's kernels write them).
        # The core zeroes x0p and x1p on the first rows itself (block_gru.step's first: the Triton core as it reads
        # them, with no masking kernels before it and after its backward).
        first = None if x0p is None else is_first
        core_out = self.core(
            deter, stoch.flatten(1), action, core_taps, action_x=action_x, x0p=x0p, x1p=x1p, packed=hoisted, first=first
        )
        deter, core_seen = core_out[:2]
        seen = {f"core.{s}": x for s, x in core_seen.items()}
        x = torch.cat([deter, token], -1)
        y = prod = None
        if merged is not None:  # merge_deter: one product of deter for this step's posterior and the next step's core
            prod = deter @ merged[0]
            U = self.obs_net[0].linear.out_features
            y = prod[:, :U] + token_x
        for i, layer in enumerate(self.obs_net):
            x = layer(x, taps, seen, f"obs_net.{i}.", y=y if i == 0 else None)
        seen["obs_logit.x"] = x
        logit = self.obs_logit(x)
        logp = self._logp(logit + taps["obs_logit.x"].to(logit.dtype))
        sample = dists.sample_onehot(logp, u)
        packed = _ObserveRecord.pack(seen, sites, self.core, core_out[2] if hoisted else None)
        out = deter, sample, logp, packed
        if prod is None:
            return out
        # The next step's core products; contiguous: their gradients are, so they need no copy.
        return *out, prod[:, U:].contiguous(), sample.flatten(1) @ merged[1]

    _core_sites = tuple(block_gru.reference.TAP_SITES)

    def tap_sites(self, bf16: bool = False, check: bool = True, hoisted: bool = False) -> dict[str, defer.Site]:
        """Every site where an observe step's parameter enters (fastdreamer/defer.py), covering step_params().
        bf16: the step runs under bf16 autocast (its F.linear and torch-core matmuls multiply bf16 operands; the
        Triton core rounds its own and hands over the rounded inputs, block_gru.step). hoisted: the steps take the
        core's action branch as action_x (hoist_action), so its sites are not theirs."""
        core = self.core.weights()
        widths = block_gru.reference.tap_widths(core)
        core_bf16 = bf16 and block_gru.get_impl() == "torch"
        sites = {
            f"core.{s}": defer.Site(kind, tuple(f"core.{p}" for p in ps), widths[s], core_bf16 and kind != "scale")
            for s, (kind, *ps) in block_gru.reference.TAP_SITES.items()
            if not (hoisted and s in block_gru.reference.ACTION_SITES)
        }
        for i, layer in enumerate(self.obs_net):
            out = layer.linear.out_features
            params = (f"obs_net.{i}.linear.weight", f"obs_net.{i}.linear.bias")
            sites[f"obs_net.{i}.x"] = defer.Site("linear", params, out, bf16)
            sites[f"obs_net.{i}.n"] = defer.Site("scale", (f"obs_net.{i}.norm.scale",), out)
        params = ("obs_logit.weight", "obs_logit.bias")
        sites["obs_logit.x"] = defer.Site("linear", params, self.obs_logit.out_features, bf16)
        covered = sorted(p for s in sites.values() for p in s.params)
        if check and covered != sorted(self.step_params(hoisted)):
            used = sorted(self.step_params(hoisted))
            raise RuntimeError(f"RSSM.tap_sites covers {covered}, the observe step uses {used}")
        return sites

    def img_step(self, deter, stoch, action, u=None):
        """Prior step from (deter, stoch) under action: deter (N, D), stoch (N, S, C), prior log-probs. u as in
        obs_step."""
        deter = self.core(deter, stoch.flatten(1), action)
        logp = self.prior(deter)
        return deter, dists.sample_onehot(logp, u), logp

    def prior(self, deter: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Prior log-probs of deter (N, D); y: the first layer's linear output, computed by the caller
        (Agent.merged_rollout)."""
        return self._logp(self.img_logit(self.img_net(deter, y)))

    def observe(self, deter, stoch, tokens, actions, is_first, u=None):
        """Posterior over a sequence: tokens (B, T, E), actions (B, T, A) (the action before each step),
        is_first (B, T); u: the latent draws' uniforms (T, B, S, 1), drawn here when None. Returns deters
        (B, T, D), stochs (B, T, S, C), posterior log-probs (B, T, S, C).
        Per-step work that is not the step's own stays out of the loop: the uniforms are one draw for all steps (a
        compiled step that draws its own launches a seed kernel per call on CUDA), and the inputs are unbound once
        (indexing tokens[:, t] costs, in the backward, a zero-filled (B, T, E) gradient and its accumulation per
        step; unbind's backward is one stack)."""
        B, T = tokens.shape[:2]
        deter0, stoch0 = deter, stoch
        if u is None:
            u = torch.rand((T, B, self.stoch, 1), device=tokens.device)
        tokens_t, actions_t, first_t, u_t = tokens.unbind(1), actions.unbind(1), is_first.unbind(1), u.unbind(0)
        hoist = self.hoist_action
        action_x = self.action_inputs(actions, is_first).unbind(1) if hoist else [None] * T
        per_step, taps, record = [None] * T, [None] * T, None
        grad = torch.is_grad_enabled()
        merge = self.merge_deter and self.defer and grad and len(self.obs_net) > 0
        x0p = x1p = merged = None
        token_x = next_first = [None] * T
        emit = self.emit_copies and grad
        if self.defer and grad:
            dtypes = self.step_dtypes(deter.device)
            params = self.step_params(hoist)
            # The Triton core's factors are rounded exactly when the switch runs its bf16 compute.
            triton_bf16 = block_gru.get_impl() == "triton" and block_gru._bf16_autocast(deter.device)
            record = _ObserveRecord(self, round_core=triton_bf16)
            taps = defer.taps(self.tap_sites(bool(dtypes), hoisted=hoist), params, T, deter.shape[0], record)
            # One (cast) copy of each parameter, without gradient: the taps carry the gradients.
            per_step = [{n: p.detach().to(dtypes.get(n, p.dtype)) for n, p in params.items()}] * T
            if merge:
                w = per_step[0]
                post = w["obs_net.0.linear.weight"], w["obs_net.0.linear.bias"]
                merged, x0p, x1p, token_x = self.deter_inputs(deter, stoch, tokens, *post, w["core.w0"], w["core.w1"])
                token_x = token_x.unbind(1)
                if emit:
                    next_first = torch.cat([is_first[:, 1:], torch.zeros_like(is_first[:, :1])], 1).unbind(1)
                    deter = deter * (~first_t[0]).to(deter.dtype)[:, None]
        elif self.fan_out and grad and (dtypes := self.step_dtypes(deter.device)):  # bf16 autocast only: fanout.py
            per_step = fanout.fan_out(self.step_params(hoist), T, dtypes)
        deters, stochs, logps = [], [], []
        for t in range(T):
            out = self.obs_step(
                deter,
                stoch,
                actions_t[t],
                tokens_t[t],
                first_t[t],
                u_t[t],
                params=per_step[t],
                taps=taps[t],
                emit=emit,
                action_x=action_x[t],
                x0p=x0p,
                x1p=x1p,
                merged=merged,
                token_x=token_x[t],
                next_first=next_first[t],
            )
            if record is not None:
                record.append(out[3])  # a defer.Record: detaches
            if merge:
                x0p, x1p = out[4:6]
            deter, stoch, logp = out[:3]
            deters.append(out[-2] if emit else deter)
            stochs.append(out[-1] if emit else stoch)
            logps.append(logp)
        if emit:
            out = stack_steps(deters), stack_steps(stochs), stack_steps(logps)
        else:
            out = torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logps, 1)
        if isinstance(record, _ObserveRecord):
            record.close(deter0, stoch0, out[0], out[1], tokens, is_first)
        return out

    def action_inputs(self, actions: torch.Tensor, is_first: torch.Tensor) -> torch.Tensor:
        """The core's action branch for a whole sequence, what observe's steps take as action_x (hoist_action):
        actions (B, T, A), masked by is_first (B, T) as each step masks its own, -> (B, T, K). A unit of its own
        so that the fast modes compile it (fast.compile_agent): observe's loop itself runs eagerly."""
        keep = (~is_first).to(actions.dtype)[..., None]
        return self.core.action_branch((actions * keep).flatten(0, 1)).unflatten(0, actions.shape[:2])

    def deter_inputs(self, deter, stoch, tokens, weight, bias, w0, w1):
        """What observe's steps take under merge_deter, from the posterior's first layer (weight (U, D + E), bias)
        and the core's w0 (D, K) and w1 as the steps get them (cast, without gradient): the weights the steps
        multiply by, (merged, w1) with merged (D, U + K) = [weight's deter columns transposed | w0] and w1 in the
        posterior's dtype (the Triton core's w0 and w1 stay float32: cast here once, not by each step under
        autocast); the first step's x0p and x1p, the initial deter (B, D)
        and stoch (B, S, C) times w0 and w1 (computed as each step computes the next one's); and token_x (B, T, U),
        the layer's token part with its bias for all rows, tokens (B, T, E) @ weight's token columns + bias. A unit
        of its own so that the fast modes compile it (fast.compile_agent)."""
        D = self.deter
        merged, w1 = torch.cat([weight[:, :D].t(), w0.to(weight.dtype)], 1), w1.to(weight.dtype)
        x0p = (deter @ merged)[:, weight.shape[0] :].contiguous()
        return (merged, w1), x0p, stoch.flatten(1) @ w1, F.linear(tokens, weight[:, D:], bias)

    def step_params(self, hoisted: bool = False) -> dict[str, torch.Tensor]:
        """The parameters each observe step uses: the core's and the posterior's; hoisted: less the core's action
        branch's (hoist_action computes it outside the steps)."""
        branch = set(BlockGRUCore.action_params) if hoisted else set()
        return {
            n: p
            for n, p in self.named_parameters()
            if n.split(".")[0] in ("core", "obs_net", "obs_logit") and n not in branch
        }

    def step_dtypes(self, device: torch.device) -> dict[str, torch.dtype]:
        """Under bf16 autocast, the parameters autocast would cast to bf16 at every step (the matmul operands:
        F.linear's weight and bias, the torch core's five matmul weights), so fan_out casts them once; the rest
        (norm scales, biases added in fp32) stay fp32. The Triton core rounds its weights itself and returns
        float32 weight gradients, so its weights stay fp32."""
        if not (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16):
            return {}
        names = [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]
        out = {f"{n}.{k}": torch.bfloat16 for n in names for k in ("weight", "bias")}
        if block_gru.get_impl() == "torch":
            out.update({f"core.{k}": torch.bfloat16 for k in ("w0", "w1", "w2", "wh", "wg")})
        return out

    def kl_losses(self, post_logp: torch.Tensor, prior_logp: torch.Tensor):
        """Dynamics and representation losses with free bits, (B, T) each, and the two entropies."""
        dyn = dists.categorical_kl(post_logp.detach(), prior_logp).sum(-1)
        rep = dists.categorical_kl(post_logp, prior_logp.detach()).sum(-1)
        dyn = dyn.clamp_min(self.free_nats)
        rep = rep.clamp_min(self.free_nats)
        return dyn, rep


class _ObserveRecord(defer.Record):
    """The deferred observe loop's record (defer.Record): each step packs only the factors it computes (pack), and
    the others are the loop's own inputs and outputs, gathered once after the loop (factors): the core's deter and
    stoch branches multiply the step's masked deter and sample in, the posterior's first layer concat(new deter,
    token), and the block hidden layer the blocks of the masked deter beside x = concat(x0, x1, x2), which is the
    same for every block (the step packs x once, not the G copies the layer reads). Per 12m step that is 5,632
    packed columns instead of 18,176, and the step's graph writes them from the kernels that compute them: no copy
    kernels for the inputs it repacked (bench/LOG.md, session 25). Either core: the Triton core's factors are the
    operands its dots read, rounded to bf16 in its bf16 compute (round_core; block_gru.fused._seen), so the
    gathered deter and stoch factors are rounded the same way here (since session 31; before, its steps packed
    every factor, G copies of x included: 15 Triton kernels around the core's op per 12m step forward)."""

    # Sites whose whole factor is an input or output of the loop, and the block site whose deter part is.
    OUTER = ("core.x0", "core.x1", "obs_net.0.x")
    SPLIT = "core.h"

    def __init__(self, rssm: RSSM, round_core: bool = False):
        super().__init__()
        self.deter, self.blocks = rssm.deter, rssm.core.wh.shape[0]
        self.round_core = round_core
        self.loop = None  # close()'s tensors

    def close(self, deter0, stoch0, deters, stochs, tokens, is_first) -> None:
        """The loop's inputs and outputs, once it has run: the initial deter (B, D) and stoch (B, S, C), deters
        (B, T, D), stochs (B, T, S, C), tokens (B, T, E), is_first (B, T). Detached, as append() detaches: the
        record lives on the taps' autograd node, and a tensor here that carried the graph would keep it alive."""
        self.loop = tuple(t.detach() for t in (deter0, stoch0, deters, stochs, tokens, is_first))

    @classmethod
    def pack(
        cls, seen: dict[str, torch.Tensor], sites: dict[str, defer.Site], core: BlockGRUCore, core_packed=None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One step's own factors, (B, own width), in the order of `sites`: defer.pack less the OUTER sites, and of
        the SPLIT site only x (block 0's columns after its deter part; seen's u is (B, G, D/G + 3K)). core_packed:
        the core's own factors already packed so (block_gru.step's packed, with the action branch hoisted); the
        return is then (core_packed, each other site's factor), which the record reads as one: the Triton core's
        kernels wrote core_packed and the posterior's kernels its factors, and a cat would copy them. (A cat of the
        posterior's two was a kernel of its own per step in torch 2.11's GPU code, the H200's, though not in 2.13's,
        which writes a cat's inputs in place when they have other readers.)"""
        if core_packed is not None:
            own = [n for n in sites if n.startswith("core.") and n not in cls.OUTER]
            if own != [f"core.{s}" for s in block_gru.reference.PACKED_SITES]:
                raise RuntimeError(f"RSSM: the core's own sites {own} are not block_gru's packed ones")
            rest = [seen[n].flatten(1) for n in sites if not n.startswith("core.") and n not in cls.OUTER]
            return core_packed.detach(), *(r.detach() for r in rest)
        dg = core.wh.shape[2]
        parts = [
            seen[name][:, 0, dg:] if name == cls.SPLIT else seen[name].flatten(1)
            for name in sites
            if name not in cls.OUTER
        ]
        return torch.cat(parts, 1).detach()

    def factors(self, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        if self.loop is None:
            raise RuntimeError("defer: the observe loop's record was not closed (RSSM.observe closes it)")
        deter0, stoch0, deters, stochs, tokens, is_first = self.loop
        T, B = is_first.shape[1], is_first.shape[0]
        D, G = self.deter, self.blocks
        keep = (~is_first).to(deters.dtype).t()[..., None]  # (T, B, 1), as each step masks its inputs
        deters, stochs = deters.movedim(1, 0), stochs.flatten(2).movedim(1, 0)  # (T, B, ...)
        outer = {
            "core.x0": torch.cat([deter0[None].to(deters.dtype), deters[:-1]]) * keep,
            "core.x1": torch.cat([stoch0.flatten(1)[None].to(stochs.dtype), stochs[:-1]]) * keep,
            "obs_net.0.x": torch.cat([deters, tokens.movedim(1, 0)], -1),
        }
        outer = {k: v.flatten(0, 1).float() for k, v in outer.items()}
        if self.round_core:  # the Triton core's bf16 compute multiplied them rounded (the posterior's are autocast's)
            for k in ("core.x0", "core.x1"):
                outer[k] = outer[k].bfloat16().float()
        own = {k: w for k, w in widths.items() if k not in self.OUTER}
        own[self.SPLIT] = (own[self.SPLIT] - D) // G  # the steps packed x, not the G blocks of [deter part, x]
        out = super().factors(own)
        x = out[self.SPLIT]  # (T*B, 3K)
        blocks = outer["core.x0"].view(T * B, G, D // G)
        out[self.SPLIT] = block_gru.reference._block_inputs(blocks, x).flatten(1)  # the u the steps' layer read
        out.update(outer)
        return {k: out[k] for k in widths}


class _StackSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *steps):
        return torch.stack(steps, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad.movedim(1, 0).contiguous().unbind(0)


def stack_steps(steps: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(steps, 1): T tensors (B, ...) -> (B, T, ...), whose backward hands each step a contiguous
    gradient: one transposing copy of the (B, T, ...) gradient instead of T strided slices, which a compiled step's
    backward would each copy to contiguous (a kernel per step)."""
    return _StackSteps.apply(*steps)


def feat(deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
    """The model state the heads read: concat(deter, flat stoch)."""
    return torch.cat([deter, stoch.flatten(-2)], -1)


__all__ = ["RSSM", "BlockGRUCore", "feat", "stack_steps"]
