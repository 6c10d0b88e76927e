"""``loratune predict``: label each row of a data file with a classifier; JSONL out."""

from __future__ import annotations

import json
import sys

from loratune.cli.loading import classifier_rows, eval_max_length, load_for_verb
from loratune.cli.options import add_model_options, positive_int
from loratune.cli.writes import Writes, adapter_inputs, inputs_of, model_inputs
from loratune.errors import ConfigError

NAME = "predict"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "label each row of a data file with a classifier (labels and probabilities as JSONL)",
        "Run a classifier (an adapter trained with task: seq_cls, or a full fine-tune's model/ directory: "
        "either carries labels.json) over --data and write one JSON object per row: the text (and text_pair), "
        "the predicted label and the probability of each label; for regression, the score. Rows need the "
        "text columns the classifier was trained on; a label column is not needed.",
    )
    add_model_options(p)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/TSV/Parquet rows to label")
    p.add_argument("--out", metavar="FILE.jsonl", default=None, help="write the predictions here (default: stdout)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file that loratune wrote (see OVERWRITE)"
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="truncate longer rows (default: 512, or the model's context when shorter)",
    )
    p.add_argument("--max-examples", type=positive_int, default=None, help="label only the first N rows")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per batch (default: 32)")


def writes(args) -> Writes:
    if args.out is None:
        return Writes(None)
    inputs = inputs_of([("the data", args.data)], adapter_inputs(args.adapter), model_inputs(args.model))
    return Writes(args.out, inputs, kind="file", overwrite=args.overwrite, record_kind="predictions")


def run(args) -> int:
    from loratune.inference.classify import classifier_logits, predictions
    from loratune.outputs import write_text_atomic

    model, tokenizer, labels = load_for_verb(args)
    if labels is None:
        raise ConfigError(
            "predict labels rows with a classifier (an adapter with labels.json, trained with task: "
            "seq_cls); for a language model use: loratune generate"
        )
    max_length = eval_max_length(model, args.max_length)
    examples, rows = classifier_rows(labels, tokenizer, args, max_length, labelled=False)
    logits = classifier_logits(model, rows, tokenizer.pad_token_id, args.batch_size)
    lines = []
    for example, prediction in zip(examples, predictions(logits, labels, rows)):
        if labels.token:
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
