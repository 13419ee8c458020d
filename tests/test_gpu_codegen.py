"""bench/gpu_codegen.py: the Triton kernels a GPU would launch, generated on the CPU, and the graphs run eagerly."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from bench.gpu_codegen import pdl_launches, triton_codegen
from bench.step_kernels import LAUNCH, launches, step_code


def kernel_names(code: str) -> list[str]:
    """The Triton kernels a generated module's `call` launches, in order."""
    return [m.group(2) for line in code.splitlines() if (m := LAUNCH.match(line)) and m.group(2)]


def masked_matmul(x, w, k):
    return (torch.tanh((x * k[:, None]) @ w) * 2).sum()


def test_triton_codegen_generates_triton_kernels_and_runs_the_graphs_eagerly():
    """Within the context a compiled function gets Triton code (forward and, at once, backward; C++ outside it) and
    still computes what eager does, forward and gradient (the same ATen ops: float32 reassociation at most, 1e-6),
    with each graph's calls counted. The mask multiplies an operand of a matmul, which takes no prologue: on a GPU
    it is a kernel of its own, so the forward launches the mask, the matmul and the tanh with its sum."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen, requires_grad=True)
    w, k = torch.randn(32, 8, generator=gen), (torch.rand(16, generator=gen) < 0.7).float()
    want = masked_matmul(x, w, k)
    (want_grad,) = torch.autograd.grad(want, x)
    with triton_codegen() as codes:
        fn = torch.compile(masked_matmul, dynamic=False)
        for _ in range(2):
            got = fn(x, w, k)
            (got_grad,) = torch.autograd.grad(got, x)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    assert len(codes) == 2 and codes.backward == [False, True] and codes.calls == [2, 2], codes.calls
    assert codes.labels[1] == f"backward of {codes.labels[0]}"
    assert launches(codes[0]) == {"fused": 2, "extern": 1, "aten": 0}, launches(codes[0])
    # the CI's torch has them all
    assert codes.gpu_lowerings == ["cat", "online_softmax", "combo_kernels", "pdl", "realize"]
    names = kernel_names(codes[0])
    assert all(n.startswith("triton_") for n in names) and len(names) == 2, names
    # Outside, the CPU's own code again (no graph compiled inside is reused).
    _, after = run_and_get_code(torch.compile(masked_matmul, dynamic=False), x.detach(), w, k)
    assert "cpp_fused" in after[0] and "triton_" not in after[0]


# The GPU's observe step (deferred gradients, the fast modes' flags on CUDA), bf16, at debug size: launches of its
# forward and backward graphs as the Triton code generator makes them with the GPU's lowerings (torch 2.13: 10
# Triton + 5 matmuls forward, 11 + 5 backward; 15 + 5 and 12 + 5 before session 25: the steps now pack only their
# own factors, build the block layer's input in one kernel, take their deter masked by the step before, and get a
# tap per site; 11 + 5 forward before session 26 recomputed the gate pre-activations in the backward). A graph
# break inside the step splits it into several graphs, and the masks of its carried state become kernels of their
# own (torch 2.11 did that on the H200, session 21: 6 per step, a mask alone each).
STEP_LAUNCHES = 31
MASK_ALONE = re.compile(r"^triton_poi_fused__to_copy_bitwise_not_mul_unsqueeze(_view)?_\d+$")


def test_the_gpus_observe_step_is_two_graphs_with_its_masks_fused():
    codes = step_code("merge", "debug", "cpu", "bf16", "triton")
    assert len(codes) == 2, f"the step compiled to {len(codes)} graphs (a graph break?)"
    counts = [launches(c) for c in codes]
    assert sum(sum(c.values()) for c in counts) <= STEP_LAUNCHES, counts
    names = [n for c in codes for n in kernel_names(c)]
    assert not [n for n in names if MASK_ALONE.match(n)], names


def test_the_census_of_a_gpu_update_counts_each_graph_by_its_calls():
    """bench.gpu_codegen.census at debug size with short sequences: the observe step's forward and backward graphs
    are called once per step, every other graph once per update, and the total is the graphs' launches times their
    calls plus the ops between the graphs. Between them no slice_backward (a graph break in the step left the taps'
    slices to eager autograd: a zero-fill, a copy and an add per site and step on the H200; bench/LOG.md, session
    21), and no more copies than a real run makes: the census's interpreter once kept the graphs' outputs, and
    AccumulateGrad then copied each parameter's gradient instead of taking it (~66 per update; session 25)."""
    from bench.gpu_codegen import census

    T = 6
    out = census("debug", "vector", "bf16", "compiled", batch_length=T, imag_length=3)
    by_label = {g["graph"]: g for g in out["graphs"]}
    (step,) = [g for label, g in by_label.items() if label.endswith(" obs_step") and "backward" not in label]
    assert step["calls"] == T and by_label[f"backward of {step['graph']}"]["calls"] == T, out["graphs"]
    others = [g for g in out["graphs"] if "obs_step" not in g["graph"]]
    assert others and all(g["calls"] == 1 for g in others), others
    in_graphs = sum(g["calls"] * (g["fused"] + g["extern"] + g["aten"]) for g in out["graphs"])
    assert out["in_graphs"] == in_graphs and out["total"] == in_graphs + sum(out["between"].values())
    assert "slice_backward" not in out["between"], out["between"]
    assert out["between"].get("copy_", 0) < 10, out["between"]  # 66 with the outputs kept


def sin_cos_cat(a, b):
    return torch.cat([a.sin(), b.cos()], 1) * 2


def codes_both_ways(fn, *args) -> dict[bool, str]:
    """fn compiled with the GPU's lowerings and with the CPU's ({gpu: its one generated module}), each checked
    against eager fn (the same ATen ops: float32 reassociation at most)."""
    out = {}
    for gpu in (True, False):
        with triton_codegen(gpu) as codes:
            got = torch.compile(fn, dynamic=False)(*args)
        torch.testing.assert_close(got, fn(*args), rtol=1e-6, atol=1e-6)
        (out[gpu],) = codes
    return out


def test_gpu_lowerings_fuse_a_cat_as_a_gpu_does_and_are_undone_after():
    """With the GPU's lowerings a cat of two pointwise results and its pointwise user are one kernel (a GPU's
    pointwise cat); with the CPU's, a copy kernel per input and one for the user. After the context inductor's own
    functions have their constants back."""
    import torch._inductor.lowering as lowering

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4, generator=gen), torch.randn(8, 5, generator=gen)
    counts = {gpu: launches(code) for gpu, code in codes_both_ways(sin_cos_cat, a, b).items()}
    assert counts == {True: {"fused": 1, "extern": 0, "aten": 0}, False: {"fused": 3, "extern": 0, "aten": 0}}
    assert "cpu" in lowering.lowerings[torch.ops.aten.cat.default].__wrapped__.__code__.co_consts


def outer_and_sum(x, y):
    s = torch.sigmoid(x)
    return s[:, :, None] * y[:, None, :], s.sum(1)


def test_gpu_lowerings_recompute_a_reused_sigmoid_as_a_gpu_does_and_are_undone_after():
    """A sigmoid read by two kernels (a broadcast product and a row sum): on a CUDA device inductor recomputes it in
    each (it keeps a reused value only past realize_reads_threshold reads or a large expression), on a CPU device it
    stores it once and both read it (ir.is_cpu's heuristics). The census answers as for CUDA; outside it the CPU's
    rule again."""
    import torch._inductor.ir as ir

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
    codes = codes_both_ways(outer_and_sum, x, y)
    assert all(launches(c) == {"fused": 2, "extern": 0, "aten": 0} for c in codes.values())
    assert {gpu: code.count("tl.sigmoid(") for gpu, code in codes.items()} == {True: 2, False: 1}
    assert ir.is_cpu(torch.device("cpu"))


def test_block_inputs_compiled_are_the_values_of_the_eager_cat():
    """The core's block-layer input u_g = concat(deter_g, x) (block_gru.reference._block_inputs): compiled it is the
    sum of the zero-padded parts (what makes it one kernel in the observe step: test_the_gpus_observe_step...),
    eager the cat; the same values, cast to bf16 for the matmul too (bitwise but for a negative zero, which comes
    out +0: the same number)."""
    from fastdreamer.kernels.block_gru import reference

    def fn(blocks, x):
        u = reference._block_inputs(blocks * 2.0, torch.sigmoid(x) - 0.5)
        return u, u.bfloat16()

    gen = torch.Generator().manual_seed(5)
    blocks, x = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 7, generator=gen)
    blocks[0, 0, 0] = -0.0
    want = fn(blocks, x)
    assert want[0][0, 0, 0].signbit()  # eager: the cat keeps the -0
    with triton_codegen() as codes:
        got = torch.compile(fn, dynamic=False)(blocks, x)
    assert "constant_pad_nd" in " ".join(kernel_names(codes[0])), kernel_names(codes[0])  # the compiled branch ran
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
        assert torch.equal(
            g.abs().view(torch.int32 if g.dtype == torch.float32 else torch.int16),
            w.abs().view(torch.int32 if w.dtype == torch.float32 else torch.int16),
        )


def test_a_compiled_core_step_without_taps_joins_its_branch_norms_and_splits_its_block_layer():
    """Without taps (imagination, acting), a compiled core step normalises the three input branches as one (B, 3, K)
    tensor (reference._joint_branches: one reduction kernel where each branch's norm had its own and a fourth kernel
    joined them) and multiplies the deter blocks and x apart (reference._split_hidden: no operand u repeating x per
    block, no zero-padding kernel building it, and the hidden norm one kernel): two reductions in all. The values of
    the eager step (float32 reassociation at most); each part alone equals the eager form it replaces."""
    from fastdreamer.kernels.block_gru import reference

    gen = torch.Generator().manual_seed(3)
    w = reference.random_weights(48, 4, 24, 20, 5, gen)
    deter, stoch, action = torch.randn(7, 48, generator=gen), torch.randn(7, 20, generator=gen), torch.randn(7, 5)
    want = reference.step(deter, stoch, action, w)
    with torch.no_grad(), triton_codegen() as codes:
        got = torch.compile(reference.step, dynamic=False)(deter, stoch, action, w)
    names = kernel_names(codes[0])
    reductions = [n for n in names if n.startswith(("triton_red", "triton_per"))]
    assert len(reductions) == 2 and "stack" in reductions[0], reductions
    assert not [n for n in names if "constant_pad_nd" in n], names
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    joint = reference._joint_branches((deter, stoch, action), w, False, (None, None, None))
    apart = [reference._branch(x, *w[3 * i : 3 * i + 3], False) for i, x in enumerate((deter, stoch, action))]
    torch.testing.assert_close(joint, torch.cat(apart, -1), rtol=1e-6, atol=1e-7)
    u = reference._block_inputs(deter.view(7, 4, 12), joint)
    torch.testing.assert_close(
        reference._split_hidden(deter, joint, w, False),
        reference.block_linear(u, w.wh, w.bh),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ["chain", "viewed"])
def test_compiled_graphs_cast_a_weight_once_without_a_backward(name):
    """fast._compile's post-grad pass (_one_cast_each): under bf16 autocast a no-grad graph that multiplies by one
    weight at 4 unrolled steps casts it once, its 4 matmuls reading that one cast, where plain torch.compile writes a
    cast per step (AOTAutograd merges identical ops only in graphs with a backward; the rollout cast each weight at
    each of its 15 steps). Also when each step multiplies by a view of the weight made anew (`viewed`: the block
    GRU's weights in the rollout). The same values."""
    from fastdreamer import fast

    def chain(x, w):
        for _ in range(4):
            x = torch.tanh(x @ w)
        return x

    def viewed(x, w):  # the block GRU's weights: a view made anew at each step, then cast
        for _ in range(4):
            x = torch.tanh(x @ w.unsqueeze(0).view(w.shape))
        return x

    fn = {"chain": chain, "viewed": viewed}[name]
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen)
    operands, outs = {}, {}
    for mode, make in (("plain", lambda f: torch.compile(f, dynamic=False)), ("fast", fast._compile)):
        torch._dynamo.reset()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, cache_enabled=False), triton_codegen() as codes:
            outs[mode] = make(fn)(x, w)
        (code,) = codes
        mms = re.findall(r"extern_kernels\.mm\((\w+), (\w+),", code[code.find("def call(") :])
        operands[mode] = {b for _, b in mms}
        assert len(mms) == 4, mms
    torch._dynamo.reset()
    assert (len(operands["plain"]), len(operands["fast"])) == (4, 1), operands
    assert torch.equal(outs["plain"], outs["fast"])


def test_one_cast_each_keeps_one_cast_per_tensor_and_dtype():
    """_one_cast_each on a graph: the second bf16 cast of x becomes the first; a cast to another dtype and a cast
    of another tensor stay."""
    from fastdreamer import fast

    cast = torch.ops.prims.convert_element_type.default
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    a, b = (g.call_function(cast, (x, torch.bfloat16)) for _ in range(2))
    c, d = g.call_function(cast, (x, torch.float16)), g.call_function(cast, (y, torch.bfloat16))
    g.output((g.call_function(torch.ops.aten.add.Tensor, (a, b)), c, d))
    fast._one_cast_each(g)
    casts = [n for n in g.nodes if n.target is cast]
    assert casts == [a, c, d], casts
    (add,) = [n for n in g.nodes if n.target is torch.ops.aten.add.Tensor]
    assert add.args == (a, a)


def test_one_cast_each_merges_views_and_leaves_a_mutating_graph_alone():
    """Two unsqueezes of x with the same arguments become one, so their casts become one too; an unsqueeze on another
    dim stays; two clones of one view become one, but not two that the graph returns. A graph with a copy_ into an
    input is not touched at all."""
    from fastdreamer import fast

    cast, unsq = torch.ops.prims.convert_element_type.default, torch.ops.aten.unsqueeze.default
    clone = torch.ops.aten.clone.default

    def graph(mutate: bool) -> torch.fx.Graph:
        g = torch.fx.Graph()
        x = g.placeholder("x")
        views = [g.call_function(unsq, (x, d)) for d in (0, 0, 1)]
        casts = [g.call_function(cast, (v, torch.bfloat16)) for v in views]
        clones = [g.call_function(clone, (views[2],)) for _ in range(2)]
        added = g.call_function(torch.ops.aten.add.Tensor, tuple(clones))
        returned = [g.call_function(clone, (views[2],)) for _ in range(2)]  # outputs: they stay apart
        if mutate:
            g.call_function(torch.ops.aten.copy_.default, (x, x))
        used = [g.call_function(torch.ops.aten.neg.default, (c,)) for c in casts]
        g.output((*used, added, *returned))
        return g

    g = graph(mutate=False)
    fast._one_cast_each(g)
    assert [n.args[1] for n in g.nodes if n.target is unsq] == [0, 1]
    assert len([n for n in g.nodes if n.target is cast]) == 2
    assert len([n for n in g.nodes if n.target is clone]) == 3
    g = graph(mutate=True)
    before = [str(n) for n in g.nodes]
    fast._one_cast_each(g)
    assert [str(n) for n in g.nodes] == before


def test_a_compiled_linear_adds_its_bias_in_the_kernel_after_it():
    """nets.Linear compiled under bf16 autocast: the matmul without its bias, whose bf16 cast and add go into the
    next kernel (a SiLU here), so there is no cast kernel for the bias: 3 Triton kernels (x's cast, the weight's,
    the add with the SiLU) where the addmm took 4. Values: the eager layer's within bf16 rounding (the reference's
    bf16 Linear rounds after the matmul and after the bias; an addmm once), and without autocast within float32
    reassociation. (Without a backward inductor folds the add back into an addmm: the rollout keeps its addmms.)"""
    from fastdreamer.nets import Linear

    torch.manual_seed(0)
    lin = Linear(24, 16)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(8, 24)

    def fn(x):
        return F.silu(lin(x))

    for autocast, tol in ((True, 2e-2), (False, 1e-6)):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            want = fn(x)
            with triton_codegen() as codes:
                got = torch.compile(fn, dynamic=False)(x)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        if autocast:  # the forward graph of a training step (the heads' layers)
            assert launches(codes[0]) == {"fused": 3, "extern": 1, "aten": 0}, kernel_names(codes[0])
            assert "extern_kernels.mm(" in codes[0] and "addmm" not in codes[0]


def test_compiled_laprop_launches_do_not_grow_one_per_parameter():
    """The compiled LaProp step stacks three per-tensor norm lists (AGC's gradient and parameter norms, the update's
    for update_rms). Inductor wrote one copy kernel per tensor for each stack (3 x 79 of the 12m step's 249 Triton
    launches); fastdreamer::norms keeps each list's norms and stack one op. With 40 parameters the GPU's step must
    launch fewer kernels than there are parameters, and still equal the eager step."""
    from fastdreamer import fast
    from fastdreamer.optim import LaProp

    gen = torch.Generator().manual_seed(0)
    shapes = [(3 + i % 5, 2 + i % 3) for i in range(40)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    opts = []
    for compiled in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt = LaProp(params, lr=1e-2, warmup=0)
        if compiled:
            fast.compile_optimizer(opt)
            with triton_codegen() as codes:
                metrics = opt.step()
        else:
            metrics = opt.step()
        opts.append((params, metrics))
    (want, want_metrics), (got, got_metrics) = opts
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # as test_optim's compiled-step test: fused rounding
    for name in want_metrics:
        torch.testing.assert_close(got_metrics[name], want_metrics[name], rtol=1e-6, atol=0)
    (code,) = codes
    counts = launches(code)
    assert counts["fused"] + counts["extern"] + counts["aten"] < len(shapes), counts
    assert code.count("torch.ops.fastdreamer.norms") >= 3


def test_compiled_lambda_return_is_a_few_kernels_at_any_length():
    """As a loop over the steps, the replay returns of a 64-step batch compiled to one kernel per step (61 on a GPU);
    unrolled into products they are a cumprod and a reduction whatever the length."""
    from fastdreamer.agent import lambda_return

    gen = torch.Generator().manual_seed(0)
    rew, boot = torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)
    term, last = torch.rand(16, 64, generator=gen) < 0.05, torch.rand(16, 64, generator=gen) < 0.05
    torch._dynamo.reset()
    with triton_codegen() as codes:
        got = torch.compile(lambda *a: lambda_return(*a, 0.997, 0.95), dynamic=False)(last, term, rew, boot)
    torch.testing.assert_close(got, lambda_return(last, term, rew, boot, 0.997, 0.95), rtol=0, atol=0)
    (code,) = codes
    assert launches(code)["fused"] <= 4, launches(code)


def sin_times_cos(a, b):
    return a.sin() @ b.cos()


def test_pdl_switch_reaches_inductor_and_the_census_shows_a_hoppers_code(monkeypatch):
    """FASTDREAMER_PDL=1 compiles the fast modes' units with inductor's programmatic dependent launch: every Triton
    kernel of the graph is generated to wait for its predecessor's writes and launched with launch_pdl (the code a
    GPU of compute capability 9 gets; the census stands in for one), the matmul is not, and the result is eager's.
    Off (the default), no kernel is."""
    from fastdreamer import fast

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(16, 4, generator=gen)
    for pdl in (False, True):
        monkeypatch.setattr(fast, "PDL", pdl)
        with triton_codegen() as codes:
            out = fast._compile(sin_times_cos)(a, b)
        torch.testing.assert_close(out, sin_times_cos(a, b), rtol=1e-6, atol=1e-6)
        (code,) = codes
        assert launches(code) == {"fused": 2, "extern": 1, "aten": 0}
        assert pdl_launches(code) == (2 if pdl else 0)
        assert code.count("tl.extra.cuda.gdc_wait()") == (2 if pdl else 0)
    with triton_codegen(gpu=False) as codes:  # without the census's Hopper: a CPU device gets none
        fast._compile(sin_times_cos)(a, b)
    assert pdl_launches(codes[0]) == 0


def test_combo_kernels_switch_reaches_inductor_and_the_census_counts_it(monkeypatch):
    """FASTDREAMER_COMBO_KERNELS=1 compiles the fast modes' units with inductor's combo kernels: the two independent
    pointwise kernels feeding a matmul become one launch on a GPU (the census groups them as a GPU would), and the
    result is still eager's."""
    from fastdreamer import fast

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(16, 4, generator=gen)
    counts = {}
    for combo in (False, True):
        monkeypatch.setattr(fast, "COMBO_KERNELS", combo)
        with triton_codegen() as codes:
            out = fast._compile(sin_times_cos)(a, b)
        torch.testing.assert_close(out, sin_times_cos(a, b), rtol=1e-6, atol=1e-6)
        (counts[combo],) = [launches(c) for c in codes]
    assert counts == {False: {"fused": 2, "extern": 1, "aten": 0}, True: {"fused": 1, "extern": 1, "aten": 0}}
