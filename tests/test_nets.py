"""The decoder's upsampling convs computed at the input's resolution (nets.UpConv) against the reference's
repeat-then-conv (nets.UpConv.reference): values and every gradient, eager and compiled, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdreamer import nets


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def conv_and_input(cin: int, cout: int, kernel: int, shape: tuple[int, int, int], seed: int, dtype=torch.float32):
    """An UpConv with a random (not zero) bias and an input (N, cin, H, W), both drawn from `seed`."""
    torch.manual_seed(seed)
    conv = nets.UpConv(cin, cout, kernel).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    n, h, w = shape
    return conv, torch.randn(n, cin, h, w, dtype=dtype, requires_grad=True)


def output_and_grads(fn, conv: nets.Conv, x: torch.Tensor, grad_out: torch.Tensor):
    y = fn(x)
    return (y, *torch.autograd.grad(y, (x, conv.weight, conv.bias), grad_out))


# (cin, cout, kernel, (N, H, W)): every odd kernel width the tap map handles differently (1: one tap, 3: reach 1 with
# a zero tap per phase, 5: the decoder's, 7: reach 2), odd channel counts, non-square and 1 x 1 inputs, batch 1 and 3.
CASES = [
    (3, 5, 5, (3, 4, 7)),
    (6, 2, 5, (1, 1, 1)),
    (4, 3, 3, (3, 5, 5)),
    (2, 7, 7, (1, 6, 3)),
    (5, 4, 1, (3, 3, 2)),
]


@pytest.mark.parametrize("cin,cout,kernel,shape", CASES)
def test_upsampled_conv_is_the_repeat_then_conv_with_every_gradient(cin, cout, kernel, shape):
    # fp64: the two forms sum the same products in other orders (the phase weights are sums of up to 4 taps), so
    # they agree to ~1e-15 relative; 1e-12 fails any wrong tap, phase order or boundary by orders of magnitude.
    conv, x = conv_and_input(cin, cout, kernel, shape, seed=kernel * 100 + cin, dtype=torch.float64)
    grad_out = torch.randn(shape[0], cout, 2 * shape[1], 2 * shape[2], dtype=torch.float64)
    got = output_and_grads(conv, conv, x, grad_out)
    want = output_and_grads(conv.reference, conv, x, grad_out)
    for name, g, w in zip(("output", "input", "weight", "bias"), got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < 1e-12, (name, rel_err(g, w))


def test_upsampled_conv_compiled_is_the_repeat_then_conv():
    # fp32: inductor's C++ code reorders the sums of the phase weights and of the weight gradients' transposed map;
    # 1e-5 relative in norm is ~100x fp32's rounding over these few-hundred-term sums.
    conv, x = conv_and_input(4, 3, 5, (2, 5, 6), seed=1)
    grad_out = torch.randn(2, 3, 10, 12)
    got = output_and_grads(torch.compile(conv, dynamic=False, fullgraph=True), conv, x, grad_out)
    want = output_and_grads(conv.reference, conv, x, grad_out)
    for name, g, w in zip(("output", "input", "weight", "bias"), got, want):
        assert rel_err(g, w) < 1e-5, (name, rel_err(g, w))


def test_upsampled_conv_gives_its_conv_no_computed_bias():
    """The traced sub-pixel conv calls conv2d without a bias and adds its own after the shuffle: torch 2.11's inductor
    (the H200's) cannot lower a conv whose bias is a computed float32 tensor (the phases' repeated bias: `View`'s
    freeze_layout, a LoweringException), so compile and graphs failed on image observations at fp32 there."""
    convs = []

    def backend(gm, example_inputs):
        convs.extend(n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target))
        return gm.forward

    conv, x = conv_and_input(4, 3, 5, (2, 5, 6), seed=3)
    got = torch.compile(conv, backend=backend, fullgraph=True)(x)
    assert rel_err(got, conv.reference(x)) < 1e-5  # the bound of the compiled test above
    assert len(convs) == 1, convs
    (node,) = convs
    bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    assert bias is None, node.format_node()


def test_upsampled_conv_under_bf16_autocast_rounds_like_the_reference():
    # Under bf16 autocast both forms round the input and the weights to bf16 (8 bits: 2^-9 relative each) and the
    # output once; the phase weights are sums of up to 4 weights, rounded once after the sum. So each form is off the
    # fp64 truth by a few 2^-9 in norm; measured 2.8e-3 (sub-pixel) and 2.9e-3 (reference) here. Bound: 2^-7 (~2.7x
    # that), where a wrong phase weight is O(1).
    conv, x = conv_and_input(8, 6, 5, (3, 6, 5), seed=2)
    truth = conv.double().reference(x.detach().double())
    conv.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = conv(x), conv.reference(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got, truth) < 2**-7, rel_err(got, truth)
    assert rel_err(want, truth) < 2**-7, rel_err(want, truth)


def test_phase_taps_read_the_pixels_the_upsampled_conv_reads():
    # kernel 5: even outputs read source offsets (-1, -1, 0, 0, 1), odd ones (-1, 0, 0, 1, 1) (written out by hand).
    taps = nets.phase_taps(5)
    assert taps.shape == (2, 3, 5)
    assert taps.argmax(1).tolist() == [[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]]
    assert (taps.sum(1) == 1).all()  # every tap reads exactly one source pixel
    assert "taps" not in nets.UpConv(2, 3, 5).state_dict()  # a derived constant: checkpoints stay as they were


def test_an_even_conv_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel 4 must be odd"):
        nets.UpConv(2, 3, 4)


def image_decoder(depth: int = 4) -> nets.Decoder:
    spec = {"image": ((32, 48, 3), torch.uint8)}
    return nets.Decoder(spec, deter=32, stoch_flat=16, units=16, layers=1, depth=depth)


def test_the_decoder_upsamples_by_sub_pixel_convs_and_decodes_what_the_reference_form_does():
    torch.manual_seed(3)
    dec = image_decoder()
    assert all(m.subpixel for m in dec.modules() if isinstance(m, nets.UpConv))  # the product's path
    for p in dec.parameters():  # biases too, so a wrong bias phase shows
        torch.nn.init.normal_(p, std=0.3)
    deter = torch.randn(2, 3, 32, requires_grad=True)
    stoch = torch.randn(2, 3, 16, requires_grad=True)
    grad_out = torch.rand(2, 3, 32, 48, 3)
    got = output_and_grads_decoder(dec, deter, stoch, grad_out)
    dec.use_subpixel(False)
    want = output_and_grads_decoder(dec, deter, stoch, grad_out)
    assert got.keys() == want.keys()
    # fp32, 4 convs deep: ~1e-7 per rounding; 1e-5 is ~100x that and far under any misplaced pixel or phase.
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, (name, rel_err(got[name], want[name]))


def output_and_grads_decoder(dec, deter, stoch, grad_out) -> dict[str, torch.Tensor]:
    image = dec(deter, stoch)["image"]
    params = dict(dec.named_parameters())
    grads = torch.autograd.grad(image, (deter, stoch, *params.values()), grad_out)
    return {"image": image, "deter": grads[0], "stoch": grads[1], **dict(zip(params, grads[2:]))}


def test_the_decoder_multiplies_a_third_of_the_reference_forms_conv_flops():
    # At kernel 5 each upsampling conv is 4 phases x 3 x 3 taps at the input's resolution against 25 taps at 4x the
    # pixels: 36/100 of the conv FLOPs, forward and backward.
    dec = image_decoder(depth=8)
    deter, stoch = torch.randn(4, 32, requires_grad=True), torch.randn(4, 16)
    flops = {}
    for subpixel in (True, False):
        dec.use_subpixel(subpixel)
        with FlopCounterMode(display=False) as counter:
            dec(deter, stoch)["image"].sum().backward()
        counts = counter.get_flop_counts()["Global"]
        flops[subpixel] = sum(n for op, n in counts.items() if "convolution" in str(op))
    assert flops[True] == pytest.approx(0.36 * flops[False], rel=1e-9), flops


def test_the_sub_pixel_decoder_is_the_same_function_compiled():
    torch.manual_seed(4)
    dec = image_decoder()
    deter, stoch = torch.randn(2, 32), torch.randn(2, 16)
    want = dec(deter, stoch)["image"]
    got = torch.compile(dec, dynamic=False)(deter, stoch)["image"]
    # fp32: as the eager-compiled comparison of the conv alone.
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
