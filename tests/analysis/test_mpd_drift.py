from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cft_adapters.analysis.drift import layer_drift, linear_cka
from cft_adapters.analysis.mpd import mpd
from cft_adapters.cli import analyze_main
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import load_recipe

from conftest import SMOKE


def test_mpd_formula_on_constructed_adapters() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"m.layers.0.q.lora_A.weight": torch.randn(2, 6, generator=g), "m.layers.0.q.lora_B.weight": torch.randn(6, 2, generator=g)}
    same = mpd(a, a, 2.0)
    assert same["total"] == 0.0 and same["per_layer"] == {"0": 0.0}
    assert same["normalised"]["total"] == 0.0 and same["normalised"]["per_layer"] == {"0": 0.0}
    flipped = {k: (-v if ".lora_B." in k else v) for k, v in a.items()}
    opposite = mpd(a, flipped, 2.0)
    assert opposite["normalised"]["total"] == pytest.approx(1.0)
    # the paper's way: the mean over matrices of ||W_a - W_b||_F, here ||2 * scale * B A|| for each
    from cft_adapters.placement import lora_updates

    updates = lora_updates(a, 2.0)
    expected = sum(float(torch.linalg.matrix_norm(2 * d)) for d in updates.values()) / len(updates)
    assert opposite["total"] == pytest.approx(expected) and opposite["matrices"] == len(updates)


def _recipe(tmp_path: Path) -> Path:
    text = (SMOKE.read_text().split("phases:")[0] + """phases:
  - name: english
    datasets: [{path: "builtin:smoke/en_tasks.jsonl", language: en}]
  - name: english_again
    datasets: [{path: "builtin:smoke/en_tasks.jsonl", language: en}]
  - name: english_mostly
    datasets:
      - {path: "builtin:smoke/en_tasks.jsonl", language: en, max_examples: 56}
      - {path: "builtin:smoke/multi_fr_de.jsonl", format: messages, language_column: lang, max_examples: 8}
  - name: french_german
    datasets: [{path: "builtin:smoke/multi_fr_de.jsonl", format: messages, language_column: lang}]
""").replace("output_dir: runs/smoke", f"output_dir: {tmp_path / 'run'}")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_mpd_is_zero_for_same_data_and_grows_with_dissimilarity(tmp_path, capsys) -> None:
    recipe_path = _recipe(tmp_path)
    totals = {}
    for other in ("english_again", "english_mostly", "french_german"):
        out = tmp_path / f"{other}.json"
        assert analyze_main(["mpd", str(recipe_path), "--phases", f"english,{other}", "--token-budget", "6000",
                             "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert out.with_suffix(".png").is_file()
        assert all(t >= 6000 for t in result["tokens_seen"])
        assert set(result["per_layer"]) == {"0", "1", "2", "3"}
        totals[other] = result["total"]
    assert totals["english_again"] == 0.0
    assert 0.0 < totals["english_mostly"] < totals["french_german"]
    # the english probe adapter was trained once and reused from the cache
    assert capsys.readouterr().out.count("phase 1 'probe': done, skipped") >= 3


def test_drift_is_zero_between_identical_features() -> None:
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(20, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    drift = layer_drift(feats, feats)
    assert drift["mean_shift"] == [0.0] * 3 and drift["covariance_shift"] == [0.0] * 3
    assert drift["cka"] == pytest.approx([1.0] * 3)
    rotated = feats[0] @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    assert linear_cka(feats[0], rotated) == pytest.approx(1.0)  # CKA ignores rotations


@pytest.mark.slow
def test_drift_cli_on_a_trained_run(smoke_run: Path, tmp_path) -> None:
    out = tmp_path / "drift.json"
    assert analyze_main(["drift", str(smoke_run), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert [t["from"] for t in result["transitions"]] == ["0 base", "1 english"]
    assert result["layers"] == 5  # embeddings + 4 blocks
    for t in result["transitions"]:
        assert t["mean_shift"][0] == 0.0  # the embeddings carry no adapter
        assert max(t["mean_shift"][1:]) > 0 and min(t["cka"]) < 1.0


def test_drift_needs_two_checkpoints(tmp_path, capsys) -> None:
    from cft_adapters.cli import main

    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", "phases[0].datasets[0].max_examples=8",
                 "phases[1].datasets[0].path=/nonexistent.jsonl"]) == 2  # invalid phase 2: nothing trains
    (out / "run.json").parent.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(SMOKE, [f"output_dir={out}", "eval.tasks=[]"])
    from cft_adapters.phases import PhaseRunner

    runner = PhaseRunner(recipe, str(SMOKE))
    runner.manifest = runner._setup_run_dir()  # a run directory with only the base recorded
    assert analyze_main(["drift", str(out)]) == 2
    assert "has only the base" in capsys.readouterr().err


@pytest.mark.slow
def test_cft_train_writes_drift_when_the_recipe_asks(tmp_path) -> None:
    from cft_adapters.cli import main

    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", "analysis.drift=true", "training.max_steps=3"]) == 0
    result = json.loads((out / "analysis" / "drift.json").read_text())
    assert len(result["transitions"]) == 2 and (out / "analysis" / "drift.png").is_file()
    assert result["probe"] is None and result["probe_prompts"] == 88  # the bundled probe
    manifest = RunManifest.read(out)
    assert [c["adapter"] for c in result["checkpoints"]] == [None] + [p.train.final_digest for p in manifest.phases[1:]]


def test_the_bundled_drift_probe_is_a_general_english_instruction_set(tmp_path) -> None:
    import json
    from collections import Counter

    from cft_adapters.analysis.drift import PROBE_FILE, default_probe
    from cft_adapters.errors import CftError
    from cft_adapters.recipe import load_recipe

    prompts = default_probe()
    rows = [json.loads(line) for line in PROBE_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(prompts) >= 80 and len(set(prompts)) == len(prompts)
    assert Counter(r["category"] for r in rows) == dict.fromkeys(
        ["writing", "reasoning", "math", "coding", "extraction", "stem", "humanities", "roleplay"], 11)
    own = tmp_path / "probe.jsonl"
    own.write_text(json.dumps({"prompt": "Say hello."}) + "\n")
    assert load_recipe(SMOKE, [f"analysis.drift_probe={own}"]).analysis.drift_probe == str(own)
    with pytest.raises(CftError, match=r"analysis\.drift_probe: file not found"):
        load_recipe(SMOKE, ["analysis.drift_probe=no_such_probe.jsonl"])


@pytest.mark.slow
def test_drift_compare_writes_a_per_layer_ratio_with_intervals_over_seeds(tmp_path, capsys) -> None:
    from cft_adapters.cli import main

    runs = {"similar": [], "dissimilar": []}
    phase2 = {"similar": "[{name: more_english, datasets: [{path: 'builtin:smoke/en_tasks.jsonl', language: en}]}]",
              "dissimilar": "[{name: french_german, datasets: [{path: 'builtin:smoke/multi_fr_de.jsonl', format: messages, "
                            "language_column: lang}]}]"}
    for group, second in phase2.items():
        for seed in (0, 1):
            out = tmp_path / f"{group}_{seed}"
            recipe = load_recipe(SMOKE)
            first = recipe.phases[0]
            assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", "training.max_steps=6", f"training.seed={seed}",
                         f"phases=[{{name: english, datasets: [{{path: '{first.datasets[0].path}', language: en}}]}}, "
                         + second[1:]]) == 0
            runs[group].append(str(out))
    capsys.readouterr()
    out = tmp_path / "compare.json"
    assert analyze_main(["drift-compare", *runs["similar"], "--", *runs["dissimilar"], "--labels", "similar,dissimilar",
                         "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_a"] == 2 and result["n_b"] == 2 and result["groups"]["dissimilar"] == runs["dissimilar"]
    assert len(result["layers"]) == 5  # the tiny model: embeddings + 4 blocks
    def no_nan(constant: str) -> None:
        raise AssertionError(f"{constant} in {out}: not JSON")

    json.loads(out.read_text(), parse_constant=no_nan)
    embeddings = result["layers"][0]  # no adapter, no shift: no ratio and no interval
    assert (embeddings["mean_a"], embeddings["ratio"], embeddings["ci_low"], embeddings["ci_high"]) == (0.0, None, None, None)
    for row in result["layers"][1:]:
        assert row["ratio"] == pytest.approx(row["mean_b"] / row["mean_a"])
        assert row["ci_low"] <= row["ratio"] <= row["ci_high"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "dissimilar / similar" in printed and "layer  4" in printed
    # each run's drift was computed once and written beside it; a second comparison reuses it
    stamp = (Path(runs["similar"][0]) / "analysis" / "drift.json").stat().st_mtime_ns
    assert analyze_main(["drift-compare", *runs["similar"], "--", *runs["dissimilar"], "--out", str(out)]) == 0
    assert (Path(runs["similar"][0]) / "analysis" / "drift.json").stat().st_mtime_ns == stamp
    # ... but not one made on other checkpoints (a phase retrained since): that run's drift is redone
    saved = Path(runs["similar"][0]) / "analysis" / "drift.json"
    stale = json.loads(saved.read_text())
    stale["checkpoints"][-1]["adapter"] = "0" * 16
    saved.write_text(json.dumps(stale))
    other = (Path(runs["similar"][1]) / "analysis" / "drift.json").stat().st_mtime_ns
    assert analyze_main(["drift-compare", *runs["similar"], "--", *runs["dissimilar"], "--out", str(out)]) == 0
    redone = json.loads(saved.read_text())
    assert (Path(runs["similar"][1]) / "analysis" / "drift.json").stat().st_mtime_ns == other  # still reused
    assert redone["checkpoints"][-1]["adapter"] == RunManifest.read(Path(runs["similar"][0])).phases[-1].train.final_digest
    assert analyze_main(["drift-compare", *runs["similar"], "--out", str(out)]) == 2
    assert "then --, then group B's" in capsys.readouterr().err
