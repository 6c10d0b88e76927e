"""Mixing two adapters on smollm2-135m: loratune ``mix_adapters`` vs PEFT ``add_weighted_adapter``.

Two r=8 all-linear adapters (``--adapter`` or a random one, plus a random one), weights 0.7 and −0.3.
``cat`` and ``svd`` (rank 8) through both libraries; times alternate, medians over ``--reps``. The error of
each result is ‖mixed delta − exact weighted sum‖ / ‖exact weighted sum‖ over all modules (float64).

    python bench/mix_vs_peft.py --adapter runs/demo/adapter
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import loratune
from common import random_adapter
from loratune.adapters import read_adapter
from loratune.adapters.factors import adapter_factors
from loratune.adapters.mix import mix_adapters

WEIGHTS = [0.7, -0.3]


def exact_sum(inputs) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for (config, tensors), weight in zip(inputs, WEIGHTS):
        for path, f in adapter_factors(config, tensors)[0].items():
            total[path] = total.get(path, 0) + weight * f.scaling * (f.B.double() @ f.A.double())
    return total


def relative_error(config, tensors, exact) -> float:
    factors = adapter_factors(config, tensors)[0]
    num = sum(float((f.scaling * (f.B.double() @ f.A.double()) - exact[p]).norm() ** 2) for p, f in factors.items())
    return (num / sum(float(e.norm() ** 2) for e in exact.values())) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import peft

    work = Path(tempfile.mkdtemp(prefix="mix-bench-"))
    first = Path(args.adapter) if args.adapter else random_adapter(args.model, work / "a", seed=1)
    second = random_adapter(args.model, work / "b", seed=2)
    inputs = [read_adapter(first), read_adapter(second)]
    exact = exact_sum(inputs)

    base, _ = loratune.load_model(args.model, dtype="fp32", device="cpu")
    model = peft.PeftModel.from_pretrained(base, str(first), adapter_name="a")
    model.load_adapter(str(second), adapter_name="b")

    print("| method | loratune s | PEFT s | speed-up | loratune rel. error | PEFT rel. error |")
    print("|---|---|---|---|---|---|")
    for method, options in (("cat", {}), ("svd", {"rank": 8})):
        ours, theirs = [], []
        for rep in range(args.reps):
            start = time.perf_counter()
            result = mix_adapters(inputs, WEIGHTS, method, **options)
            ours.append(time.perf_counter() - start)
            name = f"{method}{rep}"
            start = time.perf_counter()
            model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=method, svd_rank=options.get("rank"))
            theirs.append(time.perf_counter() - start)
        model.save_pretrained(work / "peft", selected_adapters=[name])
        peft_config, peft_tensors = read_adapter(work / "peft" / name)
        mine, peers = statistics.median(ours), statistics.median(theirs)
        print(
            f"| {method} | {mine:.2f} | {peers:.2f} | {peers / mine:.1f}× | "
            f"{relative_error(result.config, result.tensors, exact):.1e} | "
            f"{relative_error(peft_config, peft_tensors, exact):.1e} |"
        )


if __name__ == "__main__":
    main()
