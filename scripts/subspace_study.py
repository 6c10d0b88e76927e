"""The LoRA paper's §7.2 and §7.3 on the demo task, from Table 6's W_q + W_v adapters (docs/experiments.md).

Every number for each of the sweep's three seeds (the tables: mean ± standard deviation over them).

§7.2 (Figures 3 and 4): the subspace similarity φ(i, j) of the A matrices' right-singular vectors between r = 8
and r = 64 of the same seed, between r = 64 of two seeds (0-1, 1-2, 2-0), and between random Gaussian matrices
of the same shapes (the baseline the paper draws); at the first, middle (the paper's choice: its 48th of 96
layers) and last block.
How far A moved from its initialisation, ‖A − A₀‖_F / ‖A₀‖_F, says whether φ can be more than the random
baseline: A₀ comes from a one-step run of the same configuration at lr 1e-12 (the trainer's own initialisation,
written to --work once). As a column of ours, not the paper's, the same φ(1, 1) on the updates ΔW = s·B·A
(their top right-singular vector), which also sees what B learned.

§7.3 (Table 7): the amplification factor ‖ΔW‖_F / ‖Uᵀ·W·V‖_F of W_q at r = 4, 8, 64 (U, V: ΔW's top-r singular
vectors, W the base weight), per block and as the median over blocks; and, as the paper's Table 7 compares,
‖Uᵀ·W·V‖_F for U, V from ΔW, from W's own top-r singular vectors, and random orthonormal ones.

    python scripts/subspace_study.py                    # after `scripts/experiments.sh table6`
    python scripts/subspace_study.py --sweep runs/experiments/demo/table6 --out docs/experiments/demo
    python scripts/subspace_study.py --report docs/experiments/demo/subspace.csv   # the tables again

Writes OUT/subspace.csv (every number below, per module) and docs/images/subspace-demo.png; prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = "q_proj+v_proj"
RANKS, SEEDS = (4, 8, 64), (0, 1, 2)


def run_dir(sweep: Path, r: int, seed: int) -> Path:
    return sweep / f"r={r},target_modules={TARGETS},seed={seed}"


def initial_adapter(sweep: Path, work: Path, r: int, seed: int, loratune: str) -> Path:
    """The adapter as the trainer initialises it for run (r, seed): one step at lr 1e-12 of the same config."""
    out = work / f"init-r{r}-s{seed}"
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        sets = ["train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "train.exact_match=false"]
        sets += ["data.retain=null", f"output_dir={out}"]
        command = [loratune, "train", str(run_dir(sweep, r, seed) / "config.yaml"), "--no-progress", "--overwrite"]
        command += [part for s in sets for part in ("--set", s)]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return out / "adapter"


def factors(adapter: Path) -> dict:
    from loratune.adapters.convert import read_any
    from loratune.adapters.factors import adapter_factors

    read = read_any(str(adapter))
    return adapter_factors(read.config, read.tensors, source=str(adapter))[0]


def top_direction(f) -> torch.Tensor:
    """The top right-singular vector of ΔW = s·B·A (in the input space)."""
    from loratune.adapters.factors import low_rank_svd

    _, _, Vh = low_rank_svd(f.scaling * f.B.double(), f.A.double())
    return Vh[:1]


def blocks_shown(layers: list[int]) -> list[tuple[int | None, str]]:
    """The tables' columns: the first, middle (the paper's choice: its 48th of 96 layers) and last block, and the
    median over blocks (None)."""
    shown = [layers[0], layers[len(layers) // 2], layers[-1]]
    return [*[(layer, f"block {layer}") for layer in shown], (None, "median of blocks")]


def tables(rows: list[dict], where: list[tuple[int | None, str]]) -> str:
    """The markdown tables docs/experiments.md shows: each cell the mean ± standard deviation over the seeds of one
    block's value, or of each seed's median over the blocks."""

    def cell(kind: str, layer: int | None, key: str) -> str:
        per_seed = []
        for seed in SEEDS:
            mine = [r for r in rows if r["kind"] == kind and int(r["seed"]) == seed]
            values = [float(r[key]) for r in mine if layer is None or int(r["layer"]) == layer]
            per_seed.append(statistics.median(values))
        mean, spread = statistics.mean(per_seed), statistics.stdev(per_seed)
        # three significant digits of the mean, the spread to the same decimal; none where the seeds agree (W)
        decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
        return f"{mean:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if spread else "")

    phi = [
        ("phi11_r8_r64", "φ(1,1), r=8 vs r=64 (same seed)"),
        ("phi88_r8_r64", "φ(8,8), r=8 vs r=64"),
        ("phi11_r64_seeds", "φ(1,1), r=64 of two seeds"),
        ("phi_mean_r64_seeds", "φ(64,64), r=64 of two seeds"),
        ("phi11_random", "φ(1,1), Gaussian 8 × k vs 64 × k"),
        ("phi88_random", "φ(8,8), Gaussian"),
        ("update_phi11_r8_r64", "ΔW's top direction, r=8 vs r=64"),
        ("A_moved_r8", "‖A − A₀‖/‖A₀‖, r=8"),
        ("A_moved_r64", "‖A − A₀‖/‖A₀‖, r=64"),
    ]
    kinds = ("q_proj", "v_proj")
    lines = ["| quantity | " + " | ".join(f"{kind} {name}" for kind in kinds for _, name in where) + " |"]
    lines.append("|---" * (1 + len(kinds) * len(where)) + "|")
    for key, name in phi:
        lines.append(f"| {name} | " + " | ".join(cell(kind, layer, key) for kind in kinds for layer, _ in where) + " |")
    lines += ["", "| W_q's amplification factor | " + " | ".join(name for _, name in where) + " |"]
    lines.append("|---" * (1 + len(where)) + "|")
    for r in RANKS:
        lines.append(
            f"| r = {r} | " + " | ".join(cell("q_proj", layer, f"amplification_r{r}") for layer, _ in where) + " |"
        )
    lines += ["", "| W_q (the paper's Table 7) | " + " | ".join(name for _, name in where) + " |"]
    lines.append("|---" * (1 + len(where)) + "|")
    table7 = [("‖W‖_F", "norm_W")]
    for r in (4, 64):
        table7 += [(f"‖ΔW‖_F, r={r}", f"norm_dW_r{r}"), (f"‖UᵀWV‖_F, U, V from ΔW, r={r}", f"proj_dW_r{r}")]
        table7 += [(f"‖UᵀWV‖_F, W's own top-{r}", f"proj_W_r{r}"), (f"‖UᵀWV‖_F, random, r={r}", f"proj_random_r{r}")]
    for name, key in table7:
        lines.append(f"| {name} | " + " | ".join(cell("q_proj", layer, key) for layer, _ in where) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "runs/experiments/demo/table6")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/experiments/demo/subspace")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/experiments/demo")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/subspace-demo.png")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--loratune", default=str(Path(sys.executable).parent / "loratune"))
    parser.add_argument("--report", type=Path, help="print the tables from this subspace.csv (nothing is computed)")
    args = parser.parse_args()
    if args.report:
        with args.report.open() as handle:
            rows = list(csv.DictReader(handle))
        layers = sorted({int(r["layer"]) for r in rows})
        print(tables(rows, blocks_shown(layers)))
        return

    from loratune.analysis.similarity import amplification, subspace_similarity
    from loratune.cli.rank_tools import weights

    trained = {(r, s): factors(run_dir(args.sweep, r, s) / "adapter") for r in RANKS for s in SEEDS}
    initial = {key: factors(initial_adapter(args.sweep, args.work, *key, args.loratune)) for key in trained}
    base = weights(args.model)
    paths = sorted(trained[(8, 0)], key=lambda p: (int(p.split(".layers.")[1].split(".")[0]), p))
    layers = sorted({int(p.split(".layers.")[1].split(".")[0]) for p in paths})
    where = blocks_shown(layers)
    shown = [layer for layer, _ in where if layer is not None]
    generator, projections = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    rows, heat = [], {}
    for path in paths:
        layer, kind = int(path.split(".layers.")[1].split(".")[0]), path.rsplit(".", 1)[-1]
        weight = base.get(f"{path}.weight").double() if kind == "q_proj" else None
        singular = torch.linalg.svdvals(weight) if weight is not None else None
        for seed in SEEDS:
            other = SEEDS[(SEEDS.index(seed) + 1) % len(SEEDS)]  # seed pairs 0-1, 1-2, 2-0
            a8, a64, a64b = trained[(8, seed)][path], trained[(64, seed)][path], trained[(64, other)][path]
            width = a8.A.shape[1]
            gauss8, gauss64 = torch.randn(8, width, generator=generator), torch.randn(64, width, generator=generator)
            phi_8_64 = subspace_similarity(a8.A, a64.A)
            phi_seeds = subspace_similarity(a64.A, a64b.A)
            phi_random = subspace_similarity(gauss8, gauss64)
            row = {
                "module": path,
                "layer": layer,
                "kind": kind,
                "seed": seed,
                "other_seed": other,
                "phi11_r8_r64": float(phi_8_64[0, 0]),
                "phi88_r8_r64": float(phi_8_64[7, 7]),
                "phi11_r64_seeds": float(phi_seeds[0, 0]),
                "phi_mean_r64_seeds": float(phi_seeds[63, 63]),
                "phi11_random": float(phi_random[0, 0]),
                "phi88_random": float(phi_random[7, 7]),
                "update_phi11_r8_r64": float((top_direction(a8) @ top_direction(a64).T).square().sum()),
            }
            for r in RANKS:
                start = initial[(r, seed)][path].A.double()
                row[f"A_moved_r{r}"] = float((trained[(r, seed)][path].A.double() - start).norm() / start.norm())
            if weight is not None:
                row["norm_W"] = float(weight.norm())
                for r in RANKS:
                    f = trained[(r, seed)][path]
                    row[f"amplification_r{r}"] = amplification(f, weight)
                    row[f"norm_dW_r{r}"] = float((f.scaling * f.B.double() @ f.A.double()).norm())
                    # Table 7's other rows: ‖UᵀWV‖ with U, V W's own top-r singular vectors, and random orthonormal
                    row[f"proj_W_r{r}"] = float(singular[:r].square().sum().sqrt())
                    U = torch.linalg.qr(torch.randn(weight.shape[0], r, generator=projections, dtype=torch.float64))[0]
                    V = torch.linalg.qr(torch.randn(weight.shape[1], r, generator=projections, dtype=torch.float64))[0]
                    row[f"proj_random_r{r}"] = float((U.T @ weight @ V).norm())
                    row[f"proj_dW_r{r}"] = row[f"norm_dW_r{r}"] / row[f"amplification_r{r}"]
            rows.append(row)
            if layer in shown and seed == SEEDS[0]:
                heat[(layer, kind)] = (phi_8_64, phi_seeds, phi_random)

    args.out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order (q_proj rows add amplification)
    temporary = args.out / "subspace.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(args.out / "subspace.csv")
    print(tables(rows, where))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(heat), 3, figsize=(12, 2.2 * len(heat)), squeeze=False, layout="constrained")
    titles = ("r=8 vs r=64 (seed 0)", "r=64, seed 0 vs seed 1", "Gaussian 8 vs 64")
    for row_axes, ((layer, kind), maps) in zip(axes, sorted(heat.items(), key=lambda x: (x[0][1], x[0][0]))):
        for axis, title, phi in zip(row_axes, titles, maps):
            shown_phi = phi[:8, :64] if phi.shape[0] >= 8 else phi
            extent = (0.5, shown_phi.shape[1] + 0.5, 0.5, shown_phi.shape[0] + 0.5)  # i, j from 1
            image = axis.imshow(
                shown_phi.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower", extent=extent
            )
            axis.set_title(f"{kind}, block {layer}: {title}", fontsize=9)
            axis.set_xlabel("j")
            axis.set_ylabel("i")
    figure.colorbar(image, ax=axes, shrink=0.5, label="φ(i, j)")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.plot.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=80)
    temporary.replace(args.plot)
    print(f"\nwrote {args.out / 'subspace.csv'} and {args.plot}")


if __name__ == "__main__":
    main()
