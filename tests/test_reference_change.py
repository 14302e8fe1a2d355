"""reference_change: LF_H2 ranked by how far a reference model moved from its base (the paper's
Instruct pair), read from safetensors shard by shard. Every pair here is built locally from the tiny
model, perturbed where the answer is known by construction."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cft_adapters import reference_change
from cft_adapters.cli import main
from cft_adapters.errors import RecipeError
from cft_adapters.manifest import RunManifest
from cft_adapters.placement import PlacementInputs, choose_placement
from cft_adapters.recipe import PlacementConfig, ReferencePair, load_recipe
from cft_adapters.reference_change import reference_change_scores, weight_files

from conftest import SMOKE

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _is_target(name: str, layer: int, modules: list[str] = TARGETS) -> bool:
    return name.startswith(f"model.layers.{layer}.") and any(name.endswith(f".{m}.weight") for m in modules)


def _moved(weight: torch.Tensor, share: float, g: torch.Generator) -> torch.Tensor:
    """weight plus noise whose Frobenius norm is exactly share x the weight's."""
    noise = torch.randn(weight.shape, generator=g)
    return weight + noise * (share * weight.norm() / noise.norm())


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_path) -> tuple[Path, Path]:
    """(base, tuned), four layers. The base is one model.safetensors; the tuned checkpoint is sharded
    into several files (huggingface_hub's own sharding, with an index), cut differently from the base.

    What moved from base to tuned, relative to the base weights of each layer's target matrices:
    - layer 0: 3%, but its base weights are 20 times larger than the others', so in absolute terms it
      moved most (0.6 of a normal layer's norm): the decoy for an absolute score;
    - layer 1: 30% (every target matrix);
    - layer 2: none of its target matrices; its layer norms moved by +100 and so did the embeddings
      and the LM head: the decoy for counting weights outside the target modules;
    - layer 3: 25% in every target matrix but q_proj, which did not move.
    The two most changed are therefore layers 1 and 3; restricted to q_proj, layers 1 and 0."""
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("pair")
    base = {n: (20 * t if _is_target(n, 0) else t).contiguous() for n, t in load_file(str(tiny_model_path / "model.safetensors")).items()}
    tuned = {}
    for name, weight in base.items():
        if _is_target(name, 0):
            tuned[name] = _moved(weight, 0.03, g)
        elif _is_target(name, 1):
            tuned[name] = _moved(weight, 0.30, g)
        elif _is_target(name, 3) and not name.endswith(".q_proj.weight"):
            tuned[name] = _moved(weight, 0.25, g)
        elif ("layernorm" in name and name.startswith("model.layers.2.")) or "embed_tokens" in name or "lm_head" in name:
            tuned[name] = weight + 100.0
        else:
            tuned[name] = weight.clone()
    for folder, state in (("base", base), ("tuned", tuned)):
        (root / folder).mkdir()
        shutil.copy(tiny_model_path / "config.json", root / folder / "config.json")
    save_file(base, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    save_torch_state_dict(tuned, root / "tuned", max_shard_size="200KB")
    assert len(weight_files(root / "tuned")) >= 4  # really sharded, so the scan goes shard by shard
    return root / "base", root / "tuned"


def _scores(pair: tuple[Path, Path], cache: Path, modules: list[str] = TARGETS, num_layers: int = 4):
    ref = ReferencePair(base=str(pair[0]), tuned=str(pair[1]))
    return reference_change_scores(ref, modules, num_layers, cache)


def _frozen(pair: tuple[Path, Path], cache: Path, count: int, modules: list[str] | None = None) -> list[int]:
    cfg = PlacementConfig(strategy="reference_change", count=count, modules=modules,
                          reference={"base": str(pair[0]), "tuned": str(pair[1])})
    inputs = PlacementInputs(cfg, num_layers=4, seed=0, modules=modules,
                             reference_change=lambda: _scores(pair, cache, modules or TARGETS))
    return choose_placement(inputs).frozen


def test_freezes_the_layers_that_changed_most_relative_to_their_weights(pair, tmp_path) -> None:
    assert _frozen(pair, tmp_path, count=2) == [1, 3]
    assert _frozen(pair, tmp_path, count=1) == [1]
    scores, detail = _scores(pair, tmp_path)
    assert scores[1] == pytest.approx(0.30, rel=1e-5)  # every target matrix moved by 30%
    assert scores[0] == pytest.approx(0.03, rel=1e-5)
    assert scores[2] == 0.0  # only its layer norms (not a target module) moved
    assert 0.2 < scores[3] < 0.25  # 25%, less the unmoved q_proj's share
    # The absolute change, recorded beside the score, ranks the decoy layer 0 first.
    assert detail["score"] == "relative"
    assert max(detail["absolute_change"], key=detail["absolute_change"].__getitem__) == "0"


def test_only_the_given_modules_count(pair, tmp_path) -> None:
    assert _frozen(pair, tmp_path, count=2, modules=["q_proj"]) == [0, 1]
    scores, detail = _scores(pair, tmp_path, ["q_proj"])
    assert scores[3] == 0.0 and detail["modules"] == ["q_proj"]
    assert _frozen(pair, tmp_path, count=2, modules=ATTENTION) == [1, 3]


def test_reading_in_row_slices_gives_the_same_scores(pair, tmp_path, monkeypatch) -> None:
    whole, _ = _scores(pair, tmp_path / "a")
    monkeypatch.setattr(reference_change, "_SLICE_ELEMENTS", 200)  # a few rows at a time, ragged last slice
    sliced, _ = _scores(pair, tmp_path / "b")
    assert sliced == pytest.approx(whole, rel=1e-9)


def test_the_scan_is_cached_by_the_checkpoints_files(pair, tmp_path, monkeypatch) -> None:
    first, detail = _scores(pair, tmp_path)
    cache = tmp_path / detail["cache"]
    assert cache.is_file() and json.loads(cache.read_text())["layers"]["1"]["tensors"] == 7
    stamp = cache.stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("read the checkpoints again")

    monkeypatch.setattr(reference_change, "read_change", no_reading)
    again, _ = _scores(pair, tmp_path)
    assert again == first and cache.stat().st_mtime_ns == stamp
    # Other modules are another entry; a shard rewritten (new mtime) is another checkpoint.
    with pytest.raises(AssertionError, match="read the checkpoints again"):
        _scores(pair, tmp_path, ["q_proj"])
    shard = weight_files(pair[1])[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="read the checkpoints again"):
        _scores(pair, tmp_path)


def test_a_pickle_only_reference_is_refused_naming_it(pair, tmp_path, capsys) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{pickled}: holds PyTorch pickle weights only \(pytorch_model.bin\); "
                       "'reference_change' reads safetensors only"):
        weight_files(pickled)
    placement = f"{{strategy: reference_change, count: 1, reference: {{base: '{pickled}', tuned: '{pair[1]}'}}}}"
    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", f"phases[0].placement={placement}", "--dry-run"])
    assert code == 2
    assert f"phases[0].placement.reference.base: {pickled}: holds PyTorch pickle weights only" in capsys.readouterr().err


def test_a_pair_with_another_layer_count_is_refused(pair, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"target weights in layers 0-3, and the model trained here has 6 layers"):
        _scores(pair, tmp_path, num_layers=6)


def test_hub_ids_resolve_through_the_hub_cache(pair, tmp_path, monkeypatch) -> None:
    """A hub id goes through huggingface_hub's snapshot_download: the configs first, then exactly the
    shards the index names; the snapshot's commit keys the cache and is recorded."""
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "snapshots" / commit
    shutil.copytree(pair[1], snapshot)
    calls = []

    def fake_snapshot_download(repo_id: str, *, revision: str | None = None, allow_patterns=None, **kwargs) -> str:
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ref = ReferencePair(base=str(pair[0]), tuned="vendor/model-instruct", tuned_revision="v1")
    scores, detail = reference_change_scores(ref, TARGETS, 4, tmp_path / "cache")
    shards = sorted(p.name for p in snapshot.glob("*.safetensors"))
    assert calls == [("vendor/model-instruct", "v1", ["*.json"]), ("vendor/model-instruct", "v1", ["*.json", *shards])]
    assert detail["tuned_commit"] == commit and detail["base_commit"] is None
    assert scores == _scores(pair, tmp_path / "local")[0]


def test_an_unreachable_hub_id_is_one_clear_error(pair, tmp_path) -> None:
    ref = ReferencePair(base=str(pair[0]), tuned="cft-test-nobody/no-such-model")  # HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ValueError, match=r"cannot read cft-test-nobody/no-such-model \(hub or its local cache\)"):
        reference_change_scores(ref, TARGETS, 4, tmp_path)


def test_schema_rules(pair, tmp_path) -> None:
    """Usable in the first phase (only with a pair, which the strategy requires); most_changed there
    points to it; a relative folder is relative to the recipe file; a revision needs a hub id."""
    base, tuned = pair
    ok = f"{{strategy: reference_change, count: 2, reference: {{base: '{base}', tuned: '{tuned}'}}}}"
    assert load_recipe(SMOKE, [f"phases[0].placement={ok}"]).phases[0].placement.reference.tuned == str(tuned)
    with pytest.raises(RecipeError, match=r"phases\[0\]\.placement: strategy 'reference_change' needs 'reference'"):
        load_recipe(SMOKE, ["phases[0].placement={strategy: reference_change, count: 2}"])
    with pytest.raises(RecipeError, match="first phase; to rank them by how a reference model changed"):
        load_recipe(SMOKE, ["phases[0].placement={strategy: most_changed, count: 2}"])
    with pytest.raises(RecipeError, match="'base_revision' applies to a hub id, and 'base' is a local folder"):
        load_recipe(SMOKE, [f"phases[0].placement={ok}", "phases[0].placement.reference.base_revision=main"])
    # Relative to the file that says it, also through extends (as data paths are).
    (tmp_path / "a" / "parent").mkdir(parents=True)
    (tmp_path / "child").mkdir()
    (tmp_path / "a" / "parent" / "p.yaml").write_text(
        f"extends: {SMOKE}\nphases:\n  - name: english\n    placement:\n      strategy: reference_change\n"
        f"      count: 2\n      reference: {{base: {os.path.relpath(base, tmp_path / 'a' / 'parent')}, tuned: vendor/model}}\n")
    (tmp_path / "child" / "c.yaml").write_text("extends: ../a/parent/p.yaml\n")
    reference = load_recipe(tmp_path / "child" / "c.yaml").phases[0].placement.reference
    assert (reference.base, reference.tuned) == (str(base), "vendor/model")
    # Without a pair the placement dumps as before the field existed: older runs' phase digests hold.
    assert "reference" not in PlacementConfig(strategy="random", count=1).model_dump(mode="json")


@pytest.mark.slow
def test_first_phase_trains_end_to_end_with_the_reference_ranking(pair, tmp_path, capsys, monkeypatch) -> None:
    """cft-train with reference_change in phase 1: the dry run describes it, the fresh adapter sits only on
    the layers that stay trainable, and placement.json holds the scores behind the choice."""
    monkeypatch.setenv("COLUMNS", "300")  # the plan table wraps its cells at the terminal width
    out = tmp_path / "run"
    placement = f"{{strategy: reference_change, count: 2, reference: {{base: '{pair[0]}', tuned: '{pair[1]}'}}}}"
    args = [str(SMOKE), f"output_dir={out}", "eval.tasks=[]", "training.max_steps=4",
            f"phases=[{{name: english, datasets: [{{path: 'builtin:smoke/en_tasks.jsonl', language: en}}], placement: {placement}}}]"]
    assert main([*args, "--dry-run"]) == 0
    plan = " ".join(capsys.readouterr().out.split())
    assert "reference_change: freeze 2 of 4 layers" in plan
    assert main(args) == 0
    info = json.loads((out / "phase_1_english" / "placement.json").read_text())
    assert info["strategy"] == "reference_change" and info["frozen"] == [1, 3] and info["trainable"] == [0, 2]
    assert info["score_name"] == "relative_weight_change_fro" and set(info["scores"]) == {"0", "1", "2", "3"}
    assert info["scores"]["1"] == pytest.approx(0.30, rel=1e-5)
    assert info["detail"]["score"] == "relative" and info["detail"]["base"] == str(pair[0])
    assert RunManifest.read(out).phases[1].placement == info
    adapter = load_file(str(out / "phase_1_english" / "adapter" / "adapter_model.safetensors"))
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in adapter} == {0, 2}
