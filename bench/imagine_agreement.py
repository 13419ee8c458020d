"""How far a fast-mode imagination rollout follows the eager one from the same noise, step by step.

`python -m bench` checks a bf16 rollout by the fraction of elements outside tolerance (bench/common.py). On the
first H200 run that fraction was 47% for compile, graphs and graphs_triton alike at 12m, against 0.05% measured on
the CPU at debug and 1m. Two causes give that number: the fast path draws other random numbers than eager (a
broken check of the fast path), or bf16 rounding tips one of the 32 latent draws per start and step and the
trajectories part (a check that cannot hold at this size). This tool tells them apart: per imagined step, the
fraction of starts whose sampled action and whose latent state differ from eager's, in fp32 and in bf16. Equal
random numbers show as agreement at step 0 that decays; other random numbers as disagreement from step 0 on.

  python -m bench.imagine_agreement --device cuda --size 12m --precisions fp32 bf16 --modes compile graphs
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch._inductor.config as inductor_config

from fastdreamer import fast

from .bench_block_gru import write_json
from .common import device_arg, json_arg, make_agent, make_config, rollout_starts, size_arg


def agreement(got, want, deter: int) -> dict[str, list[float]]:
    """Per step h: fraction of starts whose action differs, whose latent (stoch part of the feature) differs, and
    the largest deter difference relative to the reference's scale."""
    (gf, ga), (wf, wa) = got, want
    act = (ga.float() != wa.float()).any(-1).float().mean(0)
    stoch = (gf[..., deter:].float() != wf[..., deter:].float()).any(-1).float().mean(0)
    scale = wf[..., :deter].float().abs().amax((0, 2)).clamp_min(1e-6)
    dmax = (gf[..., :deter].float() - wf[..., :deter].float()).abs().amax((0, 2)) / scale
    return {"action_differs": act.tolist(), "stoch_differs": stoch.tolist(), "deter_maxrel": dmax.tolist()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--size", default="12m", type=size_arg)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--modes", nargs="+", default=["compile"], choices=("compile", "graphs"))
    p.add_argument("--starts", type=int, default=1024, help="rollout starts (B*T in an update)")
    p.add_argument("--json", default=None, type=json_arg)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # eager stays the fp32 reference
    cfg = make_config(args.size)
    results = []
    with inductor_config.patch(fallback_random=True):
        for precision in args.precisions:
            for mode in args.modes:
                agent, _ = make_agent(cfg, "vector", device)
                ref, _ = make_agent(cfg, "vector", device)
                deter, stoch = rollout_starts(agent, args.starts, device)
                imagine = fast.make_imagine(agent, mode, precision)
                torch.manual_seed(3)
                with fast.autocast(device, mode, precision):
                    want = ref.imagine(deter, stoch)
                torch.manual_seed(3)
                got = imagine(deter, stoch)
                row = {"precision": precision, "mode": mode, **agreement(got, want, agent.rssm.deter)}
                results.append(row)
                for key in ("action_differs", "stoch_differs", "deter_maxrel"):
                    cells = " ".join(f"{v:.3g}" for v in row[key])
                    print(f"{precision} {mode:8s} {key:15s} {cells}", flush=True)
                if args.json:  # after every row: a run cut by a timeout keeps what it finished
                    write_json(
                        args.json, {"size": args.size, "device": str(device), "starts": args.starts, "rows": results}
                    )


if __name__ == "__main__":
    sys.exit(main())
