"""DPO (``train.objective: dpo``): preference rows and their errors, the loss and gradients judged by TRL's own
``DPOTrainer`` on the same batch and weights, and runs through the Python API and the command line on a tiny
random Llama (ln 2 at the start, TRL's metric names, held-out reward accuracy on an easy task, resume)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama
from loratune.adapters import adapter_slots, load_adapter, set_active, set_trainable
from loratune.cli.main import main
from loratune.data import DataError, detect_format
from loratune.data.preference import (
    build_preferences,
    collate_preferences,
    read_preferences,
)
from loratune.data.tokenize import IGNORE_INDEX
from loratune.errors import ConfigError
from loratune.train import train, validate_config
from loratune.train.attention import patch_attention
from loratune.train.fused_ops import patch_for_training, recompute_norm_outputs
from loratune.train.objectives.dpo import DPO, METRICS, REFERENCE_ADAPTER
from run_helpers import (
    adapter_tensors,
    assert_same_tensors,
    config_dict,
    metrics,
    train_records,
    write_config,
    write_jsonl,
)

QUIET = dict(progress=False, log=lambda line: None)
# TRL 1.x's DPOConfig sets transformers' deprecated gradient_checkpointing itself; not ours to fix
trl_warnings = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def chat_rows(n: int = 4, start: int = 0) -> list[dict]:
    """Conversational pairs (TRL's format) with completions of different lengths."""
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
            "rejected": [{"role": "assistant", "content": f"The answer is {2 * i + 1}, I think." + " no" * (i % 3)}],
        }
        for i in range(start, start + n)
    ]


def yes_no_rows(n: int, start: int = 0) -> list[dict]:
    """An easy preference: whatever the question, answer "yes" rather than "no" (standard rows)."""
    return [
        {"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(start, start + n)
    ]


# --- rows ----------------------------------------------------------------------------------------------------


def test_standard_rows_score_the_completion_and_eos_after_the_prompt(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "chosen": " Paris", "rejected": " London is it"}])
    pairs, stats = build_preferences(path, tiny_tokenizer)
    assert stats.kind == "standard" and stats.kept == 1
    prompt = tiny_tokenizer("Q:", add_special_tokens=False)["input_ids"]
    for side, text in ((pairs[0].chosen, " Paris"), (pairs[0].rejected, " London is it")):
        completion = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        assert side.input_ids == prompt + completion
        assert side.labels == [IGNORE_INDEX] * len(prompt) + completion


@trl_warnings
def test_conversational_rows_tokenize_as_trl_does(tmp_path, tiny_tokenizer):
    """Same ids and completion masks as TRL's DPOTrainer (its dataset preparation and collator)."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    rows = chat_rows(4)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, _ = build_preferences(path, tiny_tokenizer, max_length=None)
    ours = collate_preferences(pairs, tiny_tokenizer.pad_token_id)

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None)
    prepared = DPOTrainer._prepare_dataset(
        _TokenizerHolder(tiny_tokenizer), Dataset.from_list(rows), tiny_tokenizer, args, "train"
    )
    theirs = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)([prepared[i] for i in range(4)])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["labels"] != IGNORE_INDEX, theirs["completion_mask"].bool())


class _TokenizerHolder:
    """What ``DPOTrainer._prepare_dataset`` reads off the trainer besides its arguments."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer


def test_implicit_prompts_are_what_chosen_and_rejected_share(tmp_path):
    rows = [
        {"chosen": "Human: hi. Assistant: hello there", "rejected": "Human: hi. Assistant: go away"},
        {"chosen": "Human: sky? Assistant: blue", "rejected": "Human: sky? Assistant: green"},
    ]
    examples = read_preferences(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert (examples[0].prompt, examples[0].chosen, examples[0].rejected) == (
        "Human: hi. Assistant:",
        " hello there",
        " go away",
    )
    conversation = [{"role": "user", "content": "sky?"}]
    chat = [
        {
            "chosen": [*conversation, {"role": "assistant", "content": "blue"}],
            "rejected": [*conversation, {"role": "assistant", "content": "green"}],
        }
    ]
    example = read_preferences(write_jsonl(tmp_path / "chat.jsonl", chat))[0]
    assert example.prompt == conversation
    assert example.chosen == [{"role": "assistant", "content": "blue"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q:", "chosen": " a"}, "missing field 'rejected'"),
        ({"prompt": "Q:", "chosen": " a", "rejected": 3}, "field 'rejected' must be a string"),
        ({"prompt": ["Q"], "chosen": " a", "rejected": " b"}, "field 'prompt' must be a string"),
        ({"chosen": "same", "rejected": "same"}, "is the start of the other"),
        ({"chosen": "yes", "rejected": "no"}, "share no leading text"),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "bot", "content": "a"}], "rejected": []},
            "unknown role 'bot' in chosen[0]",
        ),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant"}]},
            "missing field 'rejected[0].content'",
        ),
        (
            {
                "prompt": "Q",
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "field 'prompt' must be a list of messages",
        ),
        (
            {
                "prompt": [{"role": "assistant", "content": "Q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "the prompt ends with an assistant turn",
        ),
    ],
)
def test_a_bad_row_is_one_error_naming_file_and_line(tmp_path, row, message):
    good = {"prompt": "Q:", "chosen": " a", "rejected": " b"}
    if isinstance(row["chosen"], list):
        good = chat_rows(1)[0]
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError, match=re.escape(message)) as error:
        read_preferences(path)
    assert f"{path}:2" in str(error.value)


def test_rows_of_the_other_kind_than_the_first_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [chat_rows(1)[0], {"prompt": "Q:", "chosen": " a", "rejected": " b"}])
    with pytest.raises(DataError, match="standard row .* first row is conversational") as error:
        read_preferences(path)
    assert f"{path}:2" in str(error.value)


def test_sft_on_preference_rows_points_to_the_dpo_objective():
    with pytest.raises(DataError, match="train.objective: dpo"):
        detect_format({"prompt": "Q", "chosen": "a", "rejected": "b"}, "data.jsonl:1")


# --- judged by TRL -------------------------------------------------------------------------------------------


def trl_trainer(tmp_path, tokenizer, rows, loss_type: str, *, adapter=None):
    """TRL's DPOTrainer on the tiny Llama (seed 0): with ``adapter`` None a new PEFT LoRA adapter (the reference is
    the base, adapters disabled), else that PEFT model (TRL copies its adapter as the frozen reference "ref"). The
    trained adapter's B factors are then set at random, so the policy differs from the reference."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=[loss_type],
        report_to="none",
        use_cpu=True,
        max_length=None,
        per_device_train_batch_size=len(rows),
        bf16=False,  # the judge runs in float32
    )
    options = {}
    if adapter is None:
        options["peft_config"] = PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = adapter or build_tiny_llama(len(tokenizer), seed=0)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **options
    )
    randomize_b(trainer.model, "default", seed=1)
    return trainer


def randomize_b(peft_model, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def trl_loss_and_gradients(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's loss (``DPOTrainer.compute_loss``, the mean over the pairs) and its gradients by PEFT key."""
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {
        name.replace(".default.", "."): param.grad.clone()
        for name, param in model.named_parameters()
        if ".default." in name and param.requires_grad
    }
    return float(loss.detach()), grads


def loratune_policy(tokenizer, adapter_dir: Path, reference_dir: Path | None = None):
    """The tiny Llama (seed 0) as a loratune run trains it: the training patches, the adapter in ``adapter_dir`` as
    the trained one, and the reference adapter beside it when given."""
    model = build_tiny_llama(len(tokenizer), seed=0)
    if reference_dir is not None:
        load_adapter(model, reference_dir, REFERENCE_ADAPTER)
    load_adapter(model, adapter_dir, "default", trainable=True)
    set_trainable(model, "default")
    set_active(model, "default")
    patch_for_training(model)
    patch_attention(model)
    return model.train()


def loratune_loss_and_gradients(model, objective, batch) -> tuple[float, dict[str, torch.Tensor]]:
    with recompute_norm_outputs():
        loss_sum, pairs, sums = objective.loss_sum(model, batch)
        (loss_sum / pairs).backward()
    assert set(sums) == set(METRICS)
    return float(loss_sum.detach() / pairs), {key: tensor.grad for key, tensor in adapter_slots(model, "default")}


def our_batch(trl_batch) -> dict[str, torch.Tensor]:
    """TRL's collated batch as loratune's (the completion tokens as labels)."""
    return {
        "input_ids": trl_batch["input_ids"],
        "attention_mask": trl_batch["attention_mask"],
        "labels": trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, IGNORE_INDEX),
    }


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) == 28  # 2 blocks × 7 projections × (A, B)
    for key, grad in theirs.items():
        # 1e-5 of each tensor's scale: fp32 sums in another order differ by a few units in the last place
        torch.testing.assert_close(ours[key], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=key)


@trl_warnings
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_adapter_gradients_equal_trl_with_the_base_as_reference(tmp_path, tiny_tokenizer, loss_type):
    rows = chat_rows(4)
    trainer = trl_trainer(tmp_path, tiny_tokenizer, rows, loss_type)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.save_pretrained(tmp_path / "adapter")
    trl_loss, trl_grads = trl_loss_and_gradients(trainer, trl_batch)

    model = loratune_policy(tiny_tokenizer, tmp_path / "adapter")
    loss, grads = loratune_loss_and_gradients(model, DPO(beta=0.1, loss_type=loss_type), our_batch(trl_batch))

    assert loss != pytest.approx(math.log(2), abs=1e-3)  # the policy is not the reference
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert_same_gradients(grads, trl_grads)
    # TRL's metrics, from the same forward
    _, pairs, sums = DPO(beta=0.1, loss_type=loss_type).loss_sum(model, our_batch(trl_batch))
    for name in METRICS:
        # the rewards are β·(log π − log π_ref), differences of sums over the completion: their rounding (each row's
        # prompt is read once here, so attention sums in another order) shows at 1e-6
        assert sums[name] / pairs == pytest.approx(trainer._metrics["train"][name][-1], rel=1e-5, abs=1e-5), name


@trl_warnings
def test_loss_and_gradients_equal_trl_with_an_adapter_as_reference(tmp_path, tiny_tokenizer):
    """TRL trains a PEFT model's own adapter against a frozen copy of it ("ref"); loratune's dpo.reference: DIR."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    start = get_peft_model(
        build_tiny_llama(len(tiny_tokenizer), seed=0),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    randomize_b(start, "default", seed=7)  # the "SFT adapter" both start from
    rows = chat_rows(4)
    trainer = trl_trainer(tmp_path, tiny_tokenizer, rows, "sigmoid", adapter=start)  # then moved away from it
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.save_pretrained(tmp_path / "saved", selected_adapters=["default", "ref"])
    trl_loss, trl_grads = trl_loss_and_gradients(trainer, trl_batch)

    model = loratune_policy(tiny_tokenizer, tmp_path / "saved", reference_dir=tmp_path / "saved" / "ref")
    objective = DPO(beta=0.1, loss_type="sigmoid", reference=str(tmp_path / "saved" / "ref"))
    loss, grads = loratune_loss_and_gradients(model, objective, our_batch(trl_batch))
    assert loss != pytest.approx(math.log(2), abs=1e-3)
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert_same_gradients(grads, trl_grads)


# --- runs ----------------------------------------------------------------------------------------------------


def dpo_config(model_dir, train_file, output_dir, **sections):
    """A small DPO run's validated config (``lora=None``: no lora section, for ``train.init_adapter``)."""
    sections["train"] = {"objective": "dpo", **sections.get("train", {})}
    config = config_dict(model_dir, train_file, output_dir, **sections)
    if config["lora"] is None:
        del config["lora"]
    return validate_config(config, default_output_dir="unused")


def test_a_fresh_adapter_starts_at_ln2_and_logs_trl_metric_names(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", chat_rows(8))
    config = dpo_config(tiny_llama_dir, data, tmp_path / "run", data={"eval_split": 0.25}, train={"eval_every": 2})
    train(config, **QUIET)
    records = train_records(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == 0.0 and records[0]["rewards/accuracies"] == 0.0
    for record in records:
        assert set(METRICS) <= record.keys()
    evaluations = [r for r in metrics(tmp_path / "run") if "eval_loss" in r]
    assert evaluations and {f"eval_{name}" for name in METRICS} <= evaluations[-1].keys()


def test_held_out_reward_accuracy_reaches_090_on_an_easy_preference(tiny_llama_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", yes_no_rows(32))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", yes_no_rows(16, start=100))
    config = dpo_config(
        tiny_llama_dir,
        train_file,
        tmp_path / "run",
        data={"eval": str(eval_file)},
        train={
            "max_steps": 12,
            "batch_size": 4,
            "lr": 5e-3,
            "eval_every": 12,
            "best_metric": "eval_rewards/accuracies",
        },
    )
    summary = train(config, **QUIET)
    assert summary["eval"]["eval_rewards/accuracies"] >= 0.9
    assert summary["eval"]["eval_loss"] < math.log(2)
    assert summary["eval"]["eval_rewards/margins"] > 0
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()


def test_resumed_dpo_run_ends_bit_identical_to_an_uninterrupted_one(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", yes_no_rows(12))
    settings = dict(
        lora={"lora_dropout": 0.1},
        train={"max_steps": 4, "batch_size": 2, "save_every": 2, "lr": 1e-2, "seed": 3},
        dpo={"beta": 0.2},
    )
    train(dpo_config(tiny_llama_dir, data, tmp_path / "straight", **settings), **QUIET)

    interrupted = dpo_config(tiny_llama_dir, data, tmp_path / "interrupted", **settings)
    calls = {"n": 0}
    real = DPO.loss_sum

    def crash_in_step_4(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(self, model, batch)

    monkeypatch.setattr(DPO, "loss_sum", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted, **QUIET)
    monkeypatch.undo()
    train(interrupted, resume=True, **QUIET)

    assert_same_tensors(adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "interrupted"))
    resumed, straight = train_records(tmp_path / "interrupted"), train_records(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in straight]


def test_an_sft_adapter_as_init_and_reference_starts_at_ln2(tiny_llama_dir, tmp_path):
    sft_data = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in yes_no_rows(8)]
    )
    sft = validate_config(
        config_dict(tiny_llama_dir, sft_data, tmp_path / "sft", train={"lr": 5e-2}), default_output_dir="x"
    )
    train(sft, **QUIET)
    adapter = str(tmp_path / "sft" / "adapter")
    data = write_jsonl(tmp_path / "p.jsonl", yes_no_rows(8))
    config = dpo_config(
        tiny_llama_dir, data, tmp_path / "dpo", lora=None, train={"init_adapter": adapter}, dpo={"reference": adapter}
    )
    train(config, **QUIET)
    first = train_records(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: the same adapter
    assert first["logps/chosen"] != pytest.approx(  # ... which is not the base
        _base_first_logps(tiny_llama_dir, data, tmp_path), abs=1e-3
    )
    trained = adapter_tensors(tmp_path / "dpo")
    assert trained.keys() == adapter_tensors(adapter).keys()


def _base_first_logps(model_dir, data, tmp_path) -> float:
    train(dpo_config(model_dir, data, tmp_path / "from-base"), **QUIET)
    return train_records(tmp_path / "from-base")[0]["logps/chosen"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"method": "full"}}, "use train.method: lora"),
        ({"train": {"best_metric": "eval_exact_match", "eval_every": 1}}, "not measured by a DPO run"),
        ({"data": {"packing": True}}, "data.packing does not apply to preference pairs"),
        ({"dpo": {"loss_type": "kto"}}, "dpo.loss_type"),
    ],
)
def test_options_dpo_cannot_take_are_config_errors(tiny_llama_dir, tmp_path, sections, message):
    data = write_jsonl(tmp_path / "p.jsonl", yes_no_rows(4))
    with pytest.raises(ConfigError, match=message):
        train(dpo_config(tiny_llama_dir, data, tmp_path / "run", **sections), **QUIET)


def test_a_dpo_section_without_the_dpo_objective_is_an_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="the dpo section applies to train.objective: dpo"):
        validate_config(
            config_dict(tiny_llama_dir, tmp_path / "p.jsonl", tmp_path / "r", dpo={"beta": 0.5}), default_output_dir="x"
        )


def test_train_dpo_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", chat_rows(6))
    config = write_config(
        tmp_path / "dpo.yaml",
        config_dict(tiny_llama_dir, data, tmp_path / "run", train={"objective": "dpo"}, dpo={"loss_type": "ipo"}),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(config), "--no-progress"]) == 0
    assert "DPO: loss ipo, beta 0.1" in out.getvalue()
    assert "rewards/margins" in out.getvalue()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2


def test_a_bad_row_stops_the_command_line_with_one_line_naming_file_and_line(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [*yes_no_rows(2), {"prompt": "Q:", "chosen": " a"}])
    config = write_config(
        tmp_path / "dpo.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run", train={"objective": "dpo"})
    )
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}:3" in err[0] and "missing field 'rejected'" in err[0]


def test_data_previews_pairs_with_the_scored_completions_marked(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", yes_no_rows(3))
    config = write_config(
        tmp_path / "dpo.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run", train={"objective": "dpo"})
    )
    capsys.readouterr()
    assert main(["data", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "chosen (" in out and "[[ yes 0<|im_end|>]]" in out and "[[ no 0<|im_end|>]]" in out
    assert "3 standard pairs read; 3 kept" in out


@pytest.mark.parametrize(
    "model, lora", [({}, {"use_dora": True}), ({"quantize": "nf4", "dtype": "fp32"}, {})], ids=["dora", "qlora-nf4"]
)
def test_a_fresh_dora_or_qlora_adapter_starts_at_ln2_and_learns(tiny_llama_dir, tmp_path, model, lora):
    data = write_jsonl(tmp_path / "p.jsonl", yes_no_rows(8))
    config = dpo_config(
        tiny_llama_dir, data, tmp_path / "run", model=model, lora=lora, train={"max_steps": 4, "lr": 1e-2}
    )
    train(config, **QUIET)
    records = train_records(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["loss"] < math.log(2) and records[-1]["rewards/margins"] > 0
