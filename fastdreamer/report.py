"""The world model's open-loop report (the reference's `report`): how far ahead it predicts without observations.

A replay batch is observed for its first K steps (the posterior, as in training), then imagined for K more from
the last posterior state under the actions that were actually taken (the prior, no observations). Every step is
decoded, and the prediction losses of the imagined steps are the report: `openloop/{key}_loss` for each decoded
key, `openloop/rew_loss`, `openloop/con_loss` (the same per-step losses as training's `loss/{key}`, which observes
every step), the same over the imagination horizon's first steps only (`openloop/{key}_loss_h15`; not in the
reference), and the reference's balance statistics of the reward and continue predictions. For image observations
it also makes the reference's video: for each of 6 sequences, the true frames, the model's frames (the first K
reconstructions, then open-loop predictions) and their error ((model - true + 1) / 2), stacked top to bottom, the
sequences side by side. For vector observations (not in the reference) a chart of the first sequence: each
dimension's true values and the model's, step by step.

The report is a diagnostic beside training and leaves it untouched: it runs the plain (eager, fp32) modules on the
trained parameters without gradient, draws its batch and its latent samples with generators of its own, and writes
nothing to the agent or the replay. So a run with reports trains exactly as one without (tested).
"""

from __future__ import annotations

import torch

from . import dists
from .rssm import feat

VIDEOS = 6  # sequences side by side in a video, as in the reference


def _balance(prefix: str, loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, thres: float) -> dict:
    """The reference's balance_stats: the loss and the accuracy of `pred > thres` over the steps whose target is
    above thres (pos) and the others (neg), and the rate of pos. NaN where a group is empty (the trainer drops it)."""
    pos = target > thres
    neg = ~pos
    npos, nneg = pos.sum(), neg.sum()
    return {
        f"{prefix}_pos_loss": (loss * pos).sum() / npos,
        f"{prefix}_neg_loss": (loss * neg).sum() / nneg,
        f"{prefix}_pos_acc": ((pred > thres) & pos).sum() / npos,
        f"{prefix}_neg_acc": ((pred <= thres) & neg).sum() / nneg,
        f"{prefix}_rate": pos.float().mean(),
    }


def video_grid(truth: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """truth and model (V, T, H, W, C) in [0, 1] -> (T, 3H, V*W, C) uint8: true, model and error frames stacked
    top to bottom, the V sequences side by side."""
    model = model.clamp(0, 1)
    video = torch.cat([truth, model, (model - truth + 1) / 2], 2)  # (V, T, 3H, W, C)
    video = video.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (T, 3H, V*W, C)
    return (video * 255).round().to(torch.uint8)


PANEL, STEP, DIMS = 40, 4, 8  # a vector chart: rows per dimension, columns per step, dimensions shown at most
TRUTH, MODEL, MARK = (0, 0, 0), (220, 40, 40), (170, 170, 170)  # colours: true values, predictions, last observed


def line_chart(truth: torch.Tensor, model: torch.Tensor, observed: int) -> torch.Tensor:
    """truth and model (T, D) -> (1, P * D', T * STEP, 3) uint8, a one-frame video: per dimension (the first DIMS) a
    panel of P = PANEL rows with the true values as black dots and the model's as red ones, each panel scaled to
    the range of both; a grey line after the `observed` steps. Drawn with tensor ops on the data's device (no sync)."""
    T, D = truth.shape
    D = min(D, DIMS)
    truth, model = truth[:, :D].float(), model[:, :D].float()
    both = torch.cat([truth, model])
    finite = both.isfinite()  # the scale from finite values only: one diverged prediction must not flatten a panel
    lo = torch.where(finite, both, torch.inf).amin(0)
    span = torch.where(finite, both, -torch.inf).amax(0) - lo  # not > 0 where a panel has one value or none
    image = torch.full((D * PANEL, T * STEP, 3), 255, dtype=torch.uint8, device=truth.device)
    image[:, observed * STEP - 1] = torch.tensor(MARK, dtype=torch.uint8, device=truth.device)
    image[PANEL - 1 :: PANEL] = torch.tensor(MARK, dtype=torch.uint8, device=truth.device)  # panel separators
    cols = (torch.arange(T, device=truth.device) * STEP + STEP // 2)[:, None].expand(T, D)
    for values, colour in ((truth, TRUTH), (model, MODEL)):
        frac = torch.where(span > 0, (values - lo) / span.clamp_min(1e-12), 0.5)  # a flat series: mid-panel
        frac = frac.nan_to_num(0.5, 0.5, 0.5)  # a diverged model: its dots mid-panel, not out of the image
        rows = (PANEL - 3) - torch.round(frac * (PANEL - 4)).long() + torch.arange(D, device=truth.device) * PANEL
        for dr in (0, 1):  # 2 x 2 dots
            for dc in (-1, 0):
                image[rows + dr, cols + dc] = torch.tensor(colour, dtype=torch.uint8, device=truth.device)
    return image[None]


@torch.no_grad()
def openloop(
    agent, data: dict[str, torch.Tensor], context: int = 16, seed: int = 0, videos: int = VIDEOS, horizon: int = 0
):
    """The open-loop report on a replay batch (B, T + replay context, ...): observe K = min(context, T // 2) steps,
    then imagine as many. Returns ({name: device scalar}, {image key: (2K, 3H, V*W, C) uint8 video with V =
    min(videos, B), vector key: (1, H, W, 3) uint8 line_chart of the first sequence}).
    horizon > 0 (the trainer passes the imagination length) adds `openloop/{key}_loss_h{horizon}`: the same losses
    over the first `horizon` predicted steps only, the reach the actor and critic train on."""
    if context < 1:
        raise ValueError(f"the open-loop report needs at least 1 observed step, got context {context}")
    deter, stoch, prevact, obs = agent.sequence_start(data)
    K = min(context, obs["is_first"].shape[1] // 2)
    # As the reference's report: its first half observed, its second predicted (16 and 16 of its 32 steps by default).
    obs, prevact = {k: v[:, : 2 * K] for k, v in obs.items()}, prevact[:, : 2 * K]
    B, T = obs["is_first"].shape
    rssm, device = agent.rssm, deter.device
    u = torch.rand((T, B, rssm.stoch, 1), generator=torch.Generator(device).manual_seed(seed), device=device)
    tokens = agent.encoder({k: v[:, :K] for k, v in obs.items()})
    deters, stochs = [], []
    for t in range(T):
        if t < K:
            # rssm(...) is RSSM.forward, the plain posterior step: the fast modes route obs_step and observe through
            # their compiled units on the instance, never forward.
            deter, stoch, _ = rssm(deter, stoch, prevact[:, t], tokens[:, t], obs["is_first"][:, t], u[t])
        else:
            deter, stoch, _ = rssm.img_step(deter, stoch, prevact[:, t], u[t])
        deters.append(deter)
        stochs.append(stoch)
    deters, stochs = torch.stack(deters, 1), torch.stack(stochs, 1)
    f = feat(deters, stochs)
    recons = agent.decoder(deters, stochs.flatten(-2))
    rew_logits, con_logit = agent.reward(f), agent.cont(f).squeeze(-1)
    losses = agent.prediction_losses(recons, rew_logits, con_logit, obs)
    metrics = {f"openloop/{k}_loss": v[:, K:].mean() for k, v in losses.items()}
    if 0 < horizon < T - K:
        metrics.update({f"openloop/{k}_loss_h{horizon}": v[:, K : K + horizon].mean() for k, v in losses.items()})
    img = slice(K, None)
    rew_pred = dists.twohot_pred(rew_logits[:, img], agent.bins)
    metrics.update(_balance("openloop/rew", losses["rew"][:, img], rew_pred, obs["reward"][:, img].float(), 0.1))
    cont = (~obs["is_terminal"][:, img]).float()
    metrics.update(_balance("openloop/con", losses["con"][:, img], torch.sigmoid(con_logit[:, img]), cont, 0.5))
    V = min(videos, B)
    frames = {key: video_grid(obs[key][:V].float() / 255.0, recons[key][:V].float()) for key in agent.decoder.img_keys}
    for key in agent.decoder.vec_keys:  # the first sequence, in the observation's units (the decoder's are symlog)
        frames[key] = line_chart(obs[key][0].float(), dists.symexp(recons[key][0].float()), K)
    return metrics, frames
