"""The verbs of ``loratune``: each ``run_<verb>(args)`` calls the library and prints; errors propagate as
``LoratuneError`` for ``main`` to report in one line."""

from __future__ import annotations

import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from loratune.cli.experiments import run_sweep
from loratune.cli.options import base_model_for
from loratune.cli.rank_tools import run_compare, run_extract, run_rank, run_resize
from loratune.cli.serve import run_serve
from loratune.errors import ConfigError

DEFAULT_EVAL_MAX_LENGTH = 512


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _load(args):
    """The model ``--model`` names (see ``base_model_for``) with ``args.adapter`` loaded at their strengths."""
    from loratune.adapters import load_adapter
    from loratune.models.loader import load_model, resolve_model_dir
    from loratune.models.quantized import stored_in_4bit

    name = base_model_for(args)
    labels = classifier_labels(args, name)
    if labels is not None:
        from loratune.models.loader import load_classifier

        model, tokenizer = load_classifier(name, labels, args.dtype, args.device, args.trust_remote_code)
        model.labels = labels  # what eval and predict score and name
    else:
        quantize = getattr(args, "quantize", None) or stored_in_4bit(resolve_model_dir(name))
        model, tokenizer = load_model(
            name, quantize=quantize, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
        )
    for path, scale in args.adapter:
        load_adapter(model, path, scale=scale)
    return model, tokenizer


def classifier_labels(args, model_name: str):
    """The label space of the classifier the command runs: from the adapters' ``labels.json`` (they must
    agree), or from the model directory's (a full fine-tune's ``model/``); None for a language model."""
    from pathlib import Path

    from loratune.data.classification import read_labels

    found = {str(path): read_labels(path) for path, _ in args.adapter}
    spaces = {space for space in found.values() if space is not None}
    if len(spaces) > 1:
        raise ConfigError("the adapters are classifiers with different labels; give adapters of one task")
    if spaces and None in found.values():
        plain = next(path for path, space in found.items() if space is None)
        raise ConfigError(f"adapter {plain} has no labels.json but the others are classifiers; give adapters of one task")
    if spaces:
        return spaces.pop()
    return read_labels(model_name) if Path(model_name).is_dir() else None


# --- train / data -------------------------------------------------------------------------------------


def run_train(args) -> int:
    from loratune.train import TrainingInterrupted, load_config, train

    config = load_config(args.config, args.overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from loratune.train.distributed import launch

        sets = [part for override in args.overrides for part in ("--set", override)]
        flags = [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                                       ("--no-progress", args.no_progress), ("--debug", args.debug)) if on]
        return launch(["train", str(args.config), *sets, *flags], args.nproc)
    console = _console()
    try:
        summary = train(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            log=lambda line: console.print(line, markup=False, soft_wrap=True),
        )
    except TrainingInterrupted as stop:
        print(f"loratune train: {stop}", file=sys.stderr)
        if stop.checkpoint is not None:
            sets = [part for override in args.overrides for part in ("--set", override)]
            command = shlex.join(["loratune", "train", str(args.config), *sets, "--resume"])
            print(f"loratune train: continue with: {command}", file=sys.stderr)
        return 130
    if summary:  # (rank 0's; the other processes of a distributed run print nothing)
        _print_summary(console, summary)
    return 0


CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc", "pearson", "spearman")


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="training finished", show_header=False, title_justify="left")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("train time", f"{summary['train_seconds']:.1f} s")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    if summary["eval"]:
        ev = summary["eval"]
        em = ev.get("eval_exact_match")
        if "eval_perplexity" in ev:
            table.add_row("eval loss / ppl", f"{ev['eval_loss']:.4f} / {ev['eval_perplexity']:.2f}")
        else:
            table.add_row("eval loss", f"{ev['eval_loss']:.4f}")
        if em is not None:
            table.add_row("eval exact match", f"{100 * em:.1f}%")
        for name in CLASSIFICATION_METRICS:
            if ev.get(f"eval_{name}") is not None:
                table.add_row(f"eval {name}", f"{ev[f'eval_{name}']:.4f}")
    if summary["best_metric"] and summary["best"] is not None:
        table.add_row(f"best {summary['best_metric']}", f"{summary['best']:.4f} (step {summary['best_step']})")
    table.add_row("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}")
    peaks = summary.get("peak_memory_mb_per_process")
    each = f" (per process: {', '.join(f'{peak:,.0f}' for peak in peaks)} MiB)" if peaks else ""
    table.add_row("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB{each}")
    if summary["adapter_bytes"]:
        table.add_row("adapter", f"{summary['adapter_bytes'] / 2**20:.2f} MiB in {summary['output_dir']}/adapter")
    if summary["model_bytes"]:
        table.add_row("model", f"{summary['model_bytes'] / 2**20:.1f} MiB in {summary['output_dir']}/model")
    console.print(table)


def run_data(args) -> int:
    from loratune.data import (
        build_dataset,
        format_stats,
        render_preview,
        render_preview_rich,
    )
    from loratune.models import load_tokenizer
    from loratune.train import load_config

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
    d = config.data
    max_length = _fit_max_length(d.max_length, _base_context(config.model.name), "data.max_length")
    console = _console()
    from loratune.train.config import resolved_task

    if resolved_task(config) != "causal_lm":
        return _preview_classification(config, tokenizer, max_length, console, args.examples)
    for label, path in (("train", d.train), ("eval", d.eval)):
        if path is None:
            continue
        examples, stats = build_dataset(path, tokenizer, format=d.format, max_length=max_length,
                                        truncation=d.truncation, train_on_prompt=d.train_on_prompt)
        console.rule(f"{label}: {path}")
        if console.is_terminal:
            console.print(render_preview_rich(examples, tokenizer, n=args.examples))
        else:
            console.print(render_preview(examples, tokenizer, n=args.examples), markup=False)
        console.print()
        console.print(format_stats(stats), markup=False)
    marker = "in green" if console.is_terminal else "inside [[ ]]"
    console.print(f"trained tokens {marker}; everything else is context only", markup=False, style="dim")
    return 0


def _preview_classification(config, tokenizer, max_length: int, console, n: int) -> int:
    """``loratune data`` for a classification run: the labels, a few rows as the model sees them, lengths."""
    from loratune.data.classification import tokenize_classification, tokenize_tokens
    from loratune.train.classify import classification_examples, describe_labels
    from loratune.train.config import resolved_task

    token = resolved_task(config) == "token_cls"
    space, train, evaluation = classification_examples(config, token=token)
    tokenize = tokenize_tokens if token else tokenize_classification
    console.print(describe_labels(space, len(train), len(evaluation)), markup=False, soft_wrap=True)
    for label, examples in (("train", train), ("eval", evaluation)):
        if not examples:
            continue
        rows = tokenize(examples, tokenizer, space, max_length)
        console.rule(f"{label}: {len(rows)} rows")
        for example, row in zip(examples[:n], rows[:n]):
            if token:
                target = "tags " + " ".join(f"{word}/{tag}" for word, tag in zip(example.tokens, example.tags))
            else:
                target = "label " + (str(example.label) if space.regression else f"{example.label} (class {row.label})")
            console.print(f"{example.location}  {target}", markup=False, style="dim", soft_wrap=True)
            console.print(tokenizer.decode(row.input_ids), markup=False, soft_wrap=True)
        lengths = sorted(len(row) for row in rows)
        cut = sum(1 for length in lengths if length >= max_length)
        console.print(f"tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
                      f"{cut} at max_length {max_length} (truncated)", markup=False)
    return 0


def _base_context(name: str) -> int | None:
    from loratune.models import context_length
    from loratune.models.base_config import base_model_config

    return context_length(base_model_config(name))


def _fit_max_length(max_length: int, limit: int | None, what: str) -> int:
    """``max_length`` capped at the model's context ``limit``, with a warning when it is longer."""
    if limit is None or max_length <= limit:
        return max_length
    warnings.warn(f"{what} {max_length} is longer than the model's context ({limit} positions); using {limit}",
                  stacklevel=2)
    return limit


# --- eval / generate ----------------------------------------------------------------------------------


def run_eval(args) -> int:
    from loratune.data import build_dataset, read_examples
    from loratune.train import evaluate

    model, tokenizer = _load(args)
    from loratune.models import context_length

    limit = context_length(model.config)
    if args.max_length is None:
        max_length = min(DEFAULT_EVAL_MAX_LENGTH, limit or DEFAULT_EVAL_MAX_LENGTH)
    else:
        max_length = _fit_max_length(args.max_length, limit, "--max-length")
    if getattr(model, "labels", None) is not None:
        return _eval_classifier(model, tokenizer, args, max_length)
    tokenized, stats = build_dataset(args.data, tokenizer, format=args.format, max_length=max_length)
    examples, _ = read_examples(args.data, args.format)
    if args.max_examples is not None:
        tokenized, examples = tokenized[: args.max_examples], examples[: args.max_examples]
    if not tokenized:
        raise ConfigError(f"{args.data}: no rows left to evaluate")
    retention = _retention(model, tokenizer, args, max_length) if args.retain is not None else {}
    result = evaluate(model, tokenizer, tokenized, examples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, with_exact_match=not args.no_exact_match)
    if args.json:
        print(json.dumps({**result.as_dict(), **retention}))
        return 0
    em = "n/a (no references)" if result.exact_match is None else f"{100 * result.exact_match:.1f}%"
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  exact match {em}  "
          f"({result.n} examples, {result.n_tokens} target tokens)")
    if retention:
        base = "n/a (no adapter)" if retention["retain_loss_base"] is None else f"{retention['retain_loss_base']:.4f}"
        change = "" if retention["forgetting"] is None else f"  forgetting {retention['forgetting']:+.4f}"
        print(f"retain loss {retention['retain_loss']:.4f}  base {base}{change}")
    return 0


def _classifier_rows(model, tokenizer, args, max_length: int, *, labelled: bool):
    """(rows as read, tokenized rows) of ``--data`` for the classifier ``model``."""
    from loratune.data.classification import (
        check_layout,
        read_classification,
        read_token_classification,
        tokenize_classification,
        tokenize_tokens,
    )

    if getattr(args, "retain", None) is not None:
        raise ConfigError("--retain measures forgetting of a language model; it does not apply to a classifier")
    space = model.labels
    if space.token:
        examples = read_token_classification(args.data, require_labels=labelled)
    else:
        examples = read_classification(args.data, require_labels=labelled)
        check_layout(space, examples, str(args.data))
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
    tokenize = tokenize_tokens if space.token else tokenize_classification
    return examples, tokenize(examples, tokenizer, space if labelled else None, max_length)


def _eval_classifier(model, tokenizer, args, max_length: int) -> int:
    from loratune.train.classify import evaluate_classification

    _, rows = _classifier_rows(model, tokenizer, args, max_length, labelled=True)
    result = evaluate_classification(model, rows, model.labels, tokenizer.pad_token_id, args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    shown = "  ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
    print(f"loss {result.loss:.4f}  {shown}  ({result.n} examples)")
    return 0


def run_predict(args) -> int:
    from loratune.files import check_output_file, write_text_atomic
    from loratune.train.classify import classifier_logits, predictions

    if args.out is not None:
        check_output_file(args.out, overwrite=args.overwrite, ours=lambda path: path.suffix == ".jsonl")
    model, tokenizer = _load(args)
    if getattr(model, "labels", None) is None:
        raise ConfigError("predict labels rows with a classifier (an adapter with labels.json, trained with task: "
                          "seq_cls); for a language model use: loratune generate")
    from loratune.models import context_length

    limit = context_length(model.config)
    if args.max_length is None:
        max_length = min(DEFAULT_EVAL_MAX_LENGTH, limit or DEFAULT_EVAL_MAX_LENGTH)
    else:
        max_length = _fit_max_length(args.max_length, limit, "--max-length")
    examples, rows = _classifier_rows(model, tokenizer, args, max_length, labelled=False)
    logits = classifier_logits(model, rows, tokenizer.pad_token_id, args.batch_size)
    lines = []
    for example, prediction in zip(examples, predictions(logits, model.labels, rows)):
        if model.labels.token:
            record = {"tokens": example.tokens}
        else:
            record = {"text": example.text, **({"text_pair": example.pair} if example.pair is not None else {})}
        lines.append(json.dumps({**record, **prediction}, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        print(f"predicted {len(lines)} rows -> {args.out}", file=sys.stderr)
    return 0


def _retention(model, tokenizer, args, max_length: int) -> dict:
    """Loss on the retain set with the loaded adapters and without them (the base), and their difference."""
    from loratune.adapters import active_adapters, disabled_adapters
    from loratune.train.forgetting import retain_examples, retain_loss

    examples = retain_examples(args.retain, tokenizer, max_length)
    batch = max(1, args.batch_size // 2)
    adapted = retain_loss(model, examples, tokenizer.pad_token_id, batch)
    if not active_adapters(model):
        return {"retain_loss": adapted, "retain_loss_base": None, "forgetting": None}
    with disabled_adapters(model):
        base = retain_loss(model, examples, tokenizer.pad_token_id, batch)
    return {"retain_loss": adapted, "retain_loss_base": base, "forgetting": adapted - base}


def run_generate(args) -> int:
    import torch

    from loratune.data import Example, chat_prompt_ids, encode_texts, prompt_ids
    from loratune.train import stream_greedy

    sampling = [name for name, value in (("--top-p", args.top_p), ("--top-k", args.top_k)) if value is not None]
    if sampling and args.temperature == 0:
        raise ConfigError(f"{' and '.join(sampling)} shape sampling, but --temperature 0 decodes greedily; "
                          "give --temperature above 0 (e.g. 0.7) to sample")
    if args.raw and args.prompt is None:
        raise ConfigError("interactive chat uses the chat template; give --prompt to generate from raw text")
    model, tokenizer = _load(args)
    generator = torch.Generator().manual_seed(args.seed)
    options = dict(temperature=args.temperature or None, top_p=args.top_p, top_k=args.top_k, generator=generator)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def answer(ids) -> str:
        # A library warning printed mid-stream would land inside the model's text: show it afterwards.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = stream_greedy(model, tokenizer, ids, args.max_new_tokens, emit, **options)
        print()
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"loratune generate: warning: {message}", file=sys.stderr)
        return text

    if args.prompt is not None:
        if args.raw:
            ids = encode_texts(tokenizer, [args.prompt])[0]
        else:
            ids = chat_prompt_ids(tokenizer, args.prompt, system=args.system)
        answer(ids)
        return 0
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    typed = sys.stdin.isatty()
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            if not typed or not line:
                print(file=sys.stderr)
            break
        if not typed:
            print(line.rstrip("\n"), file=sys.stderr)  # show the turn, as a terminal would have echoed it
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = prompt_ids(Example(location="chat", messages=history), tokenizer)
        print("model> ", end="", file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": answer(ids)})
    return 0


# --- merge / inspect ----------------------------------------------------------------------------------


def run_merge(args) -> int:
    from loratune.models.merge import merge_to_directory

    if not args.adapter:
        raise ConfigError("merge needs at least one --adapter DIR[:SCALE]")
    from loratune.train.intrinsic import is_intrinsic_dir

    if any(is_intrinsic_dir(path) for path, _ in args.adapter):
        return _merge_intrinsic(args)
    model = base_model_for(args)
    labels = classifier_labels(args, model)
    extras = {"labels.json": json.dumps(labels.to_json(), indent=2) + "\n"} if labels is not None else None
    result = merge_to_directory(model, args.adapter, args.out, out_dtype=args.out_dtype, quantize=args.quantize,
                                requantize=args.requantize, device=args.device,
                                trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                                labels=labels, extras=extras)
    names = ", ".join(f"{path}:{scale:g}" for path, scale in args.adapter)
    dtype = str(result.dtype).removeprefix("torch.")
    report = result.requantize_report
    if report is None:
        print(f"merged {names} into {model} -> {result.path} ({dtype})")
        return 0
    vs_delta = report.get("error_vs_delta")
    print(f"merged {names} into {model} and re-quantized to {result.quantize} -> {result.path}; re-quantizing adds "
          f"a relative weight error of {report['relative_error']:.4f} (worst layer "
          f"{report['worst_layer_relative_error']:.4f})"
          + (f", {vs_delta:.2f}x the size of the merged adapter change" if vs_delta is not None else ""))
    return 0


def _merge_intrinsic(args) -> int:
    """``merge`` of an intrinsic-dimension run's artefact: θ₀ + P·θ_d written into the base's weights."""
    from loratune.models import load_model, resolve_dtype
    from loratune.models.base_config import model_name_for
    from loratune.models.export import save_hf_model
    from loratune.models.loader import resolve_model_dir
    from loratune.models.merge import stored_dtype
    from loratune.train.intrinsic import CONFIG_FILE, apply_intrinsic

    if len(args.adapter) != 1 or args.adapter[0][1] != 1.0 or args.quantize:
        raise ConfigError("an intrinsic-dimension artefact merges alone, at strength 1, into an unquantized base")
    path = Path(args.adapter[0][0])
    recorded = json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    name = args.model or (model_name_for(recorded) if recorded else None)
    if name is None:
        raise ConfigError(f"{path} does not record its base model; give --model")
    stored = stored_dtype(resolve_model_dir(name))
    model, tokenizer = load_model(name, dtype="fp32", device=args.device, trust_remote_code=args.trust_remote_code)
    apply_intrinsic(model, path).bake()  # in float32, written at the base's stored dtype unless --out-dtype
    out = save_hf_model(model, tokenizer, args.out, resolve_dtype(args.out_dtype) if args.out_dtype else stored,
                        overwrite=args.overwrite)
    print(f"merged {path} (intrinsic dimension) into {name} -> {out}")
    return 0


def run_mix(args) -> int:
    from loratune.adapters.mix import mix_adapter_dirs

    result = mix_adapter_dirs(args.adapters, args.out, args.method, rank=args.rank, density=args.density,
                              seed=args.seed, majority_sign=args.majority_sign, compress="int8" if args.int8 else None,
                              overwrite=args.overwrite, format=args.format)
    ranks = sorted(set(result.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    inputs = ", ".join(f"{path}:{weight:g}" for path, weight in args.adapters)
    print(f"mixed {inputs} with {args.method} -> {args.out} ({len(result.ranks)} modules, rank {rank_text})")
    if result.energy_total is not None:
        lowest = min(result.energy, key=result.energy.get)
        print(f"energy kept: {100 * result.energy_total:.4f}% overall, lowest {100 * result.energy[lowest]:.4f}% "
              f"in {lowest}")
    return 0


def run_compress(args) -> int:
    from loratune.adapters import compress_adapter
    from loratune.adapters.inspect import describe_adapter

    before = describe_adapter(args.adapter)["size_bytes"]
    compress_adapter(args.adapter, args.out, overwrite=args.overwrite)
    after = describe_adapter(args.out)["size_bytes"]
    print(f"compressed {args.adapter} ({before:,} bytes) -> {args.out} ({after:,} bytes, int8, "
          f"{before / after:.2f}x smaller)")
    return 0


def run_export_gguf(args) -> int:
    from loratune.adapters.gguf_export import export_gguf, written_by_loratune
    from loratune.files import check_output_file
    from loratune.models.base_config import base_model_config

    out = Path(args.out)
    check_output_file(out, overwrite=args.overwrite, ours=written_by_loratune)
    base_config = base_model_config(base_model_for(args, adapters=[args.adapter]))
    lora = export_gguf(args.adapter, out, base_config, dtype=args.dtype, scale=args.scale)
    folded = f", scaling folded into lora_b for {len(lora.folded)} modules" if lora.folded else ""
    print(f"wrote {out}: {len(lora.tensors) // 2} LoRA pairs, alpha {lora.alpha:g}, {args.dtype}{folded}")
    return 0


def run_inspect(args) -> int:
    from loratune.adapters.inspect import KOHYA_FIELDS, PEFT_FIELDS, describe_adapter

    info = describe_adapter(args.adapter)
    if args.json:
        print(json.dumps(info))
        return 0
    console = _console()
    from rich.table import Table

    table = Table(title=str(args.adapter), show_header=False, title_justify="left")
    for key in PEFT_FIELDS if info["format"] == "peft" else KOHYA_FIELDS:
        value = info.get(key)
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)
    return 0


def run_convert(args) -> int:
    from loratune.adapters.convert import is_diffusers_file, kohya_to_peft, peft_to_kohya, to_diffusers_file
    from loratune.adapters.kohya import is_kohya_path
    from loratune.models.diffusers_names import diffusers_module_paths

    single_file = is_kohya_path(args.source)
    kind = ("diffusers" if is_diffusers_file(args.source) else "kohya") if single_file else "peft"
    if kind == args.to:
        raise ConfigError(f"{args.source} is in the {kind} format already; --to names the format to write")
    module_paths = diffusers_module_paths(args.model) if args.model is not None else None
    if args.to == "peft":
        counts = kohya_to_peft(args.source, args.out, module_paths, base_model=args.model and str(args.model),
                               overwrite=args.overwrite)
    elif args.to == "kohya":
        counts = peft_to_kohya(args.source, args.out, overwrite=args.overwrite)
    else:
        counts = to_diffusers_file(args.source, args.out, module_paths, overwrite=args.overwrite)
    parts = ", ".join(f"{component}: {n} modules" for component, n in counts.items())
    print(f"converted {args.source} ({kind}) -> {args.out} ({args.to}; {parts})")
    return 0


__all__ = [
    "run_compare", "run_compress", "run_convert", "run_data", "run_eval", "run_export_gguf", "run_extract", "run_generate",
    "run_inspect", "run_merge", "run_mix", "run_predict", "run_rank", "run_resize", "run_serve", "run_sweep", "run_train",
]
