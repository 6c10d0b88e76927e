"""``loratune data CONFIG.yaml``: the training data as the model will see it, trained tokens marked, with length
statistics."""

from __future__ import annotations

from loratune.cli.loading import base_context, console, fit_max_length
from loratune.cli.options import non_negative_int
from loratune.cli.writes import NOTHING, Writes

NAME = "data"


def add_parser(verb) -> None:
    p = verb(NAME, "preview the training data as the model will see it, with length statistics")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", "--examples", type=non_negative_int, default=3, help="how many examples to show (default: 3)")


def writes(args) -> Writes:
    return NOTHING


def run(args) -> int:
    from loratune.data import build_dataset, format_stats, render_preview, render_preview_rich
    from loratune.models import load_tokenizer
    from loratune.train import load_config
    from loratune.train.config import resolved_task

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
    d = config.data
    max_length = fit_max_length(d.max_length, base_context(config.model.name), "data.max_length")
    out = console()
    if config.train.objective == "dpo":
        return _preview_preferences(config, tokenizer, max_length, out, args.examples)
    if resolved_task(config) != "causal_lm":
        return _preview_classification(config, tokenizer, max_length, out, args.examples)
    for label, path in (("train", d.train), ("eval", d.eval)):
        if path is None:
            continue
        examples, stats = build_dataset(
            path,
            tokenizer,
            format=d.format,
            max_length=max_length,
            truncation=d.truncation,
            train_on_prompt=d.train_on_prompt,
        )
        out.rule(f"{label}: {path}")
        if out.is_terminal:
            out.print(render_preview_rich(examples, tokenizer, n=args.examples))
        else:
            out.print(render_preview(examples, tokenizer, n=args.examples), markup=False)
        out.print()
        out.print(format_stats(stats), markup=False)
    marker = "in green" if out.is_terminal else "inside [[ ]]"
    out.print(f"trained tokens {marker}; everything else is context only", markup=False, style="dim")
    return 0


def _preview_classification(config, tokenizer, max_length: int, out, n: int) -> int:
    """``loratune data`` for a classification run: the labels, a few rows as the model sees them, lengths."""
    from loratune.data.classification import tokenize_classification, tokenize_tokens
    from loratune.train.config import resolved_task
    from loratune.train.objectives.classification import classification_examples, describe_labels

    token = resolved_task(config) == "token_cls"
    space, train, evaluation = classification_examples(config, token=token)
    tokenize = tokenize_tokens if token else tokenize_classification
    out.print(describe_labels(space, len(train), len(evaluation)), markup=False, soft_wrap=True)
    for label, examples in (("train", train), ("eval", evaluation)):
        if not examples:
            continue
        rows = tokenize(examples, tokenizer, space, max_length)
        out.rule(f"{label}: {len(rows)} rows")
        for example, row in zip(examples[:n], rows[:n]):
            if token:
                target = "tags " + " ".join(f"{word}/{tag}" for word, tag in zip(example.tokens, example.tags))
            else:
                target = "label " + (str(example.label) if space.regression else f"{example.label} (class {row.label})")
            out.print(f"{example.location}  {target}", markup=False, style="dim", soft_wrap=True)
            out.print(tokenizer.decode(row.input_ids), markup=False, soft_wrap=True)
        lengths = sorted(len(row) for row in rows)
        cut = sum(1 for length in lengths if length >= max_length)
        out.print(
            f"tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
            f"{cut} at max_length {max_length} (truncated)",
            markup=False,
        )
    return 0


def _preview_preferences(config, tokenizer, max_length: int, out, n: int) -> int:
    """``loratune data`` for a DPO run: a few pairs as the model sees them (each completion's scored tokens marked),
    and what reading the files kept and dropped."""
    from loratune.data.preference import build_preferences, check_preference_options
    from loratune.data.preview import TRAINED_CLOSE, TRAINED_OPEN, segments

    check_preference_options(config.data)
    d = config.data
    for label, path in (("train", d.train), ("eval", d.eval)):
        if path is None:
            continue
        pairs, st = build_preferences(path, tokenizer, max_length=max_length, truncation=d.truncation)
        out.rule(f"{label}: {path}")
        for pair in pairs[:n]:
            out.print(f"── {pair.location} ──", markup=False, style="dim")
            for side, sequence in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                body = "".join(
                    f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if scored else text
                    for text, scored in segments(sequence, tokenizer)
                )
                out.print(f"{side} ({len(sequence)} tokens, {sequence.n_trained} scored): {body}", markup=False)
        out.print(
            f"{st.rows_read} {st.kind} pairs read; {st.kept} kept; longer than max_length ({st.max_length}): "
            f"{st.too_long} ({st.truncated} truncated, {st.dropped_too_long} dropped); no completion token left: "
            f"{st.dropped_no_completion}; sequence lengths min {st.lengths.min}, median {st.lengths.median:g}, "
            f"max {st.lengths.max}",
            markup=False,
            soft_wrap=True,
        )
    out.print(
        f"scored completion tokens inside {TRAINED_OPEN} {TRAINED_CLOSE}; the prompts are context only", markup=False
    )
    return 0
