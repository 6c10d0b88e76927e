"""Sequence classification with encoders: data and labels, the GLUE metrics, training through the CLI,
eval and predict, and interop with real PEFT on tiny random BERT and RoBERTa models."""

from __future__ import annotations

import csv
import json
import math

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file

import loratune
from loratune.data.classification import ClassExample, LabelSpace, label_space, read_classification
from loratune.errors import DataError
from loratune.inference.scores import accuracy, macro_f1, matthews, pearson, ranks, spearman
from loratune.models import load_classifier
from loratune.train.objectives.classification import classification_lora
from test_cli import assert_one_line_error, cli
from tiny_models import tiny_encoder_dir

ATOL = 1e-5
INTENTS = {
    "flight": ["book a flight to {c}", "i need a ticket to {c} please", "book a train to {c}"],
    "music": ["play some {g} music", "play a {g} song", "i want hear {g}"],
    "weather": ["what is the weather like {d}", "is it going to rain {d}", "weather in {c} {d}"],
    "alarm": ["set an alarm for {h}", "wake me at {h}", "set an alarm {d} at {h}"],
}
FILL = dict(c=["paris", "london", "tokyo"], g=["jazz", "rock"], d=["today", "tomorrow"], h=["seven am", "eight pm"])


def intent_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(INTENTS))
        template = rng.choice(INTENTS[label])
        rows.append({"text": template.format(**{k: rng.choice(v) for k, v in FILL.items()}), "label": label})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- the metrics --------------------------------------------------------------------------------------------


def test_the_glue_metrics_match_their_definitions():
    predicted, gold = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 2, 1, 1
    assert accuracy(predicted, gold) == 4 / 6
    assert matthews(predicted, gold, 2) == pytest.approx(
        (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    )
    assert macro_f1(predicted, gold, 2) == pytest.approx((2 * 2 / (2 * 2 + 1 + 1) + 2 * 2 / (2 * 2 + 1 + 1)) / 2)
    assert macro_f1([0, 0, 2], [0, 1, 2], 3) == pytest.approx((2 / 3 + 0 + 1) / 3)  # class 1 present, never predicted
    assert matthews([1, 1, 1], [0, 1, 0], 2) == 0.0  # a constant prediction
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]
    assert spearman(x, y) == pytest.approx(1.0) and pearson(x, y) < 0.99
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)


# --- data and labels ----------------------------------------------------------------------------------------


def test_label_spaces_keep_integer_order_sort_strings_and_see_regression():
    rows = lambda labels: [ClassExample("t", None, label, f"f:{i}") for i, label in enumerate(labels)]  # noqa: E731
    assert label_space(rows([2, 0, 1, 0])).names == ("0", "1", "2")
    assert label_space(rows(["10", "9", "1"])).names == ("1", "9", "10")  # CSV labels are strings of numbers
    assert label_space(rows(["spam", "ham"])).names == ("ham", "spam")
    space = label_space(rows([0.5, 3.8, 5.0]))
    assert space.regression and space.num_labels == 1 and space.problem_type == "regression"
    assert LabelSpace.from_json(space.to_json()) == space
    with pytest.raises(DataError, match="single label"):
        label_space(rows(["a", "a"]))
    with pytest.raises(DataError, match="f:1: label 'c' never occurs"):
        label_space(rows(["a", "b"])).encode(ClassExample("t", None, "c", "f:1"))


@pytest.mark.parametrize(
    "columns",
    [("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"), ("question", "sentence")],
)
def test_glue_pair_columns_are_read_as_pairs(columns, tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{columns[0]: "play some jazz", columns[1]: "play a rock song", "label": 1}])
    (example,) = read_classification(path)
    assert (example.text, example.pair, example.label) == ("play some jazz", "play a rock song", 1)


def test_glue_tsv_files_are_read(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit is "fine" today\t1\nnot so\t0\n')
    examples = read_classification(path)
    assert [(e.text, e.label) for e in examples] == [('it is "fine" today', "1"), ("not so", "0")]
    assert examples[1].location == f"{path}:3"


# --- training, eval and predict through the command line --------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    tiny_encoder_dir(root / "bert")
    write_jsonl(root / "train.jsonl", intent_rows(240, 0))
    write_jsonl(root / "eval.jsonl", intent_rows(48, 1))
    return root


def write_config(root, name: str, **sections) -> str:
    config = {
        "model": {"name": str(root / "bert"), "dtype": "fp32"},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
        "lora": {"r": 4, "lora_alpha": 8},
        "train": {"max_steps": 60, "batch_size": 16, "lr": 5e-3, "log_every": 20, "save_every": 30},
        "output_dir": str(root / name),
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(workspace):
    config = write_config(workspace, "run", train={"eval_every": 30, "best_metric": "eval_accuracy"})
    assert loratune.cli.main(["train", config, "--no-progress"]) == 0
    return workspace / "run"


def test_a_classification_run_learns_the_task_and_writes_a_peft_seq_cls_adapter(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["eval"]["eval_accuracy"] >= 0.6  # four intents: chance is 0.25
    assert {"eval_macro_f1", "eval_mcc", "eval_loss"} <= summary["eval"].keys()
    assert summary["best_metric"] == "eval_accuracy" and (trained / "best" / "labels.json").is_file()
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["query", "value"]  # the paper's W_q, W_v by default
    labels = json.loads((trained / "adapter" / "labels.json").read_text())
    assert labels["id2label"] == {"0": "alarm", "1": "flight", "2": "music", "3": "weather"}
    assert labels["problem_type"] == "single_label_classification"
    run_config = yaml.safe_load((trained / "config.yaml").read_text())
    assert run_config["task"] == "seq_cls"


def test_eval_reports_the_classification_metrics_and_predict_labels_rows(trained, workspace, capsys):
    status, out, err = cli(
        capsys, "eval", "--adapter", trained / "adapter", "--data", workspace / "eval.jsonl", "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["perplexity"] is None and result["exact_match"] is None and result["n"] == 48
    summary = json.loads((trained / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["eval"]["eval_accuracy"])
    unlabelled = workspace / "unlabelled.jsonl"
    write_jsonl(unlabelled, [{"text": "play some jazz music"}, {"text": "book a flight to tokyo"}])
    status, out, err = cli(
        capsys,
        "predict",
        "--adapter",
        trained / "adapter",
        "--data",
        unlabelled,
        "--out",
        workspace / "predictions.jsonl",
    )
    assert status == 0, err
    rows = [json.loads(line) for line in (workspace / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["play some jazz music", "book a flight to tokyo"]
    assert all(r["label"] in {"alarm", "flight", "music", "weather"} for r in rows)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4) for r in rows)


def test_regression_and_pair_tasks_train_with_their_losses_and_metrics(workspace, capsys):
    import random

    rng = random.Random(0)
    words = [
        "play",
        "some",
        "jazz",
        "music",
        "book",
        "a",
        "flight",
        "to",
        "paris",
        "set",
        "an",
        "alarm",
        "for",
        "seven",
        "am",
    ]
    pairs = []
    for _ in range(120):
        a, b = rng.sample(words, 4), rng.sample(words, 4)
        pairs.append({"sentence1": " ".join(a), "sentence2": " ".join(b), "label": len(set(a) & set(b)) + 0.5})
    write_jsonl(workspace / "sts.jsonl", pairs)
    config = write_config(
        workspace,
        "sts",
        data={"train": str(workspace / "sts.jsonl"), "eval": None, "eval_split": 0.2, "max_length": 32},
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    summary = json.loads((workspace / "sts" / "summary.json").read_text())
    assert {"eval_pearson", "eval_spearman", "eval_mse"} <= summary["eval"].keys()
    labels = json.loads((workspace / "sts" / "adapter" / "labels.json").read_text())
    assert labels["problem_type"] == "regression" and labels["pair"] is True
    status, _, err = cli(capsys, "eval", "--adapter", workspace / "sts" / "adapter", "--data", workspace / "eval.jsonl")
    assert_one_line_error(status, err, "eval", "single texts", "pairs")  # a pair task given single sentences


def test_full_fine_tuning_trains_a_classifier_too(workspace, capsys):
    config = write_config(workspace, "full", train={"method": "full", "lr": 1e-3, "max_steps": 20})
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    model_dir = workspace / "full" / "model"
    assert (model_dir / "labels.json").is_file()
    status, out, err = cli(capsys, "eval", "--model", model_dir, "--data", workspace / "eval.jsonl", "--json")
    assert status == 0, err
    assert 0 <= json.loads(out)["accuracy"] <= 1


def test_bitfit_trains_only_the_biases_and_the_new_head(workspace, capsys):
    config = write_config(workspace, "bitfit", train={"method": "bitfit", "lr": 5e-2, "max_steps": 60})
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    summary = json.loads((workspace / "bitfit" / "summary.json").read_text())
    base = {f"bert.{name}": t for name, t in load_file(workspace / "bert" / "model.safetensors").items()}
    tuned = load_file(workspace / "bitfit" / "model" / "model.safetensors")  # BertForSequenceClassification
    changed = {name for name, tensor in tuned.items() if name in base and not torch.equal(tensor, base[name])}
    new = set(tuned) - set(base)  # the head the checkpoint lacked
    assert new and changed and all(name.endswith(".bias") for name in changed)
    assert any("encoder" in name for name in changed)  # the encoder's biases, not only the head's
    biases = sum(t.numel() for name, t in base.items() if name.endswith(".bias"))
    assert summary["trainable_params"] == biases + sum(tuned[name].numel() for name in new)
    evals = [json.loads(line) for line in (workspace / "bitfit" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1  # it learns, on biases alone
    assert evals[-1]["eval_accuracy"] > 0.25  # four intents: chance is 0.25
    status, _, err = cli(
        capsys, "eval", "--model", workspace / "bitfit" / "model", "--data", workspace / "eval.jsonl", "--json"
    )
    assert status == 0, err


def test_intrinsic_training_of_a_classifier_learns_and_merges_into_a_model_with_its_head(workspace, capsys):
    config = write_config(
        workspace,
        "intrinsic",
        train={"method": "intrinsic", "lr": 0.05, "max_steps": 60},
        intrinsic={"dim": 200},
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    run = workspace / "intrinsic"
    summary = json.loads((run / "summary.json").read_text())
    artefact = run / "intrinsic"
    assert {"intrinsic.safetensors", "head.safetensors", "labels.json"} <= {p.name for p in artefact.iterdir()}
    config_json = json.loads((artefact / "intrinsic_config.json").read_text())
    assert config_json["dim"] == 200 and not any("classifier" in t for t in config_json["targets"])
    head = sum(t.numel() for t in load_file(artefact / "head.safetensors").values())
    assert summary["trainable_params"] == 200 + head  # θ_d with SAID's λ inside it, and the head
    assert (
        any("LayerNorm" in t for t in config_json["targets"])
        and "bert.embeddings.word_embeddings.weight" in (config_json["targets"])
    )  # every parameter of the encoder by default
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    status, out, err = cli(capsys, "merge", "--adapter", artefact, "--out", workspace / "intrinsic-merged")
    assert status == 0, err
    assert (workspace / "intrinsic-merged" / "labels.json").is_file()
    status, out, err = cli(
        capsys, "eval", "--model", workspace / "intrinsic-merged", "--data", workspace / "eval.jsonl", "--json"
    )
    assert status == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])


def test_a_sweep_over_intrinsic_dims_of_a_classifier_reports_d90_by_accuracy(workspace, capsys):
    reference = write_config(workspace, "d90-reference", train={"max_steps": 30})
    status, _, err = cli(capsys, "train", reference, "--no-progress")
    assert status == 0, err
    base = write_config(
        workspace, "d90-unused", train={"method": "intrinsic", "lr": 0.05, "max_steps": 10}, intrinsic={"dim": 64}
    )
    out_dir = workspace / "d90-sweep"
    status, _, err = cli(
        capsys,
        "sweep",
        base,
        "--grid",
        "intrinsic.dim=64,256",
        "--reference",
        workspace / "d90-reference",
        "--out",
        out_dir,
    )
    assert status == 0, err
    accuracy = json.loads((workspace / "d90-reference" / "summary.json").read_text())["eval"]["eval_accuracy"]
    assert f"eval_accuracy ({accuracy:.3f})" in (out_dir / "results.md").read_text()


def test_forgetting_of_a_classifier_is_its_representation_drift_and_resumes_with_its_base(workspace, capsys):
    write_jsonl(workspace / "retain.jsonl", [{"text": f"the weather in town number {i} is mild"} for i in range(12)])
    sections = dict(
        data={"retain": str(workspace / "retain.jsonl")},
        train={"method": "full", "lr": 1e-3, "max_steps": 4, "eval_every": 2, "save_every": 2, "scheduler": "constant"},
    )
    config = write_config(workspace, "forget", **sections)
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    records = [json.loads(line) for line in (workspace / "forget" / "metrics.jsonl").read_text().splitlines()]
    drift = [(r["step"], r["forgetting"]) for r in records if "forgetting" in r]
    assert drift[0] == (0, 0.0) and [step for step, _ in drift] == [0, 2, 4]
    assert 0 < drift[1][1] < drift[2][1] < 1  # full fine-tuning moves the encoder further with every step
    summary = json.loads((workspace / "forget" / "summary.json").read_text())
    assert summary["forgetting"] == pytest.approx(drift[-1][1])
    # stopped after 2 steps and resumed: the drift is measured against the same base, so it ends the same
    status, _, err = cli(capsys, "train", config, "--no-progress", "--overwrite", "--set", "train.max_steps=2")
    assert status == 0, err
    status, _, err = cli(capsys, "train", config, "--no-progress", "--resume", "--set", "train.max_steps=4")
    assert status == 0, err
    resumed = json.loads((workspace / "forget" / "summary.json").read_text())
    assert resumed["forgetting"] == pytest.approx(summary["forgetting"], rel=1e-5)


@pytest.mark.parametrize(
    "method",
    [{"method": "lora", "lr": 1e-2}, {"method": "intrinsic", "lr": 0.1}],
    ids=["lora", "intrinsic"],
)
def test_forgetting_of_an_adapted_classifier_rises_from_zero_as_it_trains(workspace, capsys, method):
    """LoRA and intrinsic training of a classifier report forgetting too: no drift before the first step, some after
    it, the summary's figure the last one logged."""
    write_jsonl(workspace / "retain.jsonl", [{"text": f"the weather in town number {i} is mild"} for i in range(12)])
    name = f"forget-{method['method']}"
    config = write_config(
        workspace,
        name,
        data={"retain": str(workspace / "retain.jsonl")},
        train={**method, "max_steps": 4, "eval_every": 2, "save_every": 4, "scheduler": "constant"},
        **({"intrinsic": {"dim": 64}} if method["method"] == "intrinsic" else {}),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    records = [json.loads(line) for line in (workspace / name / "metrics.jsonl").read_text().splitlines()]
    drift = [(r["step"], r["forgetting"]) for r in records if "forgetting" in r]
    assert drift[0] == (0, 0.0) and [step for step, _ in drift] == [0, 2, 4]
    assert drift[1][1] > 0 and drift[2][1] > 0
    summary = json.loads((workspace / name / "summary.json").read_text())
    assert summary["forgetting"] == pytest.approx(drift[-1][1])


def test_bitfit_on_a_model_without_biases_is_one_line(tiny_llama_dir, tmp_path, capsys):
    from run_helpers import addition_rows, config_dict
    from run_helpers import write_config as write_run_config
    from run_helpers import write_jsonl as write_rows

    data = write_rows(tmp_path / "train.jsonl", addition_rows(8))
    config = write_run_config(
        tmp_path / "c.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run", train={"method": "bitfit"})
    )
    assert_one_line_error(*cli(capsys, "train", config)[::2], "train", "bitfit", "no", "lora")


def test_bad_classification_input_is_one_clear_line(workspace, tmp_path, capsys):
    rows = intent_rows(20, 3)
    del rows[4]["label"]
    write_jsonl(tmp_path / "missing.jsonl", rows)
    config = write_config(workspace, "bad1", data={"train": str(tmp_path / "missing.jsonl")})
    assert_one_line_error(*cli(capsys, "train", config)[::2], "train", "missing.jsonl:5", "label")
    write_jsonl(tmp_path / "unseen.jsonl", [{"text": "play some jazz", "label": "greeting"}])
    config = write_config(workspace, "bad2", data={"eval": str(tmp_path / "unseen.jsonl")})
    assert_one_line_error(*cli(capsys, "train", config)[::2], "train", "unseen.jsonl:1", "greeting")
    (tmp_path / "codegen").mkdir()
    (tmp_path / "codegen" / "config.json").write_text(
        json.dumps({"model_type": "codegen", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10})
    )
    config = write_config(workspace, "bad3", model={"name": str(tmp_path / "codegen")})
    assert_one_line_error(*cli(capsys, "train", config)[::2], "train", "no sequence-classification head")
    assert not (workspace / "bad1").exists() and not (workspace / "bad3").exists()


# --- interop with real PEFT --------------------------------------------------------------------------------

SPACE = LabelSpace(("neg", "neutral", "pos"))


def classifier(directory):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=3).eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(
        ["play some jazz music", "book a flight to paris please"],
        ["today", "i want hear rock"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def assert_peft_gives_our_logits(directory, space: LabelSpace, tmp_path, check_config=None) -> None:
    """A perturbed ('trained') loratune classifier adapter on the encoder at ``directory``, saved and loaded by
    PEFT onto the same transformers class: the same logits. ``check_config`` sees the LoRA config first."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    model, _ = load_classifier(directory, space, dtype="fp32")
    config = classification_lora(loratune.LoraConfig(r=4, lora_alpha=8), model, token=space.token)
    if check_config is not None:
        check_config(config)
    loratune.add_adapter(model, config)
    perturb(model)
    expected = logits(model, tokenizer)
    loratune.save_adapter(model, tmp_path / "adapter")
    auto = AutoModelForTokenClassification if space.token else AutoModelForSequenceClassification
    torch.manual_seed(3)
    base = auto.from_pretrained(directory, num_labels=space.num_labels).eval()
    assert (logits(base, tokenizer) - expected).abs().max() > 1e-2
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, tokenizer), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_loratune_classifier_adapter_loads_in_peft_with_the_same_logits(kind, tmp_path):
    assert_peft_gives_our_logits(tiny_encoder_dir(tmp_path / kind, kind), SPACE, tmp_path)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_peft_seq_cls_adapter_loads_in_loratune_with_the_same_logits(kind, tmp_path):
    from transformers import AutoTokenizer

    directory = tiny_encoder_dir(tmp_path / kind, kind)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    source = peft.get_peft_model(
        classifier(directory),
        peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
        ),
    )
    perturb(source)
    source.eval()
    expected = logits(source, tokenizer)
    source.save_pretrained(tmp_path / "adapter")
    model, _ = load_classifier(directory, SPACE, dtype="fp32")
    loratune.load_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=ATOL, rtol=0)


@pytest.mark.integration
def test_the_classification_demo_beats_90_percent_on_held_out_phrasings(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).parents[1] / "examples" / "classify" / "config.yaml"
    status, _, err = cli(capsys, "train", config, "--set", f"output_dir={tmp_path / 'run'}", "--no-progress")
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.3  # the new head: chance is 1/8
    assert evals[-1]["eval_accuracy"] >= 0.9


def test_data_preview_and_a_sweep_work_for_a_classifier(workspace, capsys):
    config = write_config(workspace, "sweepable", train={"max_steps": 10})
    status, out, err = cli(capsys, "data", config, "-n", "1")
    assert status == 0, err
    assert "4 labels (alarm, flight, music, weather)" in out and "[CLS]" in out
    status, out, err = cli(capsys, "sweep", config, "--grid", "lora.r=2,4", "--out", workspace / "sweep")
    assert status == 0, err
    with open(workspace / "sweep" / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {"eval_accuracy", "eval_macro_f1", "eval_mcc"} <= set(table[0])
    # the targets the runs trained (the encoder's query and value), not the config's unset default
    assert [(row["r"], row["target_modules"]) for row in table] == [("2", "[query, value]"), ("4", "[query, value]")]
    assert "eval_accuracy" in (workspace / "sweep" / "results.md").read_text()


# --- token classification -----------------------------------------------------------------------------------


def test_entities_are_read_as_conlleval_reads_them():
    from loratune.inference.scores import entities, entity_scores

    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "B-LOC", "I-ORG", "O"]
    assert entities(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("LOC", 5, 6), ("ORG", 6, 7)}
    scores = entity_scores([["B-PER", "I-PER", "O", "O"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    assert (scores["precision"], scores["recall"], scores["accuracy"]) == (1.0, 0.5, 0.75)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert entity_scores([["B-PER", "O"]], [["B-PER", "I-PER"]])["f1"] == 0.0  # a span must match exactly


def test_tags_go_on_the_first_sub_token_of_each_word():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loratune.data.classification import IGNORE, LabelSpace, TokenExample, tokenize_tokens

    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]", "fly", "##ing", "to", "new", "yo", "##rk"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    space = LabelSpace(("O", "B-LOC", "I-LOC"), token=True)
    example = TokenExample(["flying", "to", "new", "york"], ["O", "O", "B-LOC", "I-LOC"], "f:1")
    (row,) = tokenize_tokens([example], tokenizer, space, max_length=16)
    assert tokenizer.convert_ids_to_tokens(row.input_ids) == ["fly", "##ing", "to", "new", "yo", "##rk"]
    assert row.label == [0, IGNORE, 0, 1, 2, IGNORE]
    assert row.words == ((0, 0), (2, 1), (3, 2), (4, 3)) and row.n_words == 4
    (cut,) = tokenize_tokens([example], tokenizer, space, max_length=4)  # "new york" does not fit
    assert cut.words == ((0, 0), (2, 1), (3, 2)) and cut.n_words == 4


def ner_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    cities = [["paris"], ["london"], ["tokyo"]]
    rows = []
    for _ in range(n):
        city = rng.choice(cities)
        before = rng.choice([["book", "a", "flight", "to"], ["weather", "in"], ["i", "need", "a", "ticket", "to"]])
        after = rng.choice([[], ["today"], ["tomorrow", "please"]])
        tokens = [*before, *city, *after]
        tags = ["O"] * len(before) + ["B-LOC"] + ["I-LOC"] * (len(city) - 1) + ["O"] * len(after)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def test_a_token_classification_run_tags_words_and_reports_entity_f1(workspace, capsys):
    write_jsonl(workspace / "ner.jsonl", ner_rows(160, 0))
    write_jsonl(workspace / "ner_eval.jsonl", ner_rows(40, 1))
    config = write_config(
        workspace,
        "ner",
        data={"train": str(workspace / "ner.jsonl"), "eval": str(workspace / "ner_eval.jsonl")},
        train={"max_steps": 60, "lr": 1e-2},
    )
    status, out, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    summary = json.loads((workspace / "ner" / "summary.json").read_text())
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy"} <= summary["eval"].keys()
    assert summary["eval"]["eval_f1"] >= 0.5
    labels = json.loads((workspace / "ner" / "adapter" / "labels.json").read_text())
    assert labels["task"] == "token_cls" and labels["id2label"] == {"0": "O", "1": "B-LOC"}
    adapter_config = json.loads((workspace / "ner" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "TOKEN_CLS"
    write_jsonl(workspace / "words.jsonl", [{"tokens": ["weather", "in", "paris", "today"]}])
    status, out, err = cli(
        capsys, "predict", "--adapter", workspace / "ner" / "adapter", "--data", workspace / "words.jsonl"
    )
    assert status == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["tokens"] == ["weather", "in", "paris", "today"] and len(row["tags"]) == 4
    assert set(row["tags"]) <= {"O", "B-LOC"}
    bad = ner_rows(3, 2)
    bad[1]["tags"] = bad[1]["tags"][:-1]
    write_jsonl(workspace / "ner_bad.jsonl", bad)
    status, _, err = cli(
        capsys, "eval", "--adapter", workspace / "ner" / "adapter", "--data", workspace / "ner_bad.jsonl"
    )
    assert_one_line_error(status, err, "eval", "ner_bad.jsonl:2", "one tag per token")


def test_a_loratune_token_classifier_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    space = LabelSpace(("O", "B-LOC", "I-LOC"), token=True)
    assert_peft_gives_our_logits(tiny_encoder_dir(tmp_path / "bert"), space, tmp_path)


@pytest.mark.parametrize(
    "kind, targets, head",
    [
        ("distilbert", ["q_lin", "v_lin"], ["classifier", "pre_classifier"]),
        ("deberta-v2", ["query_proj", "value_proj"], ["classifier", "pooler"]),
        ("modernbert", ["Wqkv"], ["classifier", "head"]),
    ],
)
def test_other_encoders_get_their_query_value_targets_and_a_fully_trained_new_head(kind, targets, head, tmp_path):
    def check(config):
        assert sorted(config.target_modules) == targets
        assert config.modules_to_save == head  # the head's modules the checkpoint lacked

    assert_peft_gives_our_logits(tiny_encoder_dir(tmp_path / kind, kind), SPACE, tmp_path, check)


def test_merge_writes_a_classifier_with_its_labels_that_gives_the_adapter_s_predictions(trained, workspace, capsys):
    merged = workspace / "merged"
    status, _, err = cli(capsys, "merge", "--adapter", trained / "adapter", "--out", merged)
    assert status == 0, err
    assert json.loads((merged / "labels.json").read_text())["id2label"]["0"] == "alarm"
    outputs = []
    for options in (["--adapter", trained / "adapter"], ["--model", merged]):
        status, out, err = cli(
            capsys, "eval", *options, "--data", workspace / "eval.jsonl", "--json", "--dtype", "fp32"
        )
        assert status == 0, err
        outputs.append(json.loads(out))
    assert outputs[0]["accuracy"] == outputs[1]["accuracy"]
    assert outputs[0]["loss"] == pytest.approx(outputs[1]["loss"], abs=1e-5)


def test_the_builtin_retain_set_is_text_for_a_classifier():
    from loratune.inference.forgetting import retain_texts

    texts = retain_texts("builtin")
    assert len(texts) == 150 and all(ex.text and ex.pair is None and ex.label is None for ex in texts)
    assert texts[0].text.startswith("Explain photosynthesis")
