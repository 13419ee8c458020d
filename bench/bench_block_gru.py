"""Time one block-GRU core step: reference eager, reference under torch.compile, and the fused Triton kernels.

    python bench/bench_block_gru.py --device cuda --json bench/results/block_gru_cuda.json
    python bench/bench_block_gru.py --device cpu --small --json bench/results/block_gru_cpu.json

On CUDA every mode runs inside CUDA-graph replay (N dependent steps captured once, replayed, timed with CUDA
events), because that is how the trainer calls the core and because launch cost is what the fused kernel is meant
to remove. `fwd` is N chained steps; `fwd+bwd` is N chained steps and backpropagation through all of them into
the first deter, the stoch/action inputs and all 14 weights (what the world-model update does over T).
compile_defer and triton_defer (fwd+bwd only) are compile and triton with deferred weight gradients, as the fast
modes' observe loop runs them on a GPU (fastdreamer/defer.py): the N steps run on the weights without gradient,
each step's backward computes only the per-row gradients, and each weight's gradient is one reduction over all
N*B rows after the loop; their ms/step include that reduction, 1/N of it per step. Both compile the tapped step as
the trainer's observe step is compiled (the Triton kernels stay opaque; the ops around them fuse).
On CPU there are no graphs and Triton runs in its interpreter: --small proves the script end to end, the times
mean nothing. Each mode is checked against reference eager first; a failing check records ok=false and no time.
--compute bf16 is the trainer's precision on a GPU (bf16 autocast): eager and compile run the reference under
torch.autocast, triton runs the kernels' bf16 compute (bf16 tensor-core dots), and all are checked against
reference.step(bf16=True).
--given runs every mode as the fast modes' observe loop calls the core (RSSM.hoist_action and merge_deter): each
step computes the deter and stoch branches' products outside the core (d @ w0, stoch @ w1, under autocast in bf16)
and passes them in as x0p and x1p, with the action branch x2 computed once for all steps (its weights then get
their gradient through it, not through a tap); the core skips that work (the Triton kernels then launch no branch
kernel). The *_defer modes then record the factors as the observe loop does (rssm._ObserveRecord): each step packs
the core's own (reference.pack_factors; the Triton kernels write them, block_gru.step's packed), and the deter and
stoch factors are the loop's inputs, gathered after it. The check stays against the plain reference.
--json is rewritten after every row with "complete": false, and true once the last row is in.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name: (D, G, K, S*C, A)
    "12m": (2048, 8, 256, 32 * 16, 6),
    "200m": (8192, 32, 1024, 32 * 64, 6),
    "small": (48, 4, 24, 4 * 4, 3),
}
# The check before timing. Wider than the unit tests' table (kernels/block_gru/fused.py) because these widths sum
# thousands of terms per output (rounding grows ~sqrt(n) * 6e-8) and BPTT over N steps compounds it; it is a guard
# against a broken mode, not the correctness test. Errors are max |a - b| / max(|b|, 1) per tensor.
CHECK_TOL = {"out": 1e-4, "grad": 1e-3}
# bf16 compute: autocast also rounds every matmul's output to bf16 (2^-9 relative), which the kernels' bf16 spec does
# not, and N steps compound it; measured at the small shape on CPU (N 16): see bench/LOG.md. Still a guard: a mode
# computing something else is off by O(1).
CHECK_TOL_BF16 = {"out": 3e-2, "grad": 1e-1}


def write_json(path: str, obj) -> None:
    """Write obj as JSON to path through a temp file in the same folder and os.replace, so a reader, or a run killed
    by `timeout` mid-write, sees the previous whole file or the new one, never a truncated one. Stdlib only, so that
    `python -m bench` shares it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:  # a file where the folder should be, no permission, a full disk: one line
        raise SystemExit(f"bench: cannot write {path} ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise SystemExit(f"bench: cannot write {path} ({e.strerror or e})") from None
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--json", help="write results here")
    p.add_argument("--small", action="store_true", help="only the tiny shape at batch 4 (for CPU)")
    p.add_argument("--models", nargs="+", default=["12m", "200m"], choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 1024])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "compile", "triton", "triton_wide", "compile_defer", "triton_defer"],
        choices=("eager", "compile", "triton", "triton_wide", "compile_defer", "triton_defer"),
        help="triton_wide: the kernels with fused.py's 'wide' tile policy (triton uses the default, 'parallel'); "
        "*_defer: deferred weight gradients (fwd+bwd rows only; see above)",
    )
    p.add_argument(
        "--given", action="store_true", help="the branches' products and the action branch from outside the core"
    )
    p.add_argument("--steps", type=int, default=16, help="dependent steps per timed graph")
    p.add_argument("--repeats", type=int, default=30, help="timed replays; median and p10/p90 reported")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype")
    p.add_argument(
        "--compute",
        nargs="+",
        default=["fp32"],
        choices=("fp32", "bf16"),
        help="precisions to time, in this order (bf16: the trainer's GPU precision, see above)",
    )
    args = p.parse_args(argv)
    if args.small:
        args.models, args.batches, args.steps = ["small"], [4], min(args.steps, 2)
        args.repeats = min(args.repeats, 3)
    return args


def meta(args, torch, triton):
    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except Exception:  # noqa: BLE001 (no git is not an error for a benchmark)
            return ""

    # None: no git, or ROOT is not a checkout's top (a copy inside another repository is not that one's commit)
    top = git("rev-parse", "--show-toplevel")
    commit = (git("rev-parse", "HEAD") or None) if top and os.path.realpath(top) == os.path.realpath(ROOT) else None
    scope = ("--", "kernels", "bench", ":(exclude)bench/results")
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no", *scope)),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date_utc": time.strftime("%Y-%m-%dT%H:%MZ"),
        "args": vars(args),
        "check_tol": CHECK_TOL,
        "check_tol_bf16": CHECK_TOL_BF16,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_block_gru: --device cuda (the default) asked for, but CUDA is not available here")
    import triton
    from fastdreamer.kernels.block_gru import fused, reference
    from fastdreamer.kernels.block_gru.reference import ACTION_SITES, TAP_SITES, BlockGRUWeights

    from fastdreamer import defer

    dev = torch.device(args.device)
    if args.device == "cpu":
        # One intra-op thread: on a shared 2-core box the OpenMP pool's spin-waits made eager steps jump from 0.24 to
        # 48 ms between runs.
        torch.set_num_threads(1)
    wdtype = getattr(torch, args.dtype)

    @contextlib.contextmanager
    def tiles(mode):
        """fused.py's tile policy for a mode, held over the forward and the backward (autograd runs the backward
        after the step returns, so a wrapper around the step alone would leave it at the default)."""
        policy = fused.TILES
        fused.TILES = "wide" if mode == "triton_wide" else policy
        try:
            yield
        finally:
            fused.TILES = policy

    def autocast(fn):
        def f(*a, **k):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return fn(*a, **k)

        return f

    def given(step, bf16: bool):
        """step as the observe loop calls it under --given: the deter and stoch branches' products computed here
        (under autocast in bf16, as the trainer's matmuls), the action branch x2 passed by run()."""

        def f(d, stoch, action, w, x2=None, **k):
            if x2 is None:
                return step(d, stoch, action, w, **k)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                x0p, x1p = d @ w.w0, stoch @ w.w1
            return step(d, stoch, action, w, x0p=x0p, x1p=x1p, x2=x2, **k)

        return f

    triton_bf16 = given(functools.partial(fused.step, bf16=True), True)
    torch_bf16 = given(autocast(reference.step), True)
    impls = {
        "fp32": {"eager": given(reference.step, False), "triton": given(fused.step, False)},
        "bf16": {"eager": torch_bf16, "triton": triton_bf16},
    }
    for compute in impls:
        impls[compute]["triton_wide"] = impls[compute]["triton"]
    spec = {"fp32": reference.step, "bf16": lambda *a: reference.step(*a, bf16=True)}
    if {"compile", "compile_defer"} & set(args.modes):
        impls["fp32"]["compile"] = torch.compile(given(reference.step, False), dynamic=False)
        impls["bf16"]["compile"] = torch.compile(torch_bf16, dynamic=False)

    def tapped(step, packs, d, stoch, action, w, tap, sites, x2=None):
        """One deferred step as the trainer's compiled observe step runs it: {site: tap} in, the factors packed
        inside the compiled function (outside, each factor's zero gradient would be launches of their own). Under
        --given as the observe loop packs them (rssm._ObserveRecord): the core's own (reference.PACKED_SITES; the
        Triton kernels write them, packs), the deter and stoch factors gathered after the loop (GivenRecord)."""
        if x2 is None:
            d, seen = step(d, stoch, action, w, taps=tap)
            return d, defer.pack(seen, sites)
        if packs:
            return step(d, stoch, action, w, taps=tap, x2=x2, packed=True)[::2]
        d, seen = step(d, stoch, action, w, taps=tap, x2=x2)
        return d, reference.pack_factors(seen)

    class GivenRecord(defer.Record):
        """--given's record: the steps' packed core factors, and the loop's inputs (each step's deter, the stoch)
        that the deter and stoch sites' factors are, gathered once (rounded to bf16 where the Triton kernels'
        bf16 compute multiplied them so), with h's deter blocks beside the packed x, as rssm._ObserveRecord."""

        def __init__(self, stoch, w, round_inputs: bool):
            super().__init__()
            self.stoch, self.w, self.round, self.deters = stoch, w, round_inputs, []

        def factors(self, widths):
            packed = torch.stack(list(self)).flatten(0, 1).float()
            w = self.w
            out = dict(zip(reference.PACKED_SITES, packed.split(list(reference.packed_widths(w).values()), 1)))
            x0 = torch.stack(self.deters).flatten(0, 1).float()
            x1 = self.stoch.detach().float().repeat(len(self), 1)
            if self.round:
                x0, x1 = x0.bfloat16().float(), x1.bfloat16().float()
            G = w.wh.shape[0]
            out["h"] = reference._block_inputs(x0.view(x0.shape[0], G, -1), out["h"]).flatten(1)
            out.update(x0=x0, x1=x1)
            return {k: out[k] for k in widths}

    # The *_defer modes compile the whole tapped step; the Triton kernels stay opaque custom ops and the torch ops
    # around them (fused._seen, pack) fuse.
    plain = (given(reference.step, False), given(fused.step, False))
    for compute, steps in (("fp32", plain), ("bf16", (torch_bf16, triton_bf16))):
        for mode, step in zip(("compile_defer", "triton_defer"), steps, strict=True):
            if mode in args.modes:
                packs = mode == "triton_defer"
                impls[compute][mode] = torch.compile(functools.partial(tapped, step, packs), dynamic=False)

    def make(B, D, G, K, SC, A):
        gen = torch.Generator().manual_seed(0)

        def r(*shape, scale=1.0, mean=0.0):
            return (mean + scale * torch.randn(*shape, generator=gen)).to(dev)

        w = reference.random_weights(D, G, K, SC, A, gen, dev)
        w = BlockGRUWeights(*(t.to(wdtype).requires_grad_() for t in w))
        return r(B, D).requires_grad_(), r(B, SC).requires_grad_(), r(B, A).requires_grad_(), w

    def run(fn, deter, stoch, action, w, backward, deferred=None, spec=False):
        """N chained steps; with backward, gradients of sum(last deter) for every input. deferred: for a *_defer
        mode, whose steps take taps (reference.step) and run without weight grads, its sites' defer.Site.bf16.
        spec: fn is the check's reference, which computes every branch itself (no --given)."""
        with torch.set_grad_enabled(backward):
            d = deter
            x2 = None
            if args.given and not spec:  # the action branch, hoisted: once for all steps, on the weights with grad
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=compute == "bf16"):
                    x2 = reference.action_branch(action, w)
            if deferred is not None:
                widths = reference.tap_widths(w)
                sites = {
                    s: defer.Site(kind, tuple(ps), widths[s], deferred and kind != "scale")
                    for s, (kind, *ps) in TAP_SITES.items()
                    if not (args.given and s in ACTION_SITES)
                }
                if args.given:
                    record = GivenRecord(stoch, w, compute == "bf16" and fn is impls["bf16"].get("triton_defer"))
                else:
                    record = defer.Record()
                taps = defer.taps(sites, w._asdict(), args.steps, deter.shape[0], record)
                wd = BlockGRUWeights(*(t.detach() for t in w))
                for t in range(args.steps):
                    if args.given:
                        record.deters.append(d.detach())
                    d, packed = fn(d, stoch, action, wd, taps[t], sites, x2=x2)
                    record.append(packed)
            elif spec:
                for _ in range(args.steps):
                    d = fn(d, stoch, action, w)
            else:
                for _ in range(args.steps):
                    d = fn(d, stoch, action, w, x2=x2)
            if not backward:
                return (d,)
            return (d, *torch.autograd.grad(d.sum(), (deter, stoch, action, *w)))

    def check(outs, refs, tol):
        errs = [
            ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()
            for a, b in zip(outs, refs)
        ]
        ok = errs[0] <= tol["out"] and all(e <= tol["grad"] for e in errs[1:])
        return ok, errs[0], max(errs[1:], default=0.0)

    def time_it(fn, inputs, backward, deferred=None):
        if args.device == "cpu":
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(fn, *inputs, backward, deferred)
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm up (compile, autotune, allocator) outside the capture
                run(fn, *inputs, backward, deferred)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(fn, *inputs, backward, deferred)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    # Written after every row with complete=false, so a run cut short by the device's time limit keeps its rows.
    info, results = meta(args, torch, triton), []

    def save(complete: bool):
        if args.json:
            write_json(args.json, {"complete": complete, "meta": info, "results": results})

    save(False)
    cases = [(c, m, B, bwd) for c in args.compute for m in args.models for B in args.batches for bwd in (False, True)]
    inputs = refs = None
    for compute, model, B, backward in cases:
        D, G, K, SC, A = SHAPES[model]
        if not backward:
            inputs = make(B, D, G, K, SC, A)
        refs = [t.detach() for t in run(spec[compute], *inputs, backward, spec=True)]
        tol = CHECK_TOL_BF16 if compute == "bf16" else CHECK_TOL
        for mode in args.modes:
            if mode.endswith("_defer") and not backward:
                continue  # the forward is the mode's without _defer
            # Autocast rounded both operands of the torch core's matmuls; the Triton core hands over its rounded
            # inputs and keeps the output gradients in float32 (defer.Site.bf16).
            deferred = (compute == "bf16" and mode == "compile_defer") if mode.endswith("_defer") else None
            row = {
                "model": model,
                "batch": B,
                "pass": "fwd+bwd" if backward else "fwd",
                "mode": mode,
                "compute": compute,
                "weights": args.dtype,
                "steps": args.steps,
                "repeats": args.repeats,
                "given": args.given,
            }
            fn = impls[compute][mode]
            try:
                with tiles(mode):
                    ok, err, gerr = check(run(fn, *inputs, backward, deferred), refs, tol)
                row.update(ok=ok, check_err=max(err, gerr), check_err_out=err, check_err_grad=gerr)
                if ok:
                    with tiles(mode):  # the CUDA graph captures the launches with this policy's tiles
                        per_step = sorted(t / args.steps for t in time_it(fn, inputs, backward, deferred))
                    n = len(per_step)
                    row.update(
                        ms_per_step_median=statistics.median(per_step),
                        ms_per_step_p10=per_step[n // 10],
                        ms_per_step_p90=per_step[(9 * n) // 10],
                    )
            except Exception as e:  # noqa: BLE001 (a mode that cannot run is a result, not a crash)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
            save(False)
            t = row.get("ms_per_step_median")
            print(
                f"{compute} {model:>5} B{B:<5} {row['pass']:<8} {mode:<8}{' given' if args.given else ''} "
                f"ok={row['ok']!s:<5} "
                f"err={row.get('check_err', float('nan')):.1e} "
                + (
                    f"{t:.4f} ms/step [{row['ms_per_step_p10']:.4f}, {row['ms_per_step_p90']:.4f}]"
                    if t is not None
                    else row.get("error", "not timed")
                ),
                flush=True,
            )
    save(True)
    return {"complete": True, "meta": info, "results": results}


if __name__ == "__main__":
    main()
