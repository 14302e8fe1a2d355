"""Trainer callbacks: rich step progress (plain lines when not on a terminal), and a guard that stops
on a non-finite loss."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import TrainerCallback


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, what: str):
        self.step = step
        super().__init__(f"{what} at step {step}")


class NonFiniteGuard(TrainerCallback):
    """Stop before a non-finite model is ever checkpointed.

    `on_step_end` runs after the optimizer step and before the trainer's save at that step, so
    checking the trainable parameters there keeps every saved checkpoint finite. The logged loss is
    checked too (`logging_nan_inf_filter` is off, so a NaN reaches the log).
    """

    def __init__(self, model: Any):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # Checked when this step will be saved or logged (the flow callback has decided by now) and
        # at the last step: that keeps every checkpoint finite without a per-step cost.
        if not (control.should_save or control.should_log or state.global_step >= state.max_steps):
            return
        self._check(state)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # A stop decided after this step's check (the token budget's callback runs later) still
        # reaches the save: the weights are checked once more before the phase saves its adapter.
        self._check(state)

    def _check(self, state: Any) -> None:
        with torch.no_grad():
            for p in self.params:
                if not torch.isfinite(p).all():
                    raise NonFiniteLossError(state.global_step, "adapter weights became non-finite (nan/inf)")

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(state.global_step, f"loss became {loss}")


class RichProgressCallback(TrainerCallback):
    """One rich progress task per phase, advanced per optimizer step, showing the latest loss. When
    the console is not a terminal (output redirected to a file: nohup, a cluster job, CI), the live
    display draws nothing until the end, so every `logging_steps` a plain line is printed instead:
    step, loss, tokens/s and the time left."""

    def __init__(self, progress: Any, label: str):
        self.progress = progress
        self.label = label
        self.task: Any = None
        self.loss: float | None = None
        self.started: float | None = None
        self.first_step = 0
        self.first_tokens = 0

    @property
    def plain(self) -> bool:
        return not self.progress.console.is_terminal

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.task = self.progress.add_task(self.label, total=state.max_steps, completed=state.global_step, loss="")
        self.started, self.first_step = time.perf_counter(), state.global_step
        self.first_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.progress.update(self.task, loss=f"loss {self.loss:.4f}")
            if self.plain:
                self.progress.console.print(self.line(state), highlight=False, soft_wrap=True)

    def line(self, state: Any) -> str:
        """e.g. 'phase 1 english: step 8/24 (33%), loss 6.7954, 5,912 tok/s, 1s elapsed, ETA 3s'."""
        done, total = state.global_step, state.max_steps
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        steps = max(done - self.first_step, 0)
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.first_tokens
        rate = f", {tokens / elapsed:,.0f} tok/s" if elapsed > 0 and tokens > 0 else ""
        eta = f", ETA {_duration(elapsed / steps * (total - done))}" if steps else ""
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        return f"{self.label}: step {done}/{total} ({done / max(total, 1):.0%}){loss}{rate}, {_duration(elapsed)} elapsed{eta}"

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.progress.update(self.task, completed=state.global_step)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class AdapterDtypeGuard(TrainerCallback):
    """Fail closed if a resumed phase would train at another precision than an uninterrupted one.

    For a quantized base, TRL's SFTTrainer casts the trainable LoRA weights to bf16 when it is built,
    and PEFT's `load_adapter` (which the Trainer calls to resume from a checkpoint) would cast them
    back to fp32; the runner keeps the dtype on reload (modeling.adapter_dtype_kept_on_reload). This
    guard checks, before the first step, that every trainable tensor still has the dtype it had when
    the trainer was built: under data parallelism a cast after the model is wrapped would desync the
    ranks' gradient buckets, so a mismatch is an error, not something to patch up here."""

    def __init__(self, model: Any):
        # By name: the reload may replace the parameter objects.
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        for name, p in model.named_parameters():
            expected = self.dtypes.get(name.removeprefix("module."))
            if expected is not None and p.dtype != expected:
                raise RuntimeError(f"the adapter tensor {name} is {p.dtype} after the resume, {expected} before it; "
                                   f"the phase would train at another precision than an uninterrupted one")


class SeededLengthGrouping(TrainerCallback):
    """Length-grouped batches in an order that depends on (seed, epoch) alone.

    transformers' LengthGroupedSampler draws its permutation from torch's global RNG, which a resumed
    run restores only after it has drawn the resumed epoch's order: a resumed phase would see that
    epoch's batches in another order. A generator of its own, reseeded at every epoch's start (before
    the epoch's iterator is built), gives an uninterrupted and a resumed run the same order."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: ANN001
        sampler = _length_grouped_sampler(train_dataloader)
        if sampler is None:
            raise RuntimeError("group_by_length: the train dataloader has no length-grouped sampler to seed")
        sampler.generator = torch.Generator().manual_seed(self.seed * 1000 + int(state.epoch or 0))


def _length_grouped_sampler(loader: Any) -> Any:
    """The sampler inside accelerate's and torch's batch-sampler wrappers that groups by length."""
    seen, todo = set(), [loader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj).__name__ == "LengthGroupedSampler":
            return obj
        todo += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader")]
    return None
