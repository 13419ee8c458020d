"""bench.conv_ab on the CPU: the script end to end at a tiny shape, and its check failing a wrong gradient."""

from __future__ import annotations

import json

import pytest
import torch

from bench import conv_ab
from bench.common import make_agent, make_config, random_batch


@pytest.fixture(autouse=True)
def one_thread():
    # One CPU thread: inductor's OpenMP kernels spin at barriers on a shared 2-core CPU (bench/test_bench_fast.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def debug_inputs(seed: int = 0):
    """A debug-size agent and conv_ab's inputs for 2 x 2 images."""
    agent, _ = make_agent(make_config("debug"), "image", "cpu", seed=seed)
    data = random_batch(agent, 2, 2, "cpu", seed=seed)
    stoch = torch.nn.functional.one_hot(data["stoch"].long(), agent.rssm.classes).flatten(-2).float()
    return agent, {"image": data["image"], "deter": data["deter"].float(), "stoch": stoch}


def bf16_gradients(agent, inputs) -> dict[str, torch.Tensor]:
    """The loss and gradients of image_loss, eager under bf16 autocast: a rounding path away from the fp32 truth."""
    deter, stoch = (inputs[k].detach().requires_grad_() for k in ("deter", "stoch"))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss = conv_ab.image_loss(agent.encoder, agent.decoder, inputs["image"], deter, stoch)
        loss.backward()
    return conv_ab.gradients(agent, {"loss": loss.detach(), "input/deter": deter.grad, "input/stoch": stoch.grad})


def test_conv_ab_checks_and_times_every_variant(tmp_path):
    path = tmp_path / "conv_ab.json"
    argv = "--size debug --mode compile --precision fp32 --batch-size 2 --batch-length 2 --rounds 1 --repeat 1"
    out = conv_ab.main([*argv.split(), "--json", str(path)])
    assert out["complete"]
    assert [r["variant"] for r in out["rows"]] == list(conv_ab.DEFAULT_VARIANTS)
    for row in out["rows"]:
        assert row["ok"], row
        assert row["median_ms"] > 0 and len(row["rounds_ms"]) == 1, row
        assert row["conv_inputs"].keys() == {"encoder", "decoder"}
    assert out["meta"]["images"] == 4 and out["meta"]["flops"] > 0
    saved = json.loads(path.read_text())
    assert saved["complete"] and saved["rows"] == out["rows"]
    assert saved["meta"]["command"] == f"python -m bench.conv_ab {argv} --json {path}"
    assert not saved["meta"]["cudnn_benchmark"] and not any(r["cudnn_benchmark"] for r in saved["rows"])
    # cuDNN's benchmark mode is the whole process's (its plan cache ignores the flag), recorded in every row, and
    # undone at the end.
    out = conv_ab.main([*argv.split(), "--variants", "base", "--cudnn-benchmark"])
    assert out["complete"] and out["meta"]["cudnn_benchmark"] and all(r["cudnn_benchmark"] for r in out["rows"])
    assert torch.backends.cudnn.benchmark is False


def test_check_fails_any_gradient_ten_percent_off():
    agent, inputs = debug_inputs()
    _, truth = conv_ab.reference(agent, inputs)
    assert all(p.grad is None for p in agent.parameters())
    base = bf16_gradients(agent, inputs)
    names = {"loss", "input/deter", "input/stoch"} | {
        f"{m}.{n}" for m in ("encoder", "decoder") for n, _ in getattr(agent, m).named_parameters()
    }
    assert base.keys() == names  # every parameter has a gradient, so none can go unchecked
    for precision, reference in (("fp32", truth), ("bf16", base)):
        bounds = conv_ab.check_bounds(reference, truth, conv_ab.CHECK_REL[precision])
        assert conv_ab.compare(reference, reference, bounds)[0]
        # A tensor whose own rounding noise reaches 10% / NOISE_MARGIN cannot resolve 10% (seen here in bf16:
        # encoder.convs.0.weight, encoder.convs.1.weight, encoder.norms.1.scale of 34); every other one must.
        resolved = [n for n in reference if bounds[n] < 0.1]
        assert len(resolved) == len(reference) if precision == "fp32" else len(resolved) >= 0.85 * len(reference)
        for name in resolved:
            ok, worst, err = conv_ab.compare({**reference, name: reference[name] * 1.1}, reference, bounds)
            assert not ok and worst == name and err == pytest.approx(0.1, rel=1e-3), (precision, name)
        missing = {n: g for n, g in reference.items() if n != "decoder.img_out.weight"}
        assert conv_ab.compare(missing, reference, bounds)[:2] == (False, "decoder.img_out.weight")
        nan = {**reference, "encoder.convs.0.weight": reference["encoder.convs.0.weight"] * float("nan")}
        assert conv_ab.compare(nan, reference, bounds)[:2] == (False, "encoder.convs.0.weight")


def test_a_base_off_the_fp32_truth_fails_and_nothing_is_timed(monkeypatch):
    original = conv_ab.reference

    def doubled(agent, inputs):  # the truth twice what base computes: base is wrong by 50% of it
        flops, truth = original(agent, inputs)
        return flops, {k: v * 2 for k, v in truth.items()}

    monkeypatch.setattr(conv_ab, "reference", doubled)
    argv = "--size debug --mode compile --precision fp32 --batch-size 2 --batch-length 2 --rounds 1 --repeat 1"
    out = conv_ab.main(argv.split())
    base = out["rows"][0]
    assert base["variant"] == "base" and not base["ok"] and base["noise_worst_rel"] == pytest.approx(0.5, rel=1e-3)
    assert len(out["rows"]) == 1 and "median_ms" not in base, "no other variant checked against it, nothing timed"
