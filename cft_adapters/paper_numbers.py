"""The paper's side of every comparison: how it aggregates its benchmarks, and the numbers it reports,
each with where it comes from (`cft_adapters/data/paper_numbers.json`).

A number nobody has transcribed yet is null, and everything that prints it says `n/a`; a number
without its `source`, or numbers without the `scale` they are printed on, make the file invalid.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cft_adapters.errors import CftError

PAPER_NUMBERS = Path(__file__).resolve().parent / "data" / "paper_numbers.json"
PAPER_PHASES = ("phase1", "phase2")
SETTINGS = ("similar", "dissimilar", "mixed")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Aggregation(_Strict):
    source: str = Field(description="Where the paper defines its aggregates.")
    EA: list[str] = Field(description="The benchmarks the paper's EA averages.")
    MA: list[str] = Field(description="The benchmarks the paper's MA averages.")
    beside_MA: list[str] = Field(description="Benchmarks reported beside MA, never inside it (language fidelity).")


class Benchmark(_Strict):
    name: str = Field(description="The name the paper prints.")
    missing: str | None = Field(None, description="Why this package does not score it, when it does not.")


class PaperModel(_Strict):
    name: str
    matches: list[str] = Field(description="Lower-case substrings of a base model id that mean this model.")


class Scores(_Strict):
    """One row of a paper table: EA / MA / Combined on the paper's scale, or null (not transcribed)."""

    model: str
    setting: str
    EA: float | None = None
    MA: float | None = None
    Combined: float | None = None
    source: str | None = Field(None, description="Version, table or figure, row and column of these numbers.")

    @model_validator(mode="after")
    def _cited(self) -> Scores:
        if any(v is not None for v in (self.EA, self.MA, self.Combined)) and not self.source:
            raise ValueError(f"{self.model} {self.setting}: a number without its source")
        return self


class MainRow(Scores):
    phase: str = Field(pattern="^(phase1|phase2)$")


class MitigationRow(Scores):
    condition: str


class MainTable(_Strict):
    source: str
    rows: list[MainRow]


class MitigationTable(_Strict):
    source: str
    rows: list[MitigationRow]


class PaperNumbers(_Strict):
    about: list[str]
    paper: dict[str, Any]
    aggregation: Aggregation
    benchmarks: dict[str, Benchmark]
    models: dict[str, PaperModel]
    settings: dict[str, str]
    phases: dict[str, str]
    scale: float | None = Field(None, description="1: the paper prints 0-1; 100: percent. Needed once a value is set.")
    scale_note: str = ""
    main: MainTable
    mitigation: MitigationTable

    @model_validator(mode="after")
    def _scaled(self) -> PaperNumbers:
        rows = [*self.main.rows, *self.mitigation.rows]
        if self.scale is None and any(v is not None for r in rows for v in (r.EA, r.MA, r.Combined)):
            raise ValueError("scale: set it (1 or 100) before any number")
        return self

    def benchmark_name(self, key: str) -> str:
        return self.benchmarks[key].name if key in self.benchmarks else key

    def model_for(self, base_model: str) -> str | None:
        """The paper's model key a base model id stands for (mistralai/Mistral-7B-v0.1 -> mistral-7b), or None."""
        lowered = base_model.lower()
        return next((key for key, m in self.models.items() if any(s in lowered for s in m.matches)), None)

    def to_unit(self, value: float | None) -> float | None:
        """A paper number on the 0-1 scale our scores use."""
        return None if value is None or self.scale is None else value / self.scale


@lru_cache(maxsize=2)
def paper_numbers(path: Path = PAPER_NUMBERS) -> PaperNumbers:
    try:
        return PaperNumbers.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        raise CftError(f"{path}: {loc + ': ' if loc else ''}{err['msg']}") from None
    except (OSError, ValueError) as exc:
        raise CftError(f"{path}: {exc}") from None
