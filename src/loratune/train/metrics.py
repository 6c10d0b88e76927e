"""What a run reports: ``metrics.jsonl`` (one object per logged step or evaluation), optional TensorBoard,
and ``loss.png`` with the train and eval curves."""

from __future__ import annotations

import json
from pathlib import Path

from loratune.errors import ConfigError
from loratune.outputs import record_published, start_log, write_atomic, write_text_atomic


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed at once, so a crash loses nothing logged)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        start_log(self.path)  # recorded once, it only grows
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            record_published(run_dir / "tensorboard", appended=True)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run repeats them)."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            record_published(self.path, appended=True)

    def log(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class NoMetrics:
    """The metrics log of a process that does not write the run (ranks other than 0)."""

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def records(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


def plot_losses(records: list[dict], path: Path) -> None:
    """Draw train loss (and eval loss when present) against step into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
