"""``loratune generate``: text from a prompt (chat-formatted unless ``--raw``), streamed; an interactive chat
without ``--prompt``."""

from __future__ import annotations

import sys
import warnings

from loratune.cli.loading import load_for_verb
from loratune.cli.options import add_model_options, positive_int, probability, seed, temperature
from loratune.cli.writes import NOTHING, Writes
from loratune.errors import ConfigError

NAME = "generate"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "generate text from a prompt (chat-formatted unless --raw), streamed to the terminal",
        "Generate from --prompt, or chat interactively when no --prompt is given. The prompt goes through the "
        "model's chat template, exactly as chat-style training data did, unless --raw.",
    )
    add_model_options(p)
    p.add_argument("--prompt", "-p", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--system", help="a system message (chat format only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as written, no chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation limit (default: 256)")
    p.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help="0 = greedy (default); above 0, sample from softmax(logits / T)",
    )
    p.add_argument(
        "--top-p",
        type=probability,
        default=None,
        metavar="P",
        help="sampling: keep the smallest set of tokens with probability mass P, in (0, 1]",
    )
    p.add_argument(
        "--top-k", type=positive_int, default=None, metavar="K", help="sampling: keep the K most likely tokens"
    )
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")


def writes(args) -> Writes:
    return NOTHING


def run(args) -> int:
    import torch

    from loratune.data import Example, chat_prompt_ids, encode_texts, prompt_ids
    from loratune.inference import stream_greedy

    sampling = [name for name, value in (("--top-p", args.top_p), ("--top-k", args.top_k)) if value is not None]
    if sampling and args.temperature == 0:
        raise ConfigError(
            f"{' and '.join(sampling)} shape sampling, but --temperature 0 decodes greedily; "
            "give --temperature above 0 (e.g. 0.7) to sample"
        )
    if args.raw and args.prompt is None:
        raise ConfigError("interactive chat uses the chat template; give --prompt to generate from raw text")
    model, tokenizer, _ = load_for_verb(args)
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
        ids = (
            encode_texts(tokenizer, [args.prompt])[0]
            if args.raw
            else chat_prompt_ids(tokenizer, args.prompt, system=args.system)
        )
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
