"""The paper's aggregates (benchmark first, language fidelity beside MA, Combined) and `cft tables`: both
of the paper's tables from run directories, the paper's numbers beside ours, and a note wherever the
comparison is not like for like. Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_adapters.cli import cft_main
from cft_adapters.errors import CftError
from cft_adapters.manifest import RESOLVED_RECIPE, PhaseRecord, RunManifest
from cft_adapters.paper_numbers import PAPER_NUMBERS, PaperNumbers, paper_numbers
from cft_adapters.paper_tables import build, markdown, read_run, tables
from cft_adapters.recipe import dump_recipe, load_recipe
from cft_adapters.report import (PhaseScores, paper_coverage, paper_scores, phase_scores, rich_tables,
                                 write_report)
from cft_adapters.task_semantics import Semantics, load_catalog
from cft_adapters.tasks_path import tasks_dir

from conftest import REPO

# The paper's benchmarks by their shipped names: lm-eval's own, declared by our groups, and ours.
PAPER_TASKS = ["ifeval", "mmlu", "hellaswag", "cft_xlsum_en", "xquad_de", "xquad_es", "mlqa_de_de", "global_mmlu_fr",
               "cft_xlsum_fr", "cft_xlsum_es", "cft_langfid_fr", "cft_langfid_de"]
SMOKE_TASKS = ["cft_smoke_en", "cft_smoke_ml"]
SMOKE_GROUPS = {"cft_smoke_en": ["cft_smoke_en_mc", "cft_smoke_en_gen"],
                "cft_smoke_ml": ["cft_smoke_ml_de", "cft_smoke_ml_es", "cft_smoke_ml_fr"]}


def _manifest(*evals: dict[str, dict[str, float]], groups: dict | None = None, limit: float | None = None,
              recipe: str = "r.yaml") -> RunManifest:
    settings = {"limit": limit, "num_fewshot": None, "batch_size": 8, "apply_chat_template": True,
                "base_precision": "nf4"}
    names = ["base", "english", "french_german", "more"]
    return RunManifest(recipe=recipe, base_model="builtin:tiny-mistral", seed=0, versions={}, phases=[
        PhaseRecord(index=k, name=names[k], status="done", eval=e, eval_status="done", eval_groups=groups or {},
                    eval_settings=settings, data={"languages": {"fr": 1, "de": 1}} if k else None)
        for k, e in enumerate(evals)])


def _paper_phase(ifeval: float, xquad_de: float) -> dict[str, dict[str, float]]:
    """One phase's record on the paper's benchmarks, next to metrics the aggregates must not use."""
    return {
        "ifeval": {"prompt_level_strict_acc": ifeval, "inst_level_strict_acc": 0.99},
        "mmlu": {"acc": 0.50}, "hellaswag": {"acc_norm": 0.70, "acc": 0.99}, "cft_xlsum_en": {"rougeL": 0.10},
        "xquad_de": {"f1": xquad_de, "exact": 0.99}, "xquad_es": {"f1": 0.40}, "mlqa_de_de": {"f1": 0.60},
        "global_mmlu_fr": {"acc": 0.45}, "cft_xlsum_fr": {"rougeL": 0.05}, "cft_xlsum_es": {"rougeL": 0.15},
        "cft_langfid_fr": {"langfid": 0.90, "chrf": 0.99}, "cft_langfid_de": {"langfid": 0.70, "chrf": 0.99},
    }


# ------------------------------------------------------------------------------------------------
# the paper's aggregates
# ------------------------------------------------------------------------------------------------


def test_paper_view_averages_each_benchmark_over_its_languages_first() -> None:
    run = _manifest(_paper_phase(ifeval=0.30, xquad_de=0.20), _paper_phase(ifeval=0.10, xquad_de=0.60))
    (p0, p1) = paper_scores(phase_scores(run, PAPER_TASKS))
    # Phase 0. EA over IFEval 0.30, MMLU 0.50, HellaSwag 0.70, XLSum-en 0.10: 1.60 / 4 = 0.40.
    # MA, benchmark first: XQuAD (de 0.20, es 0.40) = 0.30; MLQA (de) 0.60; Global-MMLU (fr) 0.45;
    # XLSum (fr 0.05, es 0.15) = 0.10 -> (0.30 + 0.60 + 0.45 + 0.10) / 4 = 1.45 / 4 = 0.3625.
    # (A mean over the six units would be 1.85 / 6 = 0.3083: not the paper's.)
    # Language fidelity beside MA, not in it: (fr 0.90 + de 0.70) / 2 = 0.80. Combined (0.40 + 0.3625) / 2 = 0.38125.
    assert (p0.ea, p0.ma, p0.fidelity, p0.combined) == pytest.approx((0.40, 0.3625, 0.80, 0.38125))
    assert p0.benchmarks[("MA", "xquad")] == pytest.approx(0.30)
    assert p0.benchmarks[("EA", "xlsum")] == pytest.approx(0.10) and p0.benchmarks[("MA", "xlsum")] == pytest.approx(0.10)
    # Phase 1: EA (0.10 + 0.50 + 0.70 + 0.10) / 4 = 0.35; XQuAD (0.60 + 0.40) / 2 = 0.50 ->
    # MA (0.50 + 0.60 + 0.45 + 0.10) / 4 = 0.4125; Combined (0.35 + 0.4125) / 2 = 0.38125.
    assert (p1.ea, p1.ma, p1.combined) == pytest.approx((0.35, 0.4125, 0.38125))


def test_paper_coverage_names_what_is_missing_and_what_stands_in() -> None:
    run = _manifest(_paper_phase(ifeval=0.30, xquad_de=0.20))
    notes = paper_coverage(phase_scores(run, PAPER_TASKS)).notes()
    assert notes == [
        "EA over 4 of the paper's 5 benchmarks: AlpacaEval missing (AlpacaEval needs an LLM judge and the recipe "
        "sets none (eval.judge: a local model or an OpenAI-compatible endpoint))",
        "language fidelity (langfid) is reported beside MA, not inside it",
    ]
    smoke = _manifest({"cft_smoke_en_mc": {"acc": 0.5}, "cft_smoke_en_gen": {"rougeL": 0.5},
                       "cft_smoke_ml_fr": {"chrf": 0.5}}, groups=SMOKE_GROUPS)
    coverage = paper_coverage(phase_scores(smoke, SMOKE_TASKS))
    assert coverage.missing["EA"] == ["ifeval", "alpacaeval", "mmlu", "hellaswag", "xlsum"]
    assert coverage.extra == {"EA": ["smoke_en_gen", "smoke_en_mc"], "MA": ["smoke_ml"]}


def test_a_unit_without_a_declared_benchmark_is_a_benchmark_of_its_own_and_said_so() -> None:
    scores = [PhaseScores(0, "base", units={"t_a": 0.2, "t_b": 0.6, "t_c": 0.4, "t_d": 0.8, "t_e": 0.3},
                          semantics={"t_a": Semantics("EA", "en", "acc"), "t_b": Semantics("EA", "en", "acc"),
                                     "t_c": Semantics("MA", "fr", "acc", "xquad"),
                                     "t_d": Semantics("MA", "fr", "acc", "xquad"),
                                     "t_e": Semantics("MA", "de", "acc", "xquad")})]
    (p,) = paper_scores(scores)
    # t_a and t_b are two benchmarks (not one of two units): EA (0.2 + 0.6) / 2 = 0.4.
    # XQuAD, languages first: fr (0.4 + 0.8) / 2 = 0.6, de 0.3 -> 0.45 (its three units' mean would be 0.5).
    assert set(p.benchmarks) == {("EA", "t_a"), ("EA", "t_b"), ("MA", "xquad")}
    assert (p.ea, p.ma) == pytest.approx((0.4, 0.45))
    assert "no benchmark declared (metadata.cft.benchmark), each counted as a benchmark of its own: t_a, t_b" \
        in paper_coverage(scores).notes()


def test_every_shipped_task_declares_its_benchmark() -> None:
    shipped = load_catalog(tasks_dir())
    assert [name for name, s in shipped.declared.items() if s.benchmark is None] == []
    benchmarks = {(s.ability, s.benchmark) for s in shipped.declared.values()}
    aggregation = paper_numbers().aggregation
    # every benchmark of the paper but AlpacaEval (no judge here) has tasks, under the ability the paper counts it in
    assert {("EA", b) for b in aggregation.EA if b != "alpacaeval"} <= benchmarks
    assert {("MA", b) for b in [*aggregation.MA, *aggregation.beside_MA]} <= benchmarks


def test_a_benchmark_declaration_is_checked_like_the_rest(tmp_path: Path) -> None:
    for name, cft in (("t_ok", "{ability: MA, language: fr, metric: f1, benchmark: xquad}"),
                      ("t_caps", "{ability: MA, language: fr, metric: f1, benchmark: XQuAD}"),
                      ("t_typo", "{ability: MA, language: fr, metric: f1, benchmrk: xquad}")):
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\nmetadata:\n  cft: {cft}\n")
    for i, bench in enumerate(("mlqa", "xquad")):  # one lm-eval task, declared twice with different benchmarks
        (tmp_path / f"g{i}.yaml").write_text(f"group: g{i}\ntask: [xquad_fr]\nmetadata:\n  cft:\n    members:\n"
                                             f"      xquad_fr: {{ability: MA, language: fr, metric: f1, benchmark: {bench}}}\n")
    catalog = load_catalog(tmp_path)
    assert catalog.declared["t_ok"].benchmark == "xquad"
    assert "benchmark: expected a lower-case name such as 'xquad', got 'XQuAD'" in catalog.problems["t_caps"]
    assert "unknown key(s) benchmrk" in catalog.problems["t_typo"]
    assert "declared twice, differently" in catalog.problems["xquad_fr"]


def test_report_md_leads_with_the_paper_view_and_keeps_the_unit_view(tmp_path: Path) -> None:
    run = _manifest(_paper_phase(ifeval=0.30, xquad_de=0.20), _paper_phase(ifeval=0.10, xquad_de=0.60))
    text = write_report(tmp_path, run, PAPER_TASKS).read_text()
    paper, unit = text.index("## The paper's aggregates"), text.index("(the finer view)")
    assert paper < unit
    # phase 1 (numbers above): ΔEA 0.35 - 0.40 = -0.05, ΔMA 0.4125 - 0.3625 = +0.05, ΔCombined 0, forgetting 0.05
    assert "| 1 english | 0.3500 | 0.4125 | 0.3812 | 0.8000 | -0.0500 | +0.0500 | +0.0000 | 0.0500 |" in text
    assert "| xquad | MA | de, es | 0.3000 | 0.5000 |" in text
    # the unit view: MA seen = fr, de units, langfid inside: (0.20 + 0.60 + 0.45 + 0.05 + 0.90 + 0.70) / 6 = 0.4833
    assert "| 0 base | 0.4000 | 0.4833 |" in text
    summary_titles = [t.title for t in rich_tables(run, PAPER_TASKS)[:1] + rich_tables(run, PAPER_TASKS, view="unit")[:1]]
    assert summary_titles[0].startswith("The paper's aggregates") and "MA-s seen" in summary_titles[1]


# ------------------------------------------------------------------------------------------------
# cft tables
# ------------------------------------------------------------------------------------------------


def _smoke(en_mc: float, en_gen: float, de: float, es: float, fr: float) -> dict[str, dict[str, float]]:
    return {"cft_smoke_en_mc": {"acc": en_mc, "acc_norm": 0.99}, "cft_smoke_en_gen": {"rougeL": en_gen},
            "cft_smoke_ml_de": {"chrf": de, "langfid": 0.99}, "cft_smoke_ml_es": {"chrf": es, "langfid": 0.99},
            "cft_smoke_ml_fr": {"chrf": fr, "langfid": 0.99}, "cft_smoke_en": {"acc": 0.99}}


def _run_dir(path: Path, recipe: str, *evals: dict, limit: float | None = None) -> Path:
    """A run directory as cft-train leaves it, with hand-made scores: the recipe's resolved YAML and run.json."""
    path.mkdir(parents=True)
    resolved = load_recipe(REPO / "recipes" / recipe, [f"output_dir={path}"])
    (path / RESOLVED_RECIPE).write_text(dump_recipe(resolved))
    manifest = _manifest(*evals, groups=SMOKE_GROUPS, limit=limit, recipe=f"recipes/{recipe}")
    for rec, phase in zip(manifest.phases[1:], resolved.run_phases()):
        rec.name = phase.name
    manifest.write(path)
    return path


BASE = _smoke(en_mc=0.40, en_gen=0.20, de=0.30, es=0.50, fr=0.10)  # EA 0.30, MA (0.3 + 0.5 + 0.1) / 3 = 0.30
ENGLISH = _smoke(en_mc=0.80, en_gen=0.40, de=0.10, es=0.20, fr=0.30)  # EA 0.60, MA 0.20


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        # phase 2: EA (0.5 + 0.3) / 2 = 0.40, MA (0.6 + 0.3 + 0.3) / 3 = 0.40, Combined 0.40, forgetting 0.6 - 0.4 = 0.20
        "none": _run_dir(tmp_path / "smoke", "smoke.yaml", BASE, ENGLISH, _smoke(0.50, 0.30, 0.60, 0.30, 0.30)),
        # phase 2: EA (0.7 + 0.3) / 2 = 0.50, MA (0.5 + 0.2 + 0.2) / 3 = 0.30, Combined 0.40
        "gr5": _run_dir(tmp_path / "smoke_gr5", "smoke_gr5.yaml", BASE, ENGLISH, _smoke(0.70, 0.30, 0.50, 0.20, 0.20)),
        # phase 2: EA (0.6 + 0.4) / 2 = 0.50, MA (0.7 + 0.4 + 0.4) / 3 = 0.50, Combined 0.50
        "lf_h1": _run_dir(tmp_path / "smoke_lf_h1", "smoke_lf_h1.yaml", BASE, ENGLISH,
                          _smoke(0.60, 0.40, 0.70, 0.40, 0.40), limit=8),
        # one phase: EA (0.6 + 0.2) / 2 = 0.40, MA (0.2 + 0.2 + 0.2) / 3 = 0.20, Combined 0.30
        "mixed": _run_dir(tmp_path / "smoke_mixed", "smoke_mixed.yaml", BASE, _smoke(0.60, 0.20, 0.20, 0.20, 0.20)),
    }


def _filled_paper() -> PaperNumbers:
    """The shipped file with a few numbers filled, in percent as a paper would print them."""
    raw = json.loads(PAPER_NUMBERS.read_text())
    raw["scale"] = 100
    for row in raw["main"]["rows"]:
        if (row["model"], row["setting"]) == ("mistral-7b", "dissimilar"):
            ea, ma = (70.0, 20.0) if row["phase"] == "phase1" else (50.0, 40.0)
            row.update(EA=ea, MA=ma, Combined=(ea + ma) / 2, source="test")
    for row in raw["mitigation"]["rows"]:
        if row["model"] == "mistral-7b" and row["condition"] in ("none", "GR_5"):
            ea, ma = (50.0, 40.0) if row["condition"] == "none" else (60.0, 38.0)
            row.update(EA=ea, MA=ma, Combined=(ea + ma) / 2, source="test")
    return PaperNumbers.model_validate(raw)


def _table(result: dict, name: str, **match) -> dict:
    (row,) = [r for r in result[name] if all((r["phase"] or {}).get(k, r.get(k)) == v for k, v in match.items())]
    return row


def test_tables_put_the_papers_numbers_beside_ours_with_deltas(runs: dict[str, Path]) -> None:
    paper = _filled_paper()
    result = build([read_run(runs[k], "dissimilar", paper_model="mistral-7b") for k in ("none", "gr5", "lf_h1")]
                   + [read_run(runs["mixed"], paper_model="mistral-7b")], paper)
    # Main table, phase 2 of the no-mitigation run: ours EA 0.40 vs the paper's 50 / 100 = 0.50 -> Δ -0.10;
    # MA 0.40 vs 0.40 -> 0; forgetting ours 0.20 vs the paper's (70 - 50) / 100 = 0.20 -> 0.
    row = _table(result, "main", index=2, recipe="smoke")
    assert row["phase"]["paper"] == "phase2" and row["setting"] == "dissimilar"
    assert (row["ours"]["ea"], row["paper"]["ea"], row["delta"]["ea"]) == pytest.approx((0.40, 0.50, -0.10))
    assert row["delta"]["ma"] == pytest.approx(0.0) and row["delta"]["forgetting"] == pytest.approx(0.0)
    # phase 1 is the paper's Phase 1: EA 0.60 vs 0.70 -> -0.10; the base has no paper row
    assert _table(result, "main", index=1, recipe="smoke")["delta"]["ea"] == pytest.approx(-0.10)
    assert _table(result, "main", index=0, recipe="smoke")["paper"]["ea"] is None
    # the mixed baseline is in the main table, its one model the paper's mixed Phase 2 (not transcribed here)
    mixed = _table(result, "main", index=1, recipe="smoke_mixed")
    assert mixed["setting"] == "mixed" and mixed["ours"]["combined"] == pytest.approx(0.30)
    assert mixed["phase"]["paper"] == "phase2" and _table(result, "main", index=0, recipe="smoke_mixed")["phase"]["paper"] is None
    # Mitigation table, GR_5: ours vs none EA 0.50 - 0.40 = +0.10, MA 0.30 - 0.40 = -0.10, Combined 0;
    # the paper's vs none EA (60 - 50) / 100 = +0.10; ours - paper EA 0.50 - 0.60 = -0.10, MA 0.30 - 0.38 = -0.08.
    gr5 = _table(result, "mitigation", condition="GR_5")
    assert [gr5["vs_none"][m] for m in ("ea", "ma", "combined")] == pytest.approx([0.10, -0.10, 0.0])
    assert gr5["paper"]["vs_none"]["ea"] == pytest.approx(0.10)
    assert (gr5["delta"]["ea"], gr5["delta"]["ma"]) == pytest.approx((-0.10, -0.08))
    lf = _table(result, "mitigation", condition="LF_H1")  # the paper's LF_H1 is not filled in: n/a
    assert [lf["vs_none"][m] for m in ("ea", "ma", "combined")] == pytest.approx([0.10, 0.10, 0.10])
    assert lf["paper"]["ea"] is None and lf["delta"]["ea"] is None
    assert _table(result, "mitigation", condition="Spectrum")["runs"] == []  # the paper's condition, no run of ours
    text = markdown(result)
    assert "| dissimilar | 2 french_german (Phase 2) | 0.400 (paper: 0.500, Δ -0.100) |" in text
    assert "| dissimilar | GR_5 | 0.500 (paper: 0.600, Δ -0.100) |" in text
    assert "+0.100 (paper: +0.100, Δ +0.000)" in text  # GR_5: ΔEA vs none, ours beside the paper's
    assert "| dissimilar | LF_H1 | 0.500 (paper: n/a) |" in text and "| dissimilar | Spectrum (no run) |" in text
    assert "The paper's numbers above come from: test." in text


def test_tables_flag_every_comparison_that_is_not_like_for_like(runs: dict[str, Path]) -> None:
    result = build([read_run(runs["none"]), read_run(runs["lf_h1"], "dissimilar", paper_model="mistral-7b")])
    notes = result["notes"]

    def of(row: dict) -> list[str]:
        return [notes[str(i)] for i in row["notes"]]

    unlabelled = of(_table(result, "main", index=2))
    assert "ours: LoRA r=8 on an NF4 base (QLoRA); the paper: full fine-tuning" in unlabelled
    assert any(n.startswith("EA over 0 of the paper's 5 benchmarks") and "AlpacaEval needs an LLM judge" in n
               for n in unlabelled)
    assert "EA averages benchmarks the paper does not use: smoke_en_gen, smoke_en_mc" in unlabelled
    assert any(n.startswith("base builtin:tiny-mistral is none of the paper's models") for n in unlabelled)
    assert any(n.startswith("pair not known from the recipe name 'smoke'") for n in unlabelled)
    assert not any("eval.limit" in n for n in unlabelled)
    lf = of(_table(result, "mitigation", condition="LF_H1", recipe="smoke_lf_h1"))
    assert "scored on at most 8 examples per task (eval.limit); the paper scores the full test sets" in lf
    assert "base builtin:tiny-mistral compared with the paper's Mistral-7B (--paper-model)" in lf
    assert "no single no-mitigation run of this pair and model to compare with: Δ vs none left out" in lf
    assert not any(n.startswith("pair not known") for n in lf)
    assert "the paper's dissimilar pair is the vendor's Instruct model -> MultiAlpaca (DES 0.746), one training " \
           "phase; this run trains 2 phases (its own English phase first)" in lf


def test_a_study_is_read_cell_by_cell_and_its_seeds_are_averaged(tmp_path: Path) -> None:
    study = tmp_path / "study"
    for seed, fr in ((0, 0.30), (1, 0.60)):
        _run_dir(study / "cells" / "dissimilar" / f"seed_{seed}", "smoke.yaml", BASE, ENGLISH,
                 _smoke(0.50, 0.30, 0.60, 0.30, fr))
    out = tmp_path / "t.json"
    text = tables([], study=str(study), out=str(out))
    result = json.loads(out.read_text())
    row = _table(result, "main", index=2)
    # the pair from the condition's name; MA per seed (0.6 + 0.3 + 0.3) / 3 = 0.40 and (0.6 + 0.3 + 0.6) / 3 = 0.50
    assert row["setting"] == "dissimilar" and row["n"] == 2 and row["ours"]["ma"] == pytest.approx(0.45)
    assert "mean over 2 runs" in result["notes"].values()
    assert "| dissimilar | 2 french_german (Phase 2) | 0.400 (paper: n/a) | 0.450 (paper: n/a) |" in text


def test_two_recipes_of_one_condition_are_two_rows_against_the_same_baseline(runs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    longer = _run_dir(tmp_path / "smoke_gr5_long", "smoke_gr5.yaml", BASE, ENGLISH, _smoke(0.30, 0.30, 0.40, 0.40, 0.40))
    manifest = RunManifest.read(longer)
    manifest.recipe = "recipes/smoke_gr5_long.yaml"
    manifest.write(longer)
    result = build([read_run(p, "dissimilar") for p in (runs["none"], runs["gr5"], longer)])
    rows = [r for r in result["mitigation"] if r["condition"] == "GR_5"]
    # vs none (phase 2 EA 0.40): smoke_gr5 EA 0.50 -> +0.10; smoke_gr5_long EA (0.3 + 0.3) / 2 = 0.30 -> -0.10
    assert [(r["recipe"], round(r["vs_none"]["ea"], 6)) for r in rows] == [("smoke_gr5", 0.10), ("smoke_gr5_long", -0.10)]


def test_a_run_is_read_where_its_training_data_is_not(runs: dict[str, Path]) -> None:
    """A run directory copied from the machine that trained it: its recipe names data files not here."""
    resolved = runs["gr5"] / RESOLVED_RECIPE
    resolved.write_text(resolved.read_text().replace("builtin:smoke/multi_fr_de.jsonl", "/gpu-box/data/fr_de.jsonl"))
    assert "/gpu-box/data/fr_de.jsonl" in resolved.read_text()
    run = read_run(runs["gr5"], "similar")
    assert (run.condition, run.setting) == ("GR_5", "similar") and run.phases[-1].ea == pytest.approx(0.50)
    resolved.write_text("model: [not, a, mapping]\n")
    with pytest.raises(CftError, match="cannot read the run's recipe"):
        read_run(runs["gr5"])


def test_cft_tables_prints_markdown_writes_json_and_refuses_bad_arguments(runs: dict[str, Path], tmp_path: Path,
                                                                           capsys) -> None:
    out = tmp_path / "tables.json"
    assert cft_main(["tables", f"{runs['none']}=similar", str(runs["gr5"]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## Main table" in text and "## Mitigation table" in text and "paper: n/a" in text
    assert "none transcribed yet" in text  # the shipped numbers are all null: said, not invented
    result = json.loads(out.read_text())
    assert {"paper", "main", "mitigation", "notes", "runs"} <= set(result)
    assert [r["condition"] for r in result["runs"]] == ["none", "GR_5"]
    assert result["runs"][0]["setting_from"] == "the command line"
    assert cft_main(["tables", f"{runs['none']}=alike"]) == 2
    assert "expected RUN_DIR or RUN_DIR=PAIR with PAIR one of similar, dissimilar, mixed" in capsys.readouterr().err
    assert cft_main(["tables"]) == 2
    assert cft_main(["tables", str(runs["none"]), "--paper-model", "gpt-2"]) == 2
    assert cft_main(["tables", str(tmp_path / "nowhere")]) == 2
    assert "no run.json here" in capsys.readouterr().err


def test_paper_numbers_must_cite_their_source_and_scale() -> None:
    shipped = paper_numbers()
    rows = [*shipped.main.rows, *shipped.mitigation.rows]
    assert all(v is None for r in rows for v in (r.EA, r.MA, r.Combined))  # not transcribed: none invented
    raw = json.loads(PAPER_NUMBERS.read_text())
    raw["main"]["rows"][0]["EA"] = 55.0
    with pytest.raises(ValueError, match="a number without its source"):
        PaperNumbers.model_validate(raw)
    raw["main"]["rows"][0]["source"] = "Table 2, v3"
    with pytest.raises(ValueError, match="scale: set it"):
        PaperNumbers.model_validate(raw)
    raw["scale"] = 100
    assert PaperNumbers.model_validate(raw).to_unit(55.0) == pytest.approx(0.55)
    with pytest.raises(CftError):
        paper_numbers(Path("/nonexistent/paper_numbers.json"))


@pytest.mark.slow
def test_cft_tables_on_real_smoke_runs(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """The acceptance: real smoke runs, a mitigation among them, both tables with the paper's column."""
    from cft_adapters.cli import main

    lf_h1 = tmp_path / "smoke_lf_h1"
    assert main([str(REPO / "recipes" / "smoke_lf_h1.yaml"), f"output_dir={lf_h1}"]) == 0
    capsys.readouterr()
    out = tmp_path / "tables.json"
    assert cft_main(["tables", f"{smoke_run}=dissimilar", f"{lf_h1}=dissimilar", "--paper-model", "mistral-7b",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    tasks = [*SMOKE_TASKS, "cft_smoke_alpacaeval"]  # the smoke recipe also scores AlpacaEval, judged
    none = [p for p in paper_scores(phase_scores(RunManifest.read(smoke_run), tasks))]
    lf = paper_scores(phase_scores(RunManifest.read(lf_h1), tasks))
    main_rows = [r for r in result["main"]]
    assert [r["phase"]["index"] for r in main_rows] == [0, 1, 2]
    assert [r["ours"]["ea"] for r in main_rows] == pytest.approx([p.ea for p in none])
    row = _table(result, "mitigation", condition="LF_H1")
    assert row["vs_none"]["combined"] == pytest.approx(lf[-1].combined - none[-1].combined)
    assert "| dissimilar | LF_H1 |" in text and "(paper: n/a)" in text
    assert "ours: LoRA r=8 on an NF4 base (QLoRA); the paper: full fine-tuning" in text
    assert "AlpacaEval judged by builtin:tiny-mistral (local); AlpacaEval 2.0's own judge is GPT-4 Turbo" in text
