"""EA, MA (seen / unseen), forgetting and backward transfer on small hand-made run records, with
the task semantics the shipped task YAMLs declare. Every expected number is worked out by hand in
the comments; none comes from the code under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from cft_adapters.errors import CftError
from cft_adapters.manifest import PhaseRecord, RunManifest
from cft_adapters.report import backward_transfer, forgetting, phase_scores, summary_rows, write_report
from cft_adapters.task_semantics import TaskSemanticsError

SMOKE_TASKS = ["cft_smoke_en", "cft_smoke_ml"]
SMOKE_GROUPS = {"cft_smoke_en": ["cft_smoke_en_mc", "cft_smoke_en_gen"],
                "cft_smoke_ml": ["cft_smoke_ml_de", "cft_smoke_ml_es", "cft_smoke_ml_fr"]}


def _phase(index: int, name: str, languages: list[str] | None, scores: dict[str, dict[str, float]],
           groups: dict[str, list[str]] | None = None) -> PhaseRecord:
    return PhaseRecord(index=index, name=name, status="done", eval=scores, eval_status="done" if scores else "pending",
                       eval_groups=SMOKE_GROUPS if groups is None else groups,
                       data={"languages": {lang: 10 for lang in languages}} if languages else None)


def _smoke(en_mc: float, en_gen: float, de: float, es: float, fr: float) -> dict[str, dict[str, float]]:
    """A smoke phase's eval record: the primary metrics, next to metrics and group aggregates the
    report must not use (acc_norm, langfid, the groups' own scores)."""
    return {
        "cft_smoke_en_mc": {"acc": en_mc, "acc_norm": 0.99},
        "cft_smoke_en_gen": {"rougeL": en_gen},
        "cft_smoke_ml_de": {"chrf": de, "langfid": 0.99},
        "cft_smoke_ml_es": {"chrf": es, "langfid": 0.99},
        "cft_smoke_ml_fr": {"chrf": fr, "langfid": 0.99},
        "cft_smoke_en": {"acc": 0.99, "rougeL": 0.99},
        "cft_smoke_ml": {"chrf": 0.99, "langfid": 0.99},
    }


def _manifest(*phases: PhaseRecord) -> RunManifest:
    return RunManifest(recipe="r.yaml", base_model="builtin:tiny-mistral", seed=0, versions={}, phases=list(phases))


@pytest.fixture
def four_phases() -> RunManifest:
    """base, then English, then French + German, then German again. Trained languages: en, fr, de,
    so de and fr are seen and es is unseen in every phase."""
    return _manifest(
        _phase(0, "base", None, _smoke(en_mc=0.40, en_gen=0.20, de=0.30, es=0.50, fr=0.10)),
        _phase(1, "english", ["en"], _smoke(en_mc=0.80, en_gen=0.40, de=0.10, es=0.20, fr=0.10)),
        _phase(2, "french_german", ["fr", "de"], _smoke(en_mc=0.50, en_gen=0.30, de=0.60, es=0.30, fr=0.40)),
        _phase(3, "german", ["de"], _smoke(en_mc=0.30, en_gen=0.10, de=0.70, es=0.40, fr=0.50)),
    )


def test_ea_and_ma_are_unweighted_means_of_the_declared_primary_metrics(four_phases: RunManifest) -> None:
    scores = phase_scores(four_phases, SMOKE_TASKS)
    # EA = mean(en_mc acc, en_gen rougeL); MA seen = mean(chrf de, fr); MA unseen = chrf es.
    # phase 0: EA (0.40 + 0.20) / 2 = 0.30, MA_s (0.30 + 0.10) / 2 = 0.20, MA_u 0.50
    # phase 1: EA (0.80 + 0.40) / 2 = 0.60, MA_s (0.10 + 0.10) / 2 = 0.10, MA_u 0.20
    # phase 2: EA (0.50 + 0.30) / 2 = 0.40, MA_s (0.60 + 0.40) / 2 = 0.50, MA_u 0.30
    # phase 3: EA (0.30 + 0.10) / 2 = 0.20, MA_s (0.70 + 0.50) / 2 = 0.60, MA_u 0.40
    assert [s.ea for s in scores] == pytest.approx([0.30, 0.60, 0.40, 0.20])
    assert [s.ma_seen for s in scores] == pytest.approx([0.20, 0.10, 0.50, 0.60])
    assert [s.ma_unseen for s in scores] == pytest.approx([0.50, 0.20, 0.30, 0.40])
    # The units are the member tasks, never the groups (whose aggregates read 0.99 here).
    assert set(scores[0].units) == {"cft_smoke_en_mc", "cft_smoke_en_gen", "cft_smoke_ml_de", "cft_smoke_ml_es",
                                    "cft_smoke_ml_fr"}
    assert scores[2].units["cft_smoke_en_mc"] == 0.50  # acc, not acc_norm (0.99)


def test_forgetting_is_the_ea_drop_from_its_best_phase_so_far(four_phases: RunManifest) -> None:
    scores = phase_scores(four_phases, SMOKE_TASKS)
    # EA: 0.30, 0.60, 0.40, 0.20. k=0: 0.30 - 0.30 = 0; k=1: 0.60 - 0.60 = 0 (a new best);
    # k=2: max(0.30, 0.60, 0.40) - 0.40 = 0.20; k=3: 0.60 - 0.20 = 0.40.
    assert [forgetting(scores, k) for k in range(4)] == pytest.approx([0.0, 0.0, 0.20, 0.40])


def test_backward_transfer_compares_each_trained_ability_at_the_end(four_phases: RunManifest) -> None:
    scores = phase_scores(four_phases, SMOKE_TASKS)
    # Last phase N = 3. Phase 1 trained English only -> EA: EA_3 - EA_1 = 0.20 - 0.60 = -0.40.
    # Phase 2 trained fr + de -> MA_seen: MA_s3 - MA_s2 = 0.60 - 0.50 = +0.10. Mean: -0.30 / 2 = -0.15.
    assert backward_transfer(four_phases, scores) == pytest.approx(-0.15)


def test_summary_rows_deltas_vs_base_and_vs_best_earlier(four_phases: RunManifest) -> None:
    rows = summary_rows(phase_scores(four_phases, SMOKE_TASKS))
    # Phase 2: EA 0.40, MA_s 0.50, MA_u 0.30. ΔEA vs 0: 0.40 - 0.30 = +0.10; ΔMA vs 0: 0.50 - 0.20 = +0.30;
    # ΔEA vs best earlier: 0.40 - max(0.30, 0.60) = -0.20; ΔMA vs best earlier: 0.50 - max(0.20, 0.10) = +0.30;
    # forgetting 0.20.
    assert rows[2] == ["2 french_german", "0.4000", "0.5000", "0.3000", "+0.1000", "+0.3000", "-0.2000", "+0.3000",
                       "0.2000"]
    assert rows[0][6:8] == ["-", "-"]  # no earlier phase


def test_lm_eval_builtins_are_classified_by_the_group_that_declares_them() -> None:
    """cft_en declares ifeval, mmlu and hellaswag in its metadata.cft.members; mmlu is a unit (lm-eval
    aggregates it), never expanded into its subgroups."""
    scores = {
        "ifeval": {"prompt_level_strict_acc": 0.25, "inst_level_strict_acc": 0.99},
        "mmlu": {"acc": 0.50}, "mmlu_stem": {"acc": 0.99},
        "hellaswag": {"acc": 0.99, "acc_norm": 0.45},
        "cft_xlsum_en": {"rougeL": 0.20},
    }
    groups = {"cft_en": ["ifeval", "mmlu", "hellaswag", "cft_xlsum_en"], "mmlu": ["mmlu_stem"]}
    run = _manifest(_phase(0, "base", None, scores, groups))
    (base,) = phase_scores(run, ["cft_en"])
    # EA = (0.25 + 0.50 + 0.45 + 0.20) / 4 = 1.40 / 4 = 0.35
    assert base.ea == pytest.approx(0.35)
    assert base.ma_seen is None and base.ma_unseen is None
    assert set(base.units) == {"ifeval", "mmlu", "hellaswag", "cft_xlsum_en"}
    # The declaration holds wherever the name is scored, also when requested by itself.
    (alone,) = phase_scores(run, ["mmlu"])
    assert alone.units == {"mmlu": 0.50}


def test_seen_means_trained_in_this_run_whatever_the_group_is_called() -> None:
    scores = {
        "global_mmlu_fr": {"acc": 0.60}, "cft_langfid_fr": {"langfid": 0.80, "chrf": 0.99},
        "xquad_de": {"f1": 0.40, "exact": 0.99}, "cft_xlsum_ar": {"rougeL": 0.10},  # in cft_ml_seen
        "xquad_el": {"f1": 0.20},  # in cft_ml_unseen
    }
    groups = {"cft_ml": ["cft_ml_seen", "cft_ml_unseen"],
              "cft_ml_seen": ["global_mmlu_fr", "cft_langfid_fr", "xquad_de", "cft_xlsum_ar"],
              "cft_ml_unseen": ["xquad_el"]}
    run = _manifest(_phase(0, "base", None, scores, groups), _phase(1, "fr_de", ["fr", "de"], {}, {}))
    base = phase_scores(run, ["cft_ml"])[0]
    # Trained: fr, de. Seen: fr (0.60 acc, 0.80 langfid), de (0.40 f1) -> (0.60 + 0.80 + 0.40) / 3 = 0.60.
    # Unseen: ar (0.10, though cft_ml_seen lists it: this run did not train Arabic), el (0.20) -> 0.15.
    assert base.ma_seen == pytest.approx(0.60)
    assert base.ma_unseen == pytest.approx(0.15)
    assert base.ea is None


def test_an_unscored_phase_reads_as_missing_not_as_an_error(four_phases: RunManifest) -> None:
    four_phases.phases[3] = _phase(3, "german", ["de"], {}, {})  # not scored: no eval_groups either
    scores = phase_scores(four_phases, SMOKE_TASKS)
    assert scores[3].units == {} and scores[3].ea is None and forgetting(scores, 3) is None
    # Backward transfer from phase 2 (the last scored one is not the last phase): no pairs.
    assert backward_transfer(four_phases, scores) is None


def test_a_requested_task_without_semantics_is_an_error_naming_it(four_phases: RunManifest, tmp_path: Path) -> None:
    with pytest.raises(TaskSemanticsError, match="eval task 'arc_easy': the report cannot classify it") as info:
        phase_scores(four_phases, [*SMOKE_TASKS, "arc_easy"])
    assert isinstance(info.value, CftError) and info.value.exit_code == 2
    with pytest.raises(TaskSemanticsError, match="arc_easy"):
        write_report(tmp_path, four_phases, [*SMOKE_TASKS, "arc_easy"])
    assert not (tmp_path / "report.md").exists()


def test_a_scored_member_without_semantics_is_an_error_naming_it_and_its_group(four_phases: RunManifest) -> None:
    """A member lm-eval scored that nothing declares does not drop out of EA silently."""
    four_phases.phases[1].eval_groups = {**SMOKE_GROUPS, "cft_smoke_en": ["cft_smoke_en_mc", "cft_smoke_en_new"]}
    with pytest.raises(TaskSemanticsError, match=r"eval task 'cft_smoke_en_new' \(in cft_smoke_en\)"):
        phase_scores(four_phases, SMOKE_TASKS)


def test_report_md_lists_each_unit_with_its_declared_metric_and_language(four_phases: RunManifest,
                                                                         tmp_path: Path) -> None:
    text = write_report(tmp_path, four_phases, SMOKE_TASKS).read_text()
    assert "| cft_smoke_en_gen | rougeL | en | 0.2000 | 0.4000 | 0.3000 | 0.1000 |" in text
    assert "| cft_smoke_ml_es | chrf | es | 0.5000 | 0.2000 | 0.3000 | 0.4000 |" in text
    assert "Backward transfer: -0.1500." in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| cft_")]
    assert rows == ["| cft_smoke_en_gen", "| cft_smoke_en_mc", "| cft_smoke_ml_de", "| cft_smoke_ml_es",
                    "| cft_smoke_ml_fr"]  # English first
