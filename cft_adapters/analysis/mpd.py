"""MPD (model parameter difference): how far apart two fine-tunes of the same base land.

For phases a and b, a short probe adapter is trained on each phase's data alone, from the same base,
the same seed (so the same LoRA init) and the same token budget, with the recipe's own trainer. The
two fine-tuned models are W0 + Δ_a and W0 + Δ_b, with Δ = scale·B·A per adapted weight matrix
(scale = alpha / r), so W_a − W_b = Δ_a − Δ_b and every weight the adapters do not touch is equal.

- **MPD, the paper's way** (`total`, `per_layer`; the default): the mean over the adapted weight
  matrices of the L2 (Frobenius) distance between the two fine-tuned weights, ‖Δ_a − Δ_b‖_F. Not
  normalised: its scale is the model's and the probes'. The paper's 0.29 (similar) vs 1.00
  (dissimilar) read as values relative to its dissimilar pair; compare ratios of pairs measured the
  same way, not the absolute numbers.
- **Normalised MPD** (`normalised`; ours): ‖Δ_a − Δ_b‖_F / (‖Δ_a‖_F + ‖Δ_b‖_F), per layer and in
  total: 0 for identical updates, 1 for opposite ones (the triangle inequality bounds it to [0, 1]).

The probe adapters are cached by their settings (model, adapter, training, data), so a second call
only computes the distances.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console

from cft_adapters.errors import CftError
from cft_adapters.manifest import RunManifest, dumps_canonical
from cft_adapters.placement import layer_of, lora_updates
from cft_adapters.recipe import Recipe
from cft_adapters.util.fs import cache_dir
from cft_adapters.util.digest import short_digest
from cft_adapters.util.plot import pyplot, save_figure

DEFAULT_TOKEN_BUDGET = 20_000


def mpd(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], scale: float) -> dict[str, Any]:
    da, db = lora_updates(state_a, scale), lora_updates(state_b, scale)
    if set(da) != set(db):
        raise CftError("the two adapters cover different modules; MPD needs the same adapter layout")
    sums: dict[int | None, list[float]] = {}
    distances: dict[int | None, list[float]] = {}
    for path in da:
        diff = float(torch.linalg.matrix_norm(da[path] - db[path]) ** 2)
        na, nb = float(torch.linalg.matrix_norm(da[path]) ** 2), float(torch.linalg.matrix_norm(db[path]) ** 2)
        layer = layer_of(path + ".")
        acc = sums.setdefault(layer, [0.0, 0.0, 0.0])
        acc[0] += diff
        acc[1] += na
        acc[2] += nb
        distances.setdefault(layer, []).append(diff**0.5)

    def ratio(d: float, a: float, b: float) -> float:
        denom = a**0.5 + b**0.5
        return d**0.5 / denom if denom > 0 else 0.0

    order = sorted(sums, key=lambda k: (k is None, k or 0))
    every = [d for layer in order for d in distances[layer]]
    return {
        "definition": "mean over the adapted weight matrices of the L2 distance between the two fine-tuned weights",
        "total": sum(every) / len(every) if every else 0.0,
        "per_layer": {str(k): sum(distances[k]) / len(distances[k]) for k in order},
        "matrices": len(every),
        "normalised": {
            "definition": "||D_a - D_b||_F / (||D_a||_F + ||D_b||_F): 0 identical updates, 1 opposite",
            "total": ratio(*(sum(v[i] for v in sums.values()) for i in range(3))),
            "per_layer": {str(k): ratio(*sums[k]) for k in order},
        },
    }


def probe_recipe(recipe: Recipe, index: int, token_budget: int) -> Recipe:
    """One phase of the recipe, alone, from the base, at the given token budget (no eval, placement or replay)."""
    # The probe's name is fixed, so two phases with the same data share one cached probe.
    phase = recipe.phases[index].model_copy(update={"name": "probe", "placement": None, "replay": None})
    training = recipe.phase_training(index).model_copy(update={"token_budget": token_budget, "seed": recipe.training.seed})
    key = dumps_canonical({
        "model": recipe.model.model_dump(mode="json"), "adapter": recipe.adapter.model_dump(mode="json"),
        "training": training.model_dump(mode="json"), "datasets": [d.model_dump(mode="json") for d in phase.datasets],
    })
    out = cache_dir() / "mpd" / short_digest(key)
    return recipe.model_copy(update={
        "phases": [phase.model_copy(update={"training": type(phase.training)()})],
        "training": training, "eval": recipe.eval.model_copy(update={"tasks": []}),
        "output_dir": str(out), "mixed_baseline": False,
    })


# Runs a recipe into its output_dir and returns its manifest: the training runner, handed in by the
# caller (`cft analyze mpd` passes PhaseRunner), so analysis never imports the training runner.
Train = Callable[[Recipe, str, Console], RunManifest]


def train_probe(recipe: Recipe, index: int, token_budget: int, console: Console, train: Train) -> Path:
    probe = probe_recipe(recipe, index, token_budget)
    manifest = train(probe, f"mpd probe of phases[{index}]", console)
    return Path(probe.output_dir) / str(manifest.phases[1].checkpoint)


def model_parameter_difference(recipe: Recipe, a: int, b: int, token_budget: int, console: Console,
                               train: Train) -> dict[str, Any]:
    from safetensors.torch import load_file

    dirs = [train_probe(recipe, i, token_budget, console, train) for i in (a, b)]
    states = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    result = mpd(states[0], states[1], recipe.adapter.alpha / recipe.adapter.r)
    result.update({
        "phases": [recipe.phases[a].name, recipe.phases[b].name], "token_budget": token_budget,
        "probe_adapters": [str(d) for d in dirs],
        "tokens_seen": [json.loads((d.parent / "train.json").read_text())["tokens"] for d in dirs],
    })
    return result


def plot_mpd(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    layers = [k for k in result["per_layer"] if k != "None"]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(layers) + 2), 3))
    ax.bar([int(k) for k in layers], [result["per_layer"][k] for k in layers], color="#4472c4")
    ax.set_xlabel("layer")
    ax.set_ylabel("MPD (mean L2 distance per matrix)")
    ax.set_title(f"MPD {result['phases'][0]} vs {result['phases'][1]}: total {result['total']:.3f}")
    fig.tight_layout()
    save_figure(fig, path)
