"""Examples → token ids + labels (the loss mask), and the prompts a model is given at generation time.

Labels follow Hugging Face's convention: ``labels[t]`` is ``input_ids[t]`` where the token is trained and
``IGNORE_INDEX`` (-100) where it is not; the model shifts them internally (logits at t predict label t+1).
``labels[0]`` is always -100: nothing precedes the first token, so it is never predicted, and marking it
keeps trained-token counts honest and packed rows independent.

Masks come from turn boundaries and lengths, never from comparing ids with the pad id (SmolLM2's pad is
its EOS, so that would also mask the EOS the model must learn):

- chat (``messages``/``sharegpt``/``alpaca``): the conversation goes through ``tokenizer.apply_chat_template``.
  For each assistant turn i, the conversation up to turn i rendered with the generation prompt and the
  conversation up to and including turn i are tokenized; both must be prefixes of the whole conversation's
  tokens (checked; ``DataError`` if a template breaks this). The tokens between them are the assistant turn:
  its content and its end-of-turn token (``<|im_end|>`` in ChatML) are trained, so the model learns to stop.
  Trailing whitespace-only tokens of the turn (ChatML's newline after ``<|im_end|>``) are not trained:
  generation stops at the end-of-turn token, and in a longer conversation the template writes the newline.
  Every assistant turn is trained; system/user turns and the template's role headers are not.
- prompt/completion: ``[BOS] + prompt + completion + EOS``, prompt and completion tokenized separately (so
  the prompt tokens are exactly what generation sees); completion and EOS are trained.
- text: ``[BOS] + text + EOS``, all trained.
- BOS is added only when the tokenizer adds one itself (``tokenizer("x")`` starts with special tokens that
  ``add_special_tokens=False`` leaves out); chat templates write their own, so rendered chats are tokenized
  with ``add_special_tokens=False`` exactly as ``apply_chat_template`` does.
- ``train_on_prompt=True`` trains every token (except the first, see above).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loratune.data.formats import Example
from loratune.errors import ConfigError, DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (``IGNORE_INDEX`` where not trained) of one example, and where it came from."""

    input_ids: list[int]
    labels: list[int]
    location: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """Number of tokens that contribute to the loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class _TokenizerFacts:
    leading_ids: list[int]  # special tokens the tokenizer puts before plain text (BOS), often none
    eos_id: int | None


def _tokenizer_facts(tokenizer) -> _TokenizerFacts:
    probe = "hello"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    leading: list[int] = []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            leading = with_special[:start]
            break
    return _TokenizerFacts(leading_ids=leading, eos_id=tokenizer.eos_token_id)


def _require_eos(facts: _TokenizerFacts) -> int:
    if facts.eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; prompt/completion and text rows need one to learn to stop")
    return facts.eos_id


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize plain texts without adding special tokens; return one id list per text.

    Uses the Rust backend's batch call directly when the tokenizer is a fast one with no truncation or
    padding configured (about twice as fast as ``tokenizer(texts)``, same ids); otherwise ``tokenizer(...)``.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and not getattr(backend, "encode_special_tokens", False)
        and not getattr(tokenizer, "split_special_tokens", False)
    ):
        return [encoding.ids for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _require_chat_template(tokenizer, location: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{location}: chat-style rows go through the tokenizer's chat template, and this tokenizer has none; "
            "use prompt/completion rows for a base model"
        )


def _render_chats(tokenizer, conversations: list, add_generation_prompt: bool, locations: list[str]) -> list[str]:
    """Render conversations to text with the chat template; a failure names the row that caused it."""
    if not conversations:
        return []
    try:
        return list(
            tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
        )
    except Exception:  # find the row that fails, to name it
        for conversation, location in zip(conversations, locations):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as err:  # noqa: BLE001 - a template is user code: whatever it raises names the row
                raise DataError(f"{location}: the chat template failed on this conversation ({err})") from None
        raise


class _BlankTokens:
    """Memoized 'does this token decode to whitespace only?' (the separator after an end-of-turn token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        blank = self.known.get(token_id)
        if blank is None:
            blank = self.known[token_id] = not self.tokenizer.decode([token_id]).strip()
        return blank


def _assistant_indices(messages: list[dict[str, str]]) -> list[int]:
    return [index for index, turn in enumerate(messages) if turn["role"] == "assistant"]


def tokenize_examples(
    examples: Sequence[Example], tokenizer, *, train_on_prompt: bool = False, chunk_size: int = 1024
) -> list[TokenizedExample]:
    """Tokenize examples with their loss masks (see the module docstring); return them in the same order.

    Untruncated: ``build_dataset`` applies ``max_length``. Texts are rendered and tokenized in batches of
    ``chunk_size`` examples. Raises ``DataError`` (naming the row) when a chat has no chat template to go
    through, starts with an assistant turn, or its template does not render prefixes as prefixes; raises
    ``ConfigError`` when prompt/completion or text rows meet a tokenizer without an EOS token.
    """
    facts = _tokenizer_facts(tokenizer)
    blank = _BlankTokens(tokenizer)
    result: list[TokenizedExample] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start : start + chunk_size]
        result.extend(_tokenize_chunk(chunk, tokenizer, facts, blank, train_on_prompt))
    return result


def tokenize_example(example: Example, tokenizer, train_on_prompt: bool = False) -> TokenizedExample:
    """Tokenize one example with its loss mask; see ``tokenize_examples`` for what it raises."""
    return tokenize_examples([example], tokenizer, train_on_prompt=train_on_prompt)[0]


def _tokenize_chunk(examples, tokenizer, facts, blank, train_on_prompt) -> list[TokenizedExample]:
    # 1. Collect every text to render/tokenize, remembering which slot each example's pieces landed in.
    plain_chats, plain_locations = [], []  # rendered without the generation prompt
    prompt_chats, prompt_locations = [], []  # rendered with it (the conversation before an assistant turn)
    plans = []
    for example in examples:
        location = example.location
        if example.kind == "chat":
            _require_chat_template(tokenizer, location)
            messages = example.messages
            full = len(plain_chats)
            plain_chats.append(messages)
            plain_locations.append(location)
            turns = []  # (assistant index, slot of prefix + generation prompt, slot of prefix including the turn)
            if not train_on_prompt:
                for index in _assistant_indices(messages):
                    if index == 0:
                        raise DataError(
                            f"{location}: the conversation starts with an assistant turn; "
                            "start it with a system or user turn"
                        )
                    prompt_chats.append(messages[:index])
                    prompt_locations.append(location)
                    if index == len(messages) - 1:
                        after = full
                    else:
                        after = len(plain_chats)
                        plain_chats.append(messages[: index + 1])
                        plain_locations.append(location)
                    turns.append((index, len(prompt_chats) - 1, after))
            plans.append(("chat", full, turns))
        elif example.kind == "prompt_completion":
            _require_eos(facts)
            plans.append(("prompt_completion", example.prompt, example.completion))
        else:
            _require_eos(facts)
            plans.append(("text", example.text))

    plain_texts = _render_chats(tokenizer, plain_chats, False, plain_locations)
    prompt_texts = _render_chats(tokenizer, prompt_chats, True, prompt_locations)
    raw_texts = []
    for plan in plans:
        if plan[0] == "prompt_completion":
            raw_texts.extend([plan[1], plan[2] or ""])
        elif plan[0] == "text":
            raw_texts.append(plan[1])
    ids = encode_texts(tokenizer, plain_texts + prompt_texts + raw_texts)
    plain_ids = ids[: len(plain_texts)]
    prompt_ids_ = ids[len(plain_texts) : len(plain_texts) + len(prompt_texts)]
    raw_ids = iter(ids[len(plain_texts) + len(prompt_texts) :])

    # 2. Assemble input ids and labels.
    out = []
    for example, plan in zip(examples, plans):
        if plan[0] == "chat":
            input_ids = plain_ids[plan[1]]
            if train_on_prompt:
                labels = list(input_ids)
            else:
                labels = [IGNORE_INDEX] * len(input_ids)
                for index, prompt_slot, after_slot in plan[2]:
                    start, end = _assistant_span(
                        input_ids, prompt_ids_[prompt_slot], plain_ids[after_slot], index, example.location
                    )
                    while end > start and blank(input_ids[end - 1]):
                        end -= 1
                    labels[start:end] = input_ids[start:end]
        elif plan[0] == "prompt_completion":
            prompt, completion = next(raw_ids), next(raw_ids)
            head = facts.leading_ids + prompt
            tail = [*completion, facts.eos_id] if plan[2] is not None else []
            input_ids = head + tail
            labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(head) + tail
        else:
            input_ids = facts.leading_ids + next(raw_ids) + [facts.eos_id]
            labels = list(input_ids)
        input_ids = list(input_ids)
        if labels:
            labels[0] = IGNORE_INDEX
        out.append(TokenizedExample(input_ids, labels, example.location))
    return out


def _assistant_span(full: list[int], before: list[int], through: list[int], index: int, location: str):
    """Token span [start, end) of assistant turn ``index``, from the tokens of the two prefixes."""
    if full[: len(before)] != before or full[: len(through)] != through or len(through) < len(before):
        raise DataError(
            f"{location}: the tokenizer's chat template does not render the conversation before messages[{index}] "
            "(or through it) as a prefix of the whole conversation, so the assistant turn's tokens cannot be "
            "found for the loss mask; use a template that renders turns independently, or train_on_prompt: true"
        )
    return len(before), len(through)


def prompt_ids(example: Example, tokenizer) -> list[int]:
    """Return the token ids a model is given to generate this example's answer, formatted as in training.

    Chat: every turn before the answer — the last turn when it is the assistant's (an evaluation row), else
    nothing (a conversation to continue) — plus the template's generation prompt. Prompt/completion:
    ``[BOS] + prompt``. Raises ``DataError`` for a text row (it has no prompt), a chat with nothing before its
    assistant turn, or a tokenizer without a chat template.
    """
    if example.kind == "text":
        raise DataError(f"{example.location}: a text row has no prompt to generate from")
    if example.kind == "prompt_completion":
        return _tokenizer_facts(tokenizer).leading_ids + encode_texts(tokenizer, [example.prompt])[0]
    _require_chat_template(tokenizer, example.location)
    answered = example.messages[-1]["role"] == "assistant"
    before = example.messages[:-1] if answered else example.messages
    if not before:
        raise DataError(f"{example.location}: nothing precedes the assistant turn to use as a prompt")
    text = _render_chats(tokenizer, [before], True, [example.location])[0]
    return encode_texts(tokenizer, [text])[0]


def reference(example: Example) -> str | None:
    """Return the expected answer: the last turn's content when it is the assistant's, the completion, or None
    (text rows, chats that end with another turn)."""
    if example.kind == "chat":
        last = example.messages[-1]
        return last["content"] if last["role"] == "assistant" else None
    if example.kind == "prompt_completion":
        return example.completion
    return None


def chat_prompt_ids(tokenizer, user_text: str, system: str | None = None) -> list[int]:
    """Return the token ids for a single user message (optionally after a system message) formatted with the
    tokenizer's chat template and its generation prompt, as training formats chat data.

    Raises ``DataError`` when the tokenizer has no chat template (generate with a raw prompt instead).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template to format the prompt with; pass the prompt raw")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user_text}
    ]
    text = _render_chats(tokenizer, [messages], True, ["prompt"])[0]
    return encode_texts(tokenizer, [text])[0]
