"""The phase runner. For each phase: place adapters -> build replay -> train -> save -> evaluate.

Phase 0 is the untouched base (evaluated only). Phases 1..N train one LoRA adapter that carries on
across phases: phase k starts from the adapter phase k-1 saved, loaded explicitly from disk, on a
base that is loaded once per run and never changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback

from cft_adapters import distributed, modeling, report
from cft_adapters.callbacks import AdapterDtypeGuard, NonFiniteGuard, SeededLengthGrouping, NonFiniteLossError, RichProgressCallback
from cft_adapters.data import PhaseData, check_data, load_phase_data, truncate_tokenized
from cft_adapters.errors import CftError, RunError
from cft_adapters.evaluation import CheckpointScorer, check_eval_tasks, eval_model_config, training_precision
from cft_adapters.hf_configs import sft_config
from cft_adapters.manifest import RESOLVED_RECIPE, PhaseRecord, RunManifest, TrainStats, dumps_canonical, package_versions
from cft_adapters.rundir import RunDirectory, last_good_checkpoint, read_manifest, verify_adapter
from cft_adapters.scoring import eval_settings, record_evaluation, result_set_label  # noqa: F401  (re-exported)
from cft_adapters.util.fs import write_atomic
from cft_adapters.placement import Placement, PlacementInputs, apply_placement, choose_placement, layer_delta_norms, spectrum_scan
from cft_adapters.recipe import PlacementConfig, Recipe, ReplayConfig, TrainingConfig, dump_recipe, format_loc
from cft_adapters.replay import REPLAY_FILE, ReplayCollator, ReplayPool, ReplayPositionCallback, build_pool
from cft_adapters.tiny import cache_dir



def phase_config_digest(recipe: Recipe, k: int) -> str:
    """Everything that determines phase k's adapter: the model, the adapter, and phases 1..k, with
    the content of every data source they read (a file edited in place is another phase)."""
    payload = {
        "model": recipe.model.model_dump(mode="json"),
        "adapter": recipe.adapter.model_dump(mode="json"),
        # The template a tokenizer without one trains under (changing it changes every such phase).
        "fallback_template": hashlib.sha256(modeling.FALLBACK_CHAT_TEMPLATE.encode()).hexdigest()[:16],
        "phases": [
            {
                **recipe.run_phases()[i].model_dump(mode="json", exclude={"training"}),
                "training": recipe.phase_training(i).model_dump(mode="json"),
                "content": [_content(src) for src in _sources(recipe.run_phases()[i])],
            }
            for i in range(k)
        ],
    }
    return hashlib.sha256(dumps_canonical(payload).encode()).hexdigest()[:16]


def _sources(phase: Any) -> list[Any]:
    replay = phase.replay
    extra = [s for s in (getattr(replay, "prompts", None), getattr(replay, "source", None)) if s is not None] if replay else []
    return [*phase.datasets, *extra]


def _content(src: Any) -> dict[str, Any] | None:
    """A source's content: size and sha256 of a file, the commit a hub source resolved to. An
    unresolved hub source adds nothing (its id and revision are in the recipe part already)."""
    from cft_adapters.data import source_fingerprint

    fingerprint = source_fingerprint(src)
    return None if fingerprint.get("kind") == "hub" and not fingerprint.get("resolved") else fingerprint


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # Linux: KiB


def _changed_keys(old: Any, new: Any, path: tuple[Any, ...] = ()) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(key), new.get(key), (*path, key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _changed_keys(a, b, (*path, i))]
    return [] if old == new else [format_loc(path) or "(top level)"]


@dataclass
class _Model:
    base: Any = None
    tokenizer: Any = None
    peft: Any = None


class PhaseRunner:
    """Runs a validated recipe into its run directory; resumable, never rewrites a finished phase."""

    def __init__(self, recipe: Recipe, recipe_path: str, console: Console | None = None):
        self.recipe = recipe
        self.recipe_path = recipe_path
        # Data-parallel runs (accelerate launch): rank 0 writes the run directory and talks; see distributed.py.
        self.main = distributed.is_main()
        self.console = (console or Console()) if self.main else Console(quiet=True)
        self.run_dir = Path(recipe.output_dir)
        self.rundir = RunDirectory(self.run_dir, self.console)
        self.phases = recipe.run_phases()  # the recipe's phases, or the single mixed-baseline phase
        self.model = _Model()
        self._eval_scorer: CheckpointScorer | None = None
        self.base_path: str | None = None
        self.manifest: RunManifest | None = None

    # -- setup ----------------------------------------------------------------------------------

    def _setup_run_dir(self) -> RunManifest:
        if self.recipe.eval.tasks:
            check_eval_tasks(self.recipe.eval, self.recipe_path)
        check_data(self.recipe)  # every phase's sources, before phase 1 spends any time training
        check_placements(self.recipe, self.recipe_path)
        check_liger(self.recipe, self.recipe_path)
        self.rundir.lock(self.recipe_path)  # held to the end of run(): one process owns a run directory
        old = read_manifest(self.run_dir)
        precision = self.recipe.eval.base_precision or training_precision(self.recipe.model)
        if old is not None:  # even with eval.tasks: [] the resolved recipe would claim the new settings
            self._refuse_other_eval_settings(old, eval_settings(self.recipe.eval, precision))
        records = []
        for k in range(len(self.phases) + 1):
            name = "base" if k == 0 else self.phases[k - 1].name
            digest = None if k == 0 else phase_config_digest(self.recipe, k)
            prior = old.phases[k] if old is not None and k < len(old.phases) else None
            if prior is not None and prior.status == "done" and k > 0:
                if prior.name != name or prior.config_digest != digest:
                    raise RunError(self._mismatch_message(prior))
                verify_adapter(self.run_dir, prior)  # a finished adapter is checked before anything uses it
                records.append(prior)
            elif prior is not None and (k == 0 or (prior.name == name and prior.config_digest == digest)):
                records.append(prior)  # the base, or an unfinished phase under the same settings: its record goes on
            elif prior is not None and (prior.config_digest != digest or prior.name != name):
                # What an unfinished phase derived from other settings (checkpoints, replay pool,
                # placement, an unrecorded adapter) is moved aside together, never reused or deleted.
                aside = self.rundir.move_derived_aside(prior, "stale")
                if aside is not None:
                    self.console.print(f"phase {k} '{prior.name}': settings changed; what its unfinished attempt "
                                       f"left was moved to {aside}")
                records.append(PhaseRecord(index=k, name=name, config_digest=digest))
            else:
                records.append(PhaseRecord(index=k, name=name, config_digest=digest, status="done" if k == 0 else "pending"))
        if old is not None:
            for extra in old.phases[len(records):]:
                if extra.status == "done":
                    raise RunError(self._mismatch_message(extra))
        manifest = RunManifest(
            recipe=self.recipe_path,
            base_model=self.recipe.model.name_or_path,
            base_model_path=old.base_model_path if old else None,
            chat_template=old.chat_template if old else None,
            seed=self.recipe.training.seed,
            eval_base_precision=precision if self.recipe.eval.tasks or old is None else old.eval_base_precision,
            versions=package_versions(),
            phases=records,
        )
        write_atomic(self.run_dir / RESOLVED_RECIPE, dump_recipe(self.recipe))
        manifest.write(self.run_dir)
        return manifest

    def _refuse_other_eval_settings(self, old: RunManifest, wanted: dict[str, Any]) -> None:
        """Scores are only ever compared when produced the same way: a run scored under other eval
        settings is not silently mixed with (or relabelled as) the new ones."""
        scored = [r for r in old.phases if r.eval_status == "done" and r.eval_settings is not None]
        differ = [r for r in scored if r.eval_settings != wanted]
        if not differ:
            return
        recorded = differ[0].eval_settings or {}
        changed = [f"eval.{key}: {recorded.get(key)!r} -> {wanted[key]!r}" for key in wanted if recorded.get(key) != wanted[key]]
        phases = ", ".join(f"{r.index} '{r.name}'" for r in differ)
        raise RunError(
            f"{self.run_dir}: phase(s) {phases} were scored with other evaluation settings ({'; '.join(changed)}). "
            f"A run's report compares phases scored one way: keep the run's eval settings here, and score "
            f"others with cft-eval {self.run_dir} (it writes a separate, labelled result set)."
        )

    def _mismatch_message(self, prior: PhaseRecord) -> str:
        changed: list[str] = []
        resolved = self.run_dir / RESOLVED_RECIPE
        if resolved.is_file():
            try:
                changed = _changed_keys(yaml.safe_load(resolved.read_text(encoding="utf-8")), self.recipe.model_dump(mode="json"))
            except (OSError, ValueError, yaml.YAMLError):  # a damaged copy only loses the detail
                changed = []
        detail = (f" (changed keys: {', '.join(changed[:8])})" if changed
                  else " (same settings, but the content of a data file it reads has changed)")
        return (
            f"{self.run_dir}: phase {prior.index} '{prior.name}' is finished there with a different recipe"
            f"{detail}. A finished phase is never retrained in place: use a new output_dir "
            f"(e.g. output_dir={self.run_dir}-2)."
        )

    def _ensure_base(self) -> None:
        if self.model.base is not None:
            return
        if self.base_path is None:  # run() resolves it on every rank; this is for callers outside run()
            self.base_path = modeling.resolve_model_path(self.recipe.model)
        self.console.print(f"[bold]loading base[/] {self.recipe.model.name_or_path} "
                           f"({self.recipe.model.quantization}) from {self.base_path}")
        self.model.tokenizer = modeling.load_tokenizer(self.recipe.model, self.base_path)
        self.model.base = modeling.load_base_model(self.recipe.model, self.base_path)
        assert self.manifest is not None
        self.manifest.base_model_path = self.base_path
        template = modeling.template_record(self.model.tokenizer, self.model.base)
        self.manifest.chat_template = template
        if template["source"] != "tokenizer":
            self.console.print(f"[yellow]chat template:[/] the tokenizer has none; using the {template['source']} template "
                               f"(each answer ends with {template['eos_token']!r}, which generation stops on)")
        if template.get("completion_has_stop") is False:
            self.console.print("[yellow]chat template:[/] its assistant turns do not end with a token generation "
                               "stops on; answers will run to max_new_tokens")
        self.manifest.write(self.run_dir)

    def _adapter_for_phase(self, k: int, placement: Placement | None) -> str | None:
        """Put phase k's starting adapter in place; return where it came from (None: fresh init).
        A fresh adapter is placed only on the trainable layers (PEFT's layers_to_transform)."""
        training = self.recipe.phase_training(k - 1)
        prev_dir = self.run_dir / self.manifest.phases[k - 1].dirname / "adapter" if k > 1 else None  # type: ignore[union-attr]
        if prev_dir is None:
            from transformers import set_seed

            set_seed(training.seed)  # the LoRA init draws from torch's RNG
            layers = placement.trainable if placement is not None and not placement.modules else None
            self.model.peft = modeling.new_adapter(self.model.base, self.recipe.adapter, layers)
            return None
        verify_adapter(self.run_dir, self.manifest.phases[k - 1])  # type: ignore[union-attr]
        if self.model.peft is None:
            self.model.peft = modeling.load_adapter_for_training(self.model.base, prev_dir)
        else:
            modeling.load_adapter_weights(self.model.peft, prev_dir)
        return str(prev_dir.relative_to(self.run_dir))

    def _decide_placement(self, k: int) -> Placement | None:
        cfg = self.phases[k - 1].placement
        if cfg is None:
            return None
        num_layers = self.model.base.config.get_text_config().num_hidden_layers
        modules = list(cfg.modules) if cfg.modules else None
        inputs = PlacementInputs(
            cfg, num_layers, self.recipe.phase_training(k - 1).seed, modules,
            spectrum=lambda: spectrum_scan(self.model.base, modules or list(self.recipe.adapter.target_modules),
                                           f"{self.base_path}|{self.recipe.model.quantization}", cache_dir()),
            adapter_change=lambda: self._adapter_change_scores(k, cfg, num_layers, modules),
        )
        try:
            return choose_placement(inputs)
        except ValueError as exc:
            raise CftError(f"{self.recipe_path}: phases[{k - 1}].placement: {exc}") from None

    def _adapter_change_scores(
        self, k: int, cfg: PlacementConfig, num_layers: int, modules: list[str] | None
    ) -> tuple[dict[int, float], dict[str, Any]]:
        """LF_H2 evidence: per-layer change of the adapter update over the reference phase."""
        from safetensors.torch import load_file

        names = [p.name for p in self.phases]
        ref = names.index(cfg.reference_phase) + 1 if cfg.reference_phase else k - 1
        records = self.manifest.phases  # type: ignore[union-attr]
        if ref < 1 or records[ref].status != "done":
            raise ValueError(f"'most_changed' needs phase {ref} ('{names[ref - 1]}') finished first")
        end_dir = self.run_dir / records[ref].dirname / "adapter"
        start_dir = self.run_dir / records[ref - 1].dirname / "adapter" if ref > 1 else None
        scale = self.recipe.adapter.alpha / self.recipe.adapter.r
        scores = layer_delta_norms(
            load_file(str(start_dir / "adapter_model.safetensors")) if start_dir else None,
            load_file(str(end_dir / "adapter_model.safetensors")), scale, num_layers, modules,
        )
        detail = {"reference_phase": names[ref - 1], "start": str(start_dir.relative_to(self.run_dir)) if start_dir else None,
                  "end": str(end_dir.relative_to(self.run_dir)), "scale": scale}
        return scores, detail

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> RunManifest:
        """Every phase, then the report; the run directory is locked (rank 0) from set-up to the end."""
        try:
            return self._run()
        finally:
            self.rundir.unlock()

    def _run(self) -> RunManifest:
        distributed.init()
        self.manifest = distributed.main_first(self._setup_run_dir, "set-up", others=lambda: RunManifest.read(self.run_dir))
        if distributed.world_size() > 1:
            # Every rank at the same point (rank 0 builds or dequantizes a builtin model first): later,
            # only rank 0 evaluates, so no collective may hide behind loading the base.
            self.base_path = distributed.main_first(lambda: modeling.resolve_model_path(self.recipe.model), "model preparation")
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), console=self.console,
            # No live-refresh thread when nobody watches (a pipe, CI): on 2 cores it competes with training.
            auto_refresh=self.console.is_terminal,
        )
        with progress:
            overall = progress.add_task("phases", total=len(self.phases), loss="")
            self._maybe_evaluate(0)
            for k in range(1, len(self.phases) + 1):
                record = self.manifest.phases[k]
                if record.status == "done":
                    self.console.print(f"phase {k} '{record.name}': done, skipped")
                else:
                    self._run_phase(k, progress)
                self._maybe_evaluate(k)
                progress.update(overall, advance=1)
        if not self.main:
            return self.manifest
        self.console.print(summary_table(self.manifest))
        if self.recipe.eval.tasks:
            settings = eval_settings(self.recipe.eval, self.recipe.eval.base_precision or training_precision(self.recipe.model))
            self.console.print(*report.rich_tables(self.manifest, self.recipe.eval.tasks, settings))
            path = report.write_report(self.run_dir, self.manifest, self.recipe.eval.tasks, settings)
            self.console.print(f"report: {path}")
        if self.recipe.analysis.drift:
            self._drift()
        return self.manifest

    def _drift(self) -> None:
        from cft_adapters.analysis.drift import default_probe, drift_outputs, plot_drift, run_drift

        out, png = drift_outputs(self.run_dir)
        # This run's own recipe asked for the model's code (or not): no second question here.
        result = run_drift(self.run_dir, default_probe(), self.console, allow_remote_code=self.recipe.model.trust_remote_code)
        write_atomic(out, json.dumps(result, indent=2) + "\n")
        plot_drift(result, png)
        self.console.print(f"drift: {out} and {png}")

    # -- evaluation -----------------------------------------------------------------------------

    def _maybe_evaluate(self, k: int) -> None:
        """Score phase k (0: the base) unless it is scored already or the recipe asks for nothing."""
        assert self.manifest is not None
        if not self.main:  # rank 0 scores; the others go on and wait for it at the next phase's set-up
            return
        record = self.manifest.phases[k]
        if not self.recipe.eval.tasks:
            if record.eval_status != "done":  # earlier scores stay what they are
                record.eval_status = "skipped"
                self.manifest.write(self.run_dir)
            return
        if record.eval_status == "done" and set(self.recipe.eval.tasks) <= set(record.eval_tasks):
            return
        adapter_dir = verify_adapter(self.run_dir, record) if k > 0 else None
        self.console.print(f"phase {k} '{record.name}': evaluating {', '.join(self.recipe.eval.tasks)}")
        scorer = self._scorer(adapter_dir)
        precision = self.recipe.eval.base_precision or training_precision(self.recipe.model)
        record_evaluation(self.manifest, record, scorer, adapter_dir, self.run_dir, self.console,
                          eval_settings(self.recipe.eval, precision))

    def _scorer(self, adapter_dir: Path | None) -> CheckpointScorer:
        """Score on the training base in memory, or on a second base when eval.base_precision differs."""
        precision = self.recipe.eval.base_precision or training_precision(self.recipe.model)
        if precision != training_precision(self.recipe.model):
            if self._eval_scorer is None:
                cfg = eval_model_config(self.recipe.model, precision)
                path = modeling.resolve_model_path(cfg)
                self.console.print(f"[bold]loading eval base[/] at {precision}")
                self._eval_scorer = CheckpointScorer(
                    self.recipe.eval, modeling.load_tokenizer(cfg, path), modeling.load_base_model(cfg, path)
                )
            return self._eval_scorer
        self._ensure_base()
        if adapter_dir is not None and self.model.peft is None:
            self.model.peft = modeling.load_adapter_for_training(self.model.base, adapter_dir)
        return CheckpointScorer(self.recipe.eval, self.model.tokenizer, self.model.base, self.model.peft)

    def _run_phase(self, k: int, progress: Progress) -> None:
        assert self.manifest is not None
        record = self.manifest.phases[k]
        phase_dir = self.run_dir / record.dirname

        def recover(tidy: bool = True) -> bool:
            """Tidy what a killed attempt left; True when its adapter was saved and only needs recording."""
            stats = self.rundir.recover_phase(record, tidy=tidy)
            if stats is None:
                return False
            self.rundir.record_phase_done(self.manifest, record, stats)
            self.console.print(f"phase {k} '{record.name}': adapter was already saved; recorded as done")
            return True

        # Rank 0 tidies; the other ranks only read what it left.
        if distributed.main_first(recover, f"phase {k} set-up", others=lambda: recover(tidy=False)):
            return
        if self.main:
            self.rundir.start_attempt(record)
        record.status, record.error = "running", None
        self.manifest.write(self.run_dir)
        try:
            self._train_phase(k, record, phase_dir, progress)
        except NonFiniteLossError as exc:
            last = last_good_checkpoint(self.rundir.trainer_dir(record))
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
            self._fail(record, str(exc))
            raise RunError(
                f"phase {k} '{record.name}': {exc}; stopped, {kept}. Re-running the same command resumes from "
                f"it. To retrain the phase instead, change its training (e.g. a lower learning_rate) and re-run: "
                f"a changed phase starts over from phase {k - 1}'s adapter, and finished phases are kept."
            ) from None
        except OSError as exc:  # disk full, a folder made read-only mid-run: say where, keep the record true
            self._fail(record, f"{type(exc).__name__}: {exc}")
            where = exc.filename or phase_dir
            raise RunError(f"phase {k} '{record.name}': {where}: {exc.strerror or exc}; the phase stopped and its last "
                           f"good checkpoint is kept. Fix the cause and re-run the same command to resume.") from None
        except BaseException as exc:
            stopped = "terminated (SIGTERM)" if type(exc).__name__ == "Terminated" else "interrupted"
            self._fail(record, stopped if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
            raise

    def _fail(self, record: PhaseRecord, message: str) -> None:
        record.status, record.error = "failed", message
        self.manifest.write(self.run_dir)  # type: ignore[union-attr]

    def _train_phase(self, k: int, record: PhaseRecord, phase_dir: Path, progress: Progress) -> None:
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTTrainer

        phase = self.phases[k - 1]
        training = self.recipe.phase_training(k - 1)
        data: PhaseData = load_phase_data(phase, k - 1, training.seed)
        record.data = {
            "examples": len(data.dataset),
            "languages": data.languages,
            "sources": [{"where": s.where, "source": s.source, "examples": s.examples} for s in data.sources],
        }
        self._ensure_base()
        placement = self._decide_placement(k)
        init_adapter = self._adapter_for_phase(k, placement)
        peft_model = self.model.peft
        trainable = apply_placement(peft_model, placement)
        if placement is not None:
            placement.trainable_parameters = trainable
            record.placement = placement.to_json()
            if self.main:
                write_atomic(phase_dir / "placement.json", json.dumps(record.placement, indent=2) + "\n")
            self.console.print(f"phase {k} '{phase.name}': {placement.strategy} placement freezes layers "
                               f"{placement.frozen}; {trainable} trainable parameters")
            self.manifest.write(self.run_dir)
        modeling.set_gradient_checkpointing(peft_model, training.gradient_checkpointing)
        pool = distributed.main_first(  # rank 0 builds (generates) the pool; the others read its replay.jsonl
            lambda: self._replay_pool(k, phase_dir, len(data.dataset), init_adapter), f"phase {k} replay pool"
        ) if phase.replay else None

        trainer_dir = self.rundir.trainer_dir(record)
        resume = last_good_checkpoint(trainer_dir, self.console, move_damaged=True)
        tokens_before = json.loads((Path(resume) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0) if resume else 0
        trainer = SFTTrainer(
            model=peft_model,
            args=sft_config(training, self.recipe.model, trainer_dir),
            train_dataset=data.for_trainer(),
            processing_class=self.model.tokenizer,
            callbacks=[NonFiniteGuard(peft_model), RichProgressCallback(progress, f"phase {k} {phase.name}")],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(AdapterDtypeGuard(peft_model))  # after TRL's cast: the dtypes it trains at
        if training.group_by_length:
            trainer.add_callback(SeededLengthGrouping(training.seed))
        # The adapter the phase starts from, as the trainer will train it (TRL may have cast it).
        init_digest = modeling.tensors_digest(modeling.adapter_state(peft_model))
        if k > 1 and init_digest != self.manifest.phases[k - 1].train.final_digest:  # type: ignore[union-attr]
            raise RunError(f"phase {k} '{phase.name}': the adapter loaded from {init_adapter} differs from the one "
                           f"phase {k - 1} saved (digest {init_digest[:16]})")
        if training.padding_free:
            trainer.train_dataset = truncate_tokenized(trainer.train_dataset, training.max_length)
        collator = self._attach_replay(trainer, pool, phase.replay, training) if pool is not None else None
        if training.token_budget is not None:
            size_to_token_budget(trainer, training.token_budget)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if resume:
            self.console.print(f"phase {k} '{phase.name}': resuming from {resume}")
        started = time.perf_counter()
        with modeling.adapter_dtype_kept_on_reload(peft_model):  # a resume reloads the adapter: keep bf16
            trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
        peak, kind = _peak_memory_mb()

        tokens = int(trainer.state.num_input_tokens_seen)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        final = modeling.adapter_state(peft_model)
        stats = TrainStats(
            config_digest=record.config_digest,
            steps=trainer.state.global_step,
            tokens=tokens,
            seconds=round(seconds, 3),
            tokens_per_second=round((tokens - tokens_before) / seconds, 1) if seconds > 0 else 0.0,
            peak_memory_mb=round(peak, 1),
            peak_memory_kind=kind,
            trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
            final_loss=float(losses[-1]) if losses else None,
            resumed_from=str(Path(resume).relative_to(self.run_dir)) if resume else None,
            init_adapter=init_adapter,
            init_digest=init_digest,
            final_digest=modeling.tensors_digest(final),
        )
        if collator is not None:
            counts = distributed.gather((collator.replayed, collator.seen, collator.replay_tokens))  # every rank's
            replayed, seen, replay_tokens = (sum(c[i] for c in counts) for i in range(3))
            record.replay = {
                "kind": phase.replay.kind,
                "ratio_requested": phase.replay.ratio,
                "ratio_achieved": round(replayed / seen, 6) if seen else 0.0,
                "replayed_examples": replayed,
                "stream_examples": seen,
                "replay_tokens": replay_tokens,
                "pool_examples": len(pool.rows),
                "pool_reused": pool.reused,
                "file": str((phase_dir / REPLAY_FILE).relative_to(self.run_dir)),
                "generation": pool.generation,
            }
            self.manifest.write(self.run_dir)  # before the adapter is saved: a kill after it keeps this record
        if distributed.world_size() > 1:
            digests = distributed.gather(stats.final_digest)
            stats.world_size, stats.rank_digests = len(digests), digests
            if len(set(digests)) > 1:
                raise RunError(f"phase {k} '{phase.name}': the data-parallel ranks ended with different adapters "
                               f"({', '.join(digests)}); nothing was saved")

        def save() -> None:
            self.rundir.save_adapter(peft_model, record, stats, trainer.state.log_history,
                                     template=lambda folder: modeling.write_template_record(self.model.tokenizer, folder, self.model.base))

        distributed.main_first(save, f"phase {k} save", others=lambda: None)  # the next phase reads this adapter
        self.rundir.record_phase_done(self.manifest, record, stats)  # type: ignore[arg-type]

    def _replay_pool(self, k: int, phase_dir: Path, phase_examples: int, init_adapter: str | None) -> ReplayPool:
        """Built once per phase before training (the model in memory holds phase k-1's adapter)."""
        cfg = self.phases[k - 1].replay
        assert cfg is not None
        records = self.manifest.phases  # type: ignore[union-attr]
        key = {"phase_config_digest": records[k].config_digest,
               "answering_adapter": records[k - 1].train.final_digest if k > 1 else "fresh"}  # type: ignore[union-attr]
        return build_pool(
            cfg, where=f"phases[{k - 1}].replay", phase_dir=phase_dir, phase_examples=phase_examples,
            seed=self.recipe.phase_training(k - 1).seed, model=self.model.peft, tokenizer=self.model.tokenizer,
            source_model=init_adapter or "base (fresh adapter)",
            earlier_sources=[src for p in self.phases[: k - 1] for src in p.datasets], console=self.console, key=key,
        )

    @staticmethod
    def _attach_replay(trainer: Any, pool: ReplayPool, cfg: ReplayConfig, training: TrainingConfig) -> ReplayCollator:
        # The replay pool goes through TRL's own dataset preparation (chat template, tokenization,
        # completion mask), so replay examples are masked exactly like phase examples.
        prepared = trainer._prepare_dataset(pool.to_dataset(), trainer.processing_class, trainer.args,
                                            packing=False, formatting_func=None, dataset_name="replay")
        if training.padding_free:
            prepared = truncate_tokenized(prepared, training.max_length)
        seed = training.seed
        keep = [c for c in prepared.column_names if c not in ("prompt", "completion")]
        collator = ReplayCollator(trainer.data_collator, prepared.select_columns(keep).to_list(), cfg.ratio, seed,
                                  rank=distributed.rank(), world_size=distributed.world_size())
        trainer.data_collator = collator
        trainer.add_callback(ReplayPositionCallback(collator))
        return collator


class TokenBudgetCallback(TrainerCallback):
    """Stops the phase once the trainer has seen `budget` non-padding input tokens."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.num_input_tokens_seen >= self.budget:
            control.should_training_stop = True


def size_to_token_budget(trainer: Any, budget: int) -> None:
    """Size max_steps (and so the LR schedule) to the budget from the prepared data's token count,
    and stop exactly when the budget is reached (within the last optimizer step)."""
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps_per_epoch = max(1, math.ceil(len(lengths) / per_step))
    tokens_per_step = sum(lengths) / steps_per_epoch
    args.max_steps = math.ceil(budget / tokens_per_step) + 1
    trainer.add_callback(TokenBudgetCallback(budget))


def check_liger(recipe: Recipe, source: str) -> None:
    import importlib.util

    wants = [i for i in range(len(recipe.phases)) if recipe.phase_training(i).use_liger_kernel]
    if not wants:
        return
    if not torch.cuda.is_available():
        raise CftError(f"{source}: training.use_liger_kernel: Liger kernels need a CUDA GPU; none is visible")
    if importlib.util.find_spec("liger_kernel") is None:
        raise CftError(f"{source}: training.use_liger_kernel: install the 'gpu' extra (pip install -e '.[gpu]')")


def check_placements(recipe: Recipe, source: str) -> None:
    """Placement errors the model config can reveal (layer ranges, fractions) before any training."""
    from cft_adapters.placement import describe_for_dry_run, num_layers_from_config

    if not any(p.placement and p.placement.strategy != "none" for p in recipe.phases):
        return
    num_layers = num_layers_from_config(recipe.model)
    problems = []
    for i, phase in enumerate(recipe.phases):
        if phase.placement is not None:
            try:
                describe_for_dry_run(phase.placement, num_layers, recipe.phase_training(i).seed)
            except CftError as exc:
                problems.append(f"{source}: phases[{i}].placement: {exc}")
    if problems:
        raise CftError(problems)


def summary_table(manifest: RunManifest) -> Table:
    table = Table(title=f"run: {manifest.recipe}")
    for col in ("phase", "status", "steps", "tokens", "sec", "tok/s", "peak MB", "loss"):
        if col == "phase":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for rec in manifest.phases:
        t = rec.train
        cells = (
            [str(t.steps), str(t.tokens), f"{t.seconds:.1f}", f"{t.tokens_per_second:.0f}", f"{t.peak_memory_mb:.0f}",
             f"{t.final_loss:.3f}" if t.final_loss is not None else "-"]
            if t else ["-"] * 6
        )
        table.add_row(f"{rec.index} {rec.name}", rec.status, *cells)
    return table
