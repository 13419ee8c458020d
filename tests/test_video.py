"""Eval videos (fastdreamer.eval --video): image observations filmed as the agent sees them, vector ones rendered by
Gymnasium, episodes side by side, an ended episode's picture held still."""

import json
from pathlib import Path

import envpool
import gymnasium
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import run, tiny_config

from fastdreamer.config import Config
from fastdreamer.envs import env_seeds, make_env
from fastdreamer.eval import VIDEO_HEIGHT, _video_env, film, load_agent
from fastdreamer.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny trained cartpole (vector) and pong (image) checkpoints."""
    out = {}
    for env in ("cartpole", "pong"):
        cfg = tiny_config(tmp_path_factory.mktemp(env), env=env, steps=40, report_every=0.0)
        train(cfg, log=lambda *_: None)
        out[env] = Path(cfg.logdir) / "checkpoint.pt"
    return out


def test_a_rendered_video_shows_each_env_and_holds_ended_episodes_still(checkpoints):
    agent, cfg = load_agent(str(checkpoints["cartpole"]), CPU)
    video, info = film(agent, "CartPole-v1", cfg, 3, CPU, seed=3, max_frames=500)
    width = VIDEO_HEIGHT * 600 // 400  # CartPole renders 600 x 400
    assert info["complete"] and video.shape == (info["frames"], VIDEO_HEIGHT, 3 * width, 3) and video.dtype == np.uint8
    assert info["returns"] == [float(n) for n in info["lengths"]]  # CartPole pays 1 per step
    assert info["frames"] == max(info["lengths"]) + 1  # the first observation's frame, then one per step
    for i, length in enumerate(info["lengths"]):
        panel = video[:, :, i * width : (i + 1) * width]
        # Frame 0 is env i's start: env i is seeded with env_seeds(seed, n)[i].
        env = gymnasium.make("CartPole-v1", render_mode="rgb_array")
        env.reset(seed=env_seeds(3, 3)[i])
        start = np.asarray(Image.fromarray(env.render()).resize((width, VIDEO_HEIGHT), Image.BILINEAR))
        env.close()
        assert np.array_equal(panel[0], start), i
        assert (panel[length:] == panel[length]).all(), i  # held after the episode's last step
        assert len({panel[t].tobytes() for t in range(length + 1)}) > length // 2, i  # and moving before it


def test_an_image_video_is_what_the_agent_sees(checkpoints):
    agent, cfg = load_agent(str(checkpoints["pong"]), CPU)
    video, info = film(agent, "Pong-v5", cfg, 2, CPU, seed=5, max_frames=30)
    assert video.shape == (30, 64, 2 * 64, 1) and info["frames"] == 30 and not info["complete"]
    env = make_env("Pong-v5", 2, 5, CPU, image_size=cfg.image_size)
    first = env.reset()["image"].numpy()
    env.close()
    assert np.array_equal(video[0], np.concatenate(list(first), axis=1))


def test_eval_writes_the_video_it_reports(checkpoints, tmp_path):
    path = tmp_path / "clips" / "cartpole.gif"
    args = ["--checkpoint", str(checkpoints["cartpole"]), "--episodes", "2", "--video", str(path)]
    proc = run("fastdreamer.eval", *args, "--video-episodes", "2", "--video-frames", "40")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["video"]["path"] == str(path) and result["episodes"] == 2
    gif = Image.open(path)
    # Pillow merges identical consecutive frames into one shown longer: the playing time is what must add up.
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    frames = result["video"]["frames"]
    assert sum(durations) == frames * 40 and frames <= 40  # 25 fps: 4 of the GIF format's 10 ms units a frame
    assert gif.size == (2 * VIDEO_HEIGHT * 600 // 400, VIDEO_HEIGHT)
    bad = run("fastdreamer.eval", *args, "--video-frames", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "fastdreamer: error: --video-frames must be at least 1, got 0"
    # A video that cannot be written (its folder would be a file) fails with one line, and the evaluation that
    # finished before it still prints its result.
    blocked = ["--checkpoint", str(checkpoints["cartpole"]), "--episodes", "2", "--video", str(path / "x.gif")]
    failed = run("fastdreamer.eval", *blocked, "--video-episodes", "1", "--video-frames", "5")
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr[-2000:]
    assert "Not a directory" in failed.stderr or "File exists" in failed.stderr, failed.stderr
    shown = json.loads(failed.stdout)
    assert shown["episodes"] == 2 and shown["mean"] == result["mean"] and "video" not in shown


@pytest.mark.skipif("WalkerWalk-v1" not in envpool.list_all_envs(), reason="this envpool build has no dm_control")
def test_a_vector_env_gymnasium_cannot_render_is_one_clear_error():
    with pytest.raises(ValueError, match="Gymnasium, which has no 'WalkerWalk-v1'"):
        _video_env("WalkerWalk-v1", 1, 0, CPU, Config())


def test_train_films_the_policy_at_the_end_when_asked(tmp_path):
    lines = []
    cfg = tiny_config(tmp_path, steps=40, video_episodes=2, report_every=0.0)
    train(cfg, log=lines.append)
    (gif,) = (Path(cfg.logdir) / "videos" / "eval_policy").glob("*.gif")
    assert gif.name == "0000000040.gif" and Image.open(gif).size == (2 * VIDEO_HEIGHT * 600 // 400, VIDEO_HEIGHT)
    assert any(line.startswith("fastdreamer: filmed 2 episodes") and str(gif) in line for line in lines), lines
    events = EventAccumulator(cfg.logdir, size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("eval/policy")] == [40]
