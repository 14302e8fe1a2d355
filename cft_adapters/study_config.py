"""The study file: conditions (a recipe plus overrides) x seeds. Its errors are reported like a
recipe's (config_errors): one line per key path, with a did-you-mean for unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cft_adapters.config_errors import validation_lines
from cft_adapters.errors import RecipeError
from cft_adapters.recipe import PHASE_NAME, _Strict


class StudyCondition(_Strict):
    name: str = Field(pattern=PHASE_NAME, description="Condition name (lowercase letters, digits, '_' or '-').")
    recipe: str = Field(description="Recipe file, relative to the study file.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides for this condition, after the study's.")


class LauncherSettings(_Strict):
    """How the cells run: one after another in this process (`sequential`, the default), or each as
    a submitit job, on this machine (`local`) or on a Slurm cluster (`slurm`). The command line's
    --launcher, --max-parallel and Slurm flags override these."""

    kind: Literal["sequential", "local", "slurm"] = Field("sequential", description="sequential | local | slurm.")
    max_parallel: int = Field(1, ge=1, description="Cells running (or queued, on Slurm) at once.")
    gpus_per_job: int = Field(0, ge=0, description="GPUs per cell; above 1 the cell runs under `accelerate launch`.")
    cpus_per_job: int | None = Field(None, ge=1, description="CPU cores per cell (Slurm --cpus-per-task).")
    mem_gb: float | None = Field(None, gt=0, description="Memory per cell in GB (Slurm --mem).")
    time_min: int = Field(24 * 60, ge=1, description="Time limit per cell in minutes (Slurm --time; local: killed after it).")
    partition: str | None = Field(None, description="Slurm partition.")
    account: str | None = Field(None, description="Slurm account.")
    sbatch: dict[str, bool | int | str] = Field(
        default_factory=dict, description="Further sbatch parameters, without '--' (e.g. {qos: high, constraint: a100}); "
        "true writes a bare flag (e.g. {exclusive: true} is --exclusive).")
    setup: list[str] = Field(default_factory=list, description="Shell lines each job runs first (module load, conda activate).")
    accelerate_config: str | None = Field(
        None, description="accelerate config file for cells with gpus_per_job above 1 (relative to the study file).")
    poll_seconds: float = Field(10.0, gt=0, description="How often the driver checks its jobs.")


class Study(_Strict):
    description: str | None = Field(None, description="What the study compares.")
    output_dir: str = Field(description="Study directory; cells go to <output_dir>/cells/<condition>/seed_<s>/.")
    seeds: int | list[int] = Field(3, description="Number of seeds (0..n-1), or the seeds themselves.")
    reference: str | None = Field(None, description="Condition the Δ columns compare with (default: the first).")
    match_tokens: bool = Field(True, description="Give every condition the same token budget per phase.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides applied to every condition.")
    conditions: list[StudyCondition] = Field(min_length=1, description="The conditions, each a recipe plus overrides.")
    launcher: LauncherSettings = Field(default_factory=LauncherSettings, description="How the cells run (see LauncherSettings).")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError("expected at least 1 seed")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("expected a non-empty list of distinct seeds")
        return value

    @model_validator(mode="after")
    def _names(self) -> Study:
        names = [c.name for c in self.conditions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"conditions: duplicate name(s) {', '.join(dupes)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference: '{self.reference}' is not a condition (conditions: {', '.join(names)})")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def reference_name(self) -> str:
        return self.reference or self.conditions[0].name


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: study file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: expected a mapping of study keys at the top level"])
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(validation_lines(exc, str(path), Study)) from None
