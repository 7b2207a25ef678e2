"""The SFT optimization loop on accelerate: micro-batches, exact resume, validation, early stopping, safe stops.

Every step is a pure function of (checkpointed state, step number): the examples come from the step plan and
the dropout RNG is reseeded per step, so a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.data.template import IGNORE_INDEX, TokenizedExample
from tunesmith.errors import TunesmithError
from tunesmith.train.batches import StepPlan, make_batch, micro_batches, trained_token_count
from tunesmith.train.checkpoints import read_checkpoint, write_checkpoint

OVERFIT_RISE = 0.10  # validation loss this far above its best while training loss still falls: overfitting


class TrainingStopped(Exception):
    """The run was asked to stop (SIGTERM / Ctrl-C) and saved a checkpoint to resume from."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def non_finite_loss(loss: float, step: int, run_dir: Path, settings) -> TunesmithError:
    """The error that stops a run whose loss became NaN/inf at `step`, before that update is applied."""
    return TunesmithError(
        f"training loss became {loss} at step {step}: the run stopped before applying that update; the last good "
        f"checkpoint is kept in {run_dir / 'checkpoints'}. Lower train.learning_rate (now {settings.learning_rate}) "
        f"or use precision=fp32, then `tunesmith train {run_dir} --resume`")


@dataclass
class LoopProgress:
    """Everything besides weights and optimizer state that a resumed run needs to continue identically."""

    step: int = 0
    loss_curve: list[dict] = field(default_factory=list)
    validation_curve: list[dict] = field(default_factory=list)
    best_validation: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0
    window_loss: float = 0.0
    window_steps: int = 0
    warnings: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    best_weights_restored: bool = False

    def record_validation(self, loss: float, patience: int | None) -> bool:
        """Add a validation point; track the best, warn on overfitting, stop early when patience runs out.

        True when the loss is a new best (a caller that stops early keeps those weights)."""
        self.validation_curve.append({"step": self.step, "loss": round(loss, 6)})
        improved = self.best_validation is None or loss < self.best_validation - 1e-4
        if improved:
            self.best_validation, self.best_step, self.evals_without_improvement = loss, self.step, 0
        else:
            self.evals_without_improvement += 1
            self.note_overfitting()
        if patience and self.evals_without_improvement >= patience:
            self.stop_reason = "early_stopping"
        return improved

    def note_overfitting(self) -> None:
        """Warn once when the one overfitting rule (registry/overfitting.py) finds validation loss diverging."""
        from tunesmith.registry.overfitting import overfitting_check

        verdict = overfitting_check({"loss_curve": self.loss_curve, "validation_curve": self.validation_curve},
                                    OVERFIT_RISE)
        if verdict["overfitting"] and not any(w.startswith("overfitting") for w in self.warnings):
            self.warnings.append(f"overfitting: {verdict['message']}; consider fewer epochs or "
                                 "train.early_stopping_patience")


def trained_token_loss_module(model):
    """Wrap a causal LM so forward returns the summed loss over trained tokens, running the LM head only there."""
    import torch

    from tunesmith.train.head_loss import HeadWorkspace, linear_cross_entropy

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused_head = plain_vocabulary_projection(causal_lm)

    class TrainedTokenLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner
            self.head_workspace = HeadWorkspace()

        def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            if not fused_head:  # the model changes its logits after the projection: let its own forward do it
                logits = causal_lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   use_cache=False).logits
                return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
            hidden = causal_lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                             attention_mask=attention_mask, use_cache=False).last_hidden_state
            weight = causal_lm.get_output_embeddings().weight
            # Prompt positions need no logits: skipping the vocabulary projection there is most of the saving.
            return linear_cross_entropy(hidden[:, :-1][keep], weight, targets[keep], self.head_workspace)

    return TrainedTokenLoss(model)


def plain_vocabulary_projection(causal_lm) -> bool:
    """True when the model's logits are just `hidden @ head.weight.T` (no bias, soft-capping or scaling).

    Checked by running the model once on four tokens rather than from a list of architectures, so a model that
    post-processes its logits in a way nobody listed still trains on its real logits.
    """
    import torch

    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    ids = torch.arange(4, device=head.weight.device)[None]
    training = causal_lm.training
    causal_lm.eval()
    try:
        with torch.no_grad(), torch.autocast(head.weight.device.type, enabled=False):
            hidden = causal_lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            direct, own = head(hidden).float(), causal_lm(input_ids=ids, use_cache=False).logits.float()
    finally:
        causal_lm.train(training)
    return direct.shape == own.shape and torch.allclose(direct, own, rtol=1e-3, atol=1e-3)


class StopSignals:
    """Turns SIGTERM / the first Ctrl-C into a request to save and stop after the current step."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            sys.stderr.write(f"\n{self.received}: stopping after this step (and its validation, if due) to save a "
                             "checkpoint; Ctrl-C again stops at once without one\n")
            sys.stderr.flush()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class SftLoop:
    """Owns the prepared model/optimizer/scheduler and runs steps, evaluations and checkpoints."""

    accelerator: object
    module: object  # the prepared TrainedTokenLoss (possibly DDP-wrapped)
    optimizer: object
    scheduler: object
    train_examples: list[TokenizedExample]
    validation_examples: list[TokenizedExample]
    plan: StepPlan
    total_steps: int
    settings: object  # TrainConfig
    seed: int
    pad_token_id: int
    run_dir: Path
    progress: LoopProgress = field(default_factory=LoopProgress)
    best_weights: dict | None = None

    @property
    def inner_model(self):
        return self.accelerator.unwrap_model(self.module).model

    def trainable_weights(self) -> dict:
        return {name: p for name, p in self.inner_model.named_parameters() if p.requires_grad}

    def run(self, on_step=None) -> LoopProgress:
        """Train from `progress.step` to the end (or an early stop); raise TrainingStopped on SIGTERM."""
        settings, eval_every = self.settings, self.eval_interval()
        with StopSignals() as signals:
            while self.progress.step < self.total_steps:
                started = time.perf_counter()
                self.train_step(self.progress.step)
                self.progress.train_seconds += time.perf_counter() - started
                self.progress.step += 1
                step = self.progress.step
                if step % eval_every == 0 or step == self.total_steps:
                    self.validate_and_maybe_stop()
                if on_step:
                    on_step(self.progress)
                if self.progress.stop_reason:
                    break
                if self.stop_requested(signals):
                    checkpoint = self.save_checkpoint()
                    raise TrainingStopped(step, checkpoint, signals.received or "SIGTERM")
                if settings.checkpoint_steps and step % settings.checkpoint_steps == 0 and step < self.total_steps:
                    self.save_checkpoint()
        if self.best_weights is not None and self.progress.best_step != self.progress.step:
            self.inner_model.load_state_dict(self.best_weights, strict=False)  # early stopping keeps the best
            self.progress.best_weights_restored = True
        return self.progress

    def eval_interval(self) -> int:
        return self.settings.eval_steps or max(1, math.ceil(self.total_steps / 4))

    def train_step(self, step: int) -> None:
        """One optimizer step over the global batch; the loss is the mean over all trained tokens of the step."""
        import torch

        accelerator, settings = self.accelerator, self.settings
        torch.manual_seed(self.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
        # Length-sorted, so each micro-batch pads its examples to a similar length; the step's loss is the same.
        indices = sorted(self.plan.step_examples(step), key=lambda i: len(self.train_examples[i].input_ids))
        step_tokens = sum(trained_token_count(self.train_examples[i]) for i in indices)
        shares = micro_batches(indices, settings.batch_size, accelerator.process_index, accelerator.num_processes)
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
        self.module.train()
        for number, share in enumerate(shares):
            batch = self.micro_batch(share, fallback=indices[0])
            last = number == len(shares) - 1
            sync = accelerator.no_sync(self.module) if not last and accelerator.num_processes > 1 else nullcontext()
            with sync, accelerator.autocast():
                loss = self.module(**batch)
            # DDP averages gradients over processes; scaling by their count keeps this a per-token mean.
            accelerator.backward(loss * accelerator.num_processes / max(1, step_tokens))
            loss_sum += loss.detach().double().cpu()
            tokens += int(batch["labels"].numel() if "position_ids" in batch else batch["attention_mask"].sum())
        totals = accelerator.reduce(torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum")
        step_loss = totals[0].item() / max(1, step_tokens)
        self.progress.tokens_seen += int(totals[1].item())
        if not math.isfinite(step_loss):
            raise non_finite_loss(step_loss, step + 1, self.run_dir, settings)
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(self.module.parameters(), settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.trained_tokens += step_tokens
        self.record_loss(step + 1, step_loss)

    def micro_batch(self, share: list[int], fallback: int) -> dict:
        """Tensors for this process's examples; an empty share trains on nothing (all labels masked)."""
        examples = [self.train_examples[i] for i in share]
        if not examples:  # keeps every process in the same collective calls
            source = self.train_examples[fallback]
            examples = [TokenizedExample(source.input_ids, [IGNORE_INDEX] * len(source.labels))]
        batch = make_batch(examples, self.settings.packing, self.pad_token_id)
        return {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}

    def record_loss(self, step: int, loss: float) -> None:
        progress = self.progress
        progress.window_loss += loss
        progress.window_steps += 1
        if step % self.settings.logging_steps == 0 or step == self.total_steps:
            progress.loss_curve.append({"step": step, "loss": round(progress.window_loss / progress.window_steps, 6)})
            progress.window_loss, progress.window_steps = 0.0, 0

    def validation_loss(self) -> float:
        """Mean loss over every trained token of the validation split (split across processes)."""
        import torch

        accelerator, size = self.accelerator, self.settings.batch_size
        share = self.validation_examples[accelerator.process_index::accelerator.num_processes]
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
        self.module.eval()
        with torch.no_grad():
            for start in range(0, len(share), size):
                chunk = share[start:start + size]
                batch = {k: v.to(accelerator.device) for k, v in
                         make_batch(chunk, self.settings.packing, self.pad_token_id).items()}
                with accelerator.autocast():
                    loss_sum += self.module(**batch).double().cpu()
                tokens += sum(trained_token_count(e) for e in chunk)
        totals = accelerator.reduce(torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum")
        return totals[0].item() / max(1.0, totals[1].item())

    def validate_and_maybe_stop(self) -> None:
        """Record the validation loss; keep the best weights when early stopping may need them."""
        patience = self.settings.early_stopping_patience
        if self.progress.record_validation(self.validation_loss(), patience) and patience:
            self.best_weights = {k: v.detach().clone() for k, v in self.trainable_weights().items()}

    def stop_requested(self, signals: StopSignals) -> bool:
        """True when any process got SIGTERM/Ctrl-C; all processes agree so they stop at the same step."""
        import torch

        flag = torch.tensor([1.0 if signals.received else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return flag.item() > 0

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint from the main process; the others wait until it is complete."""
        path = None
        if self.accelerator.is_main_process:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "best_weights": self.best_weights or {}}
            path = write_checkpoint(self.run_dir, self.progress.step, self.trainable_weights(), state,
                                    asdict(self.progress), self.settings.model_dump(mode="json"),
                                    self.settings.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def restore(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: trainable weights, optimizer and scheduler state, loop progress."""
        weights, state, progress = read_checkpoint(checkpoint)
        missing = set(weights) - set(self.trainable_weights())
        if missing:
            raise TunesmithError(f"{checkpoint}: its weights do not fit this model ({sorted(missing)[0]} ...); "
                                 "resume with the config the run started with")
        self.inner_model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_weights = state["best_weights"] or None
        self.progress = LoopProgress(**progress)

