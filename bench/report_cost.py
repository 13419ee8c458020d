"""What the open-loop report (fastdreamer/report.py) costs against the update it sits between: one report, the same
with what the trainer adds (the metrics' copy to the host, each video's GIF encoding: report_written) and one eager
update (the reference path) on the same random replay batch of a size, timed alternately in one process, and the
written report's share of the training time at the default --report-every of 300 s. The batch's true frames are
noise, which a GIF encodes slower than real frames: for images this is the costly end.

  python -m bench.report_cost --size 1m --obs vector --batch 8 --length 32 --json bench/results/report_cost_cpu_1m.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fastdreamer.logger import encode_gif, to_host
from fastdreamer.report import openloop
from fastdreamer.train import update_step

from .__main__ import meta
from .bench_block_gru import write_json
from .common import (
    OBS,
    count_arg,
    device_arg,
    json_arg,
    make_agent,
    make_config,
    random_batch,
    size_arg,
    threads_arg,
    timeit,
)

REPORT_EVERY_S = 300.0  # Config.report_every's default


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--size", default="1m", type=size_arg)
    p.add_argument("--obs", default="vector", choices=sorted(OBS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rounds", type=count_arg, default=3)
    p.add_argument("--repeat", type=count_arg, default=3, help="timed calls per variant and round")
    p.add_argument("--threads", type=threads_arg, default=0)
    p.add_argument("--json", default=None, type=json_arg)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("report_cost: --device cuda asked for, but CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args.size, batch_size=args.batch, batch_length=args.length)
    agent, opt = make_agent(cfg, args.obs, device)
    data = random_batch(agent, args.batch, args.length + cfg.replay_context, device)

    def written():  # what Trainer.report and Logger.video add: the metrics' host copy and the GIFs' encoding
        metrics, videos = openloop(agent, data, cfg.report_context, seed=0)
        to_host(metrics)
        for frames in videos.values():
            encode_gif(frames.cpu().numpy())

    calls = {
        "report": lambda: openloop(agent, data, cfg.report_context, seed=0),
        "report_written": written,
        "update": lambda: update_step(agent, opt, data),
    }
    info = meta(args, device)
    for key in ("fan_out", "defer"):  # the observe loop's switches: the eager update here has no fast path
        info.pop(key, None)
    info.update(
        command=" ".join(["python -m bench.report_cost", *sys.argv[1:]]),
        batch=args.batch,
        length=args.length,
        rounds=args.rounds,
        repeat=args.repeat,
    )
    print(
        f"report_cost: {info['device']}, torch {info['torch']}, size {args.size}, {args.obs}, "
        f"B{args.batch}xT{args.length}"
    )
    times = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, fn in calls.items():
            times[k].append(timeit(fn, device, warmup=1, repeat=args.repeat)[0])
    rows = []
    for k, ts in times.items():
        rows.append(
            {"component": k, "mode": "eager", "median_ms": statistics.median(ts), "spread_ms": max(ts) - min(ts)}
        )
        print(f"  {k:14s} {rows[-1]['median_ms']:9.2f} ms  (rounds spread {rows[-1]['spread_ms']:.2f})")
    report, update = rows[1]["median_ms"], rows[2]["median_ms"]
    share = report / (REPORT_EVERY_S * 1e3)
    print(
        f"  report with its writing = {report / update:.2f} updates; every {REPORT_EVERY_S:.0f} s it takes "
        f"{share:.2e} of the time"
    )
    out = {"meta": info, "rows": rows, "report_per_update": report / update, "share_at_300s": share}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
