"""Plot learning curves from runs' metrics.jsonl: `python -m fastdreamer.plot RUN [RUN ...] --out curve.png`.
Needs matplotlib (`pip install -e ".[plot]"`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_curve(logdir: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in (logdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash, or a run still writing it
            continue
        if isinstance(row, dict) and key in row:
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--key", default="episode/return")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastdreamer: error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        sys.exit(2)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"fastdreamer: error: {run} has no metrics.jsonl", file=sys.stderr)
            sys.exit(2)
        steps, values = read_curve(run, args.key)
        ax.plot(steps, values, label=run.name, linewidth=1.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel(args.key)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
    except OSError as e:
        print(f"fastdreamer: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(args.out)


if __name__ == "__main__":
    main()
