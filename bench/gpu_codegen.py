"""The kernels a GPU would launch for the fast modes' compiled graphs, generated on a CPU: inductor's Triton code
generator instead of its C++ one, nothing compiled for or run on a device.

On a CPU, inductor writes C++ loops and fuses them its own way (bench/step_kernels.py: the first H200 profile had
~110 launches per observe step where the C++ code gave ~57). With `config.cpu_backend = "triton"` the CPU's
graphs go through the same scheduler and fusion rules as CUDA's (SIMD scheduling: Triton pointwise, reduction and
persistent-reduction kernels, matmuls as extern calls) and the generated wrapper lists, in order, every kernel the
graph launches. `triton_codegen()` keeps that code and runs each graph eagerly instead (the FX graph inductor
lowered, so results are right and the program goes on); the Triton kernels themselves are never compiled, so no
GPU and no Triton backend for the CPU is needed.

What it does not show: which matmul kernel cuBLAS picks, the launches outside compiled graphs (eager autograd, the
optimizer when not compiled: census() counts those from the profiler), times, and what inductor decides by device
type. Checked against an H200 profile of the same tree and torch (bench/LOG.md, session 23): matmuls and the ops
between graphs within 3%, Triton kernels +30%, since for a CPU device inductor lowers `cat` to one copy kernel per
input where a GPU fuses them, and leaves softmax without its GPU-only online rewrite.
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import os
import re
import sys
import types
from unittest import mock

import torch

from fastdreamer import provenance


class Codes(list):
    """The generated wrapper modules (source text), in compile order, and how often each was called (`calls`, by
    index), and for each a label: the nearest frame of this project's code at its first call, `backward of` its
    forward's for a backward graph."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []
        self.backward: list[bool] = []
        self.labels: list[str] = []
        self.gpu_lowerings: list[str] = []


OWN_CODE = ("/fastdreamer/", "/kernels/")


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if any(m in name for m in OWN_CODE) and "/torch/" not in name:
            return f"{name.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class _Eager(torch.fx.Interpreter):
    """Runs the graph inductor lowered, op by op. After inductor's reinplacing pass an in-place foreach op (the
    compiled LaProp step's) returns None where its functional form returned a list, and the graph still indexes it
    (results it no longer uses): those indexings give None."""

    def call_function(self, target, args, kwargs):
        if target is operator.getitem and args[0] is None:
            return None
        return super().call_function(target, args, kwargs)


def _swap_const(fn, old, new) -> bool:
    """Replace the constant `old` of fn's code with `new`, in place; whether fn had it (once)."""
    consts = fn.__code__.co_consts
    if consts.count(old) != 1:
        return False
    fn.__code__ = fn.__code__.replace(co_consts=tuple(new if c == old else c for c in consts))
    return True


@contextlib.contextmanager
def gpu_lowerings():
    """Inductor's lowering choices that it makes by device type, made as for CUDA on the CPU's tensors (with the
    Triton backend): `cat` (on a CPU always one copy kernel per input, a ConcatKernel; on a GPU fused into its
    inputs' or its users' kernels where they are pointwise) and the online-softmax rewrite (GPU only: one reduction
    pass for a softmax's max and sum) and the grouping of independent kernels into combo kernels (GPU only; what
    a compile with `combo_kernels` gets). Each by swapping one constant of the function's code for the duration
    (private code of torch 2.11 and 2.13; on another torch that lacks the constant, it is left alone). Programmatic
    dependent launch (`pdl`: what a compile with `triton.enable_pdl` gets on a GPU of compute capability 9 or more,
    its kernels' gdc_wait and gdc_launch_dependents and their launch_pdl) by replacing the method that asks the
    device. And the choice to keep (realize) a value that several kernels read rather than recompute it in each
    (`realize`): a CPU device keeps any that took an exp or a sigmoid (torch 2.13: a tanh or a log too) and, in torch
    2.13, allows larger expressions before it keeps one; `ir.is_cpu`, which inductor's ir module asks for those
    heuristics alone, answers as for CUDA.
    Yields the names of those set."""
    import torch._inductor.config as inductor_config
    import torch._inductor.ir as ir
    import torch._inductor.lowering as lowering
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.fx_passes import post_grad
    from torch._inductor.scheduler import ForeachKernelSchedulerNode
    from torch._inductor.select_algorithm import TritonTemplateKernel
    from torch._inductor.virtualized import V

    cat = getattr(lowering.lowerings.get(torch.ops.aten.cat.default), "__wrapped__", None)
    combo = getattr(ForeachKernelSchedulerNode, "_default_group_nodes_for_combo_kernels", None)
    swaps = [
        ("cat", cat, "cpu", "cuda-like"),  # cpu_device = inputs[0].get_device().type == "cpu"
        ("online_softmax", post_grad.prepare_softmax_extra_check, ("cuda", "xpu"), ("cuda", "xpu", "cpu")),
        # Combo kernels (when the compile asks for them: fast.combo_kernels_on) skip nodes on a "cpu" or "mps" device.
        ("combo_kernels", combo, "cpu", "cuda-like"),
    ]

    def hopper_pdl() -> bool:  # TritonKernel._enable_pdl_codegen with a Hopper GPU's answers for the device
        return inductor_config.triton.enable_pdl and not isinstance(V.kernel, TritonTemplateKernel)

    done = []
    try:
        with contextlib.ExitStack() as stack:
            for name, fn, old, new in swaps:
                if fn is not None and _swap_const(fn, old, new):
                    done.append((name, fn, old, new))
            pdl = ["pdl"] if hasattr(TritonKernel, "_enable_pdl_codegen") else []
            if pdl:
                stack.enter_context(mock.patch.object(TritonKernel, "_enable_pdl_codegen", staticmethod(hopper_pdl)))
            realize = ["realize"] if hasattr(ir, "is_cpu") else []
            if realize:
                stack.enter_context(mock.patch.object(ir, "is_cpu", lambda x: False))
            yield [name for name, *_ in done] + pdl + realize
    finally:
        for _, fn, old, new in done:
            _swap_const(fn, new, old)


@contextlib.contextmanager
def triton_codegen(gpu: bool = True):
    """Within: every torch.compile'd graph on the CPU is code-generated with inductor's Triton backend and then run
    eagerly. Yields a Codes list the generated wrapper modules (source text) are appended to, in compile order; for
    a graph with a backward, its backward comes right after its forward (compiled at once, not at the first
    backward). Dynamo's caches are reset on entry and exit, so no graph compiled outside is reused inside or the
    other way round. gpu: lower as for CUDA where inductor decides by device type (gpu_lowerings; the names of
    those it could set in `codes.gpu_lowerings`)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils
    from torch._inductor.graph import GraphLowering

    codes = Codes()

    def lines(self, wrapper_code):
        index = len(codes)
        codes.append(wrapper_code.value)
        codes.calls.append(0)
        codes.backward.append(bool(self.is_backward))
        codes.labels.append("")
        run = _Eager(self.module)

        def call(args):
            if not codes.labels[index]:
                # A backward graph is compiled right after its forward (force_non_lazy_backward_lowering).
                own = index > 0 and codes.backward[index] and not codes.backward[index - 1]
                codes.labels[index] = f"backward of {codes.labels[index - 1]}" if own else _caller()
            codes.calls[index] += 1
            out = run.run(*args)
            # The interpreter's environment still holds every value it kept, the outputs among them: references the
            # compiled code does not keep. A gradient output so referenced is not stealable by AccumulateGrad, which
            # then copies it (~66 copies per update counted between the graphs that no GPU run makes).
            run.env.clear()
            args.clear()
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        return types.SimpleNamespace(call=call, __file__="<triton_codegen>", runner=None)

    torch._dynamo.reset()
    patches = (
        inductor_config.patch(cpu_backend="triton", fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True),
        # Inductor keys its Triton cache by the backend's hash; there is no CPU Triton backend to ask.
        mock.patch.object(triton_utils, "triton_hash_with_backend", lambda: "triton_codegen"),
        mock.patch.object(GraphLowering, "_compile_to_module_lines", lines),
    )
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            codes.gpu_lowerings = stack.enter_context(gpu_lowerings()) if gpu else []
            yield codes
    finally:
        torch._dynamo.reset()


KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.triton\(", re.M)


def pdl_launches(code: str) -> int:
    """How many of the Triton launches in one generated module's `call` are of kernels generated for programmatic
    dependent launch (their triton_meta's launch_pdl)."""
    starts = [(m.group(1), m.start()) for m in KERNEL_DEF.finditer(code)]
    ends = [s for _, s in starts[1:]] + [code.find("def call(")] if starts else []
    pdl = {name for (name, a), b in zip(starts, ends, strict=True) if "'launch_pdl': True" in code[a:b]}
    body = code[code.find("def call(") :]
    return sum(len(re.findall(rf"^\s*{name}\.run\(", body, re.M)) for name in pdl)


def census(
    size: str,
    obs: str,
    precision: str,
    optimizer: str,
    updates: int = 1,
    dump: str | None = None,
    gpu: bool = True,
    combo: bool = False,
    pdl: bool = False,
    **overrides,
) -> dict:
    """The launches of one full update as the GPU's fast path makes them (compiled agent, deferred observe loop;
    `optimizer` compiled as in graphs mode, or eager as in compile mode), counted on the CPU: for each compiled
    graph its Triton kernels and extern calls (code generated here) times its calls per update, and the ATen ops
    between the graphs that launch a kernel on a GPU (step_kernels.kernel_ops). The first update compiles; the
    next `updates` are counted.
    dump: a folder to write each graph's generated code to (graphNN.py, in compile order). gpu: triton_codegen's.
    combo: compile with inductor's combo kernels (fast.COMBO_KERNELS); pdl: with programmatic dependent launch
    (fast.PDL; the same launches, counted in `pdl_kernels`). overrides: Config fields (the tests' shorter
    sequences)."""
    from torch.profiler import ProfilerActivity, profile

    from fastdreamer import fast
    from fastdreamer.train import update_step

    from .common import make_agent, make_config, random_batch
    from .step_kernels import kernel_ops, launches

    cfg = make_config(size, **overrides)
    agent, opt = make_agent(cfg, obs, "cpu")
    data = random_batch(agent, cfg.batch_size, cfg.batch_length + cfg.replay_context, "cpu")
    saved = fast.DEFER, fast.COMBO_KERNELS, fast.PDL
    fast.DEFER = True  # the GPU's observe loop (deferred weight gradients), here on the CPU
    fast.COMBO_KERNELS, fast.PDL = combo, pdl
    try:
        with triton_codegen(gpu) as codes:
            update = fast.make_update(update_step, agent, opt, "compile", precision)
            if optimizer == "compiled":  # as graphs mode does (CUDA only: it also captures)
                fast.compile_optimizer(opt)
            update(data)
            codes.calls[:] = [0] * len(codes)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(updates):
                    update(data)
            between = {name: n / updates for name, n in kernel_ops(prof.events()).items()}
    finally:
        fast.DEFER, fast.COMBO_KERNELS, fast.PDL = saved
    graphs = []
    for i, (code, calls, label) in enumerate(zip(codes, codes.calls, codes.labels, strict=True)):
        n = launches(code)
        graphs.append({"graph": label or "?", "calls": calls / updates, **n, "pdl": pdl_launches(code)})
        if dump:
            os.makedirs(dump, exist_ok=True)
            with open(os.path.join(dump, f"graph{i:02d}.py"), "w") as f:
                f.write(f"# {label}, {calls / updates:g} calls per update\n{code}")
    in_graphs = sum(g["calls"] * (g["fused"] + g["extern"] + g["aten"]) for g in graphs)
    return {
        "meta": {
            **{"size": size, "obs": obs, "precision": precision, "optimizer": optimizer, "combo_kernels": combo},
            "pdl": pdl,
            **overrides,
            **{"torch": torch.__version__, "batch_length": cfg.batch_length, "imag_length": cfg.imag_length},
            "gpu_lowerings": codes.gpu_lowerings,
            **provenance.git_info(),
        },
        "graphs": graphs,
        "between": dict(sorted(between.items(), key=lambda kv: -kv[1])),
        "in_graphs": in_graphs,
        "pdl_kernels": sum(g["calls"] * g["pdl"] for g in graphs),
        "total": in_graphs + sum(between.values()),
    }


def main(argv=None) -> dict:
    from fastdreamer import fast

    from .bench_block_gru import write_json
    from .common import size_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="debug", type=size_arg)
    p.add_argument("--obs", default="vector", choices=("vector", "image"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="the GPU's is bf16")
    p.add_argument(
        "--optimizer",
        default="compiled",
        choices=("compiled", "eager"),
        help="compiled: graphs mode's LaProp step; eager: compile mode's (what bench.profile_update profiles)",
    )
    p.add_argument("--updates", type=int, default=1, help="counted updates, after one that compiles")
    p.add_argument("--json", default=None, help="also write the census here")
    p.add_argument("--dump", default=None, help="a folder to write each graph's generated code to")
    p.add_argument(
        "--cpu-lowerings",
        action="store_true",
        help="keep inductor's lowering choices for a CPU device (cat, softmax) instead of CUDA's (gpu_lowerings)",
    )
    p.add_argument(
        "--combo-kernels", action="store_true", help="compile with inductor's combo kernels (FASTDREAMER_COMBO_KERNELS)"
    )
    p.add_argument("--pdl", action="store_true", help="compile with programmatic dependent launch (FASTDREAMER_PDL)")
    args = p.parse_args(argv)
    fast.check_precision(args.precision, "compile")
    out = census(
        args.size,
        args.obs,
        args.precision,
        args.optimizer,
        args.updates,
        args.dump,
        not args.cpu_lowerings,
        args.combo_kernels,
        args.pdl,
    )
    m = out["meta"]
    combo = ", combo kernels" if m["combo_kernels"] else ""
    combo += f", PDL ({out['pdl_kernels']:.0f} launches)" if m["pdl"] else ""
    print(
        f"gpu_codegen: one {m['size']} {m['obs']} update{combo}, {m['precision']}, optimizer {m['optimizer']}, torch "
        f"{m['torch']}, GPU lowerings {','.join(m['gpu_lowerings']) or 'none'}: {out['total']:.0f} launches "
        f"({out['in_graphs']:.0f} in compiled graphs, "
        f"{out['total'] - out['in_graphs']:.0f} between them)"
    )
    print(f"  {'calls':>6s} {'triton':>6s} {'extern':>6s} {'aten':>4s} {'launches':>8s}  graph")
    for g in sorted(out["graphs"], key=lambda g: -g["calls"] * (g["fused"] + g["extern"] + g["aten"])):
        total = g["calls"] * (g["fused"] + g["extern"] + g["aten"])
        print(f"  {g['calls']:6g} {g['fused']:6d} {g['extern']:6d} {g['aten']:4d} {total:8g}  {g['graph']}")
    print("  between the graphs (ATen ops that launch a kernel on a GPU), per update:")
    print("    " + ", ".join(f"{k} {v:g}" for k, v in out["between"].items()))
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
