"""training.report_to: TensorBoard event files, read back (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cft_adapters.cli import main
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import load_recipe
from cft_adapters.reconcile import phase_config_digest
from cft_adapters.report import paper_scores, phase_scores

from conftest import SMOKE


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.slow
def test_tensorboard_gets_each_phases_loss_curve_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "training.report_to=[tensorboard]"]) == 0
    for phase in ("phase_1_english", "phase_2_french_german"):  # one tracker run per phase
        curves = _scalars(out / "tensorboard" / phase)
        assert len(curves["train/loss"]) >= 2, curves.keys()
    scores = _scalars(out / "tensorboard" / "scores")
    manifest = RunManifest.read(out)
    tasks = [t for t in load_recipe(SMOKE).eval.tasks]
    expected = paper_scores(phase_scores(manifest, tasks))
    assert sorted(step for step, _ in scores["scores/EA"]) == [0, 1, 2]
    for step, value in scores["scores/EA"]:
        assert value == pytest.approx(expected[step].ea, abs=1e-6)
    assert {s for s, _ in scores["scores/MA"]} == {0, 1, 2} and "scores/forgetting" in scores


def test_trackers_change_no_phase_digest() -> None:
    plain = load_recipe(SMOKE)
    tracked = load_recipe(SMOKE, ["training.report_to=[tensorboard, wandb]", "training.project=p", "training.run_name=r"])
    assert [phase_config_digest(plain, k) for k in (1, 2)] == [phase_config_digest(tracked, k) for k in (1, 2)]


def test_a_tracker_that_is_not_installed_stops_the_run_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "training.report_to=[mlflow]"]) == 2
    err = capsys.readouterr().err
    assert "training.report_to: mlflow is not installed (pip install mlflow)" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "phase_1_english").exists()


@pytest.mark.slow
def test_the_run_writes_a_loss_curve_with_every_phase_and_links_it(smoke_run: Path) -> None:
    import json

    from cft_adapters.loss_curve import phase_losses

    png = (smoke_run / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert "![training loss per phase](loss_curve.png)" in (smoke_run / "report.md").read_text()
    manifest = RunManifest.read(smoke_run)
    phases = phase_losses(smoke_run, manifest)
    assert [label for label, _ in phases] == ["1 english", "2 french_german"]
    logged = json.loads((smoke_run / "phase_2_french_german" / "train_log.json").read_text())
    assert phases[1][1] == [(r["step"], r["loss"]) for r in logged if "loss" in r]
