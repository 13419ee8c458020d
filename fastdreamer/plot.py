"""Plot learning curves from runs' metrics.jsonl: `python -m fastdreamer.plot RUN [RUN ...] --out curve.png`.
Needs matplotlib (`pip install -e ".[plot]"`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import Parser


def read_rows(logdir: Path) -> list[dict]:
    rows = []
    for line in (logdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash, or a run still writing it
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_curve(logdir: Path, key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in read_rows(logdir) if key in row]
    return [row["step"] for row in rows], [float("nan") if row[key] is None else row[key] for row in rows]  # null


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="fastdreamer.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="image to write: curve.png (or .pdf, .svg)")
    parser.add_argument("--key", default="episode/return")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plotting needs matplotlib: pip install -e '.[plot]'")
    if args.out.is_dir() or not args.out.suffix:
        fail(f"--out {args.out} must name an image file, such as curve.png")
    curves = {}
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            fail(f"{run} has no metrics.jsonl")
        curves[run] = read_curve(run, args.key)
    if not any(steps for steps, _ in curves.values()):
        logged = sorted({k for row in read_rows(args.runs[0]) for k in row} - {"step"})
        fail(f"no run logged {args.key!r}; {args.runs[0]}'s metrics.jsonl has {', '.join(logged)}")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    formats = fig.canvas.get_supported_filetypes()
    if args.out.suffix.lstrip(".").lower() not in formats:
        fail(f"--out {args.out}: matplotlib writes {', '.join(sorted(formats))}, not {args.out.suffix}")
    for run, (steps, values) in curves.items():
        # Markers where a run logged the key a few times (eval/return once at the end): a lone point has no line.
        ax.plot(steps, values, label=run.name, linewidth=1.2, marker="o" if len(steps) <= 20 else None, markersize=3)
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
        fail(str(e), 1)
    print(args.out)


def fail(message: str, code: int = 2) -> None:
    print(f"fastdreamer: error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
