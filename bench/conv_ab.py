"""A/B of the image encoder's and decoder's convolutions, fwd+bwd: memory layouts, the decoder's upsampling; cuDNN
autotuning per process.

Why: on an H200 (graphs mode, bf16) the 12m update with 64x64 images took ~35 ms against 14.8 ms with vector
observations; the ~20 ms difference is the conv encoder and decoder over B*T = 1024 images, whose ~0.84 TFLOP
(fwd+bwd) would take ~1.1 ms at the GPU's bf16 peak. This times that part alone: fastdreamer.nets' Encoder over the
B*T images and Decoder from (deter, stoch) features of the size's widths, the decoder's loss as Agent.loss computes
it, a stand-in for the encoder's (the mean of its tokens' squares: its backward is the encoder's backward), and
backward into every parameter and into deter and stoch, as the update runs it: the loss torch.compile'd
(dynamic=False) under the mode's autocast, and in graphs mode the whole step captured in a CUDA graph (fast._Graph).

Variants (each on a fresh agent from make_agent's seed, so every variant starts from the same parameters):
  base           as the trainer runs today
  channels_last  the encoder's and decoder's conv weights in torch.channels_last, and each conv's input converted to
                 it (a forward pre-hook, here only). Most activations already are: the encoder's NCHW view of uint8
                 HWC images has strides (H*W, 1, W, 1), which suggest channels_last even at C = 1, and a conv with a
                 channels_last input gives a channels_last output (cuDNN, oneDNN, and the fake-tensor trace inductor
                 follows); the decoder's (x0 + x1).permute(0, 3, 1, 2) is channels_last at 12m (at debug size,
                 where depth / bspace = 1, x0 keeps sp0's block-major order and it is NCHW). What stays NCHW is the
                 weights, which are then converted at every call (and their gradients back). A product change would
                 be the Conv weights made channels_last at init (fastdreamer/nets.py Conv), nothing else.
  upsample       the decoder's upsampling convs in the reference's form (nets.UpConv.reference: repeat each pixel
                 2 x 2, then the 5 x 5 conv) where base computes them at the input's resolution, as a 3 x 3 conv to
                 4x the channels and a pixel shuffle (nets.UpConv: 36% of the multiply-adds, no 4x upsampled input
                 in either pass). The same function of the same parameters, rounded otherwise. The conv inputs
                 printed are the UpConvs' own (before the upsampling, in either form).
  inductor_cl    (not in the default list) inductor's own layout optimization forced on (force_layout_optimization):
                 inductor's heuristic leaves it off for this model on CUDA (all convolutions have <= 64 channels at
                 12m, "too small", and the decoder's output conv has 2 * out <= in channels); a product change would
                 be one config patch where fast.compile_agent compiles agent.loss
--cudnn-benchmark: torch.backends.cudnn.benchmark = True for the whole process (cuDNN times its algorithms per shape
and keeps the fastest; by default it picks by heuristics; in graphs mode it times them at the warmups before capture,
whose choice the graph keeps). A process flag, not a variant: cuDNN's v8 API caches one plan per convolution shape
and thread, with no benchmark field in its key, and looks there before it reads the flag, so after a heuristic
variant has run every shape, a benchmark variant in the same process would reuse its plans and time the same thing.
So the benchmark figures are a second process's (on the same machine, right after), and their rows say so.
Before timing, each variant's loss and every gradient (encoder and decoder parameters, deter, stoch) are compared
with base's from the same inputs, each within its bound (CHECK_REL, or NOISE_MARGIN times base's own rounding error
from eager fp32 where that is larger); a failed check prints FAIL and the variant is not timed. Then the variants are
timed alternately, round by round (these machines are noisy): per variant the median of the rounds' medians, the
rounds' range, ratio = base's time / the variant's (above 1: faster), and TFLOP/s from the FLOPs of one eager
fwd+bwd of base (FlopCounterMode; upsample multiplies more for the same result, and its TFLOP/s counts base's).
Each conv's input layout in an eager forward is printed too: where inductor's layout optimization is off (CUDA,
here) it fixes each conv's input to the strides of its trace, which follows eager's rules.
The JSON is rewritten after every result ("complete": false until the end), so a timeout keeps the finished rows.

  python -m bench.conv_ab --device cuda --size 12m --mode graphs --json bench/results/conv_ab_12m.json
  python -m bench.conv_ab --device cuda --size 12m --mode graphs --cudnn-benchmark \
      --json bench/results/conv_ab_12m_benchmark.json

CPU caveat: cudnn.benchmark does nothing on a CPU, and inductor on a CPU
with oneDNN always converts convolutions to channels_last itself (decide_layout_opt), so the layouts meet there too;
a CPU run proves the script end to end and the checks, its times say nothing about a GPU.
"""

from __future__ import annotations

import functools
import statistics
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastdreamer import fast
from fastdreamer.agent import image_recon_loss

from .__main__ import meta
from .bench_block_gru import write_json
from .common import OBS, ab_parser, ab_run, make_agent, random_batch, rel_err, sync, timeit

# name: (channels_last weights and conv inputs, inductor's layout optimization forced on, the decoder's sub-pixel convs)
VARIANTS = {
    "base": (False, False, True),
    "channels_last": (True, False, True),
    "upsample": (False, False, False),
    "inductor_cl": (False, True, True),
}
DEFAULT_VARIANTS = ("base", "channels_last", "upsample")
# A variant against base, from the same parameters and inputs: the relative error (in norm) of the loss and of each
# gradient, bounded per tensor by max(CHECK_REL, NOISE_MARGIN * base's own relative error from an eager fp32
# reference with TF32 off). The variants compute the same sums by other algorithms and layouts, so they differ by
# roundings only. fp32 (on a CPU, or CUDA with cuDNN's TF32 off): reassociation; seen 1.7e-6 at most, compiled against
# eager at 12m on the CPU. tf32 (CUDA fp32 convs: torch.backends.cudnn.allow_tf32 is on by default): inputs rounded
# to 10 mantissa bits (2^-11), ~1e-3 after the 8 convs and their backward. bf16 (autocast): every conv's inputs and
# output rounded to 8 bits, and here some gradients sum many terms that nearly cancel: measured at 12m on the CPU
# (B2 x T4), compiled bf16 against eager bf16 (other fusions, so other roundings), up to 1.3e-1 on
# encoder.convs.0.weight (its inputs are zero-mean noise), 3.1e-2 on encoder.convs.1.weight, ~1e-2 on the decoder's;
# each within 1.2x of the compiled one's own error from fp32. So a flat bf16 bound is either blind or fails sound
# variants: the noise term scales it per tensor. NOISE_MARGIN 3: two roundings each within e of the truth are within
# 2e of each other (the triangle inequality), and the variant's own may be 1.5x base's. A wrong gradient (a
# transposed layout, a lost term, one 10% off) is 0.1 or more: caught on every tensor whose bf16 noise is under 3%
# (the test holds a 1.1x gradient failing), and in fp32 on all of them.
NOISE_MARGIN = 3.0
# base itself against the eager fp32 truth: a wrong base (finite, but off by more than any rounding) would widen every
# bound with its own error, so past this relative error in norm on any tensor it FAILs and nothing is timed.
BASE_REL_CAP = 0.25
CHECK_REL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2}


def image_loss(encoder, decoder, image: torch.Tensor, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
    """image (B, T, H, W, C) uint8, deter (B, T, D), stoch (B, T, S*C) -> the scalar loss of the image part."""
    tokens = encoder({"image": image})  # (B, T, E)
    recon = decoder(deter, stoch)["image"]  # (B, T, H, W, C) in [0, 1]
    return image_recon_loss(recon, image).mean() + tokens.float().square().mean()


def _channels_last_input(conv, args):
    return (args[0].contiguous(memory_format=torch.channels_last),)


def to_channels_last(*modules: nn.Module) -> None:
    """The modules' 4-d parameters (conv weights) in channels_last, and every conv's input converted to it."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                conv.register_forward_pre_hook(_channels_last_input)


def conv_layouts(agent, inputs: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The memory layout of each conv's input in one eager forward (no grad): nchw, cl (channels_last), any (both:
    one channel or 1x1) or other; per module, in call order."""

    def layout(x):
        nchw, cl = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
        return "any" if nchw and cl else "nchw" if nchw else "cl" if cl else "other"

    seen = {"encoder": [], "decoder": []}
    hooks = [
        conv.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(layout(args[0])))
        for name in seen
        for conv in getattr(agent, name).modules()
        if isinstance(conv, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            image_loss(agent.encoder, agent.decoder, inputs["image"], inputs["deter"], inputs["stoch"])
    finally:
        for h in hooks:
            h.remove()
    return seen


def reference(agent, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """(FLOPs, loss and gradients) of one eager fp32 fwd+bwd of image_loss, cuDNN's TF32 off: FlopCounterMode's count
    (convolutions and matmuls) and the check's yardstick of rounding noise. Leaves no gradient behind."""
    deter, stoch = (inputs[k].detach().requires_grad_() for k in ("deter", "stoch"))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with FlopCounterMode(display=False) as counter:
            loss = image_loss(agent.encoder, agent.decoder, inputs["image"], deter, stoch)
            loss.backward()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    truth = gradients(agent, {"loss": loss.detach(), "input/deter": deter.grad, "input/stoch": stoch.grad})
    for p in agent.parameters():
        p.grad = None
    return counter.get_total_flops(), truth


def make_step(agent, variant: str, mode: str, precision: str, device: torch.device):
    """inputs -> {"loss", "input/deter", "input/stoch"}: one fwd+bwd of image_loss in `mode` with `variant`'s layout;
    the parameters' gradients are left in p.grad (set anew each call, as update_step's zero_grad does). Graphs mode:
    the first call captures, every call replays, and the outputs are the graph's static buffers."""
    channels_last, layout_opt, subpixel = VARIANTS[variant]
    agent.decoder.use_subpixel(subpixel)
    if channels_last:
        to_channels_last(agent.encoder, agent.decoder)
    options = {"force_layout_optimization": True} if layout_opt else None
    # Dynamo guards on strides and on the backend: a variant with other strides (channels_last) or other inductor
    # options (inductor_cl) compiles its own graphs.
    loss_fn = torch.compile(functools.partial(image_loss, agent.encoder, agent.decoder), dynamic=False, options=options)
    params = [*agent.encoder.parameters(), *agent.decoder.parameters()]

    def step(x):
        for p in params:
            p.grad = None
        deter, stoch = x["deter"].detach().requires_grad_(), x["stoch"].detach().requires_grad_()
        with fast.autocast(device, mode, precision):
            loss = loss_fn(x["image"], deter, stoch)
            loss.backward()
        return {"loss": loss.detach(), "input/deter": deter.grad, "input/stoch": stoch.grad}

    if mode == "compile":
        return step
    holder: list[fast._Graph] = []

    def graphed(x):
        if not holder:
            holder.append(fast._Graph(step, x))
        return holder[0](x)

    return graphed


def gradients(agent, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the loss and every gradient one step left: the step's outputs and the encoder's and decoder's
    parameter gradients (None for a parameter without one, which compare counts as missing)."""
    got = {k: v.detach().float().clone() for k, v in out.items() if v is not None}
    for name in ("encoder", "decoder"):
        for n, p in getattr(agent, name).named_parameters():
            if p.grad is not None:
                got[f"{name}.{n}"] = p.grad.detach().float().clone()
    return got


def check_bounds(base: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], floor: float) -> dict[str, float]:
    """Per tensor of base: max(floor, NOISE_MARGIN * its relative error from the fp32 truth)."""
    return {n: max(floor, NOISE_MARGIN * rel_err(b, truth[n])) for n, b in base.items()}


def compare(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], bounds: dict[str, float]
) -> tuple[bool, str, float]:
    """(ok, the name of the tensor nearest its bound or past it, its relative error in norm): ok if every tensor of
    want is in got and within its bound. A missing tensor is an infinite error; a NaN fails."""
    errs = {n: rel_err(got[n], w) if n in got else float("inf") for n, w in want.items()}
    worst = max(errs, key=lambda n: (errs[n] != errs[n], errs[n] / bounds[n]))  # a NaN first
    return all(errs[n] < bounds[n] for n in want), worst, errs[worst]


def check_floor(precision: str, device: torch.device) -> tuple[str, float]:
    """The name and value of the CHECK_REL floor for `precision` on `device` (fp32 convs on CUDA run in TF32 unless
    torch.backends.cudnn.allow_tf32 is off)."""
    key = precision
    if precision == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        key = "tf32"
    return key, CHECK_REL[key]


def main(argv=None) -> dict:
    p = ab_parser(__doc__.splitlines()[0], 10, "fwd+bwd")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark on for the whole process (see the module docstring: not a variant)",
    )
    p.set_defaults(obs="image")
    args = p.parse_args(argv)
    if args.obs != "image":
        raise SystemExit("conv_ab: it times the image encoder and decoder; --obs image only")
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"conv_ab: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    variants = ["base", *[v for v in dict.fromkeys(variants) if v != "base"]]  # base: the check's and ratios' reference
    device, mode, precision, cfg = ab_run("conv_ab", args)
    if device.type == "cpu":
        fast.tune_cpu_allocator()
    B, T = cfg.batch_size, cfg.batch_length
    floor_name, floor = check_floor(precision, device)
    info = meta(args, device)
    for key in ("fan_out", "defer"):  # the observe loop's switches: nothing to do with this benchmark
        info.pop(key, None)
    info.update(
        command=" ".join(["python -m bench.conv_ab", *(sys.argv[1:] if argv is None else argv)]),
        mode=mode,
        precision=precision,
        images=B * T,
        batch_size=B,
        batch_length=T,
        variants=variants,
        rounds=args.rounds,
        repeat=args.repeat,
        check_floor={floor_name: floor},
        noise_margin=NOISE_MARGIN,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=args.cudnn_benchmark,
    )
    out = {"complete": False, "meta": info, "rows": []}
    save = (lambda: write_json(args.json, out)) if args.json else (lambda: None)
    shape = "x".join(str(s) for s in OBS["image"].obs["image"][0])  # H x W x C
    cudnn = f", cuDNN {info['cudnn']}" if info["cudnn"] else ""
    print(
        f"conv_ab: {info['device']}, torch {info['torch']}{cudnn}, size {args.size}, {mode} {precision}, "
        f"{B * T} images {shape} (B{B} x T{T}), cudnn.benchmark {'on' if args.cudnn_benchmark else 'off'}"
    )
    if device.type == "cpu":
        print("  note: cudnn.benchmark does nothing on a CPU, and inductor makes CPU convolutions channels_last itself")

    # Every variant compiles its own forward and backward graphs: past dynamo's recompile limit (8 by default) a
    # function silently runs eagerly, and its times would be eager ones.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    steps, rows, want = {}, {}, None
    try:
        for v in variants:
            row = rows[v] = {"variant": v, "cudnn_benchmark": args.cudnn_benchmark, "ok": False}
            out["rows"].append(row)
            try:
                agent, _ = make_agent(cfg, "image", device)
                if want is None:
                    data = random_batch(agent, B, T, device)
                    classes = agent.rssm.classes
                    inputs = {
                        "image": data["image"],  # (B, T, H, W, C) uint8
                        "deter": data["deter"].float(),  # (B, T, D)
                        "stoch": torch.nn.functional.one_hot(data["stoch"].long(), classes).flatten(-2).float(),
                    }
                    flops, truth = reference(agent, inputs)
                    info["flops"] = flops
                    print(f"  fwd+bwd: {flops / 1e9:.3f} GFLOP (FlopCounterMode, one eager fp32 call)")
                steps[v] = make_step(agent, v, mode, precision, device)
                layouts = conv_layouts(agent, inputs)
                row["conv_inputs"] = layouts
                got = gradients(agent, steps[v](inputs))  # compiles (and in graphs mode captures) first
                sync(device)
            except Exception as e:  # noqa: BLE001 (a variant that cannot run is a FAIL row; the others still run)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  check {v:13s} FAIL: {row['error']}")
                steps.pop(v, None)
                save()
                if want is None:
                    break  # base: no reference to check against
                continue
            where = "  ".join(f"{k} {','.join(ls)}" for k, ls in layouts.items())
            if want is None:
                want, bounds = got, check_bounds(got, truth, floor)
                ok, name, err = compare(got, truth, {n: BASE_REL_CAP for n in truth})
                row.update(ok=ok, loss=float(got["loss"]), noise_worst=name, noise_worst_rel=err)
                print(
                    f"  check {v:13s} the reference; vs eager fp32: worst rel {err:.2e} ({name}, cap "
                    f"{BASE_REL_CAP}) {'ok' if ok else 'FAIL'}; conv inputs (eager): {where}"
                )
                if not ok:
                    steps.clear()
                    save()
                    break
            else:
                ok, name, err = compare(got, want, bounds)
                row.update(ok=ok, check_worst=name, check_worst_rel=err, check_bound=bounds[name])
                row["loss"] = float(got["loss"])
                print(
                    f"  check {v:13s} vs base: worst rel {err:.2e} ({name}, bound {bounds[name]:.2g}) "
                    f"{'ok' if ok else 'FAIL'}; conv inputs (eager): {where}"
                )
                if not ok:
                    steps.pop(v)
            save()
        if "base" not in steps:
            print("  base did not run or failed its check: nothing timed")
            return out
        times: dict[str, list[float]] = {v: [] for v in steps}
        for r in range(args.rounds):
            for v, step in steps.items():
                times[v].append(timeit(lambda step=step: step(inputs), device, warmup=2, repeat=args.repeat)[0])
                base = statistics.median(times["base"])
                med = statistics.median(times[v])
                rows[v].update(
                    median_ms=med,
                    rounds_ms=list(times[v]),
                    range_ms=[min(times[v]), max(times[v])],
                    ratio=base / med,
                    tflops=flops / (med * 1e9),
                )
                save()
            print(f"  round {r}: " + ", ".join(f"{v} {times[v][-1]:.3f} ms" for v in steps))
        for v, row in rows.items():
            if v in times:
                lo, hi = row["range_ms"]
                print(
                    f"  {v:13s} {row['median_ms']:9.3f} ms  (rounds {lo:.3f}-{hi:.3f})  x{row['ratio']:.2f}  "
                    f"{row['tflops']:.3f} TFLOP/s"
                )
            else:
                print(f"  {v:13s} FAIL, not timed")
        out["complete"] = True
        save()
        return out
    finally:
        torch.backends.cudnn.benchmark = flag


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("complete") and all(r.get("ok") for r in result["rows"]) else 1)
