"""Training curves of a run as a PNG: python scripts/training_curves.py runs/NAME/log.jsonl --out FILE.png

Each line of log.jsonl is one step (loss and its seg / geo / sem parts, learning rate, images per second); the
curves are smoothed over 50 steps so a 12-dataset batch's noise does not hide the trend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for log in args.log for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    steps = np.arange(len(rows))
    fig, (ax, lr) = plt.subplots(1, 2, figsize=(11, 3.8))
    kernel = np.ones(args.window) / args.window
    for key in ("loss", "seg", "geo", "sem"):
        values = np.array([r[key] for r in rows], float)
        smooth = np.convolve(values, kernel, mode="valid")
        ax.plot(steps[args.window - 1 :], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {args.window} steps)")
    ax.legend()
    lr.plot(steps, [r["lr"] for r in rows])
    lr.set_xlabel("step")
    lr.set_ylabel("learning rate")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(
        json.dumps({"steps": len(rows), "final_loss_mean": float(np.mean([r["loss"] for r in rows[-args.window :]]))})
    )


if __name__ == "__main__":
    main()
