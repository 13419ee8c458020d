"""The update split in two for timing. Agent.loss is one loss for one optimizer, so the world-model and actor-critic
halves cannot be timed by calling it; these two functions restate its two halves with the agent's own modules and
dists functions (no new math), each with its backward. `check_parts` holds them to Agent.loss: the world-model
terms must equal the ones Agent.loss reports for the same batch and seed.

wm_update  encoder, observe loop, prior, KL, decoder, reward and continue heads; backward of their sum.
ac_update  imagination from the (detached) posterior states, reward/continue/critic/slow-critic heads on the
           rollout, returns, return normalisation, policy, value and replay-value losses; backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdreamer import dists
from fastdreamer.agent import lambda_return
from fastdreamer.dists import symlog
from fastdreamer.rssm import feat


def wm_losses(agent, data: dict[str, torch.Tensor]):
    """The world-model terms of Agent.loss: ({name: (B, T)}, deters (B, T, D), stochs (B, T, S, C))."""
    cfg, rssm = agent.cfg, agent.rssm
    ctx = cfg.replay_context
    if ctx:
        deter0 = data["deter"][:, 0].float()
        stoch0 = F.one_hot(data["stoch"][:, 0].long(), rssm.classes).float()
        prevact = data["action"][:, :-1].float()
    else:
        B = data["is_first"].shape[0]
        deter0, stoch0, act0 = agent.initial(B, data["is_first"].device)
        prevact = torch.cat([act0[:, None], data["action"][:, :-1].float()], 1)
    obs = {k: v[:, ctx:] for k, v in data.items()}
    tokens = agent.encoder(obs)
    deters, stochs, post = rssm.observe(deter0, stoch0, tokens, prevact, obs["is_first"])
    dyn, rep = rssm.kl_losses(post, rssm.prior(deters))
    repfeat = feat(deters, stochs)
    losses = {"dyn": dyn, "rep": rep}
    for key, recon in agent.decoder(deters, stochs.flatten(-2)).items():
        if key in agent.decoder.img_keys:
            losses[key] = (recon - obs[key].float() / 255.0).square().sum((-3, -2, -1))
        elif key in agent.decoder.disc_keys:
            losses[key] = agent.decoder.discrete_nll(key, recon, obs[key])
        else:
            losses[key] = (recon - symlog(obs[key].float())).square().sum(-1)
    losses["rew"] = dists.twohot_loss(agent.reward(repfeat), obs["reward"].float(), agent.bins)
    con_target = (~obs["is_terminal"]).float() * (1.0 - 1.0 / cfg.horizon)
    losses["con"] = -dists.binary_logp(agent.cont(repfeat).squeeze(-1), con_target)
    return losses, deters, stochs


def wm_loss(agent, data):
    cfg = agent.cfg
    losses, deters, stochs = wm_losses(agent, data)
    scales = {"dyn": cfg.loss_dyn, "rep": cfg.loss_rep, "rew": cfg.loss_rew, "con": cfg.loss_con}
    total = sum(v.mean() * scales.get(k, cfg.loss_rec) for k, v in losses.items())
    return total, deters.detach(), stochs.detach()


def ac_loss(agent, deters, stochs, data):
    """The actor-critic terms of Agent.loss from posterior states deters (B, T, D), stochs (B, T, S, C)."""
    cfg, bins = agent.cfg, agent.bins
    B, T, D = deters.shape
    S, C = stochs.shape[-2:]
    obs = {k: v[:, cfg.replay_context :] for k, v in data.items()}
    is_last, is_term, reward = obs["is_last"], obs["is_terminal"], obs["reward"].float()
    imgfeat, imgact = agent.imagine(deters.reshape(B * T, D), stochs.reshape(B * T, S, C))
    with torch.no_grad():
        rew = dists.twohot_pred(agent.reward(imgfeat), bins)
        con = torch.sigmoid(agent.cont(imgfeat).squeeze(-1).float())
        slowval = dists.twohot_pred(agent.slow_critic(imgfeat), bins)
    val_logits = agent.critic(imgfeat)
    val = dists.twohot_pred(val_logits.detach(), bins)
    with torch.no_grad():
        weight = torch.cumprod(con, 1)
        ret = lambda_return(torch.zeros_like(con), 1.0 - con, rew, val, 1.0, cfg.lam)
        _, rscale = agent._update_retnorm(ret)
        adv = (ret - val[:, :-1]) / rscale
    pol = agent.policy(imgfeat)
    policy = weight[:, :-1] * -(pol.logp(imgact)[:, :-1] * adv + cfg.actent * pol.entropy()[:, :-1])
    val_logp = torch.log_softmax(val_logits.float(), -1)[:, :-1]
    value = weight[:, :-1] * (
        dists.twohot_nll(val_logp, ret, bins) + cfg.slowreg * dists.twohot_nll(val_logp, slowval[:, :-1], bins)
    )
    repfeat = feat(deters, stochs)
    rep_logp = torch.log_softmax(agent.critic(repfeat).float(), -1)[:, :-1]
    with torch.no_grad():
        rep_slow = dists.twohot_pred(agent.slow_critic(repfeat), bins)
        rep_ret = lambda_return(is_last, is_term, reward, ret[:, 0].reshape(B, T), 1.0 - 1.0 / cfg.horizon, cfg.lam)
    repval = (~is_last[:, :-1]).float() * (
        dists.twohot_nll(rep_logp, rep_ret, bins) + cfg.slowreg * dists.twohot_nll(rep_logp, rep_slow[:, :-1], bins)
    )
    return cfg.loss_policy * policy.mean() + cfg.loss_value * value.mean() + cfg.loss_repval * repval.mean()


def check_parts(agent, data, tol: float = 1e-5) -> None:
    """Raise AssertionError when wm_losses disagrees with Agent.loss on the same batch and RNG state."""
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state = {k: v.clone() for k, v in agent.state_dict().items()}
    _, metrics, _ = agent.loss(data)
    torch.random.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    with torch.no_grad():
        losses, _, _ = wm_losses(agent, data)
    agent.load_state_dict(state)  # Agent.loss moved the return-normalisation EMA
    for name, value in losses.items():
        want = metrics[f"loss/{name}"]
        assert torch.allclose(value.mean(), want, rtol=tol, atol=tol), f"wm part {name}: {value.mean()} != {want}"
