"""`run.json`: the single source of truth about a run, rewritten atomically after every change.

The schema is the contract in README.md ("The run directory"). Paths are relative to the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cft_adapters.recipe import PHASE_NAME
from cft_adapters.util.fs import write_atomic  # noqa: F401  (re-exported: its old home)
from cft_adapters.util.digest import canonical_json

Status = Literal["pending", "running", "done", "failed"]
MANIFEST = "run.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"


class TrainStats(BaseModel):
    config_digest: str | None = Field(None, description="The phase config_digest this adapter was trained under.")
    steps: int
    tokens: int = Field(description="Non-padding input tokens seen by the trainer in this phase.")
    seconds: float = Field(description="Wall time of trainer.train() in the attempt that finished the phase.")
    tokens_per_second: float = Field(description="Tokens seen in that attempt / its seconds.")
    peak_memory_mb: float
    peak_memory_kind: Literal["cuda_max_allocated", "cpu_max_rss"] = Field(
        description="cuda_max_allocated: torch's per-phase peak. cpu_max_rss: the process's high-water "
        "mark so far (RSS cannot be reset per phase)."
    )
    trainable_parameters: int
    final_loss: float | None = None
    resumed_from: str | None = Field(None, description="Trainer checkpoint the phase resumed from, if any.")
    init_adapter: str | None = Field(None, description="Adapter the phase started from (None: fresh LoRA init).")
    init_digest: str = Field(description="tensors_digest of the adapter when training started.")
    final_digest: str = Field(description="tensors_digest of the saved adapter.")
    world_size: int = Field(1, description="Data-parallel processes that trained the phase.")
    rank_digests: list[str] | None = Field(
        None, description="Data-parallel runs: every rank's final tensors_digest (all equal, or the phase fails)."
    )


class EvalSet(BaseModel):
    """Scores of one checkpoint made under other evaluation settings than the run's own (`cft-eval`
    with --limit, --base-precision, ...). Kept apart from `eval`, so a report never mixes them."""

    settings: dict[str, Any]
    eval: dict[str, dict[str, float]] = Field(default_factory=dict)
    eval_groups: dict[str, list[str]] = Field(default_factory=dict)
    eval_tasks: list[str] = Field(default_factory=list)
    eval_files: list[str] = Field(default_factory=list)
    eval_status: Literal["pending", "done", "failed"] = "pending"
    eval_error: str | None = None
    eval_seconds: float | None = None


class PhaseRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    name: str = Field(pattern=PHASE_NAME, description="The recipe's phase name ('base' for phase 0); "
                      "it names the phase folder, so it never holds a path separator.")
    status: Status = "pending"
    checkpoint: str | None = None
    config_digest: str | None = Field(None, description="Digest of everything that determines this phase's adapter.")
    data: dict[str, Any] | None = None
    train: TrainStats | None = None
    placement: dict[str, Any] | None = None
    replay: dict[str, Any] | None = None
    eval: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="{task_or_group: {metric: value}}, merged over every scoring."
    )
    eval_status: Literal["pending", "done", "failed", "skipped"] = "pending"
    eval_error: str | None = None
    eval_groups: dict[str, list[str]] = Field(default_factory=dict, description="lm-eval's group -> member tasks.")
    eval_seconds: float | None = Field(
        None, description="Seconds this run spent on the phase's last scoring (scores restored from the base "
        "score cache count the restore, not the original scoring)."
    )
    eval_tasks: list[str] = Field(default_factory=list, description="The eval.tasks that were scored.")
    eval_files: list[str] = Field(default_factory=list, description="lm-eval results files written for this phase.")
    eval_settings: dict[str, Any] | None = Field(
        None, description="The evaluation settings the scores in `eval` were produced with (limit, few-shot, "
        "chat template, batch size, base precision); scores from other settings are never merged into them."
    )
    eval_sets: dict[str, EvalSet] = Field(
        default_factory=dict, description="Labelled result sets scored under other settings (cft-eval); "
        "each has its own report-<label>.md."
    )
    error: str | None = None

    @property
    def dirname(self) -> str:
        return f"phase_{self.index}_{self.name}"


class ManifestError(ValueError):
    """run.json cannot be read back as a run manifest."""


class RunManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    recipe: str
    base_model: str
    base_model_path: str | None = None
    seed: int
    eval_base_precision: str | None = Field(None, description="Precision of the base the adapters were scored on.")
    chat_template: dict[str, Any] | None = Field(
        None, description="The chat template in use: its source (tokenizer | recipe | fallback-chatml-eos), sha256, "
        "EOS and stop token ids (modeling.template_record); the text is saved beside each adapter."
    )
    versions: dict[str, str]
    phases: list[PhaseRecord]

    def phase(self, index: int) -> PhaseRecord:
        return self.phases[index]

    @classmethod
    def read(cls, run_dir: Path) -> RunManifest:
        """Read and validate run.json; a damaged file is a ManifestError naming the first bad field."""
        from pydantic import ValidationError

        path = run_dir / MANIFEST
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            what = f"{loc}: {err['msg']}" if loc else err["msg"]
            raise ManifestError(f"{path}: {what}") from None

    def write(self, run_dir: Path) -> None:
        """Rank 0 alone writes run.json in a data-parallel run (see distributed.py)."""
        from cft_adapters.distributed import is_main

        if is_main():
            write_atomic(run_dir / MANIFEST, self.model_dump_json(indent=2) + "\n")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cft-adapters", "torch", "transformers", "trl", "peft", "bitsandbytes", "lm-eval", "datasets", "accelerate",
                 "lingua-language-detector", "alpaca-eval"):  # language fidelity's detector; AlpacaEval's judging
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    from cft_adapters.metrics import LANGUAGE_ID

    out["language_id"] = LANGUAGE_ID  # which detector scored language fidelity
    return out


dumps_canonical = canonical_json  # its old name


def summary_table(manifest: RunManifest) -> Any:
    """The end-of-run table of phases: status, steps, tokens, time, throughput, memory, loss."""
    from rich.table import Table

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
