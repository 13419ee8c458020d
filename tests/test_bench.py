"""`python -m bench` end to end at a tiny shape: the table's JSON holds every component with the fields the issue
asks for, and the end_to_end row comes from the real training loop. --components measures only the rows asked for,
and the JSON on disk keeps every finished row of a run that is killed. (GPU sessions are short: a bench that broke
unnoticed would cost one.)"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as Ev

import pytest
import torch

from bench.__main__ import COMPONENTS, select_components
from bench.bench_block_gru import write_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--size", "debug", "--modes", "eager", "--threads", "1", "--repeat", "2"]
TINY += ["--batch-size", "2", "--batch-length", "8", "--imag-length", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def test_bench_precision_sets_the_fast_modes_and_leaves_eager_the_fp32_reference(tmp_path):
    """--precision bf16 with eager among the modes: eager runs as the fp32 reference it always is (it was a
    traceback: eager cannot run bf16), and the meta says so."""
    out = tmp_path / "bench.json"
    argv = [*TINY, "--precision", "bf16", "--no-env", "--components", "full_update", "--json", str(out)]
    proc = run("-m", "bench", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["precision"] == {"eager": "fp32"}
    assert [(r["component"], r["mode"], r["ok"]) for r in result["rows"]] == [("full_update", "eager", True)]


def test_bench_cli_writes_every_component_with_its_check_and_a_measured_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("-m", "bench", *TINY, "--e2e-seconds", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    meta, rows = result["meta"], result["rows"]
    assert result["complete"] is True and meta["components"] == list(COMPONENTS)
    assert meta["device_type"] == "cpu" and meta["torch"] and meta["flops_per_update"] > 0
    assert meta["batch_size"] == 2 and meta["batch_length"] == 8
    assert meta["precision"] == {"eager": "fp32"} and set(meta["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert meta["cpu_allocator_tuned"] is sys.platform.startswith("linux")
    got = {r["component"] for r in rows}
    assert got == {
        "env_step",
        "replay_sample",
        "wm_update",
        "imagine",
        "ac_update",
        "full_update",
        "act_step",
        "end_to_end",
    }
    for r in rows:
        assert r["mode"] == "eager" and r["ok"] is True
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0, r
    e2e = next(r for r in rows if r["component"] == "end_to_end")
    # The cartpole preset's 4 envs at ratio 64 with 2x8 batches: 16 updates per loop iteration.
    assert e2e["num_envs"] == 4 and e2e["updates_per_env_step"] == 16 and e2e["chunks"] >= 5
    assert e2e["env_steps_per_s"] == pytest.approx(4 / e2e["median_ms"] * 1e3)
    # The synchronised phases of the loop (bench.end_to_end.timed_iteration): 16 updates in each iteration.
    assert set(e2e["phases_ms"]) == {"update", "env_wait", "act"} and min(e2e["phases_ms"].values()) >= 0
    assert e2e["update_ms"] > 0 and e2e["phases_ms"]["update"] == pytest.approx(16 * e2e["update_ms"])
    assert "end_to_end" in proc.stdout and "steps/s" in proc.stdout


def test_components_measures_only_the_rows_asked_for(tmp_path):
    out = tmp_path / "bench.json"
    # ac_update alone: wm_update comes from the same function (bench.parts) and must not be recorded with it.
    proc = run("-m", "bench", *TINY, "--no-env", "--components", "act_step,ac_update", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["meta"]["flops_per_update"] > 0
    assert result["meta"]["components"] == ["ac_update", "act_step"]
    assert [(r["component"], r["mode"], r["ok"]) for r in result["rows"]] == [
        ("ac_update", "eager", True),
        ("act_step", "eager", True),
    ]


def test_end_to_end_without_its_rows_exits_with_one_line_before_measuring(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("-m", "bench", *TINY, "--components", "end_to_end,full_update,act_step", "--json", str(out))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "bench: end_to_end needs the env_step,replay_sample,full_update,act_step rows (its parts sum and its check); "
        "add env_step,replay_sample to --components"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "spec, no_env, error",
    [
        ("imagine,bogus", False, "unknown component(s) ['bogus']"),
        ("full_update,replay_sample", True, "--components asks for replay_sample"),
        ("end_to_end,env_step,replay_sample,act_step", False, "add full_update to --components"),
    ],
)
def test_select_components_refuses(spec, no_env, error):
    with pytest.raises(SystemExit, match=re.escape(error)):
        select_components(spec, no_env)


@pytest.mark.parametrize(
    "args, error",
    [
        (["--size", "huge"], "argument --size: unknown size 'huge'; choose one of debug"),
        (["--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
        (["--threads", "-1"], "argument --threads: must be 0 (torch's default) or a positive count"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["--json", "."], "argument --json: . is a directory"),
        (["--json", "bench/common.py/x.json"], "bench/common.py is a file, not a folder"),
        (["--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["--device", "meta"], "argument --device: meta: these benchmarks run on cpu or cuda"),
        (["--modes", "compile"], "the eager baseline is needed"),
    ],
)
def test_bad_bench_arguments_are_one_line_before_anything_runs(args, error, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", *args])
    err = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else "")
    assert exc.value.code != 0 and error in err, err
    assert "Traceback" not in err


def test_a_mode_asked_for_that_cannot_run_here_is_refused_not_dropped():
    import torch

    from bench.__main__ import MODES, select_modes

    cpu = torch.device("cpu")
    assert select_modes(None, cpu) == ["eager", "compile"]  # the default: what runs here
    with pytest.raises(SystemExit, match="graphs cannot run on cpu"):
        select_modes("eager,graphs", cpu)
    assert select_modes(",".join(MODES[:2]), cpu) == ["eager", "compile"]


def test_the_commit_recorded_is_the_code_s_from_any_folder(tmp_path):
    """git runs in the checkout the code is in, not in the folder the command starts from."""
    code = "import json; from fastdreamer.provenance import git_info; print(json.dumps(git_info()))"
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
    assert json.loads(there.stdout) == json.loads(here.stdout)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI's fresh clone is one)
        assert json.loads(here.stdout)["git_commit"] == head.stdout.strip()


def test_code_installed_inside_another_repository_records_no_commit(tmp_path):
    """A copy installed in a folder of some other checkout (a virtual environment in a user's project) is not that
    checkout's commit: only a checkout's top is asked."""
    from fastdreamer.provenance import git_info

    if shutil.which("git") is None:
        pytest.skip("no git here")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "venv" / "site-packages").mkdir(parents=True)
    assert git_info(tmp_path) == {"git_commit": head, "git_dirty": False}
    assert git_info(tmp_path / "venv" / "site-packages") == {"git_commit": None, "git_dirty": None}
    (tmp_path / "f").write_text("y")
    assert git_info(tmp_path)["git_dirty"] is True


def test_the_bench_s_world_model_parts_agree_with_the_loss_on_discrete_observations():
    """bench/parts.py restates Agent.loss's world-model terms; discrete observations of unequal counts included."""
    from bench.common import make_config, random_batch
    from bench.parts import check_parts
    from fastdreamer.agent import Agent
    from fastdreamer.envs import EnvSpec

    obs = {"vector": ((3,), torch.float32), "discrete": ((3,), torch.int32)}
    spec = EnvSpec(obs=obs, discrete=True, act_dim=2, env_id="t", classes=7, obs_classes=(2, 7, 7))
    torch.manual_seed(0)
    agent = Agent(make_config("debug"), spec)
    data = random_batch(agent, 2, 6, "cpu", seed=1)
    assert (data["discrete"] < torch.tensor([2, 7, 7])).all() and data["discrete"][..., 0].max() == 1
    check_parts(agent, data)


def test_select_components_keeps_table_order_and_no_env_drops_the_env_rows():
    assert select_components("act_step,imagine", False) == ["imagine", "act_step"]
    assert select_components(None, True) == ["wm_update", "imagine", "ac_update", "full_update", "act_step"]
    assert select_components(None, False) == list(COMPONENTS)
    e2e = "end_to_end,act_step,full_update,replay_sample,env_step"
    assert select_components(e2e, False) == ["env_step", "replay_sample", "full_update", "act_step", "end_to_end"]


# Kill the bench with SIGKILL (what `timeout -k` ends with) when it reaches act_step: no handler, no atexit runs.
KILLED_AT_ACT = """
import os, signal, sys
from bench import __main__ as bench_main
bench_main.Bench.act = lambda self, mode: os.kill(os.getpid(), signal.SIGKILL)
bench_main.main(sys.argv[1:])
"""


def test_a_run_killed_partway_leaves_valid_json_with_its_finished_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = run(
        "-c", KILLED_AT_ACT, *TINY, "--no-env", "--components", "imagine,full_update,act_step", "--json", str(out)
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is False and result["meta"]["components"] == ["imagine", "full_update", "act_step"]
    assert [(r["component"], r["ok"]) for r in result["rows"]] == [("imagine", True), ("full_update", True)]
    assert all(r["median_ms"] > 0 for r in result["rows"])
    assert os.listdir(tmp_path) == ["bench.json"]  # no temp file left behind


def test_write_json_keeps_the_previous_file_when_a_write_fails(tmp_path):
    path = tmp_path / "r.json"
    write_json(str(path), {"complete": False, "rows": [1]})
    with pytest.raises(TypeError):
        write_json(str(path), {"complete": True, "rows": [1, object()]})  # fails halfway through the dump
    assert json.loads(path.read_text()) == {"complete": False, "rows": [1]}
    assert os.listdir(tmp_path) == ["r.json"]
    assert (path.stat().st_mode & 0o777) == 0o644


# The same for bench/bench_block_gru.py, killed while its second row (fwd+bwd) takes its median.
GRU_KILLED_AT_SECOND_ROW = """
import os, runpy, signal, statistics, sys
median, calls = statistics.median, []
def killing_median(xs):
    calls.append(xs)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return median(xs)
statistics.median = killing_median
sys.argv = ["bench/bench_block_gru.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_block_gru_bench_keeps_its_rows_when_killed_and_is_complete_at_the_end(tmp_path):
    out = tmp_path / "gru.json"
    args = ["--device", "cpu", "--small", "--modes", "eager", "--json", str(out)]
    proc = run("-c", GRU_KILLED_AT_SECOND_ROW, *args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is False and [(r["pass"], r["ok"]) for r in result["results"]] == [("fwd", True)]
    proc = run("bench/bench_block_gru.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert [(r["pass"], r["mode"], r["ok"]) for r in result["results"]] == [
        ("fwd", "eager", True),
        ("fwd+bwd", "eager", True),
    ]


@pytest.mark.parametrize("given", [False, True], ids=["plain", "given"])
def test_block_gru_bench_times_the_deferred_modes_fwd_bwd_only_after_their_check(tmp_path, given):
    """compile_defer and triton_defer (deferred weight gradients, fastdreamer/defer.py) pass the bench's check
    against the spec, gradients of all 14 weights included, and have fwd+bwd rows only; so with --given (the
    branches' products and the action branch from outside the core, as the fast modes' observe loop runs it)."""
    out = tmp_path / "gru.json"
    args = ["--device", "cpu", "--small", "--compute", "bf16", "--json", str(out), *(["--given"] if given else [])]
    proc = run("bench/bench_block_gru.py", *args, "--modes", "triton_defer", "compile_defer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["pass"], r["mode"], r["ok"], r["given"]) for r in rows] == [
        ("fwd+bwd", "triton_defer", True, given),
        ("fwd+bwd", "compile_defer", True, given),
    ]
    assert all(r["ms_per_step_median"] > 0 and r["check_err_grad"] > 0 for r in rows)


def test_observe_ab_checks_then_times_each_variant_and_survives_one_that_fails(tmp_path, monkeypatch):
    """bench.observe_ab at a tiny shape on the CPU: per_step, defer, emit, hoist, merge, cpu and cpu_stacked pass their
    gradient check and are timed (and the stacked sum's switch is cleared after); a variant whose update raises (here
    fan_out, made to) is a FAIL row with its error, and the run still completes."""
    from bench import observe_ab
    from fastdreamer import fanout, fast

    make_update = fast.make_update

    def failing(update_step, agent, *args, **kwargs):
        if observe_ab.VARIANTS["fan_out"] == tuple(f for f in observe_ab.FLAGS if getattr(agent.rssm, f)):
            raise RuntimeError("capture failed (injected)")
        return make_update(update_step, agent, *args, **kwargs)

    monkeypatch.setattr(fast, "make_update", failing)
    out = tmp_path / "ab.json"
    args = ["--size", "debug", "--precision", "fp32", "--rounds", "1", "--repeat", "1", "--threads", "1"]
    observe_ab.main([*args, "--batch-size", "2", "--batch-length", "6", "--imag-length", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["complete"] is True and list(rows) == [
        "per_step",
        "fan_out",
        "defer",
        "emit",
        "hoist",
        "merge",
        "cpu",
        "cpu_stacked",
    ]
    assert rows["fan_out"]["ok"] is False and "injected" in rows["fan_out"]["error"]
    assert fanout.FORCE_SUM is None
    for v in ("per_step", "defer", "emit", "hoist", "merge", "cpu", "cpu_stacked"):
        assert rows[v]["ok"] is True and rows[v]["median_ms"] > 0, rows[v]
        assert rows[v]["check_worst_rel"] < observe_ab.CHECK_REL["fp32"], rows[v]


def test_rollout_ab_checks_the_merged_rollouts_then_times_them(tmp_path, monkeypatch):
    """bench.rollout_ab at a tiny shape on the CPU: the merged rollout, with either form of the core's block layer,
    passes its fp32 check against the unmerged one and all three are timed; a merged rollout that computes something
    else (here its feats scaled by 1.01, made to) is a FAIL row in both forms, not a time."""
    from bench import rollout_ab

    args = ["--size", "debug", "--precision", "fp32", "--rounds", "1", "--repeat", "1", "--threads", "1"]
    args += ["--batch-size", "2", "--batch-length", "4", "--imag-length", "2"]
    out = tmp_path / "rollout.json"
    result = rollout_ab.main([*args, "--json", str(out)])
    assert json.loads(out.read_text())["complete"] is True
    rows = {r["variant"]: r for r in result["rows"]}
    for v in ("merged", "merged_u"):
        assert rows[v]["ok"] is True and rows[v]["check"] < rollout_ab.FP32_REL, rows
    assert all(rows[v]["median_ms"] > 0 for v in rollout_ab.VARIANTS), rows

    from fastdreamer.agent import Agent

    merged = Agent.merged_rollout

    def off(self, *a):
        feats, acts = merged(self, *a)
        return feats * 1.01, acts

    monkeypatch.setattr(Agent, "merged_rollout", off)
    rows = {r["variant"]: r for r in rollout_ab.main(args)["rows"]}
    for v in ("merged", "merged_u"):
        assert rows[v]["ok"] is False and "median_ms" not in rows[v], rows
    assert rows["rollout"]["median_ms"] > 0


def test_optim_step_checks_the_compiled_step_then_times_both(tmp_path):
    """bench.optim_step on a few of the debug size's parameters (a cold compile of all 79 takes ~50 s here): the
    compiled step passes its check against the eager one and both are timed, with the ratio in the JSON."""
    from bench import optim_step

    out = tmp_path / "opt.json"
    args = ["--device", "cpu", "--size", "debug", "--tensors", "6", "--rounds", "1", "--repeat", "2", "--threads", "1"]
    optim_step.main([*args, "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["eager", "compiled"] and result["meta"]["tensors"] == 6
    assert all(r["ok"] and r["median_ms"] > 0 for r in rows.values()), rows
    assert rows["compiled"]["check_worst_rel"] < optim_step.CHECK_REL


def test_report_cost_times_a_report_and_an_update_on_one_batch(tmp_path):
    from bench import report_cost

    out = tmp_path / "report.json"
    args = ["--device", "cpu", "--size", "debug", "--obs", "image", "--batch", "2", "--length", "8", "--rounds", "1"]
    report_cost.main([*args, "--repeat", "1", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["component"] for r in result["rows"]] == ["report", "report_written", "update"]
    _, written, update = (r["median_ms"] for r in result["rows"])
    assert written > 0 and update > 0 and result["report_per_update"] == pytest.approx(written / update)
    assert result["meta"]["batch"] == 2 and result["meta"]["obs"] == "image"


def test_profile_attribution_names_launcher_context_and_frames():
    """profile_update --attribute: each small library kernel (or, on a CPU, each fill/copy/add op) is counted per
    update under the op that launched it and the ATen op around that, the nearest autograd node or compiled graph,
    the nearest Python frame and the innermost frame of this project's code; matmul and inductor kernels are not
    counted. Synthetic profiler events, so the attribution itself is checked without a GPU."""
    import torch

    from bench.profile_update import attribute, format_attribution

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    own = Ev(name="fastdreamer/rssm.py(301): observe", cpu_parent=None)
    node = Ev(name="autograd::engine::evaluate_function: UnbindBackward0", cpu_parent=own)
    wrapper = Ev(name="torch/_functorch/_aot_autograd/runtime_wrappers.py(99): backward", cpu_parent=node)
    stack_op = Ev(name="aten::stack", cpu_parent=wrapper)
    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"
    kernels = [Ev(name=fill, duration=1.0)] * 3
    kernels += [Ev(name="nvjet_sm90_tst_64x8", duration=4.0), Ev(name="triton_poi_fused_add_0", duration=2.0)]
    zeros = Ev(name="aten::fill_", device_type=cpu, kernels=kernels, cpu_parent=stack_op, stack=[], cpu_time_total=9)
    device_side = Ev(name="FillFunctor", device_type=cuda, kernels=[], cpu_parent=None, stack=[], cpu_time_total=0)
    rows = attribute([zeros, device_side], updates=2, cuda=True)
    kernel = "vectorized_elementwise_kernel<4, FillFunctor<float>>"  # namespaces dropped: ATen's kernels differ late
    assert rows == [(1.5, 1.5, (kernel, "aten::fill_ < aten::stack", node.name, wrapper.name, own.name))]
    # On a CPU the op is the item and the ATen op around it the launcher; other ops are not counted.
    other = Ev(name="aten::mm", device_type=cpu, kernels=[], cpu_parent=None, stack=[], cpu_time_total=5)
    rows = attribute([zeros, other], updates=1, cuda=False)
    assert rows == [(1.0, 9.0, ("aten::fill_", "aten::stack", node.name, wrapper.name, own.name))]
    assert "aten::stack" in format_attribution(rows, top=5)


def test_twohot_error_measures_both_forms_and_writes_json(tmp_path):
    from bench import twohot_error

    path = tmp_path / "twohot.json"
    argv = ["--rows", "256", "--scales", "1e-6,1", "--paths", "eager,autocast", "--json", str(path)]
    out = twohot_error.main(argv)
    saved = json.loads(path.read_text())
    assert saved["rows"] == out["rows"] and len(out["rows"]) == 2 * 2 * 2  # scales x forms x paths
    worst = {(r["form"], r["path"], r["scale"]): r["max_err_over_terms"] for r in out["rows"]}
    assert max(v for (form, _, _), v in worst.items() if form == "pairs") < 2e-6  # tests/test_dists.py's bound
    assert worst[("subtracted", "eager", 1e-6)] > 1e-3  # the former form's error, relative to its terms
    assert worst[("subtracted", "autocast", 1.0)] > 1e-3  # its bf16 matmul under autocast
    with pytest.raises(SystemExit, match="unknown path"):
        twohot_error.main(["--paths", "eager,gpu"])


def test_the_full_update_check_fails_a_fast_mode_whose_backward_is_wrong(tmp_path, monkeypatch):
    # The losses come before backward, so a wrong gradient needs the gradient's norm in the check (here the fast
    # mode's loss is doubled where backward starts: equal losses, twice the gradient; run eagerly, as the check is
    # what is tested, not the compiler).
    import bench.__main__ as bench_main
    from fastdreamer import fast

    original = fast.make_update

    def doubled(fn, agent, opt, mode, precision):
        def step(agent, opt, data):
            loss, metrics, latents = agent.loss(data)
            opt.zero_grad()
            (2 * loss).backward()
            metrics.update({f"opt/{k}": v for k, v in opt.step().items()})
            agent.update_slow_critic()
            return metrics, latents

        return (
            original(fn, agent, opt, mode, precision)
            if mode == "eager"
            else original(step, agent, opt, "eager", "fp32")
        )

    monkeypatch.setattr(fast, "make_update", doubled)
    argv = [*TINY, "--modes", "eager,compile", "--precision", "fp32", "--no-env", "--components", "full_update"]
    result = bench_main.main([*argv, "--json", str(tmp_path / "b.json")])
    assert [(r["mode"], r["ok"]) for r in result["rows"]] == [("eager", True), ("compile", False)]


def test_the_fast_modes_compile_with_only_their_planned_graph_breaks():
    """bench.graph_breaks on this torch (the GPU's may differ: torch 2.11 broke the compiled observe step where 2.13
    does not, bench/LOG.md session 21): one update, acting step and rollout in compile mode under bf16 autocast (the
    GPU's precision, with the deferred observe loop), and no break but the three torch.compiler.disable ones."""
    out = run("-m", "bench.graph_breaks", "--precision", "bf16")
    assert out.returncode == 0, out.stdout + out.stderr
    planned = [line for line in out.stdout.splitlines() if line.split()[1:2] == ["expected"]]
    # observe's loop, the noise, and _graph_break's wrapper twice (the update's rollout, make_imagine's)
    assert "(0 unexpected)" in out.stdout and len(planned) == 4, out.stdout


def test_graph_breaks_fails_on_a_break_in_the_observe_step():
    """The census is not blind: a data-dependent branch in the core's RMSNorm (called by every observe, rollout and
    acting step) is reported as UNEXPECTED, with exit code 1."""
    code = (
        "import sys, torch; from fastdreamer.kernels.block_gru import reference as r; real = r.rms_normalize\n"
        "def branching(x):\n    return real(x) if x.sum() > 0 else real(-x)\n"
        "r.rms_normalize = branching\nfrom bench import graph_breaks\nsys.exit(graph_breaks.main([]))"
    )
    out = run("-c", code)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "UNEXPECTED  Data-dependent branching" in out.stdout, out.stdout


def test_combo_ab_compiles_each_variant_with_its_own_options_and_checks_before_timing(tmp_path, monkeypatch):
    """bench.combo_ab at a tiny shape on the CPU (where inductor forms no combo kernels and no PDL code, so every
    variant computes the same): each variant's units are compiled with its own inductor options, in order, the checks
    pass, all are timed, and the switches are back as they were. A variant whose gradients are wrong fails its check
    and exits 1."""
    from bench import combo_ab
    from fastdreamer import fast

    seen = []
    compile_ = fast._compile

    def spy(fn, **kwargs):
        seen.append((fast.combo_kernels_on(), fast.pdl_on()))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(fast, "_compile", spy)
    out = tmp_path / "ab.json"
    args = ["--size", "debug", "--precision", "fp32", "--rounds", "1", "--repeat", "1", "--threads", "1"]
    args += ["--batch-size", "2", "--batch-length", "6", "--imag-length", "2"]
    combo_ab.main([*args, "--json", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "combo", "pdl"]
    for v in ("combo", "pdl"):
        assert rows[v]["ok"] and rows[v]["check_worst_rel"] < combo_ab.CHECK_REL["fp32"], rows
    assert all(r["median_ms"] > 0 for r in rows.values())
    # every variant's compiles, in the variants' order, each with its own switches
    assert list(dict.fromkeys(seen)) == [(False, False), (True, False), (False, True)], seen
    assert seen == sorted(seen, key=[(False, False), (True, False), (False, True)].index)
    assert fast.COMBO_KERNELS in ("0", False) and fast.PDL in ("0", False)

    update_step = combo_ab.update_step

    def wrong(agent, opt, data):  # the PDL agent's gradients doubled: a wrong update
        result = update_step(agent, opt, data)
        if fast.pdl_on():
            for q in agent.parameters():
                if q.grad is not None:
                    q.grad.mul_(2)
        return result

    monkeypatch.setattr(combo_ab, "update_step", wrong)
    with pytest.raises(SystemExit) as exc:
        combo_ab.main([*args, "--variants", "pdl", "--json", str(out)])
    assert exc.value.code == 1
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "pdl"] and not rows["pdl"]["ok"] and "median_ms" not in rows["pdl"], rows
