"""The open-loop report (fastdreamer/report.py): what it predicts from, what it computes, that training never sees
it, and the files it writes."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_model import make_agent, random_batch
from test_train import tiny_config

from fastdreamer import dists, fast
from fastdreamer.dists import symlog
from fastdreamer.logger import Logger, encode_gif
from fastdreamer.report import MARK, MODEL, PANEL, STEP, TRUTH, line_chart, openloop
from fastdreamer.rssm import feat
from fastdreamer.train import Trainer

H = 64  # make_agent's image size
T, K = 8, 3  # trained steps of the batch (random_batch's L = T + 1 with replay context), observed steps


def case(seed=0):
    torch.manual_seed(seed)
    agent, cfg, spec = make_agent(discrete=False, image=True)
    with torch.no_grad():  # non-zero reward head, so reward predictions depend on the latent
        agent.reward.out.weight.normal_(0, 0.1)
    return agent, random_batch(spec, B=3, L=T + 1, seed=seed)


def model_frames(video: torch.Tensor) -> torch.Tensor:
    """The middle band of a report video (T, 3H, V*W, C): the model's frames."""
    return video[:, H : 2 * H]


def test_openloop_predicts_from_the_context_and_the_actions_only():
    """Observations after the K observed steps must not reach the predictions; the context's observations and the
    later actions must."""
    agent, data = case()
    _, base = openloop(agent, data, context=K, seed=5)

    later = {k: v.clone() for k, v in data.items()}
    later["image"][:, 1 + K :] = 255 - later["image"][:, 1 + K :]  # 1: the replay-context step
    later["vector"][:, 1 + K :] += 3.0
    _, got = openloop(agent, later, context=K, seed=5)
    assert torch.equal(model_frames(got["image"]), model_frames(base["image"]))
    assert not torch.equal(got["image"][:, :H], base["image"][:, :H])  # the true frames did change

    # Data index d is trained step d - 1 (1 replay-context step); data action d is taken before trained step d.
    # Each change must move the model's frames from its own step on, and none before it. An observation reaches a
    # frame only through its sampled latents, and at init a changed frame may flip none of them for one draw (torch
    # 2.11 drew one such, where 2.13 did not): so "moves" is asked of at least one of three draws, "none before" of
    # every draw.
    for key, data_steps, first in (
        ("image", slice(1, 1 + K), 0),  # the observed steps
        ("image", slice(K, K + 1), K - 1),  # the last observed step
        ("action", slice(K, K + 1), K),  # the action before the first predicted step
        ("action", slice(K + 1, None), K + 1),  # the actions after it
    ):
        changed = {k: v.clone() for k, v in data.items()}
        x = changed[key][:, data_steps]
        changed[key][:, data_steps] = 255 - x if key == "image" else -x - 1
        moved = []
        for seed in (5, 6, 7):
            _, got = openloop(agent, changed, context=K, seed=seed)
            _, want = openloop(agent, data, context=K, seed=seed)
            got, want = model_frames(got["image"]), model_frames(want["image"])
            assert torch.equal(got[:first], want[:first]), (key, data_steps, seed)
            moved.append(not torch.equal(got[first], want[first]))
        assert any(moved), (key, data_steps)


def test_openloop_losses_are_a_plain_observe_then_imagine():
    """The report's losses against a rollout written here from the training path's pieces: RSSM.observe over the K
    observed steps (the loss's own observe), then img_step for K more (the reference's report: half observed, half
    predicted; the batch's last T - 2K steps are not used), with the same uniforms."""
    agent, data = case(1)
    metrics, videos = openloop(agent, data, context=K, seed=9, horizon=2)

    deter0, stoch0, prevact, obs = agent.sequence_start(data)
    T = 2 * K
    obs, prevact = {k: v[:, :T] for k, v in obs.items()}, prevact[:, :T]
    B = obs["is_first"].shape[0]
    rssm = agent.rssm
    u = torch.rand((T, B, rssm.stoch, 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        tokens = agent.encoder({k: v[:, :K] for k, v in obs.items()})
        deters, stochs, _ = rssm.observe(deter0, stoch0, tokens, prevact[:, :K], obs["is_first"][:, :K], u[:K])
        deter, stoch = deters[:, -1], stochs[:, -1]
        img_d, img_s = [], []
        for t in range(K, T):
            deter, stoch, _ = rssm.img_step(deter, stoch, prevact[:, t], u[t])
            img_d.append(deter)
            img_s.append(stoch)
        d, s = torch.stack(img_d, 1), torch.stack(img_s, 1)
        recon = agent.decoder(d, s.flatten(-2))
        f = feat(d, s)
        rew = dists.twohot_loss(agent.reward(f), obs["reward"][:, K:], agent.bins)
        vector = (recon["vector"] - symlog(obs["vector"][:, K:])).square().sum(-1)
        image = (recon["image"] - obs["image"][:, K:].float() / 255).square().sum((-3, -2, -1))
        full = agent.decoder(torch.cat([deters, d], 1), torch.cat([stochs, s], 1).flatten(-2))["image"]

    tol = dict(rtol=1e-5, atol=1e-6)  # the same fp32 operations in the same order; slack for summation order only
    torch.testing.assert_close(metrics["openloop/vector_loss"], vector.mean(), **tol)
    torch.testing.assert_close(metrics["openloop/image_loss"], image.mean(), **tol)
    torch.testing.assert_close(metrics["openloop/rew_loss"], rew.mean(), **tol)
    torch.testing.assert_close(metrics["openloop/vector_loss_h2"], vector[:, :2].mean(), **tol)  # 2 steps ahead
    assert "openloop/vector_loss_h2" in metrics and not any(
        k.endswith("_h5") for k in openloop(agent, data, K, 9, horizon=5)[0]
    )
    # The video: the first K frames reconstructed from the posterior, the rest predicted; true frames on top.
    truth = obs["image"].float() / 255
    want_model = (full.clamp(0, 1) * 255).round().to(torch.uint8)  # (B, T, H, W, C)
    for v in range(B):
        cols = slice(v * H, (v + 1) * H)
        assert torch.equal(videos["image"][:, :H, cols], (truth[v] * 255).round().to(torch.uint8))
        diff = (model_frames(videos["image"])[:, :, cols].int() - want_model[v].int()).abs().max()
        assert diff <= 1  # rounding of equal values computed in another grouping
    assert videos["image"].shape == (T, 3 * H, B * H, 3) and videos["image"].dtype == torch.uint8


def test_a_line_chart_puts_each_value_where_it_belongs():
    T, K = 6, 2
    ramp, zigzag = torch.arange(T, dtype=torch.float32), torch.arange(T, dtype=torch.float32) % 2
    truth = torch.stack([ramp, zigzag], -1)
    model = torch.stack([ramp.flip(0), torch.full((T,), float("nan"))], -1)  # a falling ramp; a diverged model
    (image,) = line_chart(truth, model, K).numpy()
    assert image.shape == (2 * PANEL, T * STEP, 3)

    def rows(panel, t, colour):  # the rows of `colour` in step t's columns of a panel
        block = image[panel * PANEL : (panel + 1) * PANEL, t * STEP : (t + 1) * STEP]
        return sorted({int(r) for r in np.nonzero((block == colour).all(-1))[0]})

    top, bottom = 1, PANEL - 3  # the dots' first rows at the panel's maximum and minimum
    for t in range(T):
        r = bottom - round(t / (T - 1) * (PANEL - 4))
        assert rows(0, t, TRUTH) == [r, r + 1], t  # the ramp climbs from the bottom to the top
        assert rows(0, T - 1 - t, MODEL) == [r, r + 1], t  # the reversed ramp falls
        z = bottom if t % 2 == 0 else top
        mid = bottom - round(0.5 * (PANEL - 4))
        assert rows(1, t, TRUTH) == [z, z + 1] and rows(1, t, MODEL) == [mid, mid + 1], t  # NaN: mid-panel
    assert rows(0, 0, TRUTH) == [bottom, bottom + 1] and rows(0, T - 1, TRUTH) == [top, top + 1]
    assert (image[:, K * STEP - 1] == MARK).all()  # after the observed steps


def test_openloop_charts_each_vector_key_in_the_observations_units():
    agent, data = case(5)
    _, charts = openloop(agent, data, context=K, seed=0)
    _, _, _, obs = agent.sequence_start(data)
    assert charts["vector"].shape == (1, 4 * PANEL, 2 * K * STEP, 3)  # 4 dimensions, K observed and K predicted
    # The truth's dots sit where a chart of the raw observations puts them.
    want = line_chart(obs["vector"][0, : 2 * K], obs["vector"][0, : 2 * K], K)[0]
    got = charts["vector"][0]
    truth_dots = (want == torch.tensor(TRUTH, dtype=torch.uint8)).all(-1)
    assert (
        (got == torch.tensor(TRUTH, dtype=torch.uint8)).all(-1)
        | (got == torch.tensor(MODEL, dtype=torch.uint8)).all(-1)
    )[truth_dots].all()


def test_openloop_balance_stats_count_the_groups():
    agent, data = case(2)
    data["reward"][:] = 0.0
    data["reward"][0, 1 + K :] = 1.0  # one sequence rewarded on every predicted step
    metrics, _ = openloop(agent, data, context=K, seed=0)
    assert metrics["openloop/rew_rate"].item() == pytest.approx(1 / 3)
    for key in ("rew_pos_acc", "rew_neg_acc", "con_pos_acc"):
        assert 0 <= metrics[f"openloop/{key}"].item() <= 1
    data["is_terminal"][:] = False
    metrics, _ = openloop(agent, data, context=K, seed=0)
    assert metrics["openloop/con_rate"].item() == 1.0 and torch.isnan(metrics["openloop/con_neg_acc"])


def test_openloop_runs_the_plain_modules_of_a_compiled_agent():
    """The fast modes replace units on the instance; the report must not call them (no compile, no captured graph
    replayed at another shape) and must compute what it computes on a plain agent."""
    agent, data = case(3)
    want = openloop(agent, data, context=K, seed=1)
    fast.compile_agent(agent)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = openloop(agent, data, context=K, seed=1)
    assert not torch._dynamo.utils.counters["frames"], dict(torch._dynamo.utils.counters["frames"])
    assert all(torch.equal(got[0][k], want[0][k]) or torch.isnan(want[0][k]) for k in want[0])
    assert torch.equal(got[1]["image"], want[1]["image"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_openloop_on_cuda_leaves_the_generators_alone(impl):
    """On the GPU, with either block-GRU implementation: a finite report with the CPU's shapes, the same twice from
    one seed, and the CUDA and CPU default generators untouched. (Its values are not the CPU's: the latent draws
    come from a CUDA generator.)"""
    from fastdreamer.kernels import block_gru

    agent, data = case(4)
    agent = agent.cuda()
    data = {k: v.cuda() for k, v in data.items()}
    before = block_gru.get_impl()
    block_gru.set_impl(impl, torch.device("cuda"))
    try:
        cuda_rng, cpu_rng = torch.cuda.get_rng_state(), torch.get_rng_state()
        metrics, videos = openloop(agent, data, context=K, seed=3)
        again, _ = openloop(agent, data, context=K, seed=3)
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng) and torch.equal(torch.get_rng_state(), cpu_rng)
    finally:
        block_gru.set_impl(before, torch.device("cuda"))
    assert videos["image"].shape == (2 * K, 3 * H, 3 * H, 3) and videos["image"].is_cuda  # K observed, K predicted
    for key, value in metrics.items():
        assert torch.isfinite(value) or key.endswith(("_pos_loss", "_pos_acc", "_neg_loss", "_neg_acc")), key
    torch.testing.assert_close(again["openloop/image_loss"], metrics["openloop/image_loss"], rtol=1e-5, atol=0)


def test_openloop_rejects_an_empty_context():
    agent, data = case()
    with pytest.raises(ValueError, match="at least 1 observed step"):
        openloop(agent, data, context=0)


def test_reports_leave_training_exactly_as_it_was(tmp_path):
    """Two runs from one seed, one reporting between every update: same parameters, optimizer, replay and RNG."""
    cfg = tiny_config(tmp_path, seed=4, env="pendulum", report_context=2)
    runs = []
    for name, report in (("plain", False), ("reported", True)):
        trainer = Trainer(dataclasses.replace(cfg, logdir=str(tmp_path / name)), log=lambda *_: None)
        reports = 0
        while trainer.updates < 6:
            trainer.act()
            while trainer.updates_due >= 1:
                if report:
                    metrics, videos = trainer.report()
                    assert metrics["openloop/vector_loss"] > 0 and set(videos) == {"vector"}  # its chart
                    reports += 1
                trainer.update()
        runs.append((trainer.state(), torch.get_rng_state()))
        trainer.close()
        assert reports == (6 if report else 0)
    (a, rng_a), (b, rng_b) = runs
    assert torch.equal(rng_a, rng_b)
    for part in ("agent", "opt", "replay", "counters"):
        assert_same(a[part], b[part], part)
    assert a["replay"]["consumed"] > 0, "the online queue took part"


def assert_same(a, b, where: str) -> None:
    """Nested dicts, lists and tensors equal element for element."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_the_trainer_drops_empty_balance_groups_and_keeps_a_diverged_loss(tmp_path, monkeypatch):
    from fastdreamer import train as train_mod

    nan = torch.tensor(float("nan"))
    fake = {"openloop/vector_loss": nan, "openloop/rew_pos_acc": nan, "openloop/rew_rate": torch.tensor(0.0)}
    monkeypatch.setattr(train_mod, "openloop", lambda *a, **k: (fake, {}))
    trainer = Trainer(tiny_config(tmp_path, env="pendulum"), log=lambda *_: None)
    while not trainer.replay.ready():
        trainer.act()
    metrics, _ = trainer.report()
    trainer.close()
    assert set(metrics) == {"openloop/vector_loss", "openloop/rew_rate"}


def test_logger_writes_a_gif_file_and_a_tensorboard_image(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 24, 40, 1), dtype=np.uint8)
    with Logger(tmp_path, {}) as logger:
        path = logger.video(12, "openloop/image", frames, fps=20)
    assert path == tmp_path / "videos" / "openloop_image" / "0000000012.gif"
    gif = Image.open(path)
    got = np.stack([np.asarray(f.convert("L")) for f in ImageSequence.Iterator(gif)])
    assert np.array_equal(got, frames[..., 0]) and gif.info["duration"] == 50  # gray GIFs are lossless
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("openloop/image")
    assert image.step == 12 and (image.height, image.width) == (24, 40) and image.encoded_image_string[:6] == b"GIF89a"


@pytest.mark.parametrize(
    "frames", [np.zeros((3, 8, 8), np.uint8), np.zeros((3, 8, 8, 3), np.float32), np.zeros((0, 8, 8, 3), np.uint8)]
)
def test_encode_gif_rejects_what_it_cannot_encode(frames):
    with pytest.raises(ValueError, match="a GIF takes frames"):
        encode_gif(frames)


@pytest.mark.parametrize("channels", [2, 4])
def test_encode_gif_shows_other_channel_counts_as_grey_or_rgb(channels):
    """Images with 2 or 4 channels (stacked, RGBA) are observations the envs accept: the first one as grey, or
    the first three as RGB."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 8, 8, channels), dtype=np.uint8)
    frames[..., : 3 if channels > 2 else 1] = frames[..., :1]  # grey content: the GIF keeps it exactly
    gif = Image.open(io.BytesIO(encode_gif(frames)))
    got = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)])
    assert np.array_equal(got, np.repeat(frames[..., :1], 3, -1))
