"""Execution modes of the update and the acting step. `eager` is the reference and the CPU fallback; the fast
modes wrap the very same functions (agent.loss via train.update_step, agent.act, agent.imagine) without
reimplementing them.

compile  torch.compile in units that are reused, never one unrolled update: RSSM.obs_step (one graph, called T
         times by the observe loop and once per acting step), the whole no-grad imagination rollout (one graph,
         sampling inside), and the rest of agent.loss (encoder, heads, two-hot losses, returns: the graphs between
         the observe loop and the rollout, which stay graph breaks). The observe loop stays a Python loop, so
         compile time does not grow with T and the backward is T calls of one compiled backward.
graphs   CUDA only: compile (and the LaProp step too, compile_optimizer), then one CUDA graph for the whole update
         (loss, backward, LaProp step, slow-critic EMA; LaProp keeps lr and step on the device) and one for the
         acting step, with static input buffers. Outputs of a graph are its static buffers: valid until the next
         call of the same function.
Precision: eager is the fp32 reference. The fast modes run matmuls in bf16 autocast (weights, norms and losses stay
fp32, as the reference's bfloat16 compute) where the device does bf16 natively: CUDA, and CPUs with AVX512-BF16 or
AMX (`--precision auto`); `--precision fp32|bf16` forces one. On a CPU without native bf16, oneDNN emulates it
slower than fp32, so auto keeps fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import shutil

import torch

MODES = ("eager", "compile", "graphs")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode to run. `auto` is graphs on CUDA (measured on an H200 at 12m: full update 21.5 ms in graphs, 180 ms
    compiled, 381 ms eager; acting 0.18 / 1.14 / 3.59 ms; the pong training loop ran in graphs;
    bench/results/h200_2026-11-26), and on a CPU compile (per full update on the 2-core CPU: 1.67x eager at debug
    and 1.80x at 1m with bf16 matmuls, 1.84x and 1.38x in fp32; bench/results/fast_cpu_*.json), or eager on a CPU
    without a C++ compiler for inductor. Graphs on a CPU device is an error."""
    device = torch.device(device)
    if mode == "auto":
        if device.type == "cuda":
            return "graphs"
        if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            return "eager"
        return "compile"
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of auto, {', '.join(MODES)}")
    if mode == "graphs" and device.type != "cuda":
        raise ValueError(f"--mode graphs needs a CUDA device (CUDA graphs), got device {device}; use --mode compile")
    return mode


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices in hardware: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX tiles. Measured on the 2-core AMD EPYC (avx512_bf16), one thread, (16384x640)@(640x64): bf16 7.2 ms,
    fp32 23.0 ms."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def check_precision(precision: str, mode: str) -> None:
    """Raise ValueError for a precision that is unknown or that `mode` cannot run (needs no device)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if mode == "eager" and precision == "bf16":
        raise ValueError("--precision bf16 needs a fast mode (--mode compile or graphs); eager is the fp32 reference")


def resolve_precision(precision: str, mode: str, device: torch.device) -> str:
    """The matmul precision of `mode` on `device`: fp32 or bf16. Eager is always fp32, the reference."""
    check_precision(precision, mode)
    if mode == "eager":
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, mode: str, precision: str = "auto"):
    """bf16 matmuls in the fast modes where `precision` resolves to bf16. The autocast weight cache is off: a cached
    cast would be a tensor made during capture and never refreshed after the optimizer step."""
    device = torch.device(device)
    if resolve_precision(precision, mode, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc only): no mmap for large blocks, no trimming of the heap top.
    By default glibc maps each block over its dynamic threshold (at most 32 MB) fresh and unmaps it on free, so every
    update's large temporaries page-fault anew. Measured on the 2-core EPYC, 1m size, one thread, alternating in
    one process: eager 884 -> 815 ms and compile 622 -> 596 ms per update. The cost is that the process keeps its
    peak heap. Returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _device(agent) -> torch.device:
    return next(agent.parameters()).device


# The observe loop's gradient paths, from the environment: read at import, parsed where used (compile_agent), so a
# bad value is one clear error of the command that uses it, not a traceback at import. Tests set these directly
# (a bool, or "auto" for DEFER).
FAN_OUT: bool | str = os.environ.get("FASTDREAMER_FAN_OUT", "1")
DEFER: bool | str = os.environ.get("FASTDREAMER_DEFER", "auto")
# Inductor's combo kernels in the compiled graphs (FASTDREAMER_COMBO_KERNELS=1|0), off until a GPU has measured them.
COMBO_KERNELS: bool | str = os.environ.get("FASTDREAMER_COMBO_KERNELS", "0")
# Programmatic dependent launch for inductor's Triton kernels (FASTDREAMER_PDL=1|0), off until a GPU has measured it.
PDL: bool | str = os.environ.get("FASTDREAMER_PDL", "0")


def _switch(name: str, value: bool | str, auto: bool = False) -> bool | str:
    if isinstance(value, bool):
        return value
    table = {"1": True, "0": False, **({"auto": "auto"} if auto else {})}
    if value not in table:
        raise ValueError(f"{name}={value!r}: expected {' or '.join(table)}")
    return table[value]


def combo_kernels_on() -> bool:
    """Whether the fast modes' graphs are compiled with inductor's combo kernels (FASTDREAMER_COMBO_KERNELS=1|0): up
    to 8 independent small kernels of a graph (weight casts, per-layer reductions, ...) launched as one. Inductor
    forms them for GPU devices only. The census (`python -m bench.gpu_codegen --combo-kernels`) counts 11% fewer
    launches per 12m update on the GPU's path (3,094 -> 2,748); their speed and numerics on a GPU are unmeasured,
    hence off by default (bench.combo_ab measures and checks them)."""
    return bool(_switch("FASTDREAMER_COMBO_KERNELS", COMBO_KERNELS))


def pdl_on() -> bool:
    """Whether the fast modes' graphs are compiled with programmatic dependent launch (FASTDREAMER_PDL=1|0):
    inductor's `triton.enable_pdl`, which on Hopper and later GPUs launches each Triton kernel so that it may start
    while the kernel before it finishes, waiting (`gdc_wait`) only before it reads what that kernel wrote. The update
    is a chain of ~2,500 small dependent kernels (12m, ~2.3 us each on the H200, session 24), so the gap and ramp
    between two of them is a large part of each. Inductor generates it for CUDA devices of compute capability 9 or
    more only (the census shows the code a Hopper GPU would get); unmeasured on a GPU, hence off by default
    (bench.combo_ab measures and checks it). Before it is a default, the CUDA fast-vs-eager tests should pass with it
    on, several times: inductor puts a kernel's wait only where it reads what the kernel right before it wrote, so
    any ordering fault would show as intermittent wrong values, not as an error."""
    return bool(_switch("FASTDREAMER_PDL", PDL))


def _one_cast_each(graph: torch.fx.Graph) -> None:
    """Inductor's post-grad pass (_compile): one cast of a tensor to a dtype per graph. Autocast casts a weight at
    every use, and AOTAutograd merges identical ops (CSE) in the graphs it partitions for a backward only: the
    no-grad rollout, H steps unrolled, cast each of its weights at each step (census, torch 2.11: ~100 of its 597
    launches at 12m; bench/LOG.md, session 25). A cast is pure, so later ones of the same tensor to the same dtype
    take the first's result. A cast often reads a view of the tensor, made anew at each step (the block GRU's
    weights: unsqueeze, then view; census, torch 2.11: 16 more launches per 12m rollout, each writing a weight's bf16
    copy again), so identical views of one tensor are merged first: a view computes nothing, and two views with the
    same arguments are the same memory. Copies (clone) are merged likewise: the block GRU's compiled step lays out
    the x rows of its hidden weight for one matmul (reference._split_hidden), the same copy at each step. The pass
    runs before inductor reinplaces anything; a graph that mutates (copy_ into an input, say) is left as it is, so
    no cast or copy is ever moved across a write."""
    if any(_mutates(node) for node in graph.nodes):
        return
    first = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target not in _MERGED and not getattr(target, "is_view", False):
            continue
        # (op, tensor, arguments): nodes, numbers, dtypes and tuples of them, all hashable
        key = (target, node.args, tuple(node.kwargs.items()))
        # A returned cast or copy stays its own tensor: the caller may write into one output and read another.
        returned = target in _MERGED and any(user.op == "output" for user in node.users)
        if key in first and not returned:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


# The pure ops _one_cast_each merges besides views: a cast, and a copy (a weight's slice laid out for a matmul).
_MERGED = (torch.ops.prims.convert_element_type.default, torch.ops.aten.clone.default)


def _mutates(node: torch.fx.Node) -> bool:
    """Whether a graph node may write into one of its arguments: an op whose schema says so, or any target without a
    schema but Python's operator.getitem (indexing an op's tuple of results)."""
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    return schema.is_mutable if schema is not None else node.target is not operator.getitem


@functools.cache
def _post_grad_pass():
    """_one_cast_each as inductor takes a custom pass: with an id for its cache (this file's hash)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class OneCastEach(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _one_cast_each(graph)

        def uuid(self):
            return get_hash_for_files((__file__,))

    return OneCastEach()


def _compile(fn, **kwargs):
    """torch.compile with one graph per shape (dynamic=False: the kernels stay specialised) and the fast modes'
    inductor options: one cast per tensor and dtype in a graph (_one_cast_each), and combo kernels and programmatic
    dependent launch where switched on."""
    options = {"post_grad_custom_pre_pass": _post_grad_pass()}
    if combo_kernels_on():
        options["combo_kernels"] = True
    if pdl_on():
        options["triton.enable_pdl"] = True
    return torch.compile(fn, dynamic=False, options=options, **kwargs)


def fan_out_on() -> bool:
    """Whether the fast modes hand the observe steps one cast copy of their weights (FASTDREAMER_FAN_OUT=1|0)."""
    return bool(_switch("FASTDREAMER_FAN_OUT", FAN_OUT))


def defer_on(device: torch.device) -> bool:
    """Whether the fast modes defer the observe steps' weight gradients on `device` (FASTDREAMER_DEFER=auto|1|0).
    auto: on CUDA, and on a CPU that multiplies bf16 in hardware (native_bf16: where the fast modes run bf16 by
    default). On a GPU defer removes 7 matmuls and up to 12 reductions per observe step from the backward. On the
    2-core CPUs (compile, one thread, alternated in one process; bench/LOG.md): an AMD EPYC with avx512_bf16
    (2026-11-26) had fan_out and defer within its noise of each other in bf16 and defer ~6% slower in fp32 at debug
    size, so auto kept defer CUDA only; an Intel Xeon with AMX (session 29, after fan_out's faster gradient sum) had
    defer 4-8% faster than fan_out in bf16 (1m, B8 x T32 and B16 x T64) and even in fp32 (B8 x T32)."""
    value = _switch("FASTDREAMER_DEFER", DEFER, auto=True)
    if value != "auto":
        return bool(value)
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and native_bf16(device))


def compile_agent(agent) -> None:
    """Route the agent's reused units through torch.compile, in place (idempotent). Instance attributes shadow the
    methods, so agent.loss, RSSM.observe and agent.act call the compiled units without any change to their code.
    """
    if getattr(agent, "_fast_compiled", False):
        return
    rssm = agent.rssm
    # first: a bad setting fails before any compile
    fan_out, defer, _, _ = fan_out_on(), defer_on(_device(agent)), combo_kernels_on(), pdl_on()
    # One graph per batch shape (B in observe, N in act); dynamic=False keeps the kernels specialised.
    rssm.obs_step = _same_grad_inputs(_compile(rssm.obs_step))
    # The T-step loop stays Python: a graph break around it, T calls of the compiled step inside.
    rssm.observe = torch.compiler.disable(rssm.observe)
    # Under bf16 autocast, one weight cast and one gradient sum per update, not per step (fastdreamer/fanout.py).
    # FASTDREAMER_FAN_OUT=0 turns it off, for benchmarks that measure it.
    rssm.fan_out = fan_out
    # The observe steps' weight gradients as one reduction per parameter over all B*T rows, after the loop's
    # backward (fastdreamer/defer.py). FASTDREAMER_DEFER=1|0|auto (default auto: CUDA and bf16 CPUs, defer_on).
    rssm.defer = defer
    # Each step's two gradients (next step, output stack) meet inside its compiled backward (RSSM.emit_copies).
    rssm.emit_copies = True
    # The core's action branch for all steps at once, outside the loop (RSSM.hoist_action; either core), compiled:
    # eager, its mask, norm and SiLU and their backward were ~30 small kernels per update.
    rssm.hoist_action = True
    rssm.action_inputs = _compile(rssm.action_inputs)
    # One matmul of each step's new deter for its posterior and the next step's core (RSSM.merge_deter; under defer,
    # either core), with the posterior's token part for all steps before the loop, compiled as its own unit.
    rssm.merge_deter = True
    rssm.deter_inputs = _compile(rssm.deter_inputs)
    # Random numbers are drawn eagerly, up front, in every mode (Agent.noise says why), then passed in.
    agent.noise = torch.compiler.disable(agent.noise)
    # The H-step no-grad rollout is one graph (H small, no backward); graph breaks keep it and its noise draw out
    # of the loss graph. It is the rollout with the matmuls that read one tensor merged (Agent.merged_rollout): two
    # matmuls fewer per step.
    agent.rollout = _graph_break(_compile(agent.merged_rollout))
    agent.imagine = _graph_break(agent.imagine)
    agent.loss = _compile(agent.loss)
    agent.policy_step = _compile(agent.policy_step)
    agent._fast_compiled = True


# The graph breaks compile_agent plans (each a torch.compiler.disable: observe's Python loop, the noise drawn up
# front, _graph_break's wrapper that keeps the rollout its own graph), as dynamo names them in its break reasons.
PLANNED_BREAKS = ("RSSM.observe at", "Agent.noise at", "_graph_break.<locals>.call at")


def graph_breaks() -> dict[str, int]:
    """{reason, on one line: count} of the graph breaks dynamo recorded in this process."""
    from torch._dynamo.utils import counters

    return {" ".join(str(reason).split()): count for reason, count in counters["graph_break"].items()}


def unplanned_graph_breaks() -> dict[str, int]:
    """graph_breaks() less the planned ones. A break changes no result, only speed: on the H200's torch 2.11 one in
    the block GRU's reference step split every compiled observe step into several graphs (+2 ms per 12m update;
    bench/LOG.md, session 21) where the CPU's torch traced it whole. `python -m bench.graph_breaks` runs the census
    on any machine."""
    return {
        reason: count
        for reason, count in graph_breaks().items()
        if not ("torch.compiler.disable" in reason and any(p in reason for p in PLANNED_BREAKS))
    }


def compile_optimizer(opt) -> None:
    """Route LaProp.step through torch.compile, in place (idempotent). Eager, the step is ~14 foreach passes over
    every parameter-sized list (multi_tensor_apply kernels, ~0.45 ms of a 12m update on an H200 and bound by memory
    traffic: ~30 parameter-sized reads and writes); compiled, inductor fuses the elementwise chain after the norms
    (on a GPU predicted ~3x less traffic; measured on the CPU only, bench.optim_step). The graphs mode only: on the
    2-core CPU the step was 3.9 -> 2.7 ms of a ~600 ms 1m update, for a ~50 s cold compile (bench/LOG.md,
    2026-11-26)."""
    if getattr(opt, "_fast_compiled", False):
        return
    opt.step = _compile(opt.step, fullgraph=True)  # one graph, or an error
    opt._fast_compiled = True


def _same_grad_inputs(step):
    """The observe loop's first step gets deter and stoch (and merge_deter's x0p, x1p) without grad (replay context),
    the later ones with grad; a compiled step guards on requires_grad, so that would be two graphs and two backward
    graphs to compile. Fresh leaves that require grad make step 0 take the same graph; their gradients are computed
    and dropped, and the caller's tensors, which had no grad, are unchanged. (Under merge_deter with emit_copies the
    later steps' stoch is detached too: it gets fresh leaves likewise.)"""

    def call(deter, stoch, *args, **kwargs):
        if torch.is_grad_enabled():
            if not deter.requires_grad:
                deter = deter.detach().requires_grad_()
            if not stoch.requires_grad:
                stoch = stoch.detach().requires_grad_()
            for name in ("x0p", "x1p"):  # RSSM.merge_deter: the first step's come from the initial state
                x = kwargs.get(name)
                if x is not None and not x.requires_grad:
                    kwargs[name] = x.detach().requires_grad_()
        return step(deter, stoch, *args, **kwargs)

    return call


def _graph_break(compiled):
    """Call `compiled` as its own graph from inside another compiled function: the wrapper's frame is skipped
    (a graph break in the caller) while the frames it calls still run compiled, unlike a recursive disable."""

    @torch.compiler.disable(recursive=False)
    def call(*args, **kwargs):
        return compiled(*args, **kwargs)

    return call


class _Graph:
    """A function of a dict of tensors captured in one CUDA graph: static input buffers are filled by copy_, the
    graph replayed, its static outputs returned. Warmup runs (which compile) happen on a side stream first. The CUDA
    generator is rewound to where it was before the warmups, so the first replay draws the random numbers a plain
    first call would have (a replay reads the generator's offset at replay time). `device`: the CUDA device, where
    `example` has no tensor to tell it (a function of no inputs)."""

    def __init__(self, fn, example: dict[str, torch.Tensor], warmup: int = 3, before_capture=None, device=None):
        self.static = {k: v.clone() for k, v in example.items()}
        device = device if device is not None else next(iter(example.values())).device
        rng = torch.cuda.get_rng_state(device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.set_rng_state(rng, device)
        if before_capture is not None:
            before_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.static)

    def __call__(self, inputs: dict[str, torch.Tensor]):
        for k, v in self.static.items():
            v.copy_(inputs[k], non_blocking=True)
        self.graph.replay()
        return self.out


def _snapshot(agent, opt):
    """Copies of everything an update writes, so that the warmup updates before a capture leave no trace (the CUDA
    generator is rewound by _Graph itself)."""
    state = [t.detach().clone() for t in agent.state_dict().values()]
    moments = [t.clone() for t in opt.nu + opt.mu] + [opt.step_count.clone()]

    def restore():
        with torch.no_grad():
            for dst, src in zip(agent.state_dict().values(), state, strict=True):
                dst.copy_(src)
            for dst, src in zip(opt.nu + opt.mu + [opt.step_count], moments, strict=True):
                dst.copy_(src)

    return restore


def make_update(update_step, agent, opt, mode: str, precision: str = "auto"):
    """A callable data -> (metrics, latents) running one update in `mode` at `precision` (resolve_precision)."""
    device = _device(agent)
    mode = resolve_mode(mode, device)  # before touching the agent: graphs on CPU is an error
    precision = resolve_precision(precision, mode, device)  # once: the calls below pass fp32/bf16 through
    if mode == "eager":
        return functools.partial(update_step, agent, opt)
    compile_agent(agent)

    def step(data):
        with autocast(device, mode, precision):
            return update_step(agent, opt, data)

    if mode == "compile":
        return step
    compile_optimizer(opt)
    holder: list[_Graph] = []

    def graphed(data):
        if not holder:
            restore = _snapshot(agent, opt)
            holder.append(_Graph(step, data, before_capture=restore))
        return holder[0](data)

    return graphed


def make_act(agent, mode: str, precision: str = "auto"):
    """A callable (carry, obs) -> (action, carry) running one acting step for all envs in `mode` at `precision`."""
    device = _device(agent)
    mode = resolve_mode(mode, device)  # before touching the agent: graphs on CPU is an error
    precision = resolve_precision(precision, mode, device)  # once: the calls below pass fp32/bf16 through
    if mode == "eager":
        return agent.act
    compile_agent(agent)

    def act(carry, obs):
        with autocast(device, mode, precision):
            return agent.act(carry, obs)

    if mode == "compile":
        return act
    holder: list[_Graph] = []
    names = ("deter", "stoch", "prevact")

    def captured(inputs):
        carry = tuple(inputs[f"carry/{n}"] for n in names)
        return act(carry, {k[4:]: v for k, v in inputs.items() if k.startswith("obs/")})

    def graphed(carry, obs):
        inputs = {
            **{f"carry/{n}": c for n, c in zip(names, carry, strict=True)},
            **{f"obs/{k}": v for k, v in obs.items()},
        }
        if not holder:
            holder.append(_Graph(captured, inputs))
        action, carry = holder[0](inputs)
        # Clones: the carry comes back as the next call's input, and callers may keep the action.
        return action.clone(), tuple(c.clone() for c in carry)

    return graphed


def make_imagine(agent, mode: str, precision: str = "auto"):
    """A callable (deter, stoch) -> (feats, actions), the no-grad imagination rollout in `mode` (for benchmarks and
    tests; inside an update the rollout runs as part of the update's graph)."""
    device = _device(agent)
    mode = resolve_mode(mode, device)  # before touching the agent: graphs on CPU is an error
    precision = resolve_precision(precision, mode, device)  # once: the calls below pass fp32/bf16 through
    if mode == "eager":
        return agent.imagine
    compile_agent(agent)

    def imagine(deter, stoch):
        with autocast(device, mode, precision):
            return agent.imagine(deter, stoch)

    if mode == "compile":
        return imagine
    holder: list[_Graph] = []

    def graphed(deter, stoch):
        inputs = {"deter": deter, "stoch": stoch}
        if not holder:
            holder.append(_Graph(lambda x: imagine(x["deter"], x["stoch"]), inputs))
        return holder[0](inputs)

    return graphed
