"""The report's task semantics as the task YAMLs declare them (metadata.cft): every shipped task and
group is classified, and a missing, malformed or contradictory declaration is an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cft_adapters.evaluation import check_eval_tasks
from cft_adapters.recipe import EvalConfig
from cft_adapters.task_semantics import Semantics, TaskSemanticsError, classify, load_catalog
from cft_adapters.tasks_path import tasks_dir

GROUPS = ["cft_en", "cft_ml", "cft_ml_seen", "cft_ml_unseen", "cft_smoke_en", "cft_smoke_ml", "cft_mini_en",
          "cft_mini_ml"]


def test_every_shipped_task_declares_its_semantics() -> None:
    shipped = load_catalog(tasks_dir())
    assert shipped.problems == {}
    assert shipped.tasks and [t for t in shipped.tasks if t not in shipped.declared] == []
    assert sorted(shipped.groups) == sorted(GROUPS)


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_group_classifies(group: str) -> None:
    units = classify([group])
    ability = {"EA"} if group.endswith("_en") else {"MA"}
    assert units and {s.ability for s in units.values()} == ability
    assert all(s.language == "en" for s in units.values()) == (ability == {"EA"})


def test_declarations_match_the_primary_metrics_of_each_family() -> None:
    units = classify(["cft_en", "cft_ml", "cft_smoke_en", "cft_smoke_ml", "cft_mini_en", "cft_mini_ml"])
    assert units["ifeval"] == Semantics("EA", "en", "prompt_level_strict_acc")
    assert units["mmlu"] == Semantics("EA", "en", "acc")
    assert units["hellaswag"] == Semantics("EA", "en", "acc_norm")
    assert units["cft_xlsum_en"] == Semantics("EA", "en", "rougeL")
    assert units["cft_xlsum_fr"] == Semantics("MA", "fr", "rougeL")
    assert units["xquad_de"] == Semantics("MA", "de", "f1")
    assert units["mlqa_zh_zh"] == Semantics("MA", "zh", "f1")
    assert units["global_mmlu_full_ru"] == Semantics("MA", "ru", "acc")
    assert units["cft_langfid_th"] == Semantics("MA", "th", "langfid")
    assert units["cft_smoke_en_mc"] == Semantics("EA", "en", "acc")
    assert units["cft_smoke_ml_es"] == Semantics("MA", "es", "chrf")
    assert units["cft_mini_en_qa"] == Semantics("EA", "en", "contains")
    assert units["cft_mini_ml_fr"] == Semantics("MA", "fr", "contains")
    assert "cft_ml_seen" not in units and "mmlu_stem" not in units


def test_a_tag_of_ours_expands_into_its_tasks() -> None:
    assert set(classify(["cft_smoke"])) == {"cft_smoke_en_mc", "cft_smoke_en_gen", "cft_smoke_alpacaeval",
                                            "cft_smoke_ml_de", "cft_smoke_ml_es", "cft_smoke_ml_fr"}


def _write(root: Path, name: str, text: str) -> None:
    (root / name).write_text(text, encoding="utf-8")


def test_missing_malformed_and_contradictory_declarations_name_the_task(tmp_path: Path) -> None:
    _write(tmp_path, "plain.yaml", "task: t_plain\nmetadata:\n  version: 1.0\n")
    _write(tmp_path, "bad.yaml", "task: t_bad\nmetadata:\n  cft: {ability: XA, language: fr, metric: acc}\n")
    _write(tmp_path, "half.yaml", "task: t_half\nmetadata:\n  cft: {ability: MA, language: fr}\n")
    _write(tmp_path, "g1.yaml", "group: g1\ntask: [t_plain, hellaswag]\n"
                                "metadata:\n  cft:\n    members:\n      hellaswag: {ability: EA, language: en, metric: acc_norm}\n")
    _write(tmp_path, "g2.yaml", "group: g2\ntask: [hellaswag]\n"
                                "metadata:\n  cft:\n    members:\n      hellaswag: {ability: EA, language: en, metric: acc}\n")
    cat = load_catalog(tmp_path)
    with pytest.raises(TaskSemanticsError, match=r"eval task 't_plain' \(in g1\): the report cannot classify it"):
        classify(["g1"], cat=cat)
    with pytest.raises(TaskSemanticsError, match=r"eval task 't_bad': .*bad.yaml: metadata.cft.ability: expected EA or MA"):
        classify(["t_bad"], cat=cat)
    with pytest.raises(TaskSemanticsError, match=r"eval task 't_half': .*metadata.cft: missing metric"):
        classify(["t_half"], cat=cat)
    with pytest.raises(TaskSemanticsError, match=r"eval task 'hellaswag' \(in g2\): declared twice, differently"):
        classify(["g2"], cat=cat)


def test_include_applies_like_lm_eval_the_file_s_own_metadata_wins(tmp_path: Path) -> None:
    _write(tmp_path, "_template", "output_type: generate_until\nprocess_results: !function utils.score\n"
                                  "metadata:\n  cft: {ability: MA, language: de, metric: chrf}\n")
    _write(tmp_path, "t_fr.yaml", "include: _template\ntask: t_fr\n"
                                  "metadata:\n  cft: {ability: MA, language: fr, metric: chrf}\n")
    assert classify(["t_fr"], cat=load_catalog(tmp_path)) == {"t_fr": Semantics("MA", "fr", "chrf")}


def test_an_unclassifiable_eval_task_fails_before_anything_trains() -> None:
    with pytest.raises(TaskSemanticsError) as info:
        check_eval_tasks(EvalConfig(tasks=["cft_smoke_en", "arc_easy"]), "r.yaml")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("r.yaml: eval.tasks[1]: eval task 'arc_easy': the report cannot classify it")


def test_the_dry_run_names_an_unclassifiable_task(capsys) -> None:
    """`--dry-run` says it too, before a model or dataset is loaded."""
    from cft_adapters.cli import main

    from conftest import SMOKE

    assert main([str(SMOKE), "--dry-run", "eval.tasks=[arc_easy]"]) != 0
    err = capsys.readouterr().err
    assert "eval.tasks[0]: eval task 'arc_easy': the report cannot classify it" in err
