"""The dependency ranges in pyproject.toml say what the tests ran on, and the one private library
call the package makes is still there, with the arguments it is given."""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


@pytest.mark.parametrize("package", ["trl", "peft", "bitsandbytes", "transformers", "lm-eval", "alpaca-eval"])
def test_the_installed_version_is_inside_the_declared_range(package: str) -> None:
    requirement = _requirements()[package]
    assert requirement.specifier.contains(version(package), prereleases=True), (package, version(package), str(requirement))


def test_trl_is_pinned_to_one_minor_version() -> None:
    """replay.attach_replay calls a private TRL method: a new TRL minor must be tested before it is allowed."""
    specs = {(s.operator, s.version) for s in _requirements()["trl"].specifier}
    lower = next(v for op, v in specs if op == ">=")
    upper = next(v for op, v in specs if op == "<")
    major, minor = (int(x) for x in lower.split(".")[:2])
    assert upper == f"{major}.{minor + 1}"


def test_the_private_trl_call_takes_the_arguments_replay_passes() -> None:
    from trl import SFTTrainer

    parameters = inspect.signature(SFTTrainer._prepare_dataset).parameters
    assert list(parameters)[1:] == ["dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"]
