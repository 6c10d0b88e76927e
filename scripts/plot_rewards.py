"""Plot a DPO or GRPO run's reward curve from its ``metrics.jsonl`` into ``rewards.png`` (in the run directory unless
``--out`` says otherwise).

    python scripts/plot_rewards.py runs/grpo            # reward per step and per function, held-out reward
    python scripts/plot_rewards.py runs/dpo             # implicit rewards, margins, held-out accuracy

GRPO: the training reward (the weighted sum) and each function's mean per step, and ``eval_reward`` of the
held-out prompts at each evaluation. DPO: ``rewards/chosen``, ``rewards/rejected`` and ``rewards/margins`` per
step, and ``eval_rewards/accuracies`` on the held-out pairs (right axis).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(run: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if any("reward" in r for r in records):  # GRPO
        ax.plot(*series(records, "reward"), label="reward (weighted sum)", linewidth=2)
        functions = sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")})
        for key in functions:
            ax.plot(*series(records, key), label=key[len("rewards/") : -len("/mean")], alpha=0.6)
        ax.plot(*series(records, "eval_reward"), "o-", color="black", label="held-out reward (greedy)")
        ax.set_ylabel("reward")
        title = "GRPO"
    elif any("rewards/margins" in r for r in records):  # DPO
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            ax.plot(*series(records, key), label=key)
        ax.set_ylabel("implicit reward β·log(π/π_ref)")
        right = ax.twinx()
        right.plot(*series(records, "eval_rewards/accuracies"), "o-", color="black", label="held-out accuracy")
        right.set_ylim(0, 1.05)
        right.set_ylabel("held-out reward accuracy")
        right.legend(loc="lower right")
        title = "DPO"
    else:
        sys.exit(f"{run / 'metrics.jsonl'} holds no DPO or GRPO rewards")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: {run.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="the image to write (default: RUN/rewards.png)")
    args = parser.parse_args()
    if not (args.run / "metrics.jsonl").is_file():
        sys.exit(f"{args.run} holds no metrics.jsonl; give a run directory")
    print(plot(args.run, args.out or args.run / "rewards.png"))


if __name__ == "__main__":
    main()
