"""A training run as a recipe: explicit setup phases, then a short loop, then the finish.

    setup_config      the config (a resumed run's saved one, with what it may change), the seeds
    setup_model       the objective loads the model (FSDP shards each block as it completes) and fits the config
    setup_data        the objective's rows; config.yaml written
    setup_training    what trains (an adapter, every weight, or an intrinsic vector), the training patches, the
                      topology's sharding, the optimizer, the batch stream, a micro-batch's loss on this topology
    restore           a resumed run's checkpoint: weights, optimizer, RNG and the data position
    announce          the log lines; the retain set's base loss; the objective's start evaluation
    loop              one step per iteration (``step``), evaluation, best, checkpoints; a stop signal checkpoints
    finish            the final evaluation, checkpoint and output, loss.png and summary.json; the run swapped in

The objective (``train.objectives``) says what is learned; the topology (``train.topology``) how it is spread over
processes; the recipe never asks which of either it runs. The batch order is a pure function of (seed, epoch),
the learning rate of the step, and every other piece of state is in the checkpoint, so a resumed run continues
bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune import signals
from loratune.adapters import (
    add_adapter,
    expert_report,
    load_adapter,
    parameter_report,
    set_active,
    set_trainable,
)
from loratune.data.classification import LabelSpace, write_labels
from loratune.errors import ConfigError, LoratuneError
from loratune.inference.evaluate import EvalResult
from loratune.layers.experts import recompute_expert_layers, recompute_in_backward
from loratune.memory import one_heap_arena, peak_memory_mb, reset_peak_memory
from loratune.models.devices import model_device
from loratune.outputs import write_output_dir, write_text_atomic
from loratune.train.attention import patch_attention
from loratune.train.batches import BatchStream
from loratune.train.checkpoint import latest_checkpoint, load_checkpoint, load_objective_state, save_checkpoint
from loratune.train.dropout import patch_dropout
from loratune.train.fused_ops import patch_for_training, recompute_norm_outputs
from loratune.train.metrics import MetricsLog, NoMetrics, plot_losses
from loratune.train.objectives import Objective, RunData
from loratune.train.objectives.base import split_loss
from loratune.train.objectives.classification import head_modules
from loratune.train.optimizer import build_optimizer, set_learning_rate
from loratune.train.run_dir import (
    SUMMARY_FILE,
    RunDirs,
    abandon_run_dir,
    finish_run_dir,
    resume_config,
    saved_run_config,
    write_run_config,
)
from loratune.train.schedule import learning_rate
from loratune.train.topology import OneProcess
from loratune.train.trained import TrainedAdapter, TrainedIntrinsic, TrainedModel

ADAPTER_NAME = "default"


class TrainingDiverged(LoratuneError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(LoratuneError):
    """Training stopped by a signal (Ctrl-C, SIGTERM, SIGHUP: ``signum``); ``checkpoint`` is the checkpoint to resume
    from (None when no step completed, so there is nothing to resume)."""

    def __init__(self, message: str, checkpoint: Path | None, run_dir: Path, signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint, self.run_dir, self.signum = checkpoint, run_dir, signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a command stopped by this signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + self.signum


@dataclass
class RunState:
    """What a checkpoint keeps besides tensors: the data position, totals, the best evaluation so far, the
    retain set's base loss and how many processes ran (a checkpoint's position counts their batches)."""

    epoch: int = 0
    index: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best: float | None = None
    best_step: int | None = None
    retain_loss_base: float | None = None
    processes: int = 1

    def saved(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def restored(cls, saved: dict) -> RunState:
        return cls(**{f.name: saved.get(f.name, f.default) for f in dataclasses.fields(cls)})


class Recipe:
    """One training run of ``objective`` on ``topology``, writing into ``dirs`` (see the module's phases)."""

    def __init__(
        self,
        config,
        objective: Objective,
        topology: OneProcess,
        dirs: RunDirs,
        *,
        resume: bool,
        progress: bool | None,
        log,
    ):
        self.config, self.objective, self.topology, self.dirs = config, objective, topology, dirs
        self.resume, self.show_progress, self.log = resume, progress, log
        self.run_dir = dirs.work
        self.changes: list[str] = []

    def run(self) -> dict:
        """Every phase in order; returns the summary (rank 0's; the other processes get {})."""
        reset_peak_memory()
        if not torch.cuda.is_available():
            one_heap_arena()  # before the compute threads start: their freed memory is then reused by all
        self.setup_config()
        self.setup_model()
        self.setup_data()
        self.setup_training()
        try:
            self.restore()
            self.announce()
            self.loop()
            return self.finish()
        finally:
            self.metrics.close()

    # --- setup -----------------------------------------------------------------------------------------------

    def setup_config(self) -> None:
        requested = self.requested = self.config
        if self.resume:
            saved = saved_run_config(self.run_dir)
            config, self.changes = resume_config(saved, requested)
            self.config = config.model_copy(update={"output_dir": str(self.dirs.final)})
            if self.changes and self.topology.main:
                write_run_config(self.run_dir, self.config, meta=saved.meta, requested=requested)
                self.log("resume with changes: " + "; ".join(self.changes))
        self.t = self.config.train
        random.seed(self.t.seed)
        torch.manual_seed(self.t.seed)

    def setup_model(self) -> None:
        self.model, self.tokenizer = self.objective.load(self.config, self.topology.load_hook(self.config))
        if not self.resume:
            self.config = self.objective.fit(self.config, self.model, self.log)
            self.t = self.config.train

    def setup_data(self) -> None:
        self.data: RunData = self.objective.data(self.config, self.tokenizer)
        if not self.resume and self.topology.main:
            self.config = write_run_config(self.run_dir, self.config, requested=self.requested)

    def setup_training(self) -> None:
        t, model = self.t, self.model
        torch.manual_seed(t.seed)  # the adapter's start depends on the seed only
        if t.method in ("full", "bitfit"):
            self.trained = TrainedModel(model, t.full_modules, biases=t.method == "bitfit")
        elif t.method == "intrinsic":
            i = self.config.intrinsic
            head = head_modules(model) if self.config.task in ("seq_cls", "token_cls") else ()
            seed = t.seed if i.seed is None else i.seed
            self.trained = TrainedIntrinsic(model, i.dim, seed, i.said, i.targets, head=head)
        elif t.init_adapter is not None:  # an existing adapter trains on (its own LoRA settings), alone
            load_adapter(model, t.init_adapter, ADAPTER_NAME, trainable=True)
            set_trainable(model, ADAPTER_NAME)
            set_active(model, ADAPTER_NAME)
            self.log(f"training on the adapter in {t.init_adapter}")
            self.trained = TrainedAdapter(model, ADAPTER_NAME)
        else:
            add_adapter(model, self.config.lora, ADAPTER_NAME)
            self.trained = TrainedAdapter(model, ADAPTER_NAME)
        patch_for_training(model)  # lean RMSNorm / SiLU-MLP autograd for Llama-family models
        patch_dropout(model)  # dropout masks from the compiled kernel on a CPU
        patch_attention(model)  # attention's backward from batched products on a CPU
        if t.gradient_checkpointing:
            # transformers 5 renamed it; older versions only have gradient_checkpointing_enable.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # MoE layers recomputed whole in backward where transformers can; else their expert blocks alone (step)
        self.recomputed_layers = 0
        if t.recompute_experts and not t.gradient_checkpointing:
            self.recomputed_layers = recompute_expert_layers(model)
        self.device = model_device(model)
        self.topology.prepare(model, self.trained, self.log)
        self.params = self.trained.parameters()
        self.optimizer = build_optimizer(model, t, self.trained.optimizer_parameters())
        self.stream = BatchStream(
            self.data.train,
            self.config,
            self.tokenizer.pad_token_id,
            self.device,
            self.objective.collate,
            self.topology.processes,
        )
        self.step_loss = self.topology.step_loss(model, self.objective.loss_sum)
        # the processes that take part in what rank 0 writes (FSDP gathers split weights collectively)
        self.writes = self.topology.main or self.trained.collective
        # an objective may train on each micro-batch of rows several times (GRPO's num_iterations)
        self.batches_per_epoch = self.stream.batches_per_epoch * self.objective.passes_per_batch
        micro_batches = math.ceil(t.epochs * self.batches_per_epoch)
        self.total_steps = t.max_steps or max(1, math.ceil(micro_batches / t.grad_accum))
        self.metrics = MetricsLog(self.run_dir, tensorboard=t.tensorboard) if self.topology.main else NoMetrics()
        self.state = RunState(processes=self.topology.world)
        self.start_step = 0
        self.step_metrics: dict[str, float] = {}
        self.objective_state: dict[str, torch.Tensor] = {}  # the objective's state after the last completed step

    def restore(self) -> None:
        """Continue a resumed run from its newest complete checkpoint (its steps, its position, its RNG)."""
        if not self.resume:
            return
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            self.metrics.truncate_after(0)
            self.log(f"resuming {self.dirs.final}: no complete checkpoint yet, starting from step 0")
            return
        saved = load_checkpoint(checkpoint, self.trained, self.optimizer)
        self.state = RunState.restored(saved)
        if (self.state.processes or 1) != self.topology.world:
            raise ConfigError(
                f"{checkpoint} was written by a run of {self.state.processes} process(es); resume it with "
                f"--nproc {self.state.processes} (its position in the data counts batches of that many processes)"
            )
        self.start_step = saved["step"]
        self.objective_state = load_objective_state(checkpoint)
        self.objective.load_state(self.objective_state, self.device)
        self._check_steps_left()
        self.stream.seek(self.state.epoch, self.state.index)
        self.metrics.truncate_after(self.start_step)
        more = f", now {self.total_steps} steps" if self.changes else ""
        self.log(f"resuming {self.dirs.final} from {checkpoint.name}{more}")

    def _check_steps_left(self) -> None:
        """Refuse a resume with nothing to do: a finished run needs more steps, and steps cannot be undone."""
        reached, total = self.start_step, self.total_steps
        if reached > total:
            raise ConfigError(
                f"--resume: the run already reached step {reached}, past the {total} steps now "
                f"configured; give train.max_steps (or train.epochs) for more than {reached} steps"
            )
        if reached == total and (self.run_dir / SUMMARY_FILE).is_file():
            raise ConfigError(
                f"--resume: the run already finished its {total} steps; to train it further, "
                f"extend it, e.g. --set train.max_steps={2 * total} (or a larger train.epochs)"
            )

    def announce(self) -> None:
        """Say what the run will do; measure what it compares against (the retain set's base loss, the untrained
        head's evaluation)."""
        t, data = self.t, self.data
        self.report = dataclasses.replace(
            parameter_report(self.model), trainable=sum(p.numel() for p in self.trained.optimizer_parameters())
        )
        for line in self.objective.describe(data):
            self.log(line)
        self.log(f"{self.total_steps} steps of {t.batch_size}×{t.grad_accum}; {self.report}")
        experts = expert_report(self.model)
        if experts is not None:
            self.log(experts)
        if self.recomputed_layers:
            layers = self.recomputed_layers
            self.log(f"{layers} mixture-of-experts layers run again in backward (train.recompute_experts)")
        if self.dirs.work != self.dirs.final:
            self.log(f"building the new run in {self.dirs.work}; it replaces {self.dirs.final} when it completes")
        if data.retain and self.state.retain_loss_base is None and self.topology.lockstep:
            base = self.objective.retain_loss(self.model, data.retain, self.tokenizer.pad_token_id, t.eval_batch_size)
            self.state.retain_loss_base = base
            self.metrics.log({"step": 0, "retain_loss": base, "forgetting": 0.0})
            self.log(f"retain set: loss {base:.4f} before training ({len(data.retain)} rows)")
        if self.objective.evaluates_at_start and data.eval and self.start_step == 0:
            self._log_evaluation(0, self._evaluate(), {})

    # --- the loop --------------------------------------------------------------------------------------------

    def loop(self) -> None:
        """Train from ``start_step`` to ``total_steps``; a stop signal checkpoints the last completed step."""
        t = self.t
        show = (sys.stderr.isatty() if self.show_progress is None else self.show_progress) and self.topology.main
        self.bar = _progress(self.total_steps, self.start_step, show)
        self.model.train()
        self.last_eval_step = None
        self.done = self.start_step
        self.after_step = _rng_state()  # what a checkpoint of the last completed step must restore
        try:
            for step in range(self.start_step, self.total_steps):
                loss, lr, grad_norm, tokens, seconds = self.step(step)
                self.report_step(loss, lr, grad_norm, tokens / seconds, self.step_metrics)
                if self._logs(self.done) and self.topology.main:
                    self.objective.log_samples(self.run_dir, self.done)
                if t.eval_every and (self.done % t.eval_every == 0 or self.done == self.total_steps):
                    self.evaluate_and_keep_best()
                if self.done % t.save_every == 0 and self.done < self.total_steps and self.writes:
                    self.save_checkpoint()
        except KeyboardInterrupt as stop:
            self._stop_bar()
            signum = signals.signal_of(stop)
            if not self.topology.main:
                raise TrainingInterrupted("interrupted", None, self.dirs.final, signum) from None
            with signals.stopping():
                raise self._interrupted(signum) from None
        finally:
            self._stop_bar()

    def step(self, step: int) -> tuple[float, float, float, int, float]:
        """One optimizer step over ``grad_accum`` micro-batches: (loss, lr, grad norm, tokens, seconds: the time of
        the forwards, backwards and update, without the objective's making of the micro-batches — GRPO's rollouts);
        the objective's metrics of the step (``Objective.loss_sum``) in ``step_metrics``.

        The loss is the sum over every micro-batch of every process divided by what all of them sum over (long
        and short micro-batches weigh by their targets); DDP averages the gradients over the processes, so each
        process scales its part by world / targets. The metrics are means over the same."""
        t, topology = self.t, self.topology
        begun = time.perf_counter()
        topology.seed_step(t.seed, step)
        batches = self.objective.micro_batches(self.model, self.stream, t.grad_accum, step)
        started = time.perf_counter()
        targets = int(topology.total(sum(self.objective.count(b) for b in batches)))
        lr = learning_rate(
            step, total_steps=self.total_steps, base_lr=t.lr, warmup_steps=t.warmup_steps, kind=t.scheduler
        )
        loss_total, metric_sums = 0.0, {}
        # blocks inside checkpointed layers are recomputed with them
        recompute_experts = t.recompute_experts and not t.gradient_checkpointing and not self.recomputed_layers
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with topology.micro_batch(last), recompute_norm_outputs(), recompute_in_backward(recompute_experts):
                loss_sum, _, sums = split_loss(self.step_loss(batch))
                (loss_sum * (topology.world / max(1, targets))).backward()
            topology.after_backward(last, self.params)
            loss_total += float(loss_sum.detach())
            for name, value in sums.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
            # Drop the step's graph now: kept until the next forward reassigns the name, its many small nodes sit
            # in the freed activation memory and the next forward cannot reuse it whole.
            del loss_sum
        loss = topology.total(loss_total) / max(1, targets)
        # every process has the same names in the same order (one objective): one sum over the processes each
        metrics = {name: topology.total(value) / max(1, targets) for name, value in metric_sums.items()}
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {step + 1}; {self._last_good()}. Lower train.lr or check the data"
            )
        grad_norm = topology.gradient_norm(self.params, t.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"gradient norm became {grad_norm} at step {step + 1}; {self._last_good()}. "
                "Lower train.lr or check the data"
            )
        tokens = int(
            topology.total(
                sum(
                    int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
                )
            )
        )
        with signals.deferred():  # the update and its bookkeeping are one: a stop lands before or after
            set_learning_rate(self.optimizer, lr)
            self.trained.before_step()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.trained.after_step()
            topology.after_update(self.device)
            now = time.perf_counter()
            seconds = now - started
            self.state.tokens += tokens
            self.state.train_seconds += now - begun
            self.state.epoch, self.state.index = self.stream.epoch, self.stream.index
            self.done = step + 1
            self.after_step = _rng_state()
            self.objective_state = self.objective.state()
            self.step_metrics = metrics
        return loss, lr, grad_norm, tokens, seconds

    def report_step(
        self, loss: float, lr: float, grad_norm: float, tokens_per_s: float, metrics: dict[str, float] | None = None
    ) -> None:
        """Show the step on the progress bar; log it (``metrics.jsonl`` and, without a bar, a line) every
        ``log_every`` steps, the first and the last. ``metrics``: the objective's, logged after the loss."""
        done, t, metrics = self.done, self.t, metrics or {}
        shown = "".join(f"  {name} {value:.4g}" for name, value in metrics.items())
        if self.bar is not None:
            self.bar.update(0, completed=done, info=f"loss {loss:.4f}{shown}  {tokens_per_s:,.0f} tok/s")
        if self._logs(done):
            epoch = done * t.grad_accum / self.batches_per_epoch
            record = {
                "step": done,
                "loss": loss,
                **metrics,
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "grad_norm": grad_norm,
                "epoch": epoch,
            }
            self.metrics.log(record)
            if self.bar is None:
                self.log(
                    f"step {done}/{self.total_steps}  loss {loss:.4f}{shown}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
                )

    def _logs(self, done: int) -> bool:
        """Whether step ``done`` is logged: every ``log_every`` steps, the first and the last."""
        return done % self.t.log_every == 0 or done == self.total_steps or done == 1

    # --- evaluation and saving -------------------------------------------------------------------------------

    def evaluate_and_keep_best(self) -> None:
        """Evaluate at the current step (and measure forgetting), log it, and keep the best adapter so far."""
        if not (self.data.eval or self.data.retain):
            return
        result = self._evaluate() if self.data.eval else None
        self.last_eval_step = self.done
        self._log_evaluation(self.done, result, self._retention())
        if result is not None and self.writes:
            self._keep_best(result)

    def _evaluate(self) -> EvalResult | None:
        return self.objective.evaluate(self.model, self.tokenizer, self.data, self.t, self.topology.evaluating)

    def _retention(self) -> dict:
        """{"retain_loss", "forgetting"} now, or {} without a retain set (or on a process that does not run it)."""
        if not self.data.retain or not self.topology.lockstep:
            return {}
        loss = self.objective.retain_loss(
            self.model, self.data.retain, self.tokenizer.pad_token_id, self.t.eval_batch_size
        )
        return {"retain_loss": loss, "forgetting": loss - self.state.retain_loss_base}

    def _log_evaluation(self, step: int, result: EvalResult | None, retention: dict) -> None:
        if not self.topology.main:
            return
        record = {"step": step, **retention}
        if result is not None:
            if result.metrics:
                loss = {} if result.loss is None else {"eval_loss": result.loss}  # GRPO's evaluation has no loss
                record.update(**loss, **{f"eval_{k}": v for k, v in result.metrics.items()})
            else:
                record.update(
                    eval_loss=result.loss, eval_perplexity=result.perplexity, eval_exact_match=result.exact_match
                )
            self.log(_describe_eval(step, result))
        if retention:
            self.log(
                f"retain @ step {step}: loss {retention['retain_loss']:.4f}, forgetting {retention['forgetting']:+.4f}"
            )
        self.metrics.log(record)

    def _keep_best(self, result: EvalResult) -> None:
        metric = self.t.best_metric
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
        best = self.state.best
        if best is None or (value < best if metric == "eval_loss" else value > best):
            self.state.best, self.state.best_step = value, self.done
            self.save_trained(self.run_dir / "best")

    def save_trained(self, path: Path) -> None:
        """Write what the run trained (adapter or model, tokenizer, a classifier's labels) into ``path``."""
        save_trained(
            self.trained,
            self.tokenizer,
            path,
            _base_name(self.model, self.config),
            self.data.labels,
            write=self.topology.main,
        )

    def save_checkpoint(self, step: int | None = None) -> Path | None:
        return save_checkpoint(
            self.run_dir,
            self.done if step is None else step,
            self.trained,
            self.optimizer,
            self.state.saved(),
            self.t.keep_checkpoints,
            write=self.topology.main,
            objective_state=self.objective_state,
        )

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        """Checkpoint the last completed step (as an uninterrupted run would have had it) and describe it. Weights
        FSDP split across the processes cannot be gathered while they stop: then the last checkpoint stands."""
        done, dirs = self.done, self.dirs
        checkpoint, saved = latest_checkpoint(dirs.work), done > self.start_step and not self.trained.collective
        if saved:
            _set_rng_state(self.after_step)
            checkpoint = self.save_checkpoint(done)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if checkpoint is None:
            abandon_run_dir(dirs)
            if done == self.start_step:
                message = f"{how} before the first step completed; nothing was saved"
            else:
                message = (
                    f"{how} at step {done} before the first checkpoint (a full fine-tune under FSDP saves at "
                    "train.save_every only); nothing was saved"
                )
            return TrainingInterrupted(message, None, dirs.final, signum)
        where = "checkpoint saved in" if saved else "the last checkpoint is"
        return TrainingInterrupted(
            f"{how} at step {done} of {self.total_steps}; {where} {checkpoint}", checkpoint, dirs.final, signum
        )

    def _last_good(self) -> str:
        kept = latest_checkpoint(self.run_dir)
        return f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"

    def _stop_bar(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.stop()
            self.bar = None

    # --- the finish ------------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The final evaluation (unless the last step had one), checkpoint, output and best; rank 0 then writes
        loss.png and summary.json and swaps the run into place while the others wait."""
        total, topology = self.total_steps, self.topology
        evaluate_now = bool(self.data.eval or self.data.retain) and self.last_eval_step != total
        final_eval = self._evaluate() if evaluate_now and self.data.eval else None
        final_retention = self._retention() if evaluate_now else {}
        if self.writes:
            self.save_checkpoint(total)
            self.save_trained(self.run_dir / self.trained.output_name)
            if evaluate_now:
                self._log_evaluation(total, final_eval, final_retention)
                if self.t.best_metric and final_eval is not None:
                    self._keep_best(final_eval)
        if not topology.main:
            topology.gathered(round(peak_memory_mb(), 1))  # for rank 0's summary, once it has written
            topology.barrier()  # rank 0 writes the run; the others wait for it
            return {}
        records = self.metrics.records()
        plot_losses(records, self.run_dir / "loss.png")
        peaks = topology.gathered(round(peak_memory_mb(), 1)) if topology.processes.active else None
        summary = self.summary(records, peaks)
        write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        finish_run_dir(self.dirs)
        topology.barrier()
        return summary

    def summary(self, records: list[dict], peaks: list[float] | None) -> dict:
        """What ``summary.json`` holds: the run's totals, its last evaluation and best, its size and memory."""
        evals = [r for r in records if any(key.startswith("eval_") for key in r)]
        retained = [r for r in records if "retain_loss" in r]
        state = self.state
        adapter_file = self.run_dir / "adapter" / "adapter_model.safetensors"
        return {
            "method": self.t.method,
            "steps": self.total_steps,
            "train_seconds": round(state.train_seconds, 2),
            "tokens": state.tokens,
            "tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
            "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
            "eval": evals[-1] if evals else None,
            "best_metric": self.t.best_metric,
            "best": state.best,
            "best_step": state.best_step,
            "trainable_params": self.report.trainable,
            "total_params": self.report.total,
            "adapter_bytes": adapter_file.stat().st_size if adapter_file.exists() else None,
            "model_bytes": _model_bytes(self.run_dir / "model") if self.t.method in ("full", "bitfit") else None,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "peak_memory_mb_per_process": peaks,  # in rank order, from a run over several processes
            "retain_loss_base": state.retain_loss_base,
            "retain_loss": retained[-1]["retain_loss"] if retained else None,
            "forgetting": retained[-1]["forgetting"] if retained else None,
            "output_dir": str(self.dirs.final),
        }


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


def _describe_eval(step: int, result: EvalResult) -> str:
    if result.metrics:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        loss = "" if result.loss is None else f"loss {result.loss:.4f}, "
        return f"eval @ step {step}: {loss}{shown} (n={result.n})"
    em = f", exact match {100 * result.exact_match:.1f}%" if result.exact_match is not None else ""
    return f"eval @ step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}{em} (n={result.n})"


def _base_name(model, config) -> str:
    return getattr(model, "name_or_path", None) or config.model.name


def _model_bytes(directory: Path) -> int | None:
    files = list(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(saved: tuple) -> None:
    cpu, cuda, python = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def _progress(total: int, start: int, enabled: bool):
    """A live progress bar on the terminal (None when off)."""
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
