"""Figures for the rank tools: energy curves E(k) per module type, and the φ(i, j) heat map (LoRA paper
Figure 3 style). PNG, written to a temporary name and renamed, with loratune in its Software tag."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from loratune.outputs import write_atomic

SOFTWARE_TAG = "loratune"


def _module_type(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return leaf if not leaf.isdigit() else name


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG tagged with loratune's Software tag (to a temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_atomic(path, lambda temp: fig.savefig(temp, format="png", metadata={"Software": SOFTWARE_TAG}))
    plt.close(fig)


def plot_energy(report: dict, path: str | Path, title: str = "") -> Path:
    """E(k) against k for every module of a ``rank`` report, one colour per module type (thin lines: modules,
    thick: their mean), thresholds as dashed lines. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[list[float]]] = defaultdict(list)
    for module in report["modules"]:
        groups[_module_type(module["name"])].append(module["energy"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (kind, curves) in enumerate(sorted(groups.items())):
        color = colors[index % len(colors)]
        for curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.15, linewidth=0.8)
        length = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
        ax.plot(range(1, length + 1), mean, color=color, linewidth=2, label=f"{kind} ({len(curves)})")
    for threshold in report.get("recommended_rank", {}):
        ax.axhline(float(threshold), color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("rank k")
    ax.set_ylabel("energy kept E(k)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "share of each update's energy kept by its top-k singular directions", fontsize=10)
    save_figure(fig, Path(path))
    return Path(path)


def plot_similarity(report: dict, path: str | Path, labels: tuple[str, str] = ("A", "B"), limit: int = 6) -> Path:
    """Heat maps of φ(i, j) for the first ``limit`` modules of a ``compare`` report, i down, j across.
    Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = report["modules"][:limit]
    fig, axes = plt.subplots(
        1, len(modules), figsize=(2.4 * len(modules) + 1.2, 3), dpi=100, squeeze=False, layout="constrained"
    )
    image = None
    for ax, module in zip(axes[0], modules):
        image = ax.imshow(
            module["phi"],
            vmin=0,
            vmax=1,
            cmap="viridis",
            origin="upper",
            aspect="auto",
            extent=(0.5, module["r_b"] + 0.5, module["r_a"] + 0.5, 0.5),
        )
        ax.set_title(module["name"].replace("model.layers.", "L"), fontsize=8)
        ax.set_xlabel(f"j ({labels[1]})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"i ({labels[0]})", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="φ(i, j)")
    write_atomic(Path(path), lambda temp: fig.savefig(temp, format="png", metadata={"Software": SOFTWARE_TAG}))
    plt.close(fig)
    return Path(path)
