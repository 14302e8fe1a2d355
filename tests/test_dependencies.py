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
    """The core dependencies and every extra's (the test extra's self-reference aside)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    deps = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    return {Requirement(d).name: Requirement(d) for d in deps if Requirement(d).name != "cft-adapters"}


def test_every_extra_the_code_names_is_declared_and_the_test_extra_installs_them_all() -> None:
    from cft_adapters.extras import EXTRAS

    extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    test_self = next(Requirement(d) for d in extras["test"] if Requirement(d).name == "cft-adapters")
    assert set(EXTRAS) - {"gpu"} <= test_self.extras  # gpu (Liger) needs CUDA; everything else is tested


def test_a_missing_extra_names_itself(monkeypatch) -> None:
    import importlib.util

    from cft_adapters.errors import CftError
    from cft_adapters.extras import require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(CftError, match=r"cft-study needs the 'study' extra \(scipy is not installed\): "
                                        r"pip install 'cft-adapters\[study\]'"):
        require("study", "cft-study")
    require("analysis", "cft-analyze similarity")  # installed: nothing raised


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
