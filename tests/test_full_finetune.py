"""Full fine-tuning as a baseline (``train.method: full``): the same loop trains every weight (or those of
``train.full_modules``), its steps equal a plain transformers + AdamW loop, it writes ``model/`` that transformers
loads, keeps float32 master weights for a bf16 model, resumes exactly, and refuses what makes no sense."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loratune.data import build_dataset, collate
from run_helpers import addition_rows, config_dict, write_config, write_jsonl
from test_cli import assert_one_line_error, cli

ROWS = 8


def full_config(tmp_path, model_dir, name="run", **train):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(ROWS))
    settings = {
        "method": "full",
        "max_steps": 5,
        "batch_size": ROWS,
        "lr": 1e-3,
        "scheduler": "constant",
        "max_grad_norm": None,
        "save_every": 2,
        **train,
    }
    return write_config(tmp_path / f"{name}.yaml", config_dict(model_dir, data, tmp_path / name, train=settings))


def run(capsys, config, *extra):
    status, _, err = cli(capsys, "train", config, "--no-progress", *extra)
    assert status == 0, err


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def test_full_fine_tuning_steps_equal_a_plain_transformers_adamw_loop(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = full_config(tmp_path, tiny_llama_dir)
    run(capsys, config)
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]

    # the same 5 steps written plainly: every batch holds all 8 rows, so the order the loop draws them in does not
    # matter; transformers computes the loss, torch's AdamW (loratune's defaults: no weight decay) updates
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    examples, _ = build_dataset(tmp_path / "chat.jsonl", tokenizer, max_length=64)
    batch = collate(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    expected = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())

    assert len(losses) == 5
    for ours, theirs in zip(losses, expected):
        assert abs(ours - theirs) <= 1e-4 * theirs
    assert expected[-1] < expected[0] - 0.1  # it trained: not vacuous
    trained = model_weights(tmp_path / "run")
    for name, value in model.state_dict().items():
        if name in trained:
            assert (trained[name] - value).abs().max() <= 1e-4 * value.abs().max() + 1e-6, name


def test_a_full_run_writes_a_model_transformers_loads_and_says_what_it_cost(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run(capsys, full_config(tmp_path, tiny_llama_dir, max_steps=2))
    run_dir = tmp_path / "run"
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / "adapter").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "full"
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["model_bytes"] > 0 and summary["adapter_bytes"] is None
    trained = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert (trained(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_a_full_run_can_be_overwritten_and_a_lora_run_can_replace_it(capsys, tiny_llama_dir, tmp_path):
    config = full_config(tmp_path, tiny_llama_dir, max_steps=1)
    run(capsys, config)
    run(capsys, config, "--overwrite")
    run(capsys, config, "--overwrite", "--set", "train.method=lora")
    assert (tmp_path / "run" / "adapter").is_dir() and not (tmp_path / "run" / "model").exists()


def test_a_lora_run_reports_its_trainable_params_and_peak_memory_too(capsys, tiny_llama_dir, tmp_path):
    config = full_config(tmp_path, tiny_llama_dir, method="lora", max_steps=1)
    run(capsys, config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["peak_memory_mb"] > 0


def test_full_modules_train_only_the_named_modules(capsys, tiny_llama_dir, tmp_path):
    run(capsys, full_config(tmp_path, tiny_llama_dir, max_steps=2, full_modules=["q_proj"]))
    base = load_file(tiny_llama_dir / "model.safetensors")
    changed = {name for name, value in model_weights(tmp_path / "run").items() if not torch.equal(value, base[name])}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_bf16_full_fine_tuning_keeps_float32_master_weights(capsys, tiny_llama_dir, tmp_path):
    config = full_config(tmp_path, tiny_llama_dir, max_steps=2, lr=1e-6)
    config.write_text(config.read_text().replace("dtype: fp32", "dtype: bf16"))
    run(capsys, config)
    masters = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "model_state.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    start = base[name].to(torch.bfloat16).float()
    moved = masters[name] - start
    assert masters[name].dtype == torch.float32
    assert 0 < moved.abs().max() < 1e-5  # two steps of about lr each
    # rounded to bf16 at every step, these updates would have vanished: most weights would not have moved
    assert ((start + moved).to(torch.bfloat16).float() == start).float().mean() > 0.9


def test_an_interrupted_full_run_resumes_to_the_same_weights(capsys, tiny_llama_dir, tmp_path):
    run(capsys, full_config(tmp_path, tiny_llama_dir, name="straight", max_steps=4))
    resumed = full_config(tmp_path, tiny_llama_dir, name="resumed", max_steps=4)
    run(capsys, resumed, "--set", "train.max_steps=2")
    run(capsys, resumed, "--resume", "--set", "train.max_steps=4")
    straight, again = model_weights(tmp_path / "straight"), model_weights(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_8bit_adamw_keeps_a_quarter_of_the_states_trains_and_resumes_to_the_same_weights(
    capsys, make_tiny_llama_dir, tmp_path
):
    model_dir = make_tiny_llama_dir(intermediate_size=128)  # MLP weights of 4,096: bitsandbytes' 8-bit minimum
    run(capsys, full_config(tmp_path, model_dir, name="straight", max_steps=4, optimizer="adamw_8bit"))
    resumed = full_config(tmp_path, model_dir, name="resumed", max_steps=4, optimizer="adamw_8bit")
    run(capsys, resumed, "--set", "train.max_steps=2")
    states = load_file(tmp_path / "resumed" / "checkpoints" / "step-2" / "optimizer.safetensors")
    codes = [t for k, t in states.items() if k.endswith(".state1") and t.dtype == torch.uint8]
    assert len(codes) >= 3  # bitsandbytes' 8-bit moments (their code tables, shared, were written too)
    run(capsys, resumed, "--resume", "--set", "train.max_steps=4")
    straight, again = model_weights(tmp_path / "straight"), model_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    losses = [r["loss"] for r in records(tmp_path / "straight") if "loss" in r]
    assert losses[-1] < losses[0]
    plain = full_config(tmp_path, model_dir, name="plain", max_steps=4)
    run(capsys, plain)
    assert any(not torch.equal(straight[k], model_weights(tmp_path / "plain")[k]) for k in straight)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": {"quantize": "nf4"}}, "train.method: full"),
        ({"train": {"loraplus_lr_ratio": 4}}, "loraplus_lr_ratio"),
        ({"train": {"full_modules": ["no_such_proj"]}}, "no_such_proj"),
        ({"train": {"method": "lora", "full_modules": ["q_proj"]}}, "full_modules"),
        ({"train": {"method": "partial"}}, "train.method"),
        ({"train": {"optimizer": "paged_adamw_8bit"}}, "needs CUDA; on a CPU use adamw_8bit"),
        ({"train": {"optimizer": "adam8"}}, "train.optimizer"),
    ],
)
def test_full_fine_tuning_settings_that_make_no_sense_are_one_line_errors(
    capsys, tiny_llama_dir, tmp_path, change, named
):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(ROWS))
    sections = {"train": {"method": "full", **change.get("train", {})}, "model": change.get("model", {})}
    config = write_config(tmp_path / "bad.yaml", config_dict(tiny_llama_dir, data, tmp_path / "bad", **sections))
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert_one_line_error(status, err, "train", named)
    assert not (tmp_path / "bad").exists()


def test_peak_memory_restarts_with_each_run_in_one_process():
    import sys

    from loratune.memory import peak_memory_mb, reset_peak_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("the peak RSS restarts only on Linux (/proc/self/clear_refs)")
    big = torch.ones(400 * 2**20, dtype=torch.uint8)
    big += 1
    high = peak_memory_mb()
    del big
    reset_peak_memory()
    assert peak_memory_mb() < high - 300  # a later run (a sweep's next) does not inherit this peak
