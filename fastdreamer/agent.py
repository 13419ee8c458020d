"""The DreamerV3 agent (dreamerv3/agent.py): world model, imagination, actor-critic, in one loss for one
optimizer. Everything here stays on the device: no .item(), no host branching on tensor values."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import dists
from .config import SIZES, Config
from .kernels import block_gru
from .nets import MLP, Decoder, Encoder, Linear
from .rssm import RSSM, feat

if TYPE_CHECKING:
    from .envs import EnvSpec


class Head(nn.Module):
    """MLP -> Linear; the output layer scaled by `outscale` (0 for reward and critic: zero-initialised). With `std`,
    a second output layer of the same width for the continuous actor's pre-std, concatenated after the mean: the
    reference's bounded_normal has separate mean and stddev layers, so AGC clips each by its own norm."""

    def __init__(self, fin: int, units: int, layers: int, out: int, outscale: float, std: bool = False):
        super().__init__()
        self.mlp = MLP(fin, units, layers)
        self.out = Linear(self.mlp.out_dim, out, outscale)
        self.std = Linear(self.mlp.out_dim, out, outscale) if std else None

    def forward(self, x: torch.Tensor, y0: torch.Tensor | None = None) -> torch.Tensor:
        """y0: the MLP's first linear output, computed by the caller (MLP's y0); x is then not read."""
        h = self.mlp(x, y0)
        if self.std is None:
            return self.out(h)
        return torch.cat([self.out(h), self.std(h)], -1)


def lambda_return(last, term, rew, boot, disc, lam):
    """The reference's lambda-return over (N, L) inputs -> (N, L - 1): returns for every step but the last,
    bootstrapped from `boot` where a sequence is cut (last) and at its end."""
    live = (1.0 - term.to(rew.dtype))[:, 1:] * disc
    cont = (1.0 - last.to(rew.dtype))[:, 1:] * lam
    interm = rew[:, 1:] + (1.0 - cont) * live * boot[:, 1:]
    # The recursion ret_t = interm_t + a_t ret_{t+1} (a = live * cont; ret_{L-1} = boot_{L-1}) unrolled:
    # ret_t = sum_{k >= t} (a_t ... a_{k-1}) x_k with x = (interm, boot_{L-1}). A loop over the steps compiles to one
    # kernel per step (each step's return is stacked and read by the next, so inductor stores each: 61 launches for
    # the replay returns of a 64-step batch); the (N, L-1, L) products are a cumprod and the sum one reduction.
    a = torch.cat([torch.ones_like(live[:, :1]), live * cont], 1)  # (N, L): column k holds a_{k-1}
    reach = torch.ones(a.shape[1] - 1, a.shape[1], dtype=torch.bool, device=a.device).triu()  # [t, k]: k >= t
    prods = torch.where(reach.triu(1), a[:, None, :], 1.0).cumprod(-1)  # [t, k] = a_t ... a_{k-1} for k >= t
    x = torch.cat([interm, boot[:, -1:]], 1)  # (N, L)
    return (torch.where(reach, prods, 0.0) * x[:, None, :]).sum(-1)


def _means(*tensors: torch.Tensor) -> torch.Tensor:
    """The mean of each of several tensors of one shape, as one reduction: a (len(tensors),) float32 tensor."""
    return torch.stack([t.float() for t in tensors]).flatten(1).mean(1)


def percentiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Percentiles of a 1-d tensor with linear interpolation (numpy's default). The size is static, so the
    positions are Python numbers: one sort on the device and no host sync (torch.quantile checks its
    arguments on the host)."""
    x = x.sort().values
    n = x.shape[0]
    out = []
    for q in qs:
        pos = q / 100 * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        out.append(x[lo] + (pos - lo) * (x[hi] - x[lo]))
    return out


def image_recon_loss(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The decoder's image loss: squared error of recon (..., H, W, C) in [0, 1] against the uint8 image, summed
    per frame."""
    return (recon - image.float() / 255.0).square().sum((-3, -2, -1))


class Agent(nn.Module):
    def __init__(self, cfg: Config, spec: EnvSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        size = SIZES[cfg.size]
        self.act_dim = spec.act_dim
        # Discrete actions: G categoricals (a MultiDiscrete space) padded to K = act_dim // G classes each; the counts
        # of those with fewer, as a device tensor (dists.Policy), or None.
        groups = spec.act_classes or (spec.act_dim,)
        self.act_groups = len(groups)
        padded = spec.discrete and min(groups) < spec.act_dim // self.act_groups
        self.register_buffer("act_counts", torch.tensor(groups) if padded else None, persistent=False)
        classes = spec.obs_classes or spec.classes  # each discrete element's count, or one for all
        self.encoder = Encoder(spec.obs, size.units, cfg.enc_layers, size.depth, classes=classes)
        self.rssm = RSSM(
            self.encoder.out_dim,
            spec.act_dim,
            size.deter,
            size.hidden,
            size.stoch,
            size.classes,
            size.blocks,
            cfg.unimix,
            cfg.obslayers,
            cfg.imglayers,
            cfg.free_nats,
        )
        fdim = self.rssm.feat_dim
        self.decoder = Decoder(
            spec.obs,
            size.deter,
            size.stoch * size.classes,
            size.units,
            cfg.dec_layers,
            size.depth,
            bspace=cfg.bspace,
            classes=classes,
        )
        self.reward = Head(fdim, size.units, cfg.head_layers, cfg.bins, 0.0)
        self.cont = Head(fdim, size.units, cfg.head_layers, 1, 1.0)
        self.actor = Head(fdim, size.units, cfg.ac_layers, spec.act_dim, 0.01, std=not spec.discrete)
        self.critic = Head(fdim, size.units, cfg.ac_layers, cfg.bins, 0.0)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("bins", dists.twohot_bins(cfg.bins))
        self.register_buffer("retnorm_lo", torch.zeros(()))
        self.register_buffer("retnorm_hi", torch.zeros(()))

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("slow_critic.")]

    def policy(self, f: torch.Tensor, y0: torch.Tensor | None = None) -> dists.Policy:
        """The actor's distribution at feat f; y0: its first linear output, computed by the caller (Head's y0)."""
        raw = self.actor(f, y0)
        cfg = self.cfg
        return dists.Policy(
            raw, self.spec.discrete, cfg.policy_unimix, cfg.minstd, cfg.maxstd, self.act_groups, self.act_counts
        )

    def initial(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deter, stoch = self.rssm.initial(n, device)
        return deter, stoch, torch.zeros(n, self.act_dim, device=device)

    def noise(self, n: int, latent_steps: int, action_steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """All random numbers of an acting step or a rollout, drawn up front: uniforms (latent_steps, n, S, 1) for
        the latent draws and the actions' noise (action_steps, n, ...) (dists.Policy.noise). A compiled graph need
        not draw its random numbers as eager does (seen on CUDA: from one seed, eager and compiled rollouts drew the
        same first numbers and other ones from the second draw on, most likely in another order); drawn here,
        eagerly in every mode (fast.compile_agent keeps this method out of the graphs), each sample uses the same
        numbers in every mode."""
        lat = torch.rand((latent_steps, n, self.rssm.stoch, 1), device=device)
        act = dists.Policy.noise((action_steps, n), self.act_dim, self.spec.discrete, device, self.act_groups)
        return lat, act

    @torch.no_grad()
    def act(self, carry, obs: dict[str, torch.Tensor], greedy: bool = False):
        """One acting step for N envs: carry (deter, stoch, prevact), obs (N, ...) -> action (N, A), carry.
        The action is one-hot for discrete envs and unclipped for continuous ones."""
        lat, act = self.noise(carry[0].shape[0], 1, 1, carry[0].device)
        return self.policy_step(carry, obs, lat[0], act[0], greedy)

    @torch.no_grad()
    def policy_step(self, carry, obs, lat_u: torch.Tensor, act_noise: torch.Tensor, greedy: bool = False):
        """act() given its random numbers (noise(n, 1, 1)[i][0])."""
        deter, stoch, prevact = carry
        token = self.encoder(obs, bdims=1)
        deter, stoch, _ = self.rssm.obs_step(deter, stoch, prevact, token, obs["is_first"], lat_u)
        pol = self.policy(feat(deter, stoch))
        action = pol.mode() if greedy else pol.sample(act_noise)
        return action, (deter, stoch, action)

    def imagine(self, deter: torch.Tensor, stoch: torch.Tensor):
        """H prior steps from every start (N, D), (N, S, C) under the actor. No gradient: the reference stops
        gradients at imagined features and trains the actor by REINFORCE. Returns feats (N, H+1, F) and
        actions (N, H+1, A), the action at index h being the one taken in state h."""
        H = self.cfg.imag_length
        lat, act = self.noise(deter.shape[0], H, H + 1, deter.device)
        return self.rollout(deter, stoch, lat, act)

    def rollout(self, deter, stoch, lat_u: torch.Tensor, act_noise: torch.Tensor):
        """imagine() given its random numbers (noise(N, H, H + 1))."""
        with torch.no_grad():
            feats, acts = [feat(deter, stoch)], []
            for h in range(lat_u.shape[0]):
                action = self.policy(feats[-1]).sample(act_noise[h])
                acts.append(action)
                deter, stoch, _ = self.rssm.img_step(deter, stoch, action, lat_u[h])
                feats.append(feat(deter, stoch))
            acts.append(self.policy(feats[-1]).sample(act_noise[-1]))
            return torch.stack(feats, 1), torch.stack(acts, 1)

    def merged_rollout(self, deter, stoch, lat_u: torch.Tensor, act_noise: torch.Tensor):
        """rollout() with the matmuls that read the same tensor merged into one (what the fast modes run; eager runs
        rollout(), the reference). Each step's new deter is read by three matmuls (the prior's first layer now, and
        in the next step the actor's first layer and the core's deter branch) and each new sample by two (the
        actor's first layer and the core's stoch branch, next step): here by one each, of the weights side by side,
        whose parts the steps take precomputed (Head's and MLP's y0, block_gru.step's x0p and x1p): two matmuls
        fewer per step. At batch 1024 a matmul with 256 output columns fills few of a GPU's SMs, so one with 768
        should cost about what one of 256 did (expected, unmeasured on a GPU: bench.rollout_ab). The same math up to
        the order of the sums; under bf16 autocast the actor's first pre-activation is two rounded bf16 products
        summed and rounded, the prior's a rounded product plus its bias rounded again, instead of one rounding each.
        Either core takes the products (the Triton core's kernels then skip them); without an actor or prior layer to
        merge this is rollout()."""
        rssm, actor = self.rssm, self.actor
        if not len(actor.mlp) or not len(rssm.img_net):
            return Agent.rollout(self, deter, stoch, lat_u, act_noise)
        with torch.no_grad():
            D, lin_a, lin_p = rssm.deter, actor.mlp[0].linear, rssm.img_net[0].linear
            ua, k = lin_a.out_features, rssm.core.w0.shape[1]
            # Output columns: [actor | core branch | prior] of deter, [actor | core branch] of the flat sample.
            w_deter = torch.cat([lin_a.weight[:, :D].t(), rssm.core.w0, lin_p.weight.t()], 1)
            w_stoch = torch.cat([lin_a.weight[:, D:].t(), rssm.core.w1], 1)

            def actor_y(pd, ps):
                return (pd[:, :ua] + ps[:, :ua] + lin_a.bias).to(pd.dtype)

            # Under bf16 autocast every reader of the feats is a matmul that casts them to bf16 first (the heads' first
            # layers in Agent.loss): stored as bf16, the values they read are the same, the stack half the bytes, and
            # the loss graph has no cast of its own (16,384 x 2,560 fp32 read and bf16 written at 12m).
            store = torch.bfloat16 if block_gru._bf16_autocast(deter.device) else deter.dtype
            pd, ps = deter @ w_deter, stoch.flatten(1) @ w_stoch
            feats, acts = [feat(deter, stoch).to(store)], []
            for h in range(lat_u.shape[0]):
                action = self.policy(feats[-1], actor_y(pd, ps)).sample(act_noise[h])
                acts.append(action)
                deter = rssm.core(deter, stoch.flatten(1), action, x0p=pd[:, ua : ua + k], x1p=ps[:, ua:])
                pd = deter @ w_deter
                logp = rssm.prior(deter, (pd[:, ua + k :] + lin_p.bias).to(pd.dtype))
                stoch = dists.sample_onehot(logp, lat_u[h])
                ps = stoch.flatten(1) @ w_stoch
                feats.append(feat(deter, stoch).to(store))
            acts.append(self.policy(feats[-1], actor_y(pd, ps)).sample(act_noise[-1]))
            return torch.stack(feats, 1), torch.stack(acts, 1)

    def _update_retnorm(self, ret: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA of the 5th and 95th return percentiles, then (offset, scale) with scale >= limit."""
        q = percentiles(ret.detach().flatten().float(), (self.cfg.retnorm_lo, self.cfg.retnorm_hi))
        rate = self.cfg.retnorm_rate
        self.retnorm_lo.mul_(1 - rate).add_(rate * q[0])
        self.retnorm_hi.mul_(1 - rate).add_(rate * q[1])
        scale = torch.clamp_min(self.retnorm_hi - self.retnorm_lo, self.cfg.retnorm_limit)
        return self.retnorm_lo.clone(), scale

    def sequence_start(self, data: dict[str, torch.Tensor]):
        """A replay batch (B, T + context, ...) split for the world model: the latent before its first trained step
        (deter (B, D), stoch (B, S, C): the stored posterior with replay context, else the initial state), the action
        before each trained step (B, T, A), and the trained steps' fields (B, T, ...)."""
        ctx = self.cfg.replay_context
        if ctx:
            deter0 = data["deter"][:, 0].float()
            stoch0 = dists.one_hot(data["stoch"][:, 0].long(), self.rssm.classes)
            prevact = data["action"][:, :-1].float()
        else:
            deter0, stoch0, act0 = self.initial(data["is_first"].shape[0], data["is_first"].device)
            prevact = torch.cat([act0[:, None], data["action"][:, :-1].float()], 1)
        return deter0, stoch0, prevact, {k: v[:, ctx:] for k, v in data.items()}

    def prediction_losses(self, recons, rew_logits, con_logit, obs) -> dict[str, torch.Tensor]:
        """The world model's prediction losses per step (B, T): each decoded key (recons from the decoder: symlog MSE
        for vectors, categorical NLL for discrete observations, squared error for images), the reward
        (two-hot logits (B, T, bins)) and the continue flag (logit (B, T)), against the steps' fields obs."""
        losses = {}
        for key, recon in recons.items():
            if key in self.decoder.img_keys:
                losses[key] = image_recon_loss(recon, obs[key])
            elif key in self.decoder.disc_keys:  # categorical over each element's classes, summed over elements
                losses[key] = self.decoder.discrete_nll(key, recon, obs[key])
            else:
                losses[key] = (recon - dists.symlog(obs[key].float())).square().sum(-1)
        losses["rew"] = dists.twohot_loss(rew_logits, obs["reward"].float(), self.bins)
        con_target = (~obs["is_terminal"]).float() * (1.0 - 1.0 / self.cfg.horizon)  # contdisc
        losses["con"] = -dists.binary_logp(con_logit, con_target)
        return losses

    def loss(self, data: dict[str, torch.Tensor]):
        """The whole DreamerV3 loss on a replay batch (B, T + context, ...). Returns the scalar loss, a dict
        of device-scalar metrics, and the refreshed posterior latents (deter (B, T, D), stoch index (B, T, S))
        for the replay-context write-back."""
        cfg = self.cfg
        B = data["is_first"].shape[0]
        S, C = self.rssm.stoch, self.rssm.classes
        deter0, stoch0, prevact, obs = self.sequence_start(data)
        is_first, is_last, is_term = obs["is_first"], obs["is_last"], obs["is_terminal"]
        reward = obs["reward"].float()
        T = is_first.shape[1]

        # World model.
        tokens = self.encoder(obs)  # (B, T, E)
        deters, stochs, post = self.rssm.observe(deter0, stoch0, tokens, prevact, is_first)
        prior = self.rssm.prior(deters)  # (B, T, S, C)
        dyn, rep = self.rssm.kl_losses(post, prior)
        repfeat = feat(deters, stochs)  # (B, T, F)
        losses = {"dyn": dyn, "rep": rep}
        recons = self.decoder(deters, stochs.flatten(-2))
        losses.update(self.prediction_losses(recons, self.reward(repfeat), self.cont(repfeat).squeeze(-1), obs))

        # Imagination from every posterior state of the batch.
        D = deters.shape[-1]
        imgfeat, imgact = self.imagine(deters.detach().reshape(B * T, D), stochs.detach().reshape(B * T, S, C))
        with torch.no_grad():
            rew = dists.twohot_pred(self.reward(imgfeat), self.bins)  # (N, H+1)
            con = torch.sigmoid(self.cont(imgfeat).squeeze(-1).float())
            slowval = dists.twohot_pred(self.slow_critic(imgfeat), self.bins)
        val_logits = self.critic(imgfeat)
        val = dists.twohot_pred(val_logits.detach(), self.bins)
        with torch.no_grad():
            weight = torch.cumprod(con, 1)  # disc is 1 with contdisc
            ret = lambda_return(torch.zeros_like(con), 1.0 - con, rew, val, 1.0, cfg.lam)  # (N, H)
            roffset, rscale = self._update_retnorm(ret)
            adv = (ret - val[:, :-1]) / rscale
        pol = self.policy(imgfeat)
        logpi = pol.logp(imgact)[:, :-1]
        ent = pol.entropy()[:, :-1]
        losses["policy"] = weight[:, :-1] * -(logpi * adv + cfg.actent * ent)
        val_logp = torch.log_softmax(val_logits.float(), -1)[:, :-1]  # a view: no copy of (N, H, bins)
        losses["value"] = weight[:, :-1] * (
            dists.twohot_nll(val_logp, ret, self.bins)
            + cfg.slowreg * dists.twohot_nll(val_logp, slowval[:, :-1], self.bins)
        )

        # Critic on replayed trajectories, bootstrapped from the imagined returns (repval loss).
        rep_logits = self.critic(repfeat)
        with torch.no_grad():
            boot = ret[:, 0].reshape(B, T)
            rep_slow = dists.twohot_pred(self.slow_critic(repfeat), self.bins)
            rep_ret = lambda_return(is_last, is_term, reward, boot, 1.0 - 1.0 / cfg.horizon, cfg.lam)  # (B, T-1)
        rep_logp = torch.log_softmax(rep_logits.float(), -1)[:, :-1]
        losses["repval"] = (~is_last[:, :-1]).float() * (
            dists.twohot_nll(rep_logp, rep_ret, self.bins)
            + cfg.slowreg * dists.twohot_nll(rep_logp, rep_slow[:, :-1], self.bins)
        )

        scales = {
            "dyn": cfg.loss_dyn,
            "rep": cfg.loss_rep,
            "rew": cfg.loss_rew,
            "con": cfg.loss_con,
            "policy": cfg.loss_policy,
            "value": cfg.loss_value,
            "repval": cfg.loss_repval,
        }
        means = {k: v.mean() for k, v in losses.items()}
        total = sum(means[k] * scales.get(k, cfg.loss_rec) for k in means)
        metrics = {f"loss/{k}": v.detach() for k, v in means.items()}
        with torch.no_grad():
            # Means of same-shaped tensors as one reduction each (one or two kernels on a GPU, not one or two each);
            # the latents' entropies summed over (S, C) and averaged over (B, T) are one sum over all their elements.
            dyn_ent, rep_ent = _means(-(prior.exp() * prior), -(post.exp() * post)) * (S * C)
            ret_mean, adv_mean, ent_mean = _means(ret, adv, ent)
            val_mean, rew_mean, con_mean = _means(val, rew, con)
            metrics.update(
                {
                    "loss/total": total.detach(),
                    "wm/dyn_ent": dyn_ent,
                    "wm/rep_ent": rep_ent,
                    "ac/ret": ret_mean,
                    "ac/adv": adv_mean,
                    "ac/adv_std": adv.std(),
                    "ac/entropy": ent_mean,
                    "ac/value": val_mean,
                    "ac/retnorm_scale": rscale,
                    "ac/retnorm_offset": roffset,
                    "ac/imag_reward": rew_mean,
                    "ac/imag_cont": con_mean,
                }
            )
        latents = {"deter": deters.detach(), "stoch": dists.onehot_index(stochs.detach())}
        return total, metrics, latents

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        rate = self.cfg.slow_rate
        slow = list(self.slow_critic.parameters())
        torch._foreach_lerp_(slow, list(self.critic.parameters()), rate)
