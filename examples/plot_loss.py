#!/usr/bin/env python
"""Draw the loss curve of a run from its --log-json file (one JSON object per iteration) as a PNG.

    python examples/plot_loss.py runs/quickstart/log.jsonl runs/quickstart/loss.png
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(records, out_path, title="megalite training"):
    """Training loss per iteration (and its running mean), evaluation loss where present."""
    iterations = [r["iteration"] for r in records]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(iterations, losses, color="#9ab8d8", linewidth=0.8, label="train loss")
    ax.plot(iterations, smooth, color="#1f5fa0", linewidth=1.8, label=f"train loss ({window}-iteration mean)")
    evals = [(r["iteration"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="#d0602a", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_json")
    parser.add_argument("out_png")
    parser.add_argument("--title", default="megalite training")
    args = parser.parse_args(argv)
    records = read_log(args.log_json)
    if not records:
        print(f"plot_loss.py: error: {args.log_json} has no records", file=sys.stderr)
        return 2
    print(plot(records, args.out_png, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
