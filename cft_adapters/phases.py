"""The phase runner. For each phase: place adapters -> build replay -> train -> save -> evaluate.

Phase 0 is the untouched base (evaluated only). Phases 1..N train one LoRA adapter that carries on
across phases: phase k starts from the adapter phase k-1 saved, loaded explicitly from disk, on a
base that is loaded once per run and never changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cft_adapters.loss_curve import write_loss_curve
from cft_adapters.tracking import check_trackers, log_phase_scores
from cft_adapters.tasks_path import use_include_paths
from cft_adapters import distributed, modeling, report
from cft_adapters.analysis.predict import check_analysis_files
from cft_adapters.callbacks import NonFiniteLossError
from cft_adapters.data import check_data
from cft_adapters.errors import CftError, RunError
from cft_adapters.evaluation import CheckpointScorer, check_eval_tasks, eval_model_config, scored_tasks, training_precision
from cft_adapters.hf_configs import check_liger
from cft_adapters.manifest import MANIFEST, RESOLVED_RECIPE, PhaseRecord, RunManifest, package_versions, summary_table
from cft_adapters.placement import Placement, PlacementInputs, adapter_change_scores, check_placements, choose_placement, spectrum_scan
from cft_adapters.reconcile import phase_config_digest, phase_records, refuse_other_eval_settings  # noqa: F401  (phase_config_digest: re-exported)
from cft_adapters.recipe import EvalConfig, Recipe, dump_recipe
from cft_adapters.reference_change import reference_change_scores
from cft_adapters.replay import ReplayPool, build_pool
from cft_adapters.rundir import RunDirectory, checked_manifest, last_good_checkpoint, verify_adapter
from cft_adapters.score_cache import BaseScoreCache, StoringScorer, base_score_key, cache_enabled
from cft_adapters.scoring import Scorer, eval_settings, record_evaluation
from cft_adapters.train_phase import train_phase
from cft_adapters.util.fs import cache_dir, write_atomic


@dataclass
class _Model:
    base: Any = None
    tokenizer: Any = None
    peft: Any = None


class BasePool:
    """A loaded base model kept between runs in one process (cft-study's sequential cells), so the
    next cell on the same base does not load and quantize it again. A run takes the base it needs
    when it is here, and hands it back at its end with its adapter removed (PEFT's unload). One base
    is kept, not several: memory. A base that is not clean after unloading is dropped, never reused."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._loaded: tuple[Any, Any] | None = None
        self.reused = 0

    @staticmethod
    def key(recipe: Recipe, path: str) -> str:
        return recipe.model.model_dump_json() + "|" + path

    def take(self, key: str) -> tuple[Any, Any] | None:
        if self._key != key or self._loaded is None:
            return None
        loaded, self._key, self._loaded = self._loaded, None, None
        self.reused += 1
        return loaded

    def give(self, key: str, tokenizer: Any, base: Any) -> None:
        if any("lora_" in name for name, _ in base.named_modules()):
            return
        self._key, self._loaded = key, (tokenizer, base)


class PhaseRunner:
    """Runs a validated recipe into its run directory; resumable, never rewrites a finished phase."""

    def __init__(self, recipe: Recipe, recipe_path: str, console: Console | None = None,
                 base_pool: BasePool | None = None):
        self.base_pool = base_pool if distributed.world_size() == 1 else None
        self.recipe = recipe
        use_include_paths(recipe.eval.include_path)  # the recipe's own task folders, for every scoring
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
            check_eval_tasks(self.recipe.eval, self.recipe_path, self.console)
        check_data(self.recipe)  # every phase's sources, before phase 1 spends any time training
        check_placements(self.recipe, self.recipe_path)
        check_liger(self.recipe, self.recipe_path)
        check_analysis_files(self.recipe, self.recipe_path)
        for i in range(len(self.phases)):
            check_trackers(self.recipe.phase_training(i) if not self.recipe.mixed_baseline else self.recipe.training,
                           self.recipe_path)
        self.rundir.lock(self.recipe_path)  # held to the end of run(): one process owns a run directory
        # every record's index, name and checkpoint checked: they name the folders moved aside below
        try:
            old = checked_manifest(self.run_dir) if (self.run_dir / MANIFEST).is_file() else None
        except RunError:
            raise
        except CftError as exc:  # a damaged run.json: exit 1, as every damaged run.json
            raise RunError(exc.problems) from None
        precision = self.recipe.eval.base_precision or training_precision(self.recipe.model)
        if old is not None:  # even with eval.tasks: [] the resolved recipe would claim the new settings
            refuse_other_eval_settings(self.run_dir, old, eval_settings(self.recipe.eval, precision))
        records = phase_records(self.recipe, old, self.rundir, self.console)
        same_base = old is not None and bool(old.phases) and records[0] is old.phases[0]  # else: set again when the new base loads
        manifest = RunManifest(
            recipe=self.recipe_path,
            base_model=self.recipe.model.name_or_path,
            base_model_path=old.base_model_path if same_base else None,
            chat_template=old.chat_template if same_base else None,
            seed=self.recipe.training.seed,
            eval_base_precision=precision if self.recipe.eval.tasks or old is None else old.eval_base_precision,
            versions=package_versions(),
            phases=records,
        )
        write_atomic(self.run_dir / RESOLVED_RECIPE, dump_recipe(self.recipe))
        manifest.write(self.run_dir)
        return manifest

    def ensure_base(self) -> None:
        if self.model.base is not None:
            return
        if self.base_path is None:  # run() resolves it on every rank; this is for callers outside run()
            self.base_path = modeling.resolve_model_path(self.recipe.model)
        self.console.print(f"[bold]loading base[/] {self.recipe.model.name_or_path} "
                           f"({self.recipe.model.quantization}) from {self.base_path}")
        reused = self.base_pool.take(BasePool.key(self.recipe, self.base_path)) if self.base_pool else None
        if reused is not None:
            self.console.print("(the base loaded for the previous cell, its adapter removed)")
            self.model.tokenizer, self.model.base = reused
        else:
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

    def adapter_for_phase(self, k: int, placement: Placement | None) -> str | None:
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

    def decide_placement(self, k: int) -> Placement | None:
        cfg = self.phases[k - 1].placement
        if cfg is None:
            return None
        num_layers = self.model.base.config.get_text_config().num_hidden_layers
        modules = list(cfg.modules) if cfg.modules else None
        inputs = PlacementInputs(
            cfg, num_layers, self.recipe.phase_training(k - 1).seed, modules,
            spectrum=lambda: spectrum_scan(self.model.base, modules or list(self.recipe.adapter.target_modules),
                                           f"{self.base_path}|{self.recipe.model.quantization}", cache_dir()),
            adapter_change=lambda: adapter_change_scores(
                self.run_dir, self.manifest.phases, [p.name for p in self.phases], cfg, k,  # type: ignore[union-attr]
                self.recipe.adapter.alpha / self.recipe.adapter.r, num_layers, modules),
            reference_change=lambda: reference_change_scores(
                cfg.reference, modules or list(self.recipe.adapter.target_modules), num_layers, cache_dir()),  # type: ignore[arg-type]
        )
        try:
            return choose_placement(inputs)
        except ValueError as exc:
            raise CftError(f"{self.recipe_path}: phases[{k - 1}].placement: {exc}") from None

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> RunManifest:
        """Every phase, then the report; the run directory is locked (rank 0) from set-up to the end."""
        try:
            return self._run()
        finally:
            self.rundir.unlock()
            self._return_base()

    def _return_base(self) -> None:
        """Hand the base back to the pool, without this run's adapter (see BasePool)."""
        if self.base_pool is None or self.model.base is None or self.base_path is None:
            return
        base, tokenizer = self.model.base, self.model.tokenizer
        if self.model.peft is not None:
            base = self.model.peft.unload()  # the LoRA layers out, the original (NF4) modules back in place
        self.model = _Model()
        self._eval_scorer = None
        self.base_pool.give(BasePool.key(self.recipe, self.base_path), tokenizer, base)

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
                    if k == len(self.phases) and k >= 2:
                        self._predict_forgetting(k)
                    self._run_phase(k, progress)
                self._maybe_evaluate(k)
                progress.update(overall, advance=1)
        if not self.main:
            return self.manifest
        self.console.print(summary_table(self.manifest))
        write_loss_curve(self.run_dir, self.manifest)
        if self.recipe.eval.tasks:
            settings = eval_settings(self.recipe.eval, self.recipe.eval.base_precision or training_precision(self.recipe.model))
            self.console.print(*report.rich_tables(self.manifest, self.recipe.eval.tasks, settings))
            path = report.write_report(self.run_dir, self.manifest, self.recipe.eval.tasks, settings)
            self.console.print(f"report: {path}")
        if self.recipe.analysis.drift:
            self._drift()
        return self.manifest

    def _predict_forgetting(self, k: int) -> None:
        """Before the last phase: the DES of the last two phases and the forgetting the study-fitted
        model (analysis.forgetting_model) predicts, or that there is none."""
        path = self.recipe.analysis.forgetting_model
        if not path:
            self.console.print(f"phase {k}: no forgetting prediction (no fitted model; cft-analyze predict STUDY_DIR "
                               "writes one, analysis.forgetting_model names it)")
            return
        from cft_adapters.analysis.predict import pair_des, predict, read_model
        from cft_adapters.analysis.similarity import load_encoder
        from cft_adapters.extras import require

        model = read_model(Path(path))
        require("analysis", "analysis.forgetting_model")
        des = pair_des(self.recipe, load_encoder(model["encoder"]), model["encoder"])
        self.console.print(
            f"phase {k}: DES of phases {k - 1} and {k} = {des:.4f} ({model['encoder']}); predicted EA forgetting "
            f"{predict(model, des):+.3f} (fit on {model['n']} cells, R² "
            f"{'-' if model['r2'] is None else format(model['r2'], '.2f')}; {model['caveat']})",
            highlight=False)

    def _drift(self) -> None:
        from cft_adapters.analysis.drift import default_probe, drift_outputs, plot_drift, read_probe, run_drift

        out, png = drift_outputs(self.run_dir)
        probe = self.recipe.analysis.drift_probe
        prompts = read_probe(Path(probe), "analysis.drift_probe:") if probe else default_probe()
        # This run's own recipe asked for the model's code (or not): no second question here.
        result = run_drift(self.run_dir, prompts, self.console, allow_remote_code=self.recipe.model.trust_remote_code,
                           probe_source=probe)
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
        if record.eval_status == "done" and set(scored_tasks(self.recipe.eval)) <= set(record.eval_tasks):
            return
        adapter_dir = verify_adapter(self.run_dir, record) if k > 0 else None
        precision = self.recipe.eval.base_precision or training_precision(self.recipe.model)
        settings = eval_settings(self.recipe.eval, precision)
        eval_cfg = self.recipe.eval
        if record.eval_status == "done" and record.eval_settings == settings:  # tasks added since: just those
            eval_cfg = eval_cfg.model_copy(update={"tasks": [t for t in eval_cfg.tasks if t not in record.eval_tasks]})
        cache = self._base_score_cache(settings, eval_cfg) if k == 0 else None
        cached = cache.lookup(eval_cfg, self.console) if cache is not None else None
        scorer: Scorer
        if cached is not None:
            self.console.print(f"phase 0 '{record.name}': scores from the cache ({cache.dir})")  # type: ignore[union-attr]
            scorer = cached
        else:
            self.console.print(f"phase {k} '{record.name}': evaluating {', '.join(scored_tasks(eval_cfg))}")
            checkpoint_scorer = self._scorer(adapter_dir)
            checkpoint_scorer.eval_cfg = eval_cfg  # the scorer (and its loaded base) is kept across phases
            scorer = checkpoint_scorer
            if cache is not None:
                scorer = StoringScorer(scorer, cache, self.console)
        record_evaluation(self.manifest, record, scorer, adapter_dir, self.run_dir, self.console, settings)
        if record.eval_status == "done" and self.main:
            log_phase_scores(self.recipe.training, self.run_dir, self.manifest, scored_tasks(self.recipe.eval), k)

    def _base_score_cache(self, settings: dict[str, Any], eval_cfg: EvalConfig) -> BaseScoreCache | None:
        """Where the base's scores under these settings are kept across runs (None: cache off)."""
        if not cache_enabled():
            return None
        if self.base_path is None:
            self.base_path = modeling.resolve_model_path(self.recipe.model)
        try:
            return BaseScoreCache(base_score_key(self.recipe.model, self.base_path, eval_cfg, settings))
        except OSError as exc:  # the task files or the model folder could not be read: score, cache nothing
            self.console.print(f"[yellow]base score cache:[/] not used ({exc})")
            return None

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
        self.ensure_base()
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
            train_phase(self, k, record, progress)
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
        """Record the phase as failed, unless it was recorded done already (a stop during the tidying
        after it). A run.json that cannot be written (a full disk) leaves the error to the caller."""
        if record.status == "done":
            return
        record.status, record.error = "failed", message
        try:
            self.manifest.write(self.run_dir)  # type: ignore[union-attr]
        except OSError as exc:
            self.console.print(f"[yellow]phase {record.index} '{record.name}': could not record the failure in "
                               f"run.json ({exc.strerror or exc}); a re-run finds it unfinished and resumes it[/]")

    def replay_pool(self, k: int, phase_dir: Path, phase_examples: int, init_adapter: str | None) -> ReplayPool:
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
            earlier_seeds=[self.recipe.phase_training(i).seed for i, p in enumerate(self.phases[: k - 1]) for _ in p.datasets],
            phase_sources=list(self.phases[k - 1].datasets),
        )
