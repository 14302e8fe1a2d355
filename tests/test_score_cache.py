"""The base's phase-0 scores are cached across runs (score_cache.py): a second run on the same base,
scored the same way, takes them from the cache; other settings, or an unusable entry, score again."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cft_adapters.cli import main
from cft_adapters.evaluation import EvalOutcome
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import EvalConfig
from cft_adapters.score_cache import OUTCOME, BaseScoreCache
from conftest import SMOKE

QUICK = ["training.max_steps=1", "eval.tasks=[cft_smoke_en_mc]", "eval.limit=4"]
HIT = "phase 0 'base': scores from the cache"
MISS = "phase 0 'base': evaluating"


@pytest.fixture
def fresh_cache(tmp_path: Path, tiny_model_path: Path, monkeypatch) -> Path:
    """An empty cache that shares the session's built tiny model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(tiny_model_path.parent)
    monkeypatch.setenv("CFT_CACHE_DIR", str(cache))
    monkeypatch.delenv("CFT_NO_SCORE_CACHE", raising=False)
    return cache


def _run(out: Path, capsys, *extra: str) -> str:
    code = main([str(SMOKE), f"output_dir={out}", *QUICK, *extra])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # rich wraps long lines
    assert code == 0, text[-2000:]
    assert "Traceback" not in text
    return text


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "base_scores").iterdir() if "." not in p.name and (p / OUTCOME).is_file())


@pytest.mark.slow
def test_second_run_takes_phase_0_from_the_cache_and_other_settings_do_not(fresh_cache, tmp_path, capsys, monkeypatch) -> None:
    first = _run(tmp_path / "a", capsys)
    assert MISS in first and HIT not in first
    [entry] = _entries(fresh_cache)

    second = _run(tmp_path / "b", capsys)
    assert HIT in second and MISS not in second
    assert f"({entry})" in "".join(second.split())  # the entry's path (rich may break it across lines)
    a, b = RunManifest.read(tmp_path / "a").phases[0], RunManifest.read(tmp_path / "b").phases[0]
    assert b.eval_status == "done" and b.eval == a.eval and b.eval_groups == a.eval_groups
    assert (b.eval_settings, b.eval_tasks) == (a.eval_settings, a.eval_tasks)
    assert 0 <= b.eval_seconds < a.eval_seconds  # what run b spent: restoring, not the original scoring
    # The same files as an uncached run: lm-eval's results file, recorded in eval_files.
    assert [Path(f).parent for f in b.eval_files] == [Path("phase_0_base/eval")]
    assert (tmp_path / "b" / b.eval_files[0]).read_text() == (tmp_path / "a" / a.eval_files[0]).read_text()
    assert sorted(p.name for p in (tmp_path / "b/phase_0_base/eval").iterdir()) == \
        sorted(p.name for p in (tmp_path / "a/phase_0_base/eval").iterdir())
    raw_a, raw_b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert set(raw_b) == set(raw_a) and set(raw_b["phases"][0]) == set(raw_a["phases"][0])
    assert (tmp_path / "b" / "report.md").is_file()

    other = _run(tmp_path / "c", capsys, "eval.limit=3")  # another eval setting: another entry
    assert MISS in other and HIT not in other
    assert len(_entries(fresh_cache)) == 2

    monkeypatch.setenv("CFT_NO_SCORE_CACHE", "1")
    off = _run(tmp_path / "d", capsys)
    assert MISS in off and HIT not in off


@pytest.mark.slow
def test_an_unusable_entry_is_moved_aside_and_the_base_scored_again(fresh_cache, tmp_path, capsys) -> None:
    _run(tmp_path / "a", capsys)
    [entry] = _entries(fresh_cache)
    results = next(entry.glob("results_*.json"))
    results.write_text(results.read_text()[:50])  # cut short: its digest no longer matches

    again = _run(tmp_path / "b", capsys)
    assert "base score cache:" in again and "is unusable" in again and MISS in again and HIT not in again
    aside = [p.name for p in (fresh_cache / "base_scores").iterdir() if p.name.startswith(f"{entry.name}.unusable-")]
    assert len(aside) == 1  # moved aside, never deleted
    assert _entries(fresh_cache) == [entry]  # and stored again
    assert RunManifest.read(tmp_path / "b").phases[0].eval == RunManifest.read(tmp_path / "a").phases[0].eval
    assert HIT in _run(tmp_path / "c", capsys)


# -- the cache on its own (fast) --------------------------------------------------------------------

def _stored(tmp_path: Path, key: dict) -> tuple[BaseScoreCache, EvalOutcome]:
    from rich.console import Console

    scored = tmp_path / "scored"
    scored.mkdir()
    results = scored / "results_2026-01-01T00-00-00.000000.json"
    results.write_text(json.dumps({"results": {"t": {"acc,none": 0.25}}, "versions": {"t": 1.0}}))
    (scored / "samples_t_2026-01-01T00-00-00.000000.jsonl").write_text('{"doc_id": 0}\n')
    outcome = EvalOutcome({"t": {"acc": 0.25}}, {"g": ["t"]}, 1.5, results)
    cache = BaseScoreCache(key, tmp_path / "cache")
    cache.store(outcome, scored, Console(quiet=True))
    return cache, outcome


def test_an_entry_reads_back_whole_into_another_run(tmp_path: Path) -> None:
    from rich.console import Console

    cache, outcome = _stored(tmp_path, {"model": "m", "settings": {"limit": 4}})
    found = BaseScoreCache({"model": "m", "settings": {"limit": 4}}, tmp_path / "cache").lookup(EvalConfig(tasks=["t"]), Console(quiet=True))
    assert found is not None
    got = found.score(None, tmp_path / "run" / "eval")
    assert (got.metrics, got.groups) == (outcome.metrics, outcome.groups)
    assert 0 <= got.seconds < outcome.seconds  # the restore's own time; the entry keeps the scoring's
    assert json.loads((cache.dir / OUTCOME).read_text())["seconds"] == outcome.seconds
    assert got.results_file.read_text() == outcome.results_file.read_text()
    assert sorted(p.name for p in got.results_file.parent.iterdir()) == sorted(p.name for p in outcome.results_file.parent.iterdir())
    assert BaseScoreCache({"model": "m", "settings": {"limit": 5}}, tmp_path / "cache").lookup(EvalConfig(), Console(quiet=True)) is None


@pytest.mark.parametrize("damage", ["outcome", "samples", "missing", "key"])
def test_a_damaged_entry_is_said_and_moved_aside_never_raised(tmp_path: Path, damage: str) -> None:
    from rich.console import Console

    cache, _ = _stored(tmp_path, {"model": "m"})
    if damage == "outcome":
        (cache.dir / OUTCOME).write_text("{not json")
    elif damage == "samples":
        next(cache.dir.glob("samples_*")).write_text("changed\n")
    elif damage == "missing":
        next(cache.dir.glob("results_*")).unlink()
    else:
        entry = json.loads((cache.dir / OUTCOME).read_text())
        (cache.dir / OUTCOME).write_text(json.dumps({**entry, "key": {"model": "other"}}))
    console = Console(record=True, width=400, file=io.StringIO())
    assert cache.lookup(EvalConfig(), console) is None
    assert f"{cache.dir} is unusable" in console.export_text()
    assert not cache.dir.exists() and [p.name.startswith(f"{cache.dir.name}.unusable-") for p in cache.dir.parent.iterdir()
                                       if not p.name.startswith(".")] == [True]
