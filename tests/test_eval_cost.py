"""Per-task evaluation limits and the evaluation cost `--dry-run` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from cft_adapters import eval_cost
from cft_adapters.errors import CftError
from cft_adapters.evaluation import check_eval_tasks, leaf_samples
from cft_adapters.plan import dry_run
from cft_adapters.recipe import EvalConfig, JudgeConfig, load_recipe
from cft_adapters.task_semantics import classify

REPO = Path(__file__).resolve().parents[1]
PAPER_BASES = ["mistral_similar.yaml", "mistral_instruct_dissimilar.yaml"]
PAPER_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if p.name.startswith(("mistral", "llama3")))


def test_a_limit_is_found_by_exact_name_first_then_by_the_longest_pattern() -> None:
    limits = {"mmlu": 20, "global_mmlu_*": 25, "global_mmlu_full_*": 40, "cft_xlsum_*": 60, "cft_xlsum_en": 500}
    assert eval_cost.limit_for(("mmlu_anatomy", "mmlu_stem", "mmlu", "cft_en"), limits) == 20
    assert eval_cost.limit_for(("global_mmlu_ar_stem", "global_mmlu_ar"), limits) == 25
    assert eval_cost.limit_for(("global_mmlu_full_ru_stem", "global_mmlu_full_ru"), limits) == 40
    assert eval_cost.limit_for(("cft_xlsum_en", "cft_en"), limits) == 500
    assert eval_cost.limit_for(("cft_xlsum_fr", "cft_ml_seen", "cft_ml"), limits) == 60
    assert eval_cost.limit_for(("hellaswag", "cft_en"), limits) is None


def test_lm_eval_scores_the_first_n_examples_of_each_limited_task() -> None:
    cfg = EvalConfig(tasks=["cft_smoke_en", "cft_smoke_alpacaeval", "cft_smoke_ml"],
                     limits={"cft_smoke_en": 5, "cft_smoke_ml_*": 3})
    samples = leaf_samples(["cft_smoke_en", "cft_smoke_alpacaeval", "cft_smoke_ml"], cfg)
    assert samples == {"cft_smoke_en_mc": list(range(5)), "cft_smoke_en_gen": list(range(5)),
                       "cft_smoke_ml_de": [0, 1, 2], "cft_smoke_ml_es": [0, 1, 2], "cft_smoke_ml_fr": [0, 1, 2]}
    # eval.limit covers what eval.limits does not name
    with_limit = leaf_samples(["cft_smoke_alpacaeval"], cfg.model_copy(update={"limit": 0.25}))
    assert with_limit == {"cft_smoke_alpacaeval": list(range(6))}


def test_a_limit_on_a_group_reaches_the_leaves_of_its_nested_groups(tmp_path) -> None:
    from cft_adapters.tasks_path import use_include_paths

    (tmp_path / "_nested.yaml").write_text("group: cft_test_nested\ntask:\n  - cft_smoke_ml\n  - cft_smoke_en_mc\n"
                                           "metadata:\n  version: 1.0\n")
    use_include_paths([str(tmp_path)])
    try:
        cfg = EvalConfig(tasks=["cft_test_nested"], limits={"cft_test_nested": 2, "cft_smoke_ml": 4})
        samples = leaf_samples(["cft_test_nested"], cfg)
    finally:
        use_include_paths([])
    # the nearest named group wins: cft_smoke_ml (the leaves' parent) over cft_test_nested above it
    assert samples == {"cft_smoke_ml_de": list(range(4)), "cft_smoke_ml_es": list(range(4)),
                       "cft_smoke_ml_fr": list(range(4)), "cft_smoke_en_mc": [0, 1]}


def test_a_limit_that_matches_no_scored_task_is_refused_up_front() -> None:
    cfg = EvalConfig(tasks=["cft_smoke_en"], limits={"cft_smoke_en_mcq": 5})
    with pytest.raises(CftError, match=r"smoke.yaml: eval.limits.cft_smoke_en_mcq: matches none of the tasks"):
        check_eval_tasks(cfg, "smoke.yaml")


def test_the_paper_recipes_keep_one_checkpoint_to_about_one_gpu_hour() -> None:
    limits = [load_recipe(REPO / "recipes" / name).eval.limits for name in PAPER_BASES]
    assert limits[0] and limits[0] == limits[1]
    recipe = load_recipe(REPO / "recipes" / "mistral_instruct_dissimilar.yaml")
    paths: dict[str, tuple[str, ...]] = {}
    units = list(classify(recipe.eval.tasks, paths=paths))
    assert "cft_alpacaeval" in units
    limited = eval_cost.checkpoint_cost(units, None, recipe.eval.limits, paths, recipe.model.name_or_path)
    whole = eval_cost.checkpoint_cost(units, None, {}, paths, recipe.model.name_or_path)
    assert limited.throughput.name == eval_cost.REFERENCE and not limited.unknown
    assert 45 * 60 <= limited.total_seconds() <= 75 * 60, limited.total_seconds() / 60
    assert whole.total_seconds() > 10 * limited.total_seconds()
    # every unit keeps some examples, and no limit is above the test split it cuts
    assert all(0 < u.docs <= u.full_docs for u in limited.units)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_each_paper_recipe_dry_run_prints_its_eval_cost(name: str) -> None:
    console = Console(record=True, width=140)
    recipe = load_recipe(REPO / "recipes" / name)
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"judge": JudgeConfig(model="judge")})})
    dry_run(recipe, name, console)
    text = console.export_text()
    assert "evaluation cost of one checkpoint" in text and "cft_alpacaeval" in text
    assert "eval time per checkpoint ≈" in text
    assert "cost unknown" not in text


def test_a_measured_throughput_for_this_model_and_device_wins_over_the_reference() -> None:
    entries = [eval_cost.Throughput(eval_cost.REFERENCE, "a 24 GB GPU", 3000, 200, 8, "assumed"),
               eval_cost.Throughput("my/model", "cpu", 10, 1, 8, "measured")]
    assert eval_cost.pick_throughput("my/model", entries, device="cpu").how == "measured"
    assert eval_cost.pick_throughput("my/model", entries, device="NVIDIA H200").how == "assumed"
    assert eval_cost.pick_throughput("other", []) is None
