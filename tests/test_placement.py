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


def _pair(g: torch.Generator, b_scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 8, generator=g), b_scale * torch.randn(8, 2, generator=g)


def test_most_changed_freezes_the_layers_whose_update_moved_most() -> None:
    """Six layers, built so that the answer is known without ranking anything: the updates B·A of
    layers 3 and 5 move a lot, the others barely. Two decoys: layer 1 has by far the largest update
    but it does not move, and layer 2's parameters move a lot (B x4, A /4) while its update B·A stays
    exactly the same. Ranking by update size or by parameter change would pick them instead."""
    from cft_adapters.placement import PlacementInputs, choose_placement

    g = torch.Generator().manual_seed(0)
    start, end = {}, {}
    for layer in range(6):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a, b = _pair(g, b_scale={1: 10.0, 2: 1.0}.get(layer, 0.1))
            a_end, b_end = a, b + 1e-3 * torch.randn(8, 2, generator=g)
            if layer == 1:
                b_end = b
            if layer == 2:
                a_end, b_end = a / 4, b * 4
            if layer in (3, 5):
                b_end = b + torch.randn(8, 2, generator=g)
            start.update({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b})
            end.update({f"{prefix}.lora_A.weight": a_end, f"{prefix}.lora_B.weight": b_end})

    def frozen(cfg: PlacementConfig, before: dict[str, torch.Tensor] | None) -> list[int]:
        inputs = PlacementInputs(cfg, num_layers=6, seed=0, modules=None,
                                 adapter_change=lambda: (layer_delta_norms(before, end, scale=2.0, num_layers=6), {}))
        return choose_placement(inputs).frozen

    assert frozen(PlacementConfig(strategy="most_changed", count=2), start) == [3, 5]
    assert frozen(PlacementConfig(strategy="most_changed", fraction=0.34), start) == [3, 5]
    # From a fresh adapter (B = 0 before the reference phase) the whole update is the change: layer 1 leads.
    assert frozen(PlacementConfig(strategy="most_changed", count=1), None) == [1]


def test_spectrum_freezes_the_noise_layers(tmp_path) -> None:
    """A four-layer model whose layers 1 and 2 hold pure noise, ten times larger than the low-rank
    signal (plus a little noise) of layers 0 and 3: the noise layers have the lowest SNR and are the
    ones frozen, although their weights are the largest."""
    from torch import nn

    from cft_adapters.placement import PlacementInputs, choose_placement, spectrum_scan

    g = torch.Generator().manual_seed(0)

    def weight(noise_only: bool) -> torch.Tensor:
        if noise_only:
            return torch.randn(64, 64, generator=g)
        return 0.05 * torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g) + 0.01 * torch.randn(64, 64, generator=g)

    base = nn.Module()
    base.model = nn.Module()
    base.model.layers = nn.ModuleList()
    for layer in range(4):
        block = nn.Module()
        block.self_attn = nn.Module()
        for module in ("q_proj", "v_proj"):
            linear = nn.Linear(64, 64, bias=False)
            linear.weight.data = weight(noise_only=layer in (1, 2))
            setattr(block.self_attn, module, linear)
        base.model.layers.append(block)
    scan = spectrum_scan(base, ["q_proj", "v_proj"], "constructed", tmp_path)
    cfg = PlacementConfig(strategy="spectrum", count=2)
    placement = choose_placement(PlacementInputs(cfg, num_layers=4, seed=0, modules=None, spectrum=lambda: scan))
    assert placement.frozen == [1, 2] and placement.trainable == [0, 3]


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
    if info["strategy"] == "most_changed":
        # The reference is phase 1, whose adapter started at B = 0: its change is its whole update
        # scale·B·A, summed over the layer's modules; the half of the layers that changed most is frozen.
        adapter = load_recipe(out / "recipe.resolved.yaml").adapter
        change = {}
        for layer, tensors in before.items():
            pairs = [(tensors[n.replace(".lora_A.", ".lora_B.")], tensors[n]) for n in tensors if ".lora_A." in n]
            change[layer] = sum(float(torch.linalg.matrix_norm(adapter.alpha / adapter.r * b.float() @ a.float())) for b, a in pairs)
        assert {int(k): v for k, v in info["scores"].items()} == pytest.approx(change, rel=1e-4)
        assert info["frozen"] == sorted(sorted(change, key=change.__getitem__, reverse=True)[:2])
    if info["strategy"] == "spectrum":  # the lowest-SNR layer (which layer that is: test_spectrum_freezes_the_noise_layers)
        assert info["frozen"] == [int(min(info["scores"], key=info["scores"].__getitem__))]


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
