"""Warnings are shown (once per message), not hidden, and the package's own library calls trigger
none of the deprecations transformers announces for v6."""

from __future__ import annotations

import warnings
from pathlib import Path

from cft_adapters.recipe import load_recipe

from conftest import SMOKE


def test_the_cli_shows_each_warning_once_instead_of_hiding_it() -> None:
    from cft_adapters.cli import _quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        _quiet_libraries()
        for _ in range(3):
            warnings.warn("a library says something", FutureWarning)
            warnings.warn("a user-facing note", UserWarning)
            # TRL's own use of a deprecated transformers property: nothing a user can act on
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert sorted(str(w.message) for w in caught) == ["a library says something", "a user-facing note"]


def test_the_sft_config_uses_no_deprecated_argument(tmp_path: Path) -> None:
    from cft_adapters.hf_configs import sft_config

    recipe = load_recipe(SMOKE, ["training.gradient_checkpointing=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = sft_config(recipe.training, recipe.model, tmp_path)
    assert args.gradient_checkpointing is True  # on, whatever the argument is called now


def test_switching_checkpointing_per_phase_uses_no_deprecated_call(tiny_model_path: Path) -> None:
    from cft_adapters.modeling import load_base_model, new_adapter, set_gradient_checkpointing

    recipe = load_recipe(SMOKE)
    model = new_adapter(load_base_model(recipe.model, str(tiny_model_path)), recipe.adapter)
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        set_gradient_checkpointing(model, True)
        assert all(m.gradient_checkpointing for m in layers)
        set_gradient_checkpointing(model, False)
        assert not any(m.gradient_checkpointing for m in layers)
