"""One phase's training, top to bottom:

data -> base -> placement -> starting adapter -> replay pool -> trainer (resumed from its last good
checkpoint) -> train -> stats -> replay record -> all ranks agree -> atomic adapter save -> recorded.

The runner (phases.py) owns what lives across phases (the run directory, the base in memory, the
adapter object); this module owns what one phase does with them.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from transformers import TrainerCallback

from cft_adapters.tracking import trainer_settings
from cft_adapters import distributed, modeling
from cft_adapters.callbacks import AdapterDtypeGuard, NonFiniteGuard, RichProgressCallback, SeededLengthGrouping
from cft_adapters.data import PhaseData, load_phase_data, truncate_tokenized
from cft_adapters.errors import RunError
from cft_adapters.hf_configs import sft_config
from cft_adapters.manifest import PhaseRecord, TrainStats
from cft_adapters.placement import Placement, apply_placement
from cft_adapters.replay import REPLAY_FILE, attach_replay, replay_record
from cft_adapters.rundir import last_good_checkpoint
from cft_adapters.util.fs import write_atomic


def train_phase(run: Any, k: int, record: PhaseRecord, progress: Progress) -> None:
    """Train phase k of `run` (a phases.PhaseRunner) and record it done; raises on any failure,
    leaving the phase's checkpoints for a resume."""
    phase, training = run.phases[k - 1], run.recipe.phase_training(k - 1)
    phase_dir = run.run_dir / record.dirname

    data = load_phase_data(phase, k - 1, training.seed)
    record.data = data_record(data)
    run.manifest.write(run.run_dir)  # on disk at once: the report's seen/unseen languages come from it
    run.ensure_base()
    placement = run.decide_placement(k)
    init_adapter = run.adapter_for_phase(k, placement)
    peft_model = run.model.peft
    _apply_placement(run, k, record, placement, phase_dir)
    modeling.set_gradient_checkpointing(peft_model, training.gradient_checkpointing)
    pool = distributed.main_first(  # rank 0 builds (generates) the pool; the others read its replay.jsonl
        lambda: run.replay_pool(k, phase_dir, len(data.dataset), init_adapter), f"phase {k} replay pool"
    ) if phase.replay else None

    resume = last_good_checkpoint(run.rundir.trainer_dir(record), run.console, move_damaged=True)
    trainer = _trainer(run, k, record, data, progress)
    # The adapter the phase starts from, as the trainer will train it (TRL may have cast it).
    init_digest = modeling.tensors_digest(modeling.adapter_state(peft_model))
    if k > 1 and init_digest != run.manifest.phases[k - 1].train.final_digest:
        raise RunError(f"phase {k} '{phase.name}': the adapter loaded from {init_adapter} differs from the one "
                       f"phase {k - 1} saved (digest {init_digest[:16]})")
    collator = attach_replay(trainer, pool, phase.replay, training) if pool is not None else None
    if training.token_budget is not None:
        replay = ([len(f["input_ids"]) for f in collator.features], phase.replay.ratio) if collator is not None else None
        size_to_token_budget(trainer, training.token_budget, replay)

    if resume:
        run.console.print(f"phase {k} '{phase.name}': resuming from {resume}")
    stats = _train(trainer, peft_model, resume, run.run_dir,
                   config_digest=record.config_digest, init_adapter=init_adapter, init_digest=init_digest)
    if training.token_budget is not None and stats.tokens < training.token_budget:
        run.console.print(f"[yellow]phase {k} '{phase.name}': ended at max_steps ({stats.steps}) with {stats.tokens:,} "
                          f"tokens, short of training.token_budget {training.token_budget:,}[/]")

    if collator is not None:
        record.replay = replay_record(collator, pool, phase.replay, str((phase_dir / REPLAY_FILE).relative_to(run.run_dir)))
        run.manifest.write(run.run_dir)  # before the adapter is saved: a kill after it keeps this record
    if distributed.world_size() > 1:
        digests = distributed.gather(stats.final_digest)
        stats.world_size, stats.rank_digests = len(digests), digests
        if len(set(digests)) > 1:
            raise RunError(f"phase {k} '{phase.name}': the data-parallel ranks ended with different adapters "
                           f"({', '.join(digests)}); nothing was saved")

    def save() -> None:
        run.rundir.save_adapter(peft_model, record, stats, trainer.state.log_history,
                                template=lambda folder: modeling.write_template_record(run.model.tokenizer, folder, run.model.base))

    distributed.main_first(save, f"phase {k} save", others=lambda: None)  # the next phase reads this adapter
    run.rundir.record_phase_done(run.manifest, record, stats)


def data_record(data: PhaseData) -> dict[str, Any]:
    """The phase's `data` entry in run.json."""
    return {
        "examples": len(data.dataset),
        "languages": data.languages,
        "sources": [{"where": s.where, "source": s.source, "examples": s.examples} for s in data.sources],
    }


def _apply_placement(run: Any, k: int, record: PhaseRecord, placement: Placement | None, phase_dir: Path) -> None:
    """Freeze the adapter on the placement's frozen layers; record it (placement.json, run.json)."""
    trainable = apply_placement(run.model.peft, placement)
    if placement is None:
        return
    placement.trainable_parameters = trainable
    record.placement = placement.to_json()
    if run.main:
        write_atomic(phase_dir / "placement.json", json.dumps(record.placement, indent=2) + "\n")
    run.console.print(f"phase {k} '{record.name}': {placement.strategy} placement freezes layers "
                      f"{placement.frozen}; {trainable} trainable parameters")
    run.manifest.write(run.run_dir)


def _trainer(run: Any, k: int, record: PhaseRecord, data: PhaseData, progress: Progress) -> Any:
    """TRL's SFTTrainer for the phase, with the runner's callbacks (no SFTTrainer subclass)."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    training, peft_model = run.recipe.phase_training(k - 1), run.model.peft
    tracking_args, tracking_callbacks = trainer_settings(training, run.run_dir, record.dirname)
    trainer = SFTTrainer(
        model=peft_model,
        args=sft_config(training, run.recipe.model, run.rundir.trainer_dir(record), **tracking_args),
        train_dataset=data.for_trainer(),
        processing_class=run.model.tokenizer,
        callbacks=[NonFiniteGuard(peft_model), RichProgressCallback(progress, f"phase {k} {record.name}"),
                   *tracking_callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(AdapterDtypeGuard(peft_model))  # after TRL's cast: the dtypes it trains at
    if training.group_by_length:
        trainer.add_callback(SeededLengthGrouping(training.seed))
    if training.padding_free:
        trainer.train_dataset = truncate_tokenized(trainer.train_dataset, training.max_length)
    return trainer


def _train(trainer: Any, peft_model: Any, resume: str | None, run_dir: Path, **known: Any) -> TrainStats:
    """Run the trainer (from `resume`, a checkpoint folder, if given) and measure it; `known`: the
    TrainStats fields decided before training (config digest, starting adapter and its digest)."""
    tokens_before = json.loads((Path(resume) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0) if resume else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with modeling.adapter_dtype_kept_on_reload(peft_model):  # a resume reloads the adapter: keep bf16
        trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    peak, kind = peak_memory_mb()
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return TrainStats(
        **known,
        steps=trainer.state.global_step,
        tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_second=round((tokens - tokens_before) / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_mb=round(peak, 1),
        peak_memory_kind=kind,
        trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        final_loss=float(losses[-1]) if losses else None,
        resumed_from=str(Path(resume).relative_to(run_dir)) if resume else None,
        final_digest=modeling.tensors_digest(modeling.adapter_state(peft_model)),
    )


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # Linux: KiB


class TokenBudgetCallback(TrainerCallback):
    """Stops the phase once the trainer has seen `budget` non-padding input tokens."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.num_input_tokens_seen >= self.budget:
            control.should_training_stop = True


BUDGET_MARGIN = 0.02  # max_steps above the estimate: the budget, not max_steps, is what ends the phase


def size_to_token_budget(trainer: Any, budget: int, replay: tuple[list[int], float] | None = None) -> None:
    """Size max_steps (and so the LR schedule) to the budget from the prepared data's token count,
    and stop exactly when the budget is reached (within the last optimizer step).

    `replay` (the prepared replay examples' lengths, and the share of the stream they take) enters
    the estimate: replay examples replace phase examples, and their lengths differ. max_steps is
    the estimate plus 2% and one step, because a budget below an epoch sees a random subset whose
    tokens per step vary; TokenBudgetCallback stops the phase at the budget itself."""
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps_per_epoch = max(1, math.ceil(len(lengths) / per_step))
    tokens_per_epoch = float(sum(lengths))
    if replay is not None and replay[0]:
        replay_lengths, ratio = replay
        tokens_per_epoch = (1 - ratio) * tokens_per_epoch + ratio * len(lengths) * (sum(replay_lengths) / len(replay_lengths))
    tokens_per_step = tokens_per_epoch / steps_per_epoch
    args.max_steps = math.ceil(budget / tokens_per_step * (1 + BUDGET_MARGIN)) + 1
    trainer.add_callback(TokenBudgetCallback(budget))
