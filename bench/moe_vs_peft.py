"""Training a mixture-of-experts model's experts: loratune vs PEFT ``target_parameters`` + transformers.

The model is a random Qwen3-MoE (default: hidden 512, 16 experts, top-2, expert width 256, 4 layers, a 2,048-token
vocabulary so that the output layer does not hide the experts) saved once with a byte-level BPE tokenizer trained
on the demo task's text. Both trainers adapt the attention projections and both expert stacks (rank r) from the
same initial adapter, see the same fixed-length batches and run in their own processes, alternating; PEFT runs on
transformers' default experts implementation (``grouped_mm``, its fastest on CPU) with its ``ParamWrapper``
adding ΔW to every expert's weight each step. Reported: median tokens/s over the timed steps, peak RSS, their
the training memory (peak RSS less the RSS the libraries take before the model loads: at this size the
libraries are most of a process), their ratios and the loss agreement (as ``bench/train_vs_peft.py`` reports them).

    python bench/moe_vs_peft.py                                   # bf16, batch 8 x 256, 12 steps, 2 reps
    python bench/moe_vs_peft.py --experts 64 --hidden 1024 --steps 10
    python bench/moe_vs_peft.py --allocator-peak --steps 2 --reps 1   # what torch's allocator holds, not RSS
    python bench/moe_vs_peft.py --no-recompute                        # loratune keeps its MoE activations

RSS counts what the C library keeps of freed memory. ``--allocator-peak`` runs each trainer under torch's memory
profiler (slower) and also reports the most the tensors alive at once exceeded their level before the first step:
what ``torch.cuda.max_memory_allocated`` measures on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib
from train_vs_peft import (  # the dense bench's data, initial adapter, loratune run and PEFT loop
    DEMO_TRAIN,
    _load_safetensors,
    _train_plain,
    make_fixed_length_data,
    run_loratune,
    write_initial_adapter,
)

EXPERT_STACKS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model_dir(args, directory: Path) -> None:
    """A random Qwen3-MoE and a small BPE tokenizer, saved as a model directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    texts = [
        " ".join(m["content"] for m in json.loads(line)["messages"]) for line in DEMO_TRAIN.read_text().splitlines()
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=4096
    )
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def training_mib(result: dict) -> float:
    """What training adds to the process (weights, activations, optimizer): peak RSS less the libraries'."""
    return result["peak_rss_mib"] - result["floor_rss_mib"]


def run_peft(args) -> dict:
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.floor_rss_mib = peak_rss_mib()  # the libraries, before the model loads
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules=ATTENTION,
        target_parameters=EXPERT_STACKS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    # Start from loratune's initial adapter. PEFT names a nested parameter's factors lora_A.default.weight.
    state = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in _load_safetensors(Path(args.workdir) / "initial-adapter" / "adapter_model.safetensors").items()
    }
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys[:3]
    return _train_plain(args, model, tokenizer, contextlib.nullcontext())


def with_allocator_peak(run, args) -> dict:
    """``run(args)``'s result plus ``allocator_step_mib``: the peak of the bytes held by live tensors during the
    training steps, less what was held right before the first step (from the memory profiler's timeline)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    import train_vs_peft

    mark_bytes = 123_457  # a tensor of this size is allocated right before the first step
    marks, start = [], train_vs_peft.start_step_memory

    def marked():
        marks.append(torch.empty(mark_bytes, dtype=torch.uint8))
        return start()

    train_vs_peft.start_step_memory = marked
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        result = run(args)
    live, total, base, peak = {}, 0, None, 0
    for _, action, (key, _version), size in p._memory_profile().timeline:
        if action in (Action.CREATE, Action.PREEXISTING):
            live[key] = size
            total += size
            if size == mark_bytes and base is None:
                base = total
        elif action == Action.DESTROY:
            total -= live.pop(key, 0)
        if base is not None:
            peak = max(peak, total - base)
    return {**result, "allocator_step_mib": peak / 2**20}


def run_child(args, impl: str) -> dict:
    command = [sys.executable, __file__, "--child", impl, "--workdir", args.workdir, "--data-file", args.data_file]
    command += ["--model", args.model, "--dtype", args.dtype, "--batch", str(args.batch)]
    command += ["--length", str(args.length), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--r", str(args.r)] + (["--allocator-peak"] if args.allocator_peak else [])
    command += [] if args.recompute_experts else ["--no-recompute"]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def parent(args) -> None:
    from transformers import AutoTokenizer

    workdir = Path(tempfile.mkdtemp(prefix="loratune-moe-bench-"))
    args.workdir = str(workdir)
    model_dir = workdir / "model"
    build_model_dir(args, model_dir)
    args.model = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = workdir / "fixed.jsonl"
    make_fixed_length_data(tokenizer, data, rows=args.batch * (args.steps + 1), length=args.length)
    args.data_file = str(data)
    write_initial_adapter(args)
    results: dict[str, list[dict]] = {"loratune": [], "peft": []}
    for rep in range(args.reps):
        for impl in ("loratune", "peft") if rep % 2 == 0 else ("peft", "loratune"):
            result = run_child(args, impl)
            results[impl].append(result)
            print(
                f"rep {rep + 1} {impl:8s} {result['tokens_per_s']:8.1f} tok/s  peak RSS {result['peak_rss_mib']:7.0f} "
                f"MiB (training {training_mib(result):6.0f}, steps {result['step_memory_mib']:6.0f}"
                + (f", allocator {result['allocator_step_mib']:6.1f}" if args.allocator_peak else "")
                + ")  "
                f"loss@1 {result['losses'][0]:.4f}  "
                f"loss@{args.steps} {result['losses'][-1]:.4f}",
                flush=True,
            )

    def median(impl, key):
        return statistics.median(key(r) if callable(key) else r[key] for r in results[impl])

    lt, pt = median("loratune", "tokens_per_s"), median("peft", "tokens_per_s")
    lm, pm = median("loratune", "peak_rss_mib"), median("peft", "peak_rss_mib")
    lw, pw = median("loratune", training_mib), median("peft", training_mib)
    ls, ps = median("loratune", "step_memory_mib"), median("peft", "step_memory_mib")
    rel = [abs(a - b) / abs(b) for a, b in zip(results["loratune"][0]["losses"], results["peft"][0]["losses"])]
    shape = f"hidden {args.hidden}, {args.experts} experts (top-{args.top_k}, width {args.expert_width})"
    run = f"{args.dtype}, batch {args.batch} x {args.length}, r={args.r} on attention + experts"
    run += "" if args.recompute_experts else ", loratune without recomputation"
    timing = f"{args.steps} steps ({args.warmup} warm-up excluded), {args.reps} reps, medians"
    print(f"\nrandom Qwen3-MoE: {shape}, {args.layers} layers, vocab {args.vocab}; {run}; {timing}")
    print("| trainer | tokens/s | peak RSS (MiB) | training memory (MiB) | step memory (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| PEFT target_parameters + transformers (grouped_mm experts) | {pt:.0f} | {pm:.0f} | {pw:.0f} | {ps:.0f} |")
    print(f"| loratune | {lt:.0f} | {lm:.0f} | {lw:.0f} | {ls:.0f} |")
    print(f"| ratio loratune / PEFT | {lt / pt:.2f}x | {lm / pm:.2f}x | {lw / pw:.2f}x | {ls / ps:.2f}x |")
    print("training memory: peak RSS less the RSS of the process's libraries before the model loads")
    print("step memory: the peak during the training steps less the RSS before the first (model and set-up loaded)")
    if args.allocator_peak:
        la, pa = median("loratune", "allocator_step_mib"), median("peft", "allocator_step_mib")
        print(f"allocator step peak (MiB): PEFT {pa:.1f}, loratune {la:.1f}, ratio {la / pa:.2f}x")
    print(f"loss agreement: step 1 {100 * rel[0]:.3f}% , step {len(rel)} {100 * rel[-1]:.3f}% relative difference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=256, help="each expert's intermediate size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps excluded from the speed median")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--allocator-peak", action="store_true", help="also measure torch's allocator (slower)")
    parser.add_argument(
        "--no-recompute",
        dest="recompute_experts",
        action="store_false",
        help="loratune keeps the MoE layers' activations (train.recompute_experts: false): faster, more memory",
    )
    parser.add_argument("--child", choices=("loratune", "peft"), dest="impl", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.quantize, args.dora, args.full, args.packing = None, False, False, False  # what the shared pieces read
    if args.impl:
        run = run_peft if args.impl == "peft" else run_loratune
        result = with_allocator_peak(run, args) if args.allocator_peak else run(args)
        print("RESULT " + json.dumps(result), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
