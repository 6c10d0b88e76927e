"""``loratune eval``: loss, perplexity and exact match of a model (+ adapters) on a data file; the GLUE metrics for a
classifier."""

from __future__ import annotations

import json

from loratune.cli.loading import classifier_rows, eval_max_length, load_for_verb
from loratune.cli.options import add_model_options, positive_int, retain_source
from loratune.cli.writes import NOTHING, Writes
from loratune.data.formats import FORMATS
from loratune.errors import ConfigError

NAME = "eval"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "loss, perplexity and exact match of a model (+ adapters) on a data file",
        "Loss, perplexity and exact match of a language model (+ adapters) on a data file; for a classifier "
        "(an adapter or model with labels.json, trained with task: seq_cls) the loss and the GLUE metrics "
        "that fit it: accuracy, macro_f1 and mcc (Matthews), or pearson, spearman and mse for regression.",
    )
    add_model_options(p)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet in a supported format")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        metavar="FORMAT",
        help=f"data format: auto (detected, default), {', '.join(FORMATS)}",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="truncate longer rows (default: 512, or the model's context when shorter)",
    )
    p.add_argument("--max-examples", type=positive_int, default=None, help="evaluate only the first N rows")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="generation limit for exact match (default: 32)"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per batch (default: 32)")
    p.add_argument("--no-exact-match", action="store_true", help="skip generation; loss and perplexity only")
    p.add_argument(
        "--retain",
        metavar="FILE",
        default=None,
        type=retain_source,
        help="also the loss on FILE (or 'builtin': text smollm2-135m wrote) with the adapters and without "
        "them: retain_loss, retain_loss_base and forgetting = their difference",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def writes(args) -> Writes:
    return NOTHING


def run(args) -> int:
    from loratune.data import build_dataset, read_examples
    from loratune.inference import evaluate

    model, tokenizer, labels = load_for_verb(args)
    max_length = eval_max_length(model, args.max_length)
    if labels is not None:
        return _eval_classifier(model, tokenizer, labels, args, max_length)
    tokenized, _ = build_dataset(args.data, tokenizer, format=args.format, max_length=max_length)
    examples, _ = read_examples(args.data, args.format)
    if args.max_examples is not None:
        tokenized, examples = tokenized[: args.max_examples], examples[: args.max_examples]
    if not tokenized:
        raise ConfigError(f"{args.data}: no rows left to evaluate")
    retention = {}
    if args.retain is not None:
        from loratune.inference.forgetting import retention as measure_retention

        retention = measure_retention(model, tokenizer, args.retain, max_length, max(1, args.batch_size // 2))
    result = evaluate(
        model,
        tokenizer,
        tokenized,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        with_exact_match=not args.no_exact_match,
    )
    if args.json:
        print(json.dumps({**result.as_dict(), **retention}))
        return 0
    em = "n/a (no references)" if result.exact_match is None else f"{100 * result.exact_match:.1f}%"
    print(
        f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  exact match {em}  "
        f"({result.n} examples, {result.n_tokens} target tokens)"
    )
    if retention:
        base = "n/a (no adapter)" if retention["retain_loss_base"] is None else f"{retention['retain_loss_base']:.4f}"
        change = "" if retention["forgetting"] is None else f"  forgetting {retention['forgetting']:+.4f}"
        print(f"retain loss {retention['retain_loss']:.4f}  base {base}{change}")
    return 0


def _eval_classifier(model, tokenizer, labels, args, max_length: int) -> int:
    from loratune.inference.classify import evaluate_classification

    _, rows = classifier_rows(labels, tokenizer, args, max_length, labelled=True)
    result = evaluate_classification(model, rows, labels, tokenizer.pad_token_id, args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    shown = "  ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
    print(f"loss {result.loss:.4f}  {shown}  ({result.n} examples)")
    return 0
