from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cft_adapters.cli import main
from cft_adapters.errors import RecipeError
from cft_adapters.manifest import RunManifest
from cft_adapters.placement import (
    count_to_freeze,
    layer_delta_norms,
    layer_of,
    matrix_snr,
    parse_layers,
    select_layers_most_changed,
    select_layers_random,
    select_layers_spectrum,
)
from cft_adapters.recipe import PlacementConfig, load_recipe

from conftest import SMOKE


def test_parse_layers() -> None:
    assert parse_layers("0-3,7, 5") == [0, 1, 2, 3, 5, 7]
    assert parse_layers([3, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match="out of range: the model has layers 0-3"):
        parse_layers("2-5", num_layers=4)
    with pytest.raises(ValueError, match="cannot read layer range 'a'"):
        parse_layers("1,a")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_layers("5-2")


def test_count_to_freeze() -> None:
    assert count_to_freeze(PlacementConfig(strategy="random", fraction=0.25), 32) == 8
    assert count_to_freeze(PlacementConfig(strategy="random", count=3), 32) == 3
    with pytest.raises(ValueError, match="leaves nothing to train"):
        count_to_freeze(PlacementConfig(strategy="random", count=4), 4)
    with pytest.raises(ValueError, match="freezes none"):
        count_to_freeze(PlacementConfig(strategy="random", fraction=0.1), 4)


def test_random_is_seeded() -> None:
    assert select_layers_random(32, 8, seed=1) == select_layers_random(32, 8, seed=1)
    assert select_layers_random(32, 8, seed=1) != select_layers_random(32, 8, seed=2)
    assert len(set(select_layers_random(32, 8, seed=1))) == 8


def _state(scales: dict[int, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT-style adapter state whose layer-i update is scaled by scales[i]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer, s in scales.items():
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(4, 16, generator=g)
            state[f"{prefix}.lora_B.weight"] = s * torch.randn(16, 4, generator=g)
    return state


def test_most_changed_picks_the_layers_that_moved_most() -> None:
    start = _state({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    end = {k: v.clone() for k, v in start.items()}
    moved = _state({1: 5.0, 3: 2.0}, seed=1)  # layers 1 and 3 move; 1 most
    for name, tensor in moved.items():
        if ".lora_B." in name:
            end[name] = end[name] + tensor
    norms = layer_delta_norms(start, end, scale=2.0, num_layers=4)
    assert norms[0] == 0.0 and norms[2] == 0.0 and norms[1] > norms[3] > 0
    assert select_layers_most_changed(norms, 1) == [1]
    assert select_layers_most_changed(norms, 2) == [1, 3]
    # From a fresh adapter (B = 0 at the start) the change is the whole update.
    fresh = layer_delta_norms(None, end, scale=2.0, num_layers=4)
    assert all(fresh[i] > 0 for i in range(4))
    only_q = layer_delta_norms(start, end, scale=2.0, num_layers=4, modules=["q_proj"])
    assert 0 < only_q[1] < norms[1]


def test_spectrum_ranks_low_rank_signal_above_noise() -> None:
    g = torch.Generator().manual_seed(0)
    for m, n in [(64, 64), (64, 128), (256, 512)]:
        noise = 0.02 * torch.randn(m, n, generator=g)
        signal = 0.05 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + noise
        assert matrix_snr(signal) > matrix_snr(noise), (m, n)
    assert select_layers_spectrum({0: 3.0, 1: 1.0, 2: 2.0, 3: 5.0}, 2) == [1, 2]


def test_most_changed_in_the_first_phase_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"phases\[0\]\.placement\.strategy: 'most_changed' ranks layers by an earlier"):
        load_recipe(SMOKE, ["phases[0].placement={strategy: most_changed, count: 1}"])


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("{strategy: explicit, layers: '0-9'}", "phases[1].placement: layer(s) [4, 5, 6, 7, 8, 9] out of range: the model has layers 0-3"),
        ("{strategy: random, fraction: 0.99}", "phases[1].placement: freezing 4 of 4 layers leaves nothing to train"),
        ("{strategy: explicit, layers: '0-3'}", "phases[1].placement: freezing all 4 layers leaves nothing to train"),
    ],
)
def test_bad_placement_fails_at_dry_run(tmp_path, capsys, placement, expected) -> None:
    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", f"phases[1].placement={placement}", "--dry-run"])
    assert code == 2
    assert expected in capsys.readouterr().err


def _tensors_by_layer(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        out.setdefault(layer_of(name), {})[name] = tensor
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "placement",
    [
        "{strategy: explicit, layers: '0,2'}",
        "{strategy: random, count: 2, seed: 7}",
        "{strategy: most_changed, fraction: 0.5}",
        "{strategy: spectrum, count: 1}",
        "{strategy: explicit, layers: '1', modules: [q_proj, down_proj]}",
    ],
)
def test_frozen_adapters_bitwise_unchanged_trainable_ones_trained(tmp_path, placement) -> None:
    out = tmp_path / "run"
    # weight_decay > 0: AdamW would move frozen tensors if the optimizer were given them.
    assert main([str(SMOKE), f"output_dir={out}", f"phases[1].placement={placement}", "eval.tasks=[]",
                 "training.weight_decay=0.1"]) == 0
    info = json.loads((out / "phase_2_french_german" / "placement.json").read_text())
    manifest = RunManifest.read(out)
    assert manifest.phases[2].placement == info
    before = _tensors_by_layer(out / "phase_1_english" / "adapter")
    after = _tensors_by_layer(out / "phase_2_french_german" / "adapter")
    modules = info["modules"]
    trainable_numel = 0
    for layer, tensors in before.items():
        for name, tensor in tensors.items():
            frozen = layer in info["frozen"] and (modules is None or any(f".{m}." in name for m in modules))
            if frozen:
                assert torch.equal(tensor, after[layer][name]), f"{name} moved although frozen"
            else:
                assert not torch.equal(tensor, after[layer][name]), f"{name} did not train"
                trainable_numel += tensor.numel()
    assert info["trainable_parameters"] == trainable_numel == manifest.phases[2].train.trainable_parameters
    assert sorted(info["frozen"] + info["trainable"]) == [0, 1, 2, 3]
    if info["strategy"] in {"most_changed", "spectrum"}:
        assert set(info["scores"]) == {"0", "1", "2", "3"}
        scores = {int(k): v for k, v in info["scores"].items()}
        pick = select_layers_most_changed if info["strategy"] == "most_changed" else select_layers_spectrum
        assert pick(scores, len(info["frozen"])) == info["frozen"]


@pytest.mark.slow
def test_fresh_placement_and_frozen_layers_train_again_later(tmp_path) -> None:
    """Phase 1 places a fresh adapter on layers 1-3 only; phase 2 freezes 1-2; phase 3 trains all."""
    out = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={out}", "eval.tasks=[]",
            "phases=[{name: english, datasets: [{path: 'builtin:smoke/en_tasks.jsonl', language: en}], "
            "placement: {strategy: explicit, layers: '0'}}, "
            "{name: french_german, datasets: [{path: 'builtin:smoke/multi_fr_de.jsonl', format: messages, "
            "language_column: lang}], placement: {strategy: explicit, layers: '1-2'}}, "
            "{name: again, datasets: [{path: 'builtin:smoke/multi_fr_de.jsonl', format: messages, language_column: lang}]}]"]
    assert main(args) == 0
    p1 = _tensors_by_layer(out / "phase_1_english" / "adapter")
    p2 = _tensors_by_layer(out / "phase_2_french_german" / "adapter")
    p3 = _tensors_by_layer(out / "phase_3_again" / "adapter")
    assert sorted(p1) == [1, 2, 3]  # layers_to_transform: no adapter on the frozen layer 0
    for layer in (1, 2):
        assert all(torch.equal(p1[layer][n], p2[layer][n]) for n in p1[layer])
        assert all(not torch.equal(p2[layer][n], p3[layer][n]) for n in p2[layer])
    assert all(not torch.equal(p1[3][n], p2[3][n]) for n in p1[3])
