"""The training loop: config → model + adapter + data → optimizer steps → run directory.

One optimizer step = ``grad_accum`` micro-batches; the loss is the sum of token losses divided by the
number of target tokens across all of them (so long and short micro-batches weigh by their tokens) — for a
classifier, of its rows' (or labelled sub-tokens') losses — and, across processes (``train.distributed``),
across all processes' shares of the global micro-batches.
The batch order is a pure function of (seed, epoch), the learning rate of the step, and every other piece
of state is in the checkpoint, so ``resume`` continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loratune import signals
from loratune.adapters import add_adapter, parameter_report
from loratune.data import (
    Example,
    TokenizedExample,
    batch_order,
    build_dataset,
    collate,
    collate_packed,
    pack,
    read_examples,
    split_eval,
)
from loratune.data.classification import (
    LabelSpace,
    collate_classification,
    tokenize_classification,
    tokenize_tokens,
    write_labels,
)
from loratune.errors import ConfigError, LoratuneError
from loratune.inference.classify import classification_loss_sum, classification_result, classifier_logits
from loratune.inference.evaluate import EvalResult, evaluate
from loratune.inference.forgetting import retain_examples, retain_loss
from loratune.inference.loss import causal_lm_loss_sum
from loratune.layers.init import is_residual_start
from loratune.memory import release_freed_memory
from loratune.models import context_length, load_classifier, load_model
from loratune.models.devices import model_device
from loratune.outputs import write_output_dir, write_text_atomic
from loratune.train import distributed
from loratune.train.attention import patch_attention
from loratune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loratune.train.classify import (
    check_classifier_config,
    classification_examples,
    classification_lora,
    describe_labels,
)
from loratune.train.config import TrainConfig, resolved_task
from loratune.train.distributed import Processes
from loratune.train.dropout import patch_dropout
from loratune.train.fused_ops import patch_for_training, recompute_norm_outputs
from loratune.train.metrics import MetricsLog, NoMetrics, plot_losses
from loratune.train.optimizer import build_optimizer, set_learning_rate
from loratune.train.run_dir import (
    SUMMARY_FILE,
    RunDirs,
    abandon_run_dir,
    finish_run_dir,
    resume_config,
    run_directory,
    run_inputs,
    saved_run_config,
    write_run_config,
)
from loratune.train.schedule import learning_rate
from loratune.train.trained import TrainedAdapter, TrainedIntrinsic, TrainedModel

ADAPTER_NAME = "default"
SINGLE = Processes()  # one process: no distributed run


class TrainingDiverged(LoratuneError):
    """The loss became NaN or infinite."""


@dataclass
class RunData:
    """Training and evaluation examples of a run (eval ``examples`` carry the references for exact match)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    eval_examples: list[Example]
    stats: object
    retain: list[TokenizedExample] = ()  # data.retain: what the base knows (see train.forgetting)
    labels: LabelSpace | None = None  # a classifier's outputs (task: seq_cls); its rows are TokenizedClassExample


def prepare_data(config: TrainConfig, tokenizer) -> RunData:
    """Read, tokenize and split the run's data as ``config.data`` says."""
    d = config.data
    options = dict(format=d.format, max_length=d.max_length, truncation=d.truncation, train_on_prompt=d.train_on_prompt)
    train, stats = build_dataset(d.train, tokenizer, **options)
    eval_tokenized: list[TokenizedExample] = []
    eval_examples: list[Example] = []
    if d.eval is not None:
        eval_tokenized, _ = build_dataset(d.eval, tokenizer, **options)
        eval_examples, _ = read_examples(d.eval, d.format)
    elif d.eval_split > 0:
        train, eval_tokenized = split_eval(train, d.eval_split, config.train.seed)
        by_location = {ex.location: ex for ex in read_examples(d.train, d.format)[0]}
        eval_examples = [by_location[t.location] for t in eval_tokenized]
    if d.eval_max_examples is not None:
        eval_tokenized, eval_examples = eval_tokenized[: d.eval_max_examples], eval_examples[: d.eval_max_examples]
    if not train:
        raise ConfigError(f"data.train: no usable training rows in {d.train} after length limits")
    retain = retain_examples(d.retain, tokenizer, d.max_length) if d.retain is not None else []
    return RunData(train, eval_tokenized, eval_examples, stats, retain)


class BatchStream:
    """Micro-batches in a deterministic order; its position (epoch, index) is what a checkpoint stores.

    Across processes the order is that of the global micro-batch (``batch_size × world``), and each process
    takes every ``world``-th row of it from its ``rank`` on; a final short batch too small to give every process
    a row is left out."""

    def __init__(
        self,
        examples,
        config: TrainConfig,
        pad_id: int,
        device,
        collate_rows=collate,
        processes: Processes = SINGLE,
    ):
        packing = config.data.packing
        self.rows = pack(examples, config.data.max_length) if packing else examples
        self.collate = (
            (lambda rows: collate_packed(rows, pad_id)) if packing else (lambda rows: collate_rows(rows, pad_id))
        )
        self.lengths = None if packing else [len(e) for e in examples]
        self.world, self.rank = processes.world, processes.rank
        self.batch_size, self.seed, self.device = config.train.batch_size * self.world, config.train.seed, device
        if self.world > 1 and len(self.rows) < self.batch_size:
            raise ConfigError(
                f"data.train has {len(self.rows)} training rows, fewer than one global batch "
                f"({config.train.batch_size} × {self.world} processes); use fewer processes or a "
                "smaller train.batch_size"
            )
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        order = batch_order(len(self.rows), self.batch_size, self.seed, epoch, lengths=self.lengths)
        return [batch for batch in order if len(batch) >= self.world]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._order = self._epoch_order(epoch)

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._order):
            self.seek(self.epoch + 1, 0)
        batch = self.collate([self.rows[i] for i in self._order[self.index][self.rank :: self.world]])
        self.index += 1
        return {k: v.to(self.device) for k, v in batch.items()}


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        transient=False,
    )
    progress.start()
    progress.add_task("train", total=total, completed=start, info="")
    return progress


def save_trained(
    trained, tokenizer, path: Path, base_name: str, labels: LabelSpace | None = None, write: bool = True
) -> None:
    """Write what the run trained (an adapter, or a full fine-tune's model) plus the tokenizer files (with the
    chat template) — and a classifier's ``labels.json`` — into ``path``, replacing it whole. When FSDP split what
    was trained (``trained.collective``) every process calls this, and only the one with ``write`` writes."""
    weights = trained.saved_weights(keep=write)
    if not write:
        return

    def fill(staging: Path) -> None:
        trained.save(tokenizer, staging, base_name, weights)
        if labels is not None:
            write_labels(staging, labels)

    write_output_dir(path, trained.output_name, fill, overwrite=True)


class TrainingInterrupted(LoratuneError):
    """Training stopped by a signal (Ctrl-C, SIGTERM, SIGHUP: ``signum``); ``checkpoint`` is the checkpoint to resume
    from (None when no step completed, so there is nothing to resume)."""

    def __init__(self, message: str, checkpoint: Path | None, run_dir: Path, signum: int = 2):
        super().__init__(message)
        self.checkpoint, self.run_dir, self.signum = checkpoint, run_dir, signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a command stopped by this signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + self.signum


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log=print,
) -> dict:
    """Run a fine-tune as ``config`` says and return the summary (also written to ``summary.json``).

    ``resume`` continues the run in ``config.output_dir`` from its newest complete checkpoint with the run's
    saved config, changed only where ``config`` differs in what a resumed run may change (more steps or
    epochs, evaluation, logging and saving: ``run_dir.RESUMABLE_CHANGES``). ``overwrite`` replaces an
    existing run that loratune wrote; the new run is built beside it and swapped in when it completes.
    ``progress`` shows a live bar (default: on a terminal).

    Raises ``ConfigError`` for an output directory that cannot be used, a resume that would change anything
    else or finds the run finished, and other user errors; ``TrainingDiverged`` when the loss stops being
    finite (the last checkpoint stays); ``TrainingInterrupted`` on Ctrl-C, after saving a checkpoint at the
    last completed step. A run that fails before its first step leaves no output directory behind.
    """
    processes = distributed.start()
    dirs = None
    try:
        with signals.stop_on_signals(), contextlib.ExitStack() as guarded:
            dirs = _shared_run_dir(config, resume, overwrite, log, processes, guarded)
            return _run(config, dirs, resume, progress, log if processes.main else _quiet, processes)
    except BaseException as error:
        if (
            processes.main
            and dirs is not None
            and not isinstance(error, TrainingInterrupted)
            and not _first_step_done(dirs)
        ):
            abandon_run_dir(dirs)
        raise
    finally:
        distributed.stop(processes)


def _quiet(*_args, **_kwargs) -> None:
    """The log of processes other than rank 0: the run speaks once."""


def _shared_run_dir(
    config: TrainConfig, resume: bool, overwrite: bool, log, processes: Processes, guarded: contextlib.ExitStack
) -> RunDirs:
    """Rank 0 guards the run directory (held in ``guarded`` for the run) and decides where it writes; every process
    gets its paths (or rank 0's error, raised everywhere)."""
    prepared = None
    if processes.main:
        try:
            prepared = guarded.enter_context(
                run_directory(
                    config.output_dir,
                    resume=resume,
                    overwrite=overwrite,
                    log=log,
                    inputs=run_inputs(config, resume=resume),
                )
            )
        except LoratuneError as error:
            prepared = error
    prepared = distributed.from_main(processes, prepared)
    if isinstance(prepared, LoratuneError):
        raise prepared
    return prepared


def _first_step_done(dirs) -> bool:
    metrics = dirs.work / "metrics.jsonl"
    return (dirs.work / "checkpoints").is_dir() or (metrics.is_file() and metrics.stat().st_size > 0)


def _load_base(config: TrainConfig, on_block=None):
    return load_model(
        config.model.name,
        quantize=config.model.quantize,
        dtype=config.model.dtype,
        device=config.model.device,
        trust_remote_code=config.model.trust_remote_code,
        double_quant=config.model.double_quant,
        compute_dtype=config.model.compute_dtype,
        unquantized_modules=config.model.unquantized_modules,
        on_block=on_block,
    )


def _shards_while_loading(config: TrainConfig) -> bool:
    """Whether FSDP may shard each block as it loads: not when the adapter's start reads the base weights
    whole (DoRA's magnitudes, PiSSA/OLoRA's factors) or copies modules (modules_to_save)."""
    lora = config.lora
    return config.train.method == "full" or not (
        lora.use_dora or is_residual_start(lora.init_lora_weights) or lora.modules_to_save
    )


def fit_max_length(config: TrainConfig, model, log) -> TrainConfig:
    """``config`` with ``data.max_length`` capped at the model's context length, saying so when it was longer."""
    limit = context_length(getattr(model, "config", None))
    if limit is None or config.data.max_length <= limit:
        return config
    log(
        f"data.max_length {config.data.max_length} is longer than the model's context ({limit} positions); "
        f"using {limit}"
    )
    return config.model_copy(update={"data": config.data.model_copy(update={"max_length": limit})})


def _run(config: TrainConfig, dirs: RunDirs, resume: bool, progress, log, processes: Processes = SINGLE) -> dict:
    reset_peak_memory()
    run_dir = dirs.work
    changes: list[str] = []
    requested = config
    if resume:
        saved = saved_run_config(run_dir)
        config, changes = resume_config(saved, config)
        config = config.model_copy(update={"output_dir": str(dirs.final)})
        if changes and processes.main:
            write_run_config(run_dir, config, meta=saved.meta, requested=requested)
            log("resume with changes: " + "; ".join(changes))
    t = config.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    task = resolved_task(config)
    classifier = task != "causal_lm"
    if classifier:
        check_classifier_config(config)
        space, train_rows, eval_rows = classification_examples(config, token=task == "token_cls")
        m = config.model
        model, tokenizer = load_classifier(m.name, space, m.dtype, m.device, m.trust_remote_code)
    else:
        streams = processes.active and t.distributed == "fsdp" and _shards_while_loading(config)
        model, tokenizer = _load_base(config, distributed.shard_block if streams else None)
    if not resume:
        config = fit_max_length(config, model, log)
        if classifier:
            lora = classification_lora(config.lora, model, token=space.token)
            config = config.model_copy(update={"task": task, "lora": lora})
    if classifier:
        tokenize = tokenize_tokens if space.token else tokenize_classification
        tokenized = (tokenize(rows, tokenizer, space, config.data.max_length) for rows in (train_rows, eval_rows))
        data = RunData(next(tokenized), next(tokenized), [], None, labels=space)
    else:
        data = prepare_data(config, tokenizer)
    if not resume and processes.main:
        config = write_run_config(run_dir, config, requested=requested)
    torch.manual_seed(t.seed)  # the adapter's start depends on the seed only
    if t.method == "full":
        trained = TrainedModel(model, t.full_modules)
    elif t.method == "intrinsic":
        i = config.intrinsic
        trained = TrainedIntrinsic(model, i.dim, t.seed if i.seed is None else i.seed, i.said, i.targets)
    else:
        add_adapter(model, config.lora, ADAPTER_NAME)
        trained = TrainedAdapter(model, ADAPTER_NAME)
    patch_for_training(model)  # lean RMSNorm / SiLU-MLP autograd for Llama-family models
    patch_dropout(model)  # dropout masks from the compiled kernel on a CPU
    patch_attention(model)  # attention's backward from batched products on a CPU
    if t.gradient_checkpointing:
        # transformers 5 renamed it; older versions only have gradient_checkpointing_enable.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = model_device(model)
    sharded = processes.active and t.distributed == "fsdp"
    if sharded:
        full = t.method == "full"
        blocks, loaded, held, total = distributed.shard_model(model, trained.parameters(), shard_trained=full)
        trained.after_sharding()
        loading = distributed.gathered(processes, peak_memory_mb())  # each process's peak so far
        log(
            f"FSDP2: {blocks} blocks of the base sharded over {processes.world} processes; each holds "
            f"{held / 2**20:.4g} of the weights' {total / 2**20:.4g} MiB "
            f"(trained parameters {'sharded too' if full else 'whole'}); "
            + ("each block sharded as it was read" if loaded == blocks else "the base was read whole, then sharded")
            + f"; peak memory so far {', '.join(f'{peak:,.0f}' for peak in loading or [])} MiB"
        )
    params = trained.parameters()
    optimizer = build_optimizer(model, t, trained.optimizer_parameters())
    stream = BatchStream(
        data.train, config, tokenizer.pad_token_id, device, collate_classification if classifier else collate, processes
    )
    loss_sum_of = classification_loss_sum if classifier else causal_lm_loss_sum
    # DDP all-reduces (averages) the gradients; every process runs the same steps on its shard. It wraps the loss
    # computation, so the fused loss (hidden states and the output head, no logits) runs under it too.
    wrapped, step_loss = None, lambda batch: loss_sum_of(model, batch)
    if processes.active and not sharded:
        wrapped = DistributedDataParallel(
            StepLoss(model, loss_sum_of), device_ids=[processes.local_rank] if device.type == "cuda" else None
        )
        step_loss = wrapped
    # FSDP gathers each block's weights from every process at every forward: all of them run every evaluation
    # together (on all rows), where DDP shares the rows out
    evaluating = Processes() if sharded else processes
    lockstep = processes.main or sharded  # the processes that run a forward rank 0 needs
    writes = processes.main or trained.collective  # the processes that take part in what rank 0 writes
    micro_batches = math.ceil(t.epochs * stream.batches_per_epoch)
    total_steps = t.max_steps or max(1, math.ceil(micro_batches / t.grad_accum))

    metrics = MetricsLog(run_dir, tensorboard=t.tensorboard) if processes.main else NoMetrics()
    state = {
        "epoch": 0,
        "index": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "best": None,
        "best_step": None,
        "retain_loss_base": None,
        "processes": processes.world,
    }
    start_step = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trained, optimizer)
        saved_world = state.get("processes") or 1
        if saved_world != processes.world:
            raise ConfigError(
                f"{checkpoint} was written by a run of {saved_world} process(es); resume it with "
                f"--nproc {saved_world} (its position in the data counts batches of that many processes)"
            )
        start_step = state["step"]
        _check_steps_left(run_dir, start_step, total_steps)
        stream.seek(state["epoch"], state["index"])
        metrics.truncate_after(start_step)
        log(f"resuming {dirs.final} from {checkpoint.name}" + (f", now {total_steps} steps" if changes else ""))
    elif resume:
        metrics.truncate_after(0)
        log(f"resuming {dirs.final}: no complete checkpoint yet, starting from step 0")

    report = replace(parameter_report(model), trainable=sum(p.numel() for p in trained.optimizer_parameters()))
    st = data.stats
    if classifier:
        log(describe_labels(data.labels, len(data.train), len(data.eval)))
        log(f"{total_steps} steps of {t.batch_size}×{t.grad_accum}; {report}")
    else:
        log(
            f"data: {st.rows_read} rows read from {st.path}; longer than max_length ({st.max_length}): {st.too_long} "
            f"({st.truncated} truncated, {st.dropped_too_long} dropped); dropped with no target token: "
            f"{st.dropped_no_target}"
        )
        log(
            f"{len(data.train)} training examples ({st.trained_tokens:,} target tokens), "
            f"{len(data.eval)} eval; {total_steps} steps of {t.batch_size}×{t.grad_accum}; {report}"
        )
    if dirs.work != dirs.final:
        log(f"building the new run in {dirs.work}; it replaces {dirs.final} when it completes")
    if data.retain and state.get("retain_loss_base") is None and lockstep:
        state["retain_loss_base"] = retain_loss(model, data.retain, tokenizer.pad_token_id, t.eval_batch_size)
        metrics.log({"step": 0, "retain_loss": state["retain_loss_base"], "forgetting": 0.0})
        log(f"retain set: loss {state['retain_loss_base']:.4f} before training ({len(data.retain)} rows)")
    if classifier and data.eval and start_step == 0:  # the new head's start: chance level, for comparison
        start_eval = _evaluate(model, tokenizer, data, t, evaluating)
        if processes.main:
            _log_evaluation(metrics, log, 0, start_eval, {})
    show = (sys.stderr.isatty() if progress is None else progress) and processes.main
    bar = _progress(total_steps, start_step, show)
    model.train()
    last_eval_step = None
    done = start_step
    after_step = _rng_state()  # what a checkpoint of the last completed step must restore
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            if processes.active:
                torch.manual_seed(distributed.step_seed(t.seed, processes.rank, step))
            batches = [stream.next() for _ in range(t.grad_accum)]
            targets = int(distributed.total(processes, sum(_targets(b, classifier) for b in batches)))
            lr = learning_rate(
                step, total_steps=total_steps, base_lr=t.lr, warmup_steps=t.warmup_steps, kind=t.scheduler
            )
            loss_total = 0.0
            for index, batch in enumerate(batches):
                # one gradient all-reduce per step, at its last micro-batch
                sync = (
                    wrapped.no_sync() if wrapped is not None and index < len(batches) - 1 else contextlib.nullcontext()
                )
                with sync, recompute_norm_outputs():
                    loss_sum, _ = step_loss(batch)
                    # DDP averages over the processes; the step wants the sum over all targets
                    (loss_sum * (processes.world / max(1, targets))).backward()
                if sharded and index == len(batches) - 1:
                    distributed.average_gradients(processes, params)  # FSDP reduces only what it shards
                loss_total += float(loss_sum.detach())
                # Drop the step's graph now: kept until the next forward reassigns the name, its many small
                # nodes sit in the freed activation memory and the next forward cannot reuse it whole.
                del loss_sum
            loss = distributed.total(processes, loss_total) / max(1, targets)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss} at step {step + 1}; {_last_good(run_dir)}. Lower train.lr or check the data"
                )
            grad_norm = distributed.gradient_norm(params, t.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"gradient norm became {grad_norm} at step {step + 1}; "
                    f"{_last_good(run_dir)}. Lower train.lr or check the data"
                )
            tokens = int(
                distributed.total(
                    processes,
                    sum(
                        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                        for b in batches
                    ),
                )
            )
            with signals.deferred():
                set_learning_rate(optimizer, lr)
                trained.before_step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                trained.after_step()
                if sharded and device.type == "cpu":
                    release_freed_memory()  # the gathered blocks' freed memory, or the heap keeps it resident
                seconds = time.perf_counter() - started
                state["tokens"] += tokens
                state["train_seconds"] += seconds
                state["epoch"], state["index"] = stream.epoch, stream.index
                done = step + 1
                after_step = _rng_state()
            tokens_per_s = tokens / seconds
            if bar is not None:
                bar.update(0, completed=done, info=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")
            if done % t.log_every == 0 or done == total_steps or done == 1:
                record = {
                    "step": done,
                    "loss": loss,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "grad_norm": grad_norm,
                    "epoch": done * t.grad_accum / stream.batches_per_epoch,
                }
                metrics.log(record)
                if bar is None:
                    log(f"step {done}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s")
            if t.eval_every and (data.eval or data.retain) and (done % t.eval_every == 0 or done == total_steps):
                result = _evaluate(model, tokenizer, data, t, evaluating) if data.eval else None
                last_eval_step = done
                retention = _retention(model, tokenizer, data, state, t) if lockstep else {}
                if processes.main:
                    _log_evaluation(metrics, log, done, result, retention)
                if result is not None and writes:
                    _keep_best(
                        trained, tokenizer, run_dir, config, state, result, done, data.labels, write=processes.main
                    )
            if done % t.save_every == 0 and done < total_steps and writes:
                save_checkpoint(
                    run_dir, done, trained, optimizer, _trainer_state(state), t.keep_checkpoints, write=processes.main
                )
    except KeyboardInterrupt as stop:
        if bar is not None:
            bar.stop()
            bar = None
        signum = signals.signal_of(stop)
        if not processes.main:
            raise TrainingInterrupted("interrupted", None, dirs.final, signum) from None
        with signals.stopping():
            raise _interrupted(
                dirs, done, start_step, total_steps, after_step, trained, optimizer, state, t, signum
            ) from None
    finally:
        if bar is not None:
            bar.stop()
        metrics.close()

    final_eval, final_retention = None, {}
    if (data.eval or data.retain) and last_eval_step != total_steps:
        final_eval = _evaluate(model, tokenizer, data, t, evaluating) if data.eval else None
        final_retention = _retention(model, tokenizer, data, state, t) if lockstep else {}
    main = processes.main
    if writes:
        save_checkpoint(run_dir, total_steps, trained, optimizer, _trainer_state(state), t.keep_checkpoints, write=main)
        save_trained(
            trained, tokenizer, run_dir / trained.output_name, _base_name(model, config), data.labels, write=main
        )
        if (data.eval or data.retain) and last_eval_step != total_steps:
            if main:
                _log_evaluation(metrics, log, total_steps, final_eval, final_retention)
            if t.best_metric and final_eval is not None:
                _keep_best(trained, tokenizer, run_dir, config, state, final_eval, total_steps, data.labels, write=main)
    if not main:
        distributed.gathered(processes, round(peak_memory_mb(), 1))  # for rank 0's summary, once it has written
        distributed.barrier(processes)  # rank 0 writes the run; the others wait for it
        return {}
    records = metrics.records()
    plot_losses(records, run_dir / "loss.png")
    peaks = distributed.gathered(processes, round(peak_memory_mb(), 1)) if processes.active else None
    summary = _summary(dirs.final, run_dir, config, state, total_steps, report, records, peaks)
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    finish_run_dir(dirs)
    distributed.barrier(processes)
    return summary


class StepLoss(nn.Module):
    """A micro-batch's (summed loss, count) as a module, for DDP to wrap: ``loss_sum_of(model, batch)``."""

    def __init__(self, model: nn.Module, loss_sum_of):
        super().__init__()
        self.model, self.loss_sum_of = model, loss_sum_of

    def forward(self, batch: dict):
        return self.loss_sum_of(self.model, batch)


def _check_steps_left(run_dir: Path, reached: int, total_steps: int) -> None:
    """Refuse a resume with nothing to do: a finished run needs more steps, and steps cannot be undone."""
    if reached > total_steps:
        raise ConfigError(
            f"--resume: the run already reached step {reached}, past the {total_steps} steps now "
            f"configured; give train.max_steps (or train.epochs) for more than {reached} steps"
        )
    if reached == total_steps and (run_dir / SUMMARY_FILE).is_file():
        raise ConfigError(
            f"--resume: the run already finished its {total_steps} steps; to train it further, "
            f"extend it, e.g. --set train.max_steps={2 * total_steps} (or a larger train.epochs)"
        )


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(saved: tuple) -> None:
    cpu, cuda, python = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def _interrupted(
    dirs, done, start_step, total_steps, rng, trained, optimizer, state, t, signum: int
) -> TrainingInterrupted:
    """Checkpoint the last completed step (as an uninterrupted run would have had it) and describe it. Weights FSDP
    split across the processes cannot be gathered while they stop: then the last checkpoint written stands."""
    checkpoint, saved = latest_checkpoint(dirs.work), done > start_step and not trained.collective
    if saved:
        _set_rng_state(rng)
        checkpoint = save_checkpoint(dirs.work, done, trained, optimizer, _trainer_state(state), t.keep_checkpoints)
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if checkpoint is None:
        abandon_run_dir(dirs)
        return TrainingInterrupted(
            f"{how} before the first step completed; nothing was saved"
            if done == start_step
            else f"{how} at step {done} before the first checkpoint (a full fine-tune under "
            "FSDP saves at train.save_every only); nothing was saved",
            None,
            dirs.final,
            signum,
        )
    where = "checkpoint saved in" if saved else "the last checkpoint is"
    return TrainingInterrupted(
        f"{how} at step {done} of {total_steps}; {where} {checkpoint}", checkpoint, dirs.final, signum
    )


def _last_good(run_dir: Path) -> str:
    kept = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"


def _targets(batch: dict, classifier: bool) -> int:
    """What one micro-batch's loss is a sum over: target tokens; a classifier's rows; a token classifier's
    labelled words."""
    labels = batch["labels"]
    if classifier:
        return int((labels != -100).sum()) if labels.ndim == 2 else labels.shape[0]
    return int((labels[:, 1:] != -100).sum())


def _evaluate(model, tokenizer, data: RunData, t, processes: Processes = SINGLE) -> EvalResult | None:
    """The evaluation of the run's model. Across processes each evaluates every N-th row and rank 0 combines
    them (sums of losses and matches, or all outputs for a classifier's metrics); the others get None."""
    rank, world = processes.rank, processes.world
    if data.labels is not None:
        rows = data.eval[rank::world]
        logits = classifier_logits(model, rows, tokenizer.pad_token_id, t.eval_batch_size)
        parts = distributed.gathered(processes, (list(logits), rows))
        if not processes.main:
            return None
        every = [(logit, row) for part_logits, part_rows in parts for logit, row in zip(part_logits, part_rows)]
        logits_all = [logit for logit, _ in every]
        return classification_result(
            logits_all if data.labels.token else torch.stack(logits_all), [row for _, row in every], data.labels
        )
    result = evaluate(
        model,
        tokenizer,
        data.eval[rank::world],
        data.eval_examples[rank::world],
        batch_size=t.eval_batch_size,
        max_new_tokens=t.eval_max_new_tokens,
        with_exact_match=t.exact_match,
    )
    if not processes.active:
        return result
    matches = None if result.exact_match is None else result.exact_match * len(result.references)
    loss_sum = result.loss * result.n_tokens if result.n_tokens else 0.0  # (a share with no rows has a NaN mean)
    parts = distributed.gathered(processes, (loss_sum, result.n_tokens, result.n, matches, len(result.references)))
    if not processes.main:
        return None
    loss_sum, n_tokens, n, match_sum, references = (sum(p[i] or 0 for p in parts) for i in range(5))
    loss = loss_sum / n_tokens if n_tokens else float("nan")
    exact = match_sum / references if references and any(p[3] is not None for p in parts) else None
    return EvalResult(
        loss=loss, perplexity=math.exp(loss) if loss < 50 else float("inf"), n=n, n_tokens=n_tokens, exact_match=exact
    )


def _retention(model, tokenizer, data: RunData, state: dict, t) -> dict:
    """{"retain_loss", "forgetting"} now, or {} without a retain set."""
    if not data.retain:
        return {}
    loss = retain_loss(model, data.retain, tokenizer.pad_token_id, t.eval_batch_size)
    return {"retain_loss": loss, "forgetting": loss - state["retain_loss_base"]}


def _log_evaluation(metrics, log, step: int, result: EvalResult | None, retention: dict) -> None:
    record = {"step": step, **retention}
    if result is not None:
        if result.metrics:
            record.update(eval_loss=result.loss, **{f"eval_{k}": v for k, v in result.metrics.items()})
        else:
            record.update(eval_loss=result.loss, eval_perplexity=result.perplexity, eval_exact_match=result.exact_match)
        log(_describe_eval(step, result))
    if retention:
        log(f"retain @ step {step}: loss {retention['retain_loss']:.4f}, forgetting {retention['forgetting']:+.4f}")
    metrics.log(record)


def _describe_eval(step: int, result: EvalResult) -> str:
    if result.metrics:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        return f"eval @ step {step}: loss {result.loss:.4f}, {shown} (n={result.n})"
    em = f", exact match {100 * result.exact_match:.1f}%" if result.exact_match is not None else ""
    return f"eval @ step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}{em} (n={result.n})"


def _keep_best(
    trained, tokenizer, run_dir, config, state, result: EvalResult, step: int, labels=None, write: bool = True
) -> None:
    metric = config.train.best_metric
    if metric is None:
        return
    if metric == "eval_loss":
        value = result.loss
    elif metric == "eval_exact_match":
        value = result.exact_match
    else:
        value = result.metrics.get(metric.removeprefix("eval_"))
    if value is None:
        return
    better = state["best"] is None or (value < state["best"] if metric == "eval_loss" else value > state["best"])
    if better:
        state["best"], state["best_step"] = value, step
        save_trained(trained, tokenizer, run_dir / "best", _base_name(trained.model, config), labels, write)


def _base_name(model, config: TrainConfig) -> str:
    return getattr(model, "name_or_path", None) or config.model.name


def _trainer_state(state: dict) -> dict:
    return {
        k: state.get(k)
        for k in ("epoch", "index", "tokens", "train_seconds", "best", "best_step", "retain_loss_base", "processes")
    }


def _summary(
    final: Path,
    run_dir: Path,
    config: TrainConfig,
    state: dict,
    steps: int,
    report,
    records: list[dict],
    peaks: list[float] | None = None,
) -> dict:
    evals = [r for r in records if "eval_loss" in r]
    retained = [r for r in records if "retain_loss" in r]
    adapter_file = run_dir / "adapter" / "adapter_model.safetensors"
    return {
        "method": config.train.method,
        "steps": steps,
        "train_seconds": round(state["train_seconds"], 2),
        "tokens": state["tokens"],
        "tokens_per_s": round(state["tokens"] / state["train_seconds"], 1) if state["train_seconds"] else None,
        "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        "eval": evals[-1] if evals else None,
        "best_metric": config.train.best_metric,
        "best": state.get("best"),
        "best_step": state.get("best_step"),
        "trainable_params": report.trainable,
        "total_params": report.total,
        "adapter_bytes": adapter_file.stat().st_size if adapter_file.exists() else None,
        "model_bytes": _model_bytes(run_dir / "model") if config.train.method == "full" else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "peak_memory_mb_per_process": peaks,  # in rank order, from a run over several processes
        "retain_loss_base": state.get("retain_loss_base"),
        "retain_loss": retained[-1]["retain_loss"] if retained else None,
        "forgetting": retained[-1]["forgetting"] if retained else None,
        "output_dir": str(final),
    }


def _model_bytes(directory: Path) -> int | None:
    files = list(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def reset_peak_memory() -> None:
    """Start measuring the peak afresh (several runs in one process, as in a sweep, each get their own): the
    CUDA allocator's peak, and on Linux the process's peak RSS (``/proc/self/clear_refs``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): the peak then covers the whole process


def peak_memory_mb() -> float:
    """The peak memory since ``reset_peak_memory``, MiB: the CUDA allocator's peak when training on a GPU, else
    the peak RSS (``VmHWM``; ``ru_maxrss``, the whole process's, where /proc is missing)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["TrainingDiverged", "TrainingInterrupted", "prepare_data", "train"]
