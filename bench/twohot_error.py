"""The rounding error of the two-hot expected value (dists.twohot_pred) against float64, per form and per path.

Why: the bins reach 4.9e8, so an expected value that subtracts rounded probabilities (the form before session 12,
kept here as `subtracted`) has an absolute error of a probability's rounding (~2e-10 near 1/255) times the outer
bins, ~0.6 whatever the value; early in training every head is near uniform and the true values are ~1e-4. The
form in use (`pairs`) takes each mirrored pair's difference from the logits' difference. This measures both on the
same float32 logits against float64 (the subtracted form in float64 over the same logits):

  paths:  eager; compiled (torch.compile, inductor); compiled_fma (CPU only: inductor's C++ kernels with FMA
          contraction, -ffp-contract=fast, as GPU code is compiled); autocast (eager under bf16 autocast, as the
          fast modes run the loss: the subtracted form's matmul with the bins then ran in bf16)
  logits: N(c, s^2) per element with a per-row offset c ~ N(0, 9), for each scale s of --scales (small s: the
          near-uniform heads of early training; large s: peaked heads)

Per (form, path, scale): the worst absolute error, the worst error relative to the sum over pairs of
|(p_hi - p_lo) * b_hi| (the scale an accurate sum's error is proportional to; tests/test_dists.py bounds the pairs
form there by 2e-6), and the mean |value|. One table, and --json writes {"meta", "rows"}.

  python -m bench.twohot_error --device cpu --json bench/results/twohot_error_cpu.json
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch._inductor.config as inductor_config

from fastdreamer import dists

from .__main__ import meta
from .bench_block_gru import write_json
from .common import device_arg, json_arg

PATHS = ("eager", "compiled", "compiled_fma", "autocast")


def subtracted_pred(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """twohot_pred's form before session 12: subtracted rounded probabilities, then a matmul with the bins."""
    hi, lo = dists.mirrored_pairs(torch.softmax(logits.to(bins.dtype), -1), bins.shape[0])
    return (hi - lo) @ dists.mirrored_pairs(bins, bins.shape[0])[0]


def pair_terms(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The sum over mirrored pairs of |(p_hi - p_lo) * b_hi|, in float64."""
    hi, lo = dists.mirrored_pairs(torch.softmax(logits.double(), -1), bins.shape[0])
    return ((hi - lo).abs() * dists.mirrored_pairs(bins.double(), bins.shape[0])[0]).sum(-1)


FORMS = {"pairs": dists.twohot_pred, "subtracted": subtracted_pred}


def run_path(form: str, path: str, logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    fn = FORMS[form]
    if path == "eager":
        return fn(logits, bins)
    if path == "autocast":
        with torch.autocast(logits.device.type, dtype=torch.bfloat16):
            return fn(logits, bins)
    torch._dynamo.reset()  # each path compiles its own graph, under its own config
    patch = {"cpp.enable_floating_point_contract_flag": "fast"} if path == "compiled_fma" else {}
    with inductor_config.patch(patch):
        return torch.compile(fn, dynamic=False)(logits, bins)


def measure(device: torch.device, rows: int, scales: list[float], n: int, seed: int, paths=PATHS) -> list[dict]:
    bins = dists.twohot_bins(n, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for scale in scales:
        logits = torch.randn(rows, n, generator=gen, device=device) * scale
        logits = logits + torch.randn(rows, 1, generator=gen, device=device) * 3
        want = subtracted_pred(logits.double(), bins.double())  # exact enough in float64
        terms = pair_terms(logits, bins)
        for form in FORMS:
            for path in paths:
                if path == "compiled_fma" and device.type != "cpu":
                    continue
                err = (run_path(form, path, logits, bins).double() - want).abs()
                out.append(
                    {
                        "form": form,
                        "path": path,
                        "scale": scale,
                        "n": n,
                        "rows": rows,
                        "max_abs_err": err.max().item(),
                        "max_err_over_terms": (err / terms.clamp_min(1e-30)).max().item(),
                        "mean_abs_value": want.abs().mean().item(),
                    }
                )
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'form':<11} {'path':<13} {'scale':>7} {'|value|':>9} {'max abs err':>12} {'max err/terms':>14}"]
    for r in rows:
        lines.append(
            f"{r['form']:<11} {r['path']:<13} {r['scale']:>7.0e} {r['mean_abs_value']:>9.3g} "
            f"{r['max_abs_err']:>12.3g} {r['max_err_over_terms']:>14.3g}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--scales", default="1e-6,1e-4,1e-2,1,10", help="comma-separated logit scales s")
    p.add_argument("--bins", type=int, default=255)
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, type=json_arg)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("twohot_error: --device cuda asked for, but CUDA is not available here")
    try:
        scales = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        raise SystemExit(f"twohot_error: --scales must be comma-separated numbers, got {args.scales!r}") from None
    paths = [x for x in args.paths.split(",") if x]
    if bad := [x for x in paths if x not in PATHS]:
        raise SystemExit(f"twohot_error: unknown path(s) {bad}; choose from {list(PATHS)}")
    if args.rows < 1 or args.bins < 3 or not scales:
        raise SystemExit("twohot_error: --rows >= 1, --bins >= 3 and at least one scale are needed")
    info = meta(argparse.Namespace(size=None, obs=None), device)
    info["command"] = " ".join(["python -m bench.twohot_error", *(sys.argv[1:] if argv is None else argv)])
    rows = measure(device, args.rows, scales, args.bins, args.seed, paths)
    print(f"twohot_error: {info['device']}, torch {info['torch']}, {args.rows} rows x {args.bins} bins")
    print(table(rows))
    out = {"meta": info, "rows": rows}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
