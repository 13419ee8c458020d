"""Where a fast mode's updates first part ways with eager's: every state an update writes, update by update.

From the same seeds, eager (the reference; in bf16 under the fast mode's autocast, as tests/test_fast.py runs it) and
each variant of the fast mode run --updates updates of the test suite's tiny config; after each update this
snapshots the metrics, the latents, every parameter and its gradient, the buffers (slow critic, return
normalisation), LaProp's state and the generators, and prints per update each loss's relative difference, whether
the generators agree, the worst tensor of each group (relative error in norm) and the first state past its bound
("first divergence"; and the first one outside LaProp's state and the parameters, which in bf16 a few sign flips
always move: see below).

Why: on an H200 (torch 2.11+cu130, Triton 3.6) the CUDA fast-mode tests failed at update 1 while update 0 passed:
fp32 compile and graphs loss/value rel 2.6e-4 (bound 1e-4), bf16 loss/policy -0.065 vs -0.00017 (bound 0.05), and
the graphs bf16 Triton-core test's rssm.core.w0 gradient rel 0.23; on the CPU the same comparisons pass. Gradient
noise of 1e-6 relative and a shift of the generator by one draw do not give that pattern (measured on the CPU), so
some state carried into update 1, or its imagination, differs. Two things here look for the likeliest carrier:
LaProp's first step is lr * sign(g) exactly (nu_hat = g^2 at t = 0), so a gradient element whose sign differs, or
that is zero on one side only, moves its parameter a whole lr apart whatever its size: `flips` counts gradient
elements of other sign, `lr-steps` parameter elements a lr/2 or more apart. Measured on the CPU in eager fp32,
flipping the sign of update 0's smallest gradient elements before the step: three of reward.out.bias (bins 1.6,
338 and 3075) move update 1's mean imagined reward from -2.7e-5 to 0.027 and loss/policy from -1.3e-4 to +0.010
(an lr step of one bin's logit against its mirror moves the two-hot prediction by about 2 lr / 255 times the bin);
one per tensor of the continuation head moves loss/value by 2.0e-3 and loss/con by 1.3e-3 relative, of the RSSM
loss/dyn by 1.3e-2; three per actor tensor change loss/policy by < 1e-8. At update 0 the reward and critic MLPs'
gradients are exactly zero (their output layers start at zero): a fast mode that computes tiny non-zero values
there moves those weights a whole lr; `flips` counts them too ("zero on one side"). And eager runs twice first:
CUDA eager itself may not repeat (atomic adds: gather's backward), which bounds what any comparison can show.

Variants (each a fresh agent from the same seed, or with --warm the warm state eager starts from too; dynamo reset
in between):
  default           the fast mode as the trainer runs it (fast.make_update)
  no_defer          RSSM.defer off after compile_agent (as bench.observe_ab's set_flags). observe() runs merge_deter
                    only under defer, so this turns merge off too; emit_copies and hoist_action stay on, and under
                    bf16 autocast the steps take fan_out's copies instead (the CPU's default loop)
  no_emit, no_hoist, no_merge   RSSM.emit_copies, hoist_action, merge_deter off
  unmerged_rollout  Agent.rollout (not merged_rollout) compiled and wrapped as compile_agent wraps the merged one
  eager_optimizer   graphs mode without compile_optimizer (LaProp.step eager inside the graph); compile mode does
                    not compile the optimizer, so there it is skipped
  resync            default, but each update after the first starts from eager's state after the update before
                    (parameters, buffers, LaProp's state, generators; compile mode only): if it agrees where default
                    parts, each update computes what eager computes and the parting is the states drifting apart
                    (LaProp's sign-like first steps), not a wrong computation

The GPU command (one device call; the JSON is rewritten after every variant, so a run cut by its timeout keeps the
variants it finished; on the 2-core CPU each variant took 16-51 s, mostly its cold compile, 3.5 min for six):

  timeout 540 python -m bench.divergence --device cuda --mode graphs --precision fp32 \
      --variants default,no_defer,no_emit,no_hoist,no_merge,unmerged_rollout,eager_optimizer --updates 3 \
      --json bench/results/divergence_cuda_graphs_fp32.json

Each variant prints a block: its first divergence, the same without LaProp's state and the parameters, and per
update two lines (u0, u1, ...): every loss's relative difference, the other metric that differs most, the generators
(= or !=); then the worst tensor of latents, gradients, LaProp's state, parameters and buffers, and the flip and
lr-step counts with the tensor that has most.

On a CPU, `--fp-contract fast` compiles inductor's C++ kernels with FMA contraction, as GPU code is compiled (the
CPU default keeps multiplies and adds apart): GPU-like rounding without a GPU. It found the first cause of the CUDA
failures above on the CPU (session 12): twohot_pred subtracted rounded probabilities times bins up to 4.9e8, and
resync's update 2 gave imagined values 30x eager's (fixed; tests/test_divergence.py runs it).

On a CPU, `--defer 1` runs the observe loop CUDA runs by default (defer, and merge_deter, which needs it); the
default `auto` leaves both off there, as the trainer does, so no_defer and no_merge then change nothing.

The config is tests/test_fast.py's (bench.common's TINY_CFG, tiny_agent and tiny_batch): batch 4 x 8, imagination
3, lr 1e-3 without warmup, 5 vector observations, 3 discrete actions, size debug.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from unittest import mock

import torch
import torch._inductor.config as inductor_config

from fastdreamer import fast
from fastdreamer.agent import Agent
from fastdreamer.optim import LaProp
from fastdreamer.train import update_step

from .common import TINY_CFG, TINY_SPEC, device_arg, json_arg, threads_arg, tiny_agent, tiny_batch
from .draws import DrawTape, taped

SPEC, CFG = TINY_SPEC, TINY_CFG
VARIANTS = ("default", "no_defer", "no_emit", "no_hoist", "no_merge", "unmerged_rollout", "eager_optimizer", "resync")
FLAG_OFF = {"no_defer": "defer", "no_emit": "emit_copies", "no_hoist": "hoist_action", "no_merge": "merge_deter"}
LOSSES = ("loss/dyn", "loss/vector", "loss/rew", "loss/con", "loss/value", "loss/repval", "loss/policy")
# The groups of a snapshot, in the order an update writes them: the observe loop's latents, the losses and other
# metrics, the gradients, LaProp's state, the parameters, the buffers (retnorm is written in the forward, but the
# slow critic after the step), the generators after the update.
GROUPS = ("latents", "metrics", "grads", "optim", "params", "buffers", "rng")
# The bounds of tests/test_fast.py. Metrics (|got - want| <= atol + rtol |want|): LOSS_TOL in fp32, BF16_TOL in bf16.
# Tensors, relative in norm: the fp32 CUDA test's gradient bound (fp32 in another summation order: 1.7e-6), and the
# bf16 tests' GRAD_REL_TOL (bf16 against bf16 eager: up to 2.3% on the CPU; a dropped or flipped term is O(1)).
METRIC_TOL = {"fp32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=5e-2, atol=5e-2)}
TENSOR_REL = {"fp32": 1e-4, "bf16": 0.1}
# In bf16 the actor's gradient at these first updates is mostly rounding noise (tests/test_fast.py: up to 40% between
# two bf16 computations), and LaProp's moments follow it: reported, but not a divergence, as in the bf16 tests.
BF16_SKIP = ("grads/actor.", "optim/nu/actor.", "optim/mu/actor.")
WORST = 5  # tensors per group in the JSON; the printout names the worst one


make, batch = tiny_agent, tiny_batch  # tests/test_fast.py's, shared through bench.common


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def snapshot(agent: Agent, opt: LaProp, metrics: dict, latents: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Host copies of everything an update wrote, grouped as GROUPS (graphs mode's outputs are static buffers that
    the next replay overwrites)."""
    device = next(agent.parameters()).device
    names = [n for n, _ in agent.named_parameters() if not n.startswith("slow_critic.")]  # agent.trainable()'s order
    params = dict(agent.named_parameters())
    state = opt.state_dict()
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "latents": {n: _host(v) for n, v in latents.items()},
        "metrics": {n: _host(v) for n, v in metrics.items()},
        "grads": {n: _host(params[n].grad) for n in names if params[n].grad is not None},
        "optim": {
            "step": _host(state["step"]),
            "lr": _host(state["lr"]),
            **{f"nu/{n}": _host(x) for n, x in zip(names, state["nu"])},
            **{f"mu/{n}": _host(x) for n, x in zip(names, state["mu"])},
        },
        "params": {n: _host(params[n]) for n in names},
        "buffers": {n: _host(v) for n, v in agent.state_dict().items() if n not in names},
        "rng": rng,
    }


def rel_norm(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in norm (float64); 0 where both are 0, inf where only want is, or the shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    diff, ref = float((got - want).norm()), float(want.norm())
    if diff == 0:
        return 0.0
    return diff / ref if ref > 0 else float("inf")


def compare(got: dict, want: dict, precision: str, lr: float = CFG.lr) -> dict:
    """One update's snapshot against the reference's: per metric got, want, rel and excess (its difference over the
    bound; > 1 is past it), per tensor of the other groups rel (relative in norm), the generators equal or not, the
    gradient elements of other sign ("flips"; "zeros": those of them zero on one side only) and the parameter
    elements lr/2 or more apart ("lr_steps")."""
    tol = METRIC_TOL[precision]
    out: dict = {"metrics": {}, "tensors": {}, "rng": {}, "flips": {}, "zeros": {}, "lr_steps": {}, "missing": {}}
    for group in GROUPS:
        g, w = got.get(group, {}), want.get(group, {})
        if missing := sorted(g.keys() ^ w.keys()):
            out["missing"][group] = missing
        for name in (n for n in w if n in g):
            a, b = g[name], w[name]
            if group == "rng":
                out["rng"][name] = bool(torch.equal(a, b))
            elif group == "metrics":
                x, y = float(a.double()), float(b.double())
                diff = abs(x - y)
                out["metrics"][name] = {
                    "got": x,
                    "want": y,
                    "rel": diff / abs(y) if y else (0.0 if diff == 0 else float("inf")),
                    "excess": diff / (tol["atol"] + tol["rtol"] * abs(y)),
                }
            else:
                out["tensors"][f"{group}/{name}"] = rel_norm(a, b)
        if group == "grads":
            for name in (n for n in w if n in g and g[n].shape == w[n].shape):
                out["flips"][name] = int((torch.sign(g[name]) != torch.sign(w[name])).sum())
                out["zeros"][name] = int(((g[name] == 0) != (w[name] == 0)).sum())
        if group == "params":
            for name in (n for n in w if n in g and g[n].shape == w[n].shape):
                out["lr_steps"][name] = int(((g[name].double() - w[name].double()).abs() >= lr / 2).sum())
    return out


def worst(cmp: dict, group: str, n: int = WORST) -> list[tuple[str, float]]:
    """The `n` tensors of `group` with the largest relative error, names without the group."""
    rows = [(k.split("/", 1)[1], v) for k, v in cmp["tensors"].items() if k.startswith(group + "/")]
    return sorted(rows, key=lambda r: -r[1])[:n]


def first_divergence(updates: list[dict], precision: str, groups: tuple[str, ...] = GROUPS) -> dict | None:
    """The first state past its bound, updates in order and within one `groups` in GROUPS order (the worst of the
    group): {"update", "group", "name", "rel"}, or None. A generator that differs is rel None; a missing entry, inf."""
    bound, skip = TENSOR_REL[precision], BF16_SKIP if precision == "bf16" else ()
    for k, cmp in enumerate(updates):
        for group in (g for g in GROUPS if g in groups):
            if missing := cmp["missing"].get(group):
                return {"update": k, "group": group, "name": f"missing {missing[0]}", "rel": float("inf")}
            if group == "rng":
                bad = [name for name, same in cmp["rng"].items() if not same]
                if bad:
                    return {"update": k, "group": "rng", "name": bad[0], "rel": None}
                continue
            if group == "metrics":
                past = {n: m for n, m in cmp["metrics"].items() if m["excess"] > 1}
                if past:
                    name = max(past, key=lambda n: past[n]["excess"])
                    return {"update": k, "group": group, "name": name, "rel": past[name]["rel"]}
                continue
            past = {
                name: rel
                for name, rel in cmp["tensors"].items()
                if name.startswith(group + "/") and rel > bound and not name.startswith(skip)
            }
            if past:
                name = max(past, key=past.get)
                return {"update": k, "group": group, "name": name.split("/", 1)[1], "rel": past[name]}
    return None


# Without LaProp's state and the parameters: in bf16 a few gradient elements near zero take the other sign in any
# two computations (on the CPU 15 at update 0), and LaProp's sign-like step turns each into a whole lr apart, past any
# bound in norm of a small tensor; this asks whether the losses, gradients and buffers stay within the tests' bounds.
BEYOND_STEPS = tuple(g for g in GROUPS if g not in ("optim", "params"))


def describe(first: dict | None, updates: list[dict] | None = None) -> str:
    """The one-line verdict; with the comparisons, a divergence in LaProp's state or the parameters also says how
    many gradient signs differed and how many parameter elements are lr/2 or more apart at that update."""
    if first is None:
        return "none"
    rel = "generator differs" if first["rel"] is None else f"rel {first['rel']:.2g}"
    line = f"update {first['update']}, {first['group']} {first['name']} {rel}"
    if updates is not None and first["group"] in ("optim", "params"):
        cmp = updates[first["update"]]
        line += f" ({sum(cmp['flips'].values())} gradient signs differ, {sum(cmp['lr_steps'].values())} lr-steps)"
    return line


def summary(k: int, cmp: dict) -> list[str]:
    """Two printed lines of one update: the losses and generators; the worst tensor per group and the LaProp
    sign-step counts."""
    short = {n.split("/", 1)[1]: cmp["metrics"][n]["rel"] for n in LOSSES if n in cmp["metrics"]}
    others = {n: m["rel"] for n, m in cmp["metrics"].items() if n not in LOSSES}
    other = max(others, key=others.get) if others else None
    rng = " ".join(f"{n}{'=' if same else '!='}" for n, same in cmp["rng"].items())
    line1 = f"  u{k} " + " ".join(f"{n} {r:.1e}" for n, r in short.items())
    line1 += f" | {other} {others[other]:.1e}" if other else ""
    line1 += f" | rng {rng}"
    parts = []
    for group, label in (
        ("latents", "lat"),
        ("grads", "grad"),
        ("optim", "opt"),
        ("params", "par"),
        ("buffers", "buf"),
    ):
        top = worst(cmp, group, 1)
        if top:
            parts.append(f"{label} {top[0][0]} {top[0][1]:.1e}")
    counts = []
    for key, label in (("flips", "flips"), ("lr_steps", "lr-steps")):
        total = sum(cmp[key].values())
        most = max(cmp[key], key=cmp[key].get, default=None)
        zeros = f", {sum(cmp['zeros'].values())} zero on one side" if key == "flips" and total else ""
        counts.append(f"{label} {total}" + (f" (most {most} {cmp[key][most]}{zeros})" if total else ""))
    line2 = "     " + " | ".join(parts + counts)
    return [line1, line2]


def restore(agent: Agent, opt: LaProp, snap: dict, device) -> None:
    """Put a snapshot's state (parameters, buffers, LaProp's state, the generators) into `agent` and `opt`, in place
    (the compiled code keeps its tensors)."""
    names = [n for n, _ in agent.named_parameters() if not n.startswith("slow_critic.")]
    agent.load_state_dict({**snap["params"], **snap["buffers"]})
    optim = snap["optim"]
    nu, mu = [optim[f"nu/{n}"] for n in names], [optim[f"mu/{n}"] for n in names]
    opt.load_state_dict({"step": optim["step"], "lr": optim["lr"], "nu": nu, "mu": mu})
    torch.set_rng_state(snap["rng"]["cpu"])
    if "cuda" in snap["rng"]:
        torch.cuda.set_rng_state(snap["rng"]["cuda"], device)


def run(agent: Agent, opt: LaProp, update, device, updates: int, ctx=None, before=None, draws=None) -> list[dict]:
    """`updates` updates from seed 1 (tests/test_fast.py's run_updates), a snapshot after each; `ctx` makes the
    context each update runs in (eager's autocast in bf16); before(k), if given, runs before each update k > 0;
    draws(k), if given, before each update (bench.draws.taped's)."""
    torch.manual_seed(1)
    snaps = []
    for k in range(updates):
        if before is not None and k > 0:
            before(k)
        if draws is not None:
            draws(k)
        if ctx is None:
            metrics, latents = update(batch(k, device))
        else:
            with ctx():
                metrics, latents = update(batch(k, device))
        snaps.append(snapshot(agent, opt, metrics, latents))
    return snaps


def run_variant(
    variant: str,
    device,
    mode: str,
    precision: str,
    updates: int,
    want: list[dict],
    warm: int = 0,
    settled=True,
    tape: DrawTape | None = None,
) -> list[dict]:
    """An agent from make()'s seed (after `warm` eager updates, its two-hot heads `settled`: bench.common.
    warm_state), its update in `mode` with
    `variant`'s change, `updates` snapshots; `want`: the reference's snapshots (resync starts each update from the
    reference's state after the one before); `tape`: the reference's recorded draws, replayed (--taped)."""
    torch._dynamo.reset()  # each variant compiles its own graphs, none left by the last one
    agent, opt = make(device, warm=warm, settled=settled)
    with taped(agent, tape) as draws:  # before make_update: compile_agent wraps the tape's methods
        patch = mock.patch.object(fast, "compile_optimizer", lambda opt: None) if variant == "eager_optimizer" else None
        if patch is not None:
            with patch:
                update = fast.make_update(update_step, agent, opt, mode, precision)
        else:
            update = fast.make_update(update_step, agent, opt, mode, precision)
        if variant in FLAG_OFF:
            setattr(agent.rssm, FLAG_OFF[variant], False)  # before the first call: graphs captures with it
        if variant == "unmerged_rollout":
            agent.rollout = fast._graph_break(torch.compile(functools.partial(Agent.rollout, agent), dynamic=False))
        if variant == "eager_optimizer":
            assert not getattr(opt, "_fast_compiled", False), "compile_optimizer was not patched out"

        def resync(k: int) -> None:
            restore(agent, opt, want[k - 1], device)

        return run(agent, opt, update, device, updates, before=resync if variant == "resync" else None, draws=draws)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--mode", default="compile", choices=["compile", "graphs"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--updates", type=int, default=3)
    p.add_argument(
        "--warm",
        type=int,
        default=0,
        help="start eager and every variant from the state this many eager fp32 updates leave (bench.common."
        "warm_state): LaProp's moments warm, the heads off zero, the two-hot heads settled; 0: a fresh agent, as "
        "the tests' first comparisons",
    )
    p.add_argument(
        "--unsettled",
        action="store_true",
        help="with --warm, leave the two-hot heads as the warm updates leave them, near uniform, where values are "
        "ill-conditioned (bench.common.settle_twohot_heads): the warm state before session 18",
    )
    p.add_argument(
        "--defer",
        default="auto",
        choices=["auto", "1", "0"],
        help="fast.DEFER for every variant (auto: the trainer's, on CUDA and bf16 CPUs; 1: what CUDA runs, anywhere)",
    )
    p.add_argument(
        "--fp-contract",
        default="off",
        choices=["off", "fast"],
        help="CPU only: compile inductor's C++ kernels with -ffp-contract=fast, fusing multiplies and adds into FMAs "
        "as GPU code does (the CPU default keeps them apart): GPU-like rounding on a CPU",
    )
    p.add_argument(
        "--taped",
        action="store_true",
        help="the reference records its latent and action draws, each moved to the middle of a wide class interval "
        "(bench/draws.py), and the repeat and every variant replay them; all without free bits. For bf16, where two "
        "correct computations from one seed pick other classes and clamp other KLs (bench/LOG.md, session 22)",
    )
    p.add_argument("--threads", type=threads_arg, default=0)
    p.add_argument("--json", default=None, type=json_arg)
    return p


def main(argv=None) -> dict:
    """Run the comparison; returns the JSON object (its "errors" lists the variants that raised)."""
    from .__main__ import meta
    from .bench_block_gru import write_json

    args = parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"divergence: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.unsettled and not args.warm:
        raise SystemExit("divergence: --unsettled describes the warm state; it needs --warm N")
    if args.fp_contract != "off" and device.type != "cpu":
        raise SystemExit("divergence: --fp-contract sets how inductor compiles CPU kernels; it has no effect on CUDA")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("divergence: --device cuda asked for, but CUDA is not available here")
    try:
        fast.resolve_mode(args.mode, device)
    except ValueError as e:
        raise SystemExit(f"divergence: {e}") from None
    fast.DEFER = args.defer
    # One graph per variant of functions whose code objects they share (RSSM.forward and the rest): past dynamo's
    # recompile limit (8 by default) a function silently runs eagerly. reset() between variants clears them; the
    # raised limit is a second guard, as in bench.observe_ab.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    mode, precision = args.mode, args.precision
    info = meta(argparse.Namespace(size=CFG.size, obs="vector"), device)
    info.update(
        command=" ".join(["python -m bench.divergence", *(sys.argv[1:] if argv is None else argv)]),
        mode=mode,
        precision=precision,
        variants=variants,
        updates=args.updates,
        warm=args.warm,
        settled=not args.unsettled,
        taped=args.taped,
        defer_setting=args.defer,
        fp_contract=args.fp_contract,
        batch_size=CFG.batch_size,
        batch_length=CFG.batch_length,
        imag_length=CFG.imag_length,
        metric_tol=METRIC_TOL[precision],
        tensor_rel=TENSOR_REL[precision],
    )
    out = {"complete": False, "meta": info, "reference": {}, "rows": [], "errors": []}
    save = (lambda: write_json(args.json, out)) if args.json else (lambda: None)
    print(
        f"divergence: {info['device']}, torch {info['torch']}, triton {info['triton']}, {mode} {precision}, "
        f"defer {fast.defer_on(device)}, {args.updates} updates"
        + (f" after {args.warm} warm" + (" (heads unsettled)" if args.unsettled else "") if args.warm else "")
        + (f", fp-contract {args.fp_contract}" if device.type == "cpu" else "")
        + (", taped draws, no free bits" if args.taped else "")
    )

    with inductor_config.patch({"fallback_random": True, "cpp.enable_floating_point_contract_flag": args.fp_contract}):
        ctx = (lambda: fast.autocast(device, mode, "bf16")) if precision == "bf16" else None

        tape = DrawTape() if args.taped else None

        def eager():
            """The reference; with --taped the first call records the tape, the repeat replays it."""
            agent, opt = make(device, warm=args.warm, settled=not args.unsettled)
            with taped(agent, tape) as draws:
                update = fast.make_update(update_step, agent, opt, "eager")
                return run(agent, opt, update, device, args.updates, ctx, draws=draws)

        t0 = time.perf_counter()
        want = eager()
        again = [compare(g, w, precision) for g, w in zip(eager(), want)]
        first = first_divergence(again, precision)
        exact = all(c["rng"] and all(c["rng"].values()) and not any(c["tensors"].values()) for c in again)
        exact = exact and not any(m["rel"] for c in again for m in c["metrics"].values())
        out["reference"] = {"eager_repeat": {"bitwise": exact, "first_divergence": first, "updates": again}}
        verdict = "bitwise equal" if exact else f"first divergence: {describe(first, again)}"
        print(f"eager vs eager ({time.perf_counter() - t0:.1f} s): {verdict}")
        save()

        for variant in variants:
            skip = {"eager_optimizer": mode != "graphs", "resync": mode == "graphs"}.get(variant)
            if skip:
                why = {
                    "eager_optimizer": "only graphs mode compiles the optimizer",
                    "resync": "a captured graph keeps its generator offsets: compile mode only",
                }[variant]
                print(f"{variant}: skipped ({why})")
                out["rows"].append({"variant": variant, "skipped": why})
                save()
                continue
            t0 = time.perf_counter()
            try:
                got = run_variant(
                    variant, device, mode, precision, args.updates, want, args.warm, not args.unsettled, tape
                )
            except Exception as e:  # noqa: BLE001 (a variant that cannot run is an error row; the others still run)
                why = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{variant}: ERROR {why}")
                out["rows"].append({"variant": variant, "error": why})
                out["errors"].append(variant)
                save()
                continue
            cmps = [compare(g, w, precision) for g, w in zip(got, want)]
            first = first_divergence(cmps, precision)
            beyond = first_divergence(cmps, precision, BEYOND_STEPS)
            seconds = time.perf_counter() - t0
            print(f"{variant} ({seconds:.0f} s): first divergence: {describe(first, cmps)}")
            print(f"  without optim, params: {describe(beyond)}")
            for k, cmp in enumerate(cmps):
                print("\n".join(summary(k, cmp)))
            rows = []
            for cmp in cmps:
                row = {k: cmp[k] for k in ("metrics", "rng", "missing")}
                row["worst"] = {g: worst(cmp, g) for g in ("latents", "grads", "optim", "params", "buffers")}
                row["flips"] = {n: c for n, c in cmp["flips"].items() if c}
                row["zeros"] = {n: c for n, c in cmp["zeros"].items() if c}
                row["lr_steps"] = {n: c for n, c in cmp["lr_steps"].items() if c}
                rows.append(row)
            out["rows"].append(
                {
                    "variant": variant,
                    "seconds": seconds,
                    "first_divergence": first,
                    "first_divergence_without_optim_params": beyond,
                    "updates": rows,
                }
            )
            save()
    out["complete"] = True
    out["meta"]["end_time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
