"""`python -m bench --device cpu|cuda --size SIZE [--obs vector|image] --json PATH`: one table of component times per
execution mode, each fast mode checked against eager before it is timed (a failed check prints FAIL, no time, and
the command exits 1 once the table and JSON are written; a mode that crashes is a FAIL row with its "error").

Rows: env_step (envpool batch step of the preset's N envs, host copy and upload included), replay_sample (B sequences
on the device), wm_update / ac_update (bench/parts.py: the two halves of the loss with their backward), imagine
(H steps from all B*T starts, no grad), full_update (loss, backward, LaProp, slow critic: train.update_step),
act_step (one policy step for N envs), end_to_end (env steps/s of the real training loop, fastdreamer.train.Trainer
with envpool, at the preset's N and train ratio: bench/end_to_end.py). --components measures a subset of the rows;
--json is rewritten after every row with "complete": false, so a run killed by `timeout` keeps its finished rows, and
gets the FLOP count, matmul peaks and "complete": true at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time

import torch
import torch._inductor.config as inductor_config
from fastdreamer.kernels import block_gru

from fastdreamer import fast
from fastdreamer.checkpoint import first_line
from fastdreamer.config import PRESETS
from fastdreamer.provenance import cpu_name, git_info
from fastdreamer.train import update_step

from . import end_to_end, parts
from .bench_block_gru import write_json
from .common import (
    count_arg,
    device_arg,
    json_arg,
    make_agent,
    make_config,
    random_batch,
    random_obs,
    rollout_close,
    rollout_starts,
    size_arg,
    sync,
    threads_arg,
    timeit,
)

MODES = ("eager", "compile", "graphs", "graphs_triton")
COMPONENTS = ("env_step", "replay_sample", "wm_update", "imagine", "ac_update", "full_update", "act_step", "end_to_end")
ENV_ROWS = ("env_step", "replay_sample", "end_to_end")  # the rows --no-env skips: they need envpool
E2E_NEEDS = ("env_step", "replay_sample", "full_update", "act_step")  # end_to_end's parts sum and its ok check
PRESET = {"vector": "cartpole", "image": "pong"}  # the train ratio and N of end_to_end
ENV_ID = {"vector": "CartPole-v1", "image": "Pong-v5"}
FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 reassociation in fused reductions, as in tests/test_fast.py
BF16_TOL = dict(rtol=5e-2, atol=5e-2)  # bf16 autocast matmuls (fast modes) against eager under the same autocast


def available(mode: str, device: torch.device) -> bool:
    if mode in ("eager", "compile"):
        return True
    if device.type != "cuda":
        return False
    return mode == "graphs" or block_gru.triton_available()[0]


@contextlib.contextmanager
def gru_impl(mode: str):
    previous = block_gru.get_impl()
    block_gru.set_impl("triton" if mode == "graphs_triton" else "torch")
    try:
        yield
    finally:
        block_gru.set_impl(previous)


def fast_mode(mode: str) -> str:
    return "graphs" if mode == "graphs_triton" else mode


def close(got, want, tol) -> bool:
    return all(torch.allclose(g.float(), w.float(), **tol) for g, w in zip(got, want, strict=True))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.preset = PRESETS[PRESET[args.obs]].overrides
        self.cfg = make_config(args.size, num_envs=self.preset["num_envs"], **args.overrides)
        self.components = args.components
        self.rows: list[dict] = []
        self.compile_s: dict[str, float] = {}
        self.meta: dict = {}

    def save(self, complete: bool = False) -> None:
        if self.args.json:
            write_json(self.args.json, {"complete": complete, "meta": self.meta, "rows": self.rows})

    def add(self, row: dict) -> None:
        """Every row goes through here: on disk as soon as it is measured."""
        self.rows.append(row)
        self.save()

    def fresh(self, seed: int = 0):
        return make_agent(self.cfg, self.args.obs, self.device, seed)

    def data(self, agent, seed: int = 0):
        return random_batch(
            agent, self.cfg.batch_size, self.cfg.batch_length + self.cfg.replay_context, self.device, seed
        )

    def precision_arg(self, mode: str) -> str:
        """--precision as `mode` takes it: it sets the fast modes' matmuls; eager is the fp32 reference whatever it
        says (auto resolves to fp32 there), so `--modes eager,compile --precision bf16` times bf16 against fp32."""
        return "auto" if fast_mode(mode) == "eager" else self.args.precision

    def precision(self, mode: str) -> str:
        """fp32 or bf16: the matmul precision of `mode` under --precision on this device."""
        return fast.resolve_precision(self.precision_arg(mode), fast_mode(mode), self.device)

    def tol(self, mode: str):
        return BF16_TOL if self.precision(mode) == "bf16" else FP32_TOL

    def reference_ctx(self, mode: str):
        """Eager under the mode's precision: the reference a fast mode is checked against."""
        return fast.autocast(self.device, fast_mode(mode), self.precision_arg(mode))

    def record(self, component: str, mode: str, fn=None, ok: bool = True, repeat: int | None = None, **extra):
        row = {"component": component, "mode": mode, "median_ms": None, "spread_ms": None, "ok": ok, **extra}
        if ok and fn is not None:
            repeat = repeat or self.args.repeat
            row["median_ms"], row["spread_ms"] = timeit(fn, self.device, warmup=2, repeat=repeat)
        self.add(row)
        cell = "FAIL" if not ok else f"{row['median_ms']:.3f} ms"
        print(f"  {component:13s} {mode:14s} {cell}", file=sys.stderr, flush=True)
        return row

    # Mode-independent rows.
    def env_and_replay(self):
        from fastdreamer.envs import make_env
        from fastdreamer.replay import Replay
        from fastdreamer.train import replay_spec

        cfg, n = self.cfg, self.cfg.num_envs
        env = make_env(ENV_ID[self.args.obs], n, 0, self.device)
        try:
            env.reset()
            gen = torch.Generator().manual_seed(0)

            def env_step():
                env.step(torch.randint(0, env.spec.act_dim, (n,), generator=gen).to(self.device))

            if "env_step" in self.components:
                self.record("env_step", "eager", env_step, repeat=max(self.args.repeat, 50))
        finally:
            env.close()
        agent, _ = self.fresh()
        seq = cfg.batch_length + cfg.replay_context
        replay = Replay(replay_spec(agent, env.spec), 1000 * n, n, seq, self.device)
        step = {
            k: torch.zeros((n, *shape), dtype=dtype, device=self.device) for k, (shape, dtype) in replay.spec.items()
        }
        self.replay_add_ms = timeit(lambda: replay.add(step), self.device, warmup=seq, repeat=200)[0]
        if "replay_sample" in self.components:
            self.record(
                "replay_sample", "eager", lambda: replay.sample(cfg.batch_size), repeat=max(self.args.repeat, 50)
            )

    # Per-mode rows.
    def full_update(self, mode: str):
        agent, opt = self.fresh()
        data = self.data(agent)
        update = fast.make_update(update_step, agent, opt, fast_mode(mode), self.precision_arg(mode))
        ok = True
        if mode != "eager":
            ref_agent, ref_opt = self.fresh()
            torch.manual_seed(1)
            with self.reference_ctx(mode):
                want, _ = update_step(ref_agent, ref_opt, data)
            torch.manual_seed(1)
            t0 = time.perf_counter()
            got, _ = update(data)
            sync(self.device)
            self.compile_s[mode] = time.perf_counter() - t0
            # The losses check the forward; the gradient's norm and the step's size, the backward and LaProp.
            keys = [k for k in want if k.startswith("loss/")] + ["opt/grad_norm", "opt/update_rms"]
            ok = close([got[k] for k in keys], [want[k] for k in keys], self.tol(mode))
        return self.record("full_update", mode, lambda: update(data), ok)

    def imagine(self, mode: str):
        agent, _ = self.fresh()
        deter, stoch = rollout_starts(agent, self.cfg.batch_size * self.cfg.batch_length, self.device)
        imagine = fast.make_imagine(agent, fast_mode(mode), self.precision_arg(mode))
        ok, extra = True, {}
        if mode != "eager":
            ref, _ = self.fresh()
            torch.manual_seed(3)
            with self.reference_ctx(mode):
                want = ref.imagine(deter, stoch)
            torch.manual_seed(3)
            got = imagine(deter, stoch)
            if self.precision(mode) == "fp32":
                ok = close(got, want, self.tol(mode))
            else:  # bf16 rounding can tip a draw: a bounded fraction of elements may differ (bench/common.py)
                ok, extra["outside_tol_frac"] = rollout_close(got, want, self.tol(mode))
        return self.record("imagine", mode, lambda: imagine(deter, stoch), ok, **extra)

    def parts(self, mode: str):
        agent, opt = self.fresh()
        data = self.data(agent)
        if mode == "eager":
            parts.check_parts(agent, data)
        wm, ac = functools.partial(parts.wm_loss, agent), functools.partial(parts.ac_loss, agent)
        if mode != "eager":
            fast.compile_agent(agent)
            wm, ac = torch.compile(wm, dynamic=False), torch.compile(ac, dynamic=False)
        with torch.no_grad():
            _, deters, stochs = parts.wm_loss(agent, data)

        def wm_step(inputs):
            opt.zero_grad()
            loss, _, _ = wm(inputs["data"])
            loss.backward()
            return loss.detach()

        def ac_step(inputs):
            opt.zero_grad()
            loss = ac(inputs["deters"], inputs["stochs"], inputs["data"])
            loss.backward()
            return loss.detach()

        steps = {
            "wm_update": (wm_step, {"data": data}),
            "ac_update": (ac_step, {"deters": deters, "stochs": stochs, "data": data}),
        }
        for component, (step, inputs) in steps.items():
            if component not in self.components:
                continue
            run = functools.partial(self.in_mode, mode, step)
            ok = True
            if mode != "eager":
                ref, ref_opt = self.fresh()
                ref_fn = parts.wm_loss if component == "wm_update" else parts.ac_loss
                torch.manual_seed(4)
                with self.reference_ctx(mode):
                    want = ref_fn(ref, data)[0] if component == "wm_update" else ref_fn(ref, deters, stochs, data)
                torch.manual_seed(4)
                ok = close([run(inputs)], [want.detach()], self.tol(mode))
            self.record(component, mode, functools.partial(run, inputs), ok)

    def in_mode(self, mode, step, inputs):
        """Run step(inputs) under the mode's precision; in the graph modes, captured once (flattened inputs)."""
        if fast_mode(mode) != "graphs":
            with fast.autocast(self.device, fast_mode(mode), self.precision_arg(mode)):
                return step(inputs)
        graphs = self.__dict__.setdefault("_graphs", {})
        key = (mode, step.__name__)
        flat = {k: v for k, v in inputs.items() if k != "data"} | {f"data/{k}": v for k, v in inputs["data"].items()}

        def unflat(x):
            rest = {k: v for k, v in x.items() if not k.startswith("data/")}
            with fast.autocast(self.device, "graphs", self.args.precision):
                return step({**rest, "data": {k[5:]: v for k, v in x.items() if k.startswith("data/")}})

        if key not in graphs:
            graphs[key] = fast._Graph(unflat, flat)
        return graphs[key](flat)

    def act(self, mode: str):
        agent, _ = self.fresh()
        n = self.cfg.num_envs
        obs = random_obs(agent, n, self.device, seed=5)
        carry = agent.initial(n, self.device)
        act = fast.make_act(agent, fast_mode(mode), self.precision_arg(mode))
        ok = True
        if mode != "eager":
            ref, _ = self.fresh()
            torch.manual_seed(6)
            with self.reference_ctx(mode):
                want_action, want_carry = ref.act(carry, obs)
            torch.manual_seed(6)
            got_action, got_carry = act(carry, obs)
            ok = close([got_carry[0]], [want_carry[0]], self.tol(mode))
            # Sampled actions agree exactly in fp32 on the CPU (fallback_random); bf16 or CUDA kernels can tip a draw.
            exact = self.device.type == "cpu" and self.precision(mode) == "fp32"
            ok = ok and (not exact or torch.equal(got_action, want_action))
        return self.record("act_step", mode, lambda: act(carry, obs), ok)

    def end_to_end(self, mode: str):
        """Measured: the real training loop (bench/end_to_end.py) at the preset's N and train ratio with this size
        and batch. Beside it, the sum of the parts' rows (act + env step + replay add + updates per step x
        (sample + full update)): the loop beats that sum by the env step it overlaps with the updates."""
        ok = all(r["ok"] for r in self.rows if r["mode"] == mode and r["component"] in ("full_update", "act_step"))
        row = {"component": "end_to_end", "mode": mode, "median_ms": None, "spread_ms": None, "ok": ok}
        if ok:
            cfg = self.cfg
            m = end_to_end.measure(
                PRESET[self.args.obs],
                self.args.size,
                fast_mode(mode),
                str(self.device),
                gru_impl="triton" if mode == "graphs_triton" else "torch",
                precision=self.precision_arg(mode),
                seconds=self.args.e2e_seconds,
                batch_size=cfg.batch_size,
                batch_length=cfg.batch_length,
                imag_length=cfg.imag_length,
            )
            t = {r["component"]: r["median_ms"] for r in self.rows if r["mode"] in (mode, "eager") and r["ok"]}
            t.update({r["component"]: r["median_ms"] for r in self.rows if r["mode"] == mode and r["ok"]})
            parts_ms = (
                t["act_step"]
                + t["env_step"]
                + self.replay_add_ms
                + m["updates_per_env_step"] * (t["replay_sample"] + t["full_update"])
            )
            spread_ms = cfg.num_envs * 1e3 * m["env_steps_per_s_spread"] / m["env_steps_per_s"] ** 2
            row.update(m, spread_ms=spread_ms, parts_ms=parts_ms, parts_env_steps_per_s=cfg.num_envs / parts_ms * 1e3)
        self.add(row)
        if ok:
            print(f"  {'end_to_end':13s} {mode:14s} {row['env_steps_per_s']:.0f} env steps/s", file=sys.stderr)

    def flops(self):
        from torch.utils.flop_counter import FlopCounterMode

        agent, opt = self.fresh()
        data = self.data(agent)
        with FlopCounterMode(display=False) as counter:
            update_step(agent, opt, data)
        return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in TFLOP/s at `dtype`."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = timeit(lambda: a @ b, device, warmup=2, repeat=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def meta(args, device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        **git_info(),
        "size": args.size,
        "obs": args.obs,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "fan_out": fast.fan_out_on(),  # FASTDREAMER_FAN_OUT: the fast modes' observe loop (fastdreamer/fanout.py)
        "defer": fast.defer_on(device),  # FASTDREAMER_DEFER, resolved for the device (fastdreamer/defer.py)
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(rows: list[dict], modes: list[str]) -> str:
    cells = {(r["component"], r["mode"]): r for r in rows}
    lines = [f"{'component':14s}" + "".join(f"{m:>24s}" for m in MODES)]
    for comp in COMPONENTS:
        line = f"{comp:14s}"
        base = cells.get((comp, "eager"))
        for m in MODES:
            r = cells.get((comp, m))
            if r is None:
                text = "-"
            elif not r["ok"]:
                text = "FAIL"
            elif comp == "end_to_end":
                text = f"{r['env_steps_per_s']:.0f} steps/s"
            else:
                text = f"{r['median_ms']:.3f} ms"
            if r is not None and r["ok"] and base and base["ok"] and m != "eager":
                text += f" ({base['median_ms'] / r['median_ms']:.2f}x)"
            line += f"{text:>24s}"
        lines.append(line)
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--size", default="12m", type=size_arg)
    p.add_argument("--obs", default="vector", choices=("vector", "image"))
    p.add_argument("--json", default=None, type=json_arg, help="write {meta, rows} here")
    p.add_argument(
        "--modes", default=None, help="comma-separated subset of " + ",".join(MODES) + " (default: those that run here)"
    )
    p.add_argument("--repeat", type=count_arg, default=10, help="timed calls per cell (median and middle-half spread)")
    p.add_argument("--threads", type=threads_arg, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--precision", default="auto", choices=fast.PRECISIONS, help="matmul precision of the fast modes")
    p.add_argument("--batch-size", type=count_arg, default=None)
    p.add_argument("--batch-length", type=count_arg, default=None)
    p.add_argument("--imag-length", type=count_arg, default=None)
    p.add_argument(
        "--components", default=None, help="comma-separated subset of " + ",".join(COMPONENTS) + " (default: all)"
    )
    p.add_argument("--no-env", action="store_true", help="skip env_step and replay_sample (and end_to_end)")
    p.add_argument("--e2e-seconds", type=float, default=5.0, help="timed seconds of the end_to_end training loop")
    args = p.parse_args(argv)
    args.overrides = {
        k: v for k in ("batch_size", "batch_length", "imag_length") if (v := getattr(args, k)) is not None
    }
    args.components = select_components(args.components, args.no_env)
    return args


def select_modes(spec: str | None, device: torch.device) -> list[str]:
    """The modes to time. Refused before anything runs: unknown names, a mode asked for that cannot run on this
    device, and fast modes without eager (the baseline that checks and rates them). Without --modes: every mode
    that runs here."""
    if spec is None:
        return [m for m in MODES if available(m, device)]
    modes = [m for m in spec.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"bench: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    if cannot := [m for m in modes if not available(m, device)]:
        raise SystemExit(f"bench: {','.join(cannot)} cannot run on {device.type} here (graphs needs CUDA, triton too)")
    if any(m != "eager" for m in modes) and "eager" not in modes:
        raise SystemExit("bench: the eager baseline is needed to check and rate the other modes; add eager to --modes")
    return modes


def select_components(spec: str | None, no_env: bool) -> list[str]:
    """The rows to measure, in table order. Refused before anything runs: unknown names, env rows under --no-env,
    and end_to_end without the rows its parts sum and check read (it would run unchecked)."""
    names = [c for c in spec.split(",") if c] if spec else list(COMPONENTS)
    bad = [c for c in names if c not in COMPONENTS]
    if bad:
        raise SystemExit(f"bench: unknown component(s) {bad}; choose from {','.join(COMPONENTS)}")
    if no_env:
        if spec and (clash := [c for c in names if c in ENV_ROWS]):
            raise SystemExit(f"bench: --no-env skips {','.join(ENV_ROWS)}, but --components asks for {','.join(clash)}")
        names = [c for c in names if c not in ENV_ROWS]
    if "end_to_end" in names and (missing := [c for c in E2E_NEEDS if c not in names]):
        raise SystemExit(
            f"bench: end_to_end needs the {','.join(E2E_NEEDS)} rows (its parts sum and its check); "
            f"add {','.join(missing)} to --components"
        )
    return [c for c in COMPONENTS if c in names]


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but CUDA is not available here")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # eager stays the fp32 reference, its convolutions too
        torch.backends.cudnn.allow_tf32 = False
    tuned_allocator = device.type == "cpu" and fast.tune_cpu_allocator()  # as train does, for every mode
    modes = select_modes(args.modes, device)
    info = meta(args, device)
    bench = Bench(args)
    cfg = bench.cfg
    info.update(
        precision={m: bench.precision(m) for m in modes},
        cpu_allocator_tuned=tuned_allocator,
        batch_size=cfg.batch_size,
        batch_length=cfg.batch_length,
        imag_length=cfg.imag_length,
        num_envs=cfg.num_envs,
        train_ratio=bench.preset["train_ratio"],
        components=args.components,
    )
    bench.meta = info
    bench.save()  # the run's meta on disk before its first row
    print(
        f"bench: {info['device']}, torch {info['torch']}, size {args.size}, obs {args.obs}, B{cfg.batch_size}x"
        f"T{cfg.batch_length}, H{cfg.imag_length}, N{cfg.num_envs}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    if {"env_step", "replay_sample"} & set(args.components):
        bench.env_and_replay()
    # Compiled modes draw their random numbers from the eager generator (fallback_random): the graph that is
    # checked against eager is the graph that is timed.
    with inductor_config.patch(fallback_random=True):
        for mode in modes:
            with gru_impl(mode):
                for names, run in (
                    (("wm_update", "ac_update"), bench.parts),
                    (("imagine",), bench.imagine),
                    (("full_update",), bench.full_update),
                    (("act_step",), bench.act),
                ):
                    names = [n for n in names if n in args.components]
                    if not names:
                        continue
                    component = names[0]
                    try:
                        run(mode)
                    except Exception as e:  # a mode that cannot run is a FAIL cell, not a lost table
                        first = first_line(e)[:200]
                        print(f"bench: {component} in {mode} failed: {type(e).__name__}: {first}", file=sys.stderr)
                        done = {(r["component"], r["mode"]) for r in bench.rows}
                        for name in names:
                            if (name, mode) not in done:
                                bench.add(
                                    {
                                        "component": name,
                                        "mode": mode,
                                        "median_ms": None,
                                        "spread_ms": None,
                                        "ok": False,
                                        "error": f"{type(e).__name__}: {first}",
                                    }
                                )
            if "end_to_end" in args.components:
                bench.end_to_end(mode)
    flops = bench.flops()
    peaks = {name: matmul_peak(device, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    info.update(
        flops_per_update=flops,
        matmul_peak_tflops=peaks,
        compile_first_call_s=bench.compile_s,
        replay_add_ms=getattr(bench, "replay_add_ms", None),
    )
    for r in bench.rows:
        if r["component"] == "full_update" and r["ok"]:
            r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
    print(table(bench.rows, modes))
    achieved = ", ".join(
        f"{r['mode']} {r['tflops']:.3g} ({bench.precision(r['mode'])})" for r in bench.rows if "tflops" in r
    )
    print(
        f"model FLOPs per update {flops / 1e9:.2f} GFLOP (FlopCounterMode, eager fwd+bwd); achieved TFLOP/s "
        f"{achieved}; measured matmul peak fp32 {peaks['fp32']:.3g}, bf16 {peaks['bf16']:.3g} TFLOP/s"
    )
    if bench.compile_s:
        print("first call incl. compile/capture: " + ", ".join(f"{m} {s:.1f} s" for m, s in bench.compile_s.items()))
    bench.save(complete=True)
    return {"complete": True, "meta": info, "rows": bench.rows}


if __name__ == "__main__":
    result = main()
    failed = [f"{r['component']}/{r['mode']}" for r in result["rows"] if not r["ok"]]
    if failed:  # the table and the JSON are written; the exit status says a check failed or a mode crashed
        print(f"bench: {len(failed)} row(s) failed (see FAIL above): {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
