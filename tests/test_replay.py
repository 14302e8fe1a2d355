from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from cft_adapters.cli import main
from cft_adapters.errors import CftError, RecipeError
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import load_recipe
from cft_adapters.replay import ReplayCollator, is_replay_slot

from conftest import SMOKE

GENERATIVE = ("phases[1].replay={kind: generative, ratio: 0.1, max_new_tokens: 12, min_new_tokens: 4, generation_batch_size: 4, "
              "prompts: {path: 'builtin:smoke/en_prompts.jsonl', language: en}}")


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5])
def test_replay_share_is_exact_in_every_window(ratio: float) -> None:
    replay = [{"input_ids": [9, 9, 9], "src": "replay"}]
    collator = ReplayCollator(lambda batch: batch, replay, ratio, seed=0)
    stream = []
    for _ in range(37):  # batches of 7: windows cross batch boundaries
        stream += [f.get("src", "phase") for f in collator([{"input_ids": [1, 2], "src": "phase"} for _ in range(7)])]
    window = round(1 / ratio)
    for start in range(len(stream) - window + 1):
        assert stream[start:start + window].count("replay") == 1, start
    assert collator.replayed == stream.count("replay")
    assert collator.achieved_ratio == pytest.approx(ratio, abs=1 / len(stream))
    assert collator.replay_tokens == 3 * collator.replayed


def test_schedule_resumes_at_the_same_slot() -> None:
    a = ReplayCollator(lambda b: b, [{"input_ids": [0]}], 0.1, seed=0)
    marks = [is_replay_slot(p, 0.1) for p in range(100)]
    b = ReplayCollator(lambda b: b, [{"input_ids": [0], "r": 1}], 0.1, seed=0)
    b.seek(40)
    out = b([{"input_ids": [1], "r": 0} for _ in range(20)])
    assert [bool(f["r"]) for f in out] == marks[40:60]
    assert a.position == 0


def test_resume_position_counts_the_short_last_batch_of_each_epoch() -> None:
    """64 examples in batches of 6: 11 batches an epoch, the last of 4. Step 16 is 5 steps into the
    second epoch: 64 + 30 = 94 examples before it, not 16 x 6 = 96."""
    from cft_adapters.replay import examples_before_step

    kw = dict(examples_per_epoch=64, batches_per_epoch=11, batch_size=6)
    assert examples_before_step(16, accumulation=1, **kw) == 94
    assert examples_before_step(11, accumulation=1, **kw) == 64
    assert examples_before_step(3, accumulation=2, **kw) == 36  # 6 steps an epoch, 2 batches each
    assert examples_before_step(7, accumulation=2, **kw) == 64 + 12


def test_seek_restores_the_counters_of_an_uninterrupted_stream() -> None:
    pool = [{"input_ids": [0] * (i + 1)} for i in range(7)]
    straight = ReplayCollator(lambda b: b, pool, 0.1, seed=2)
    for _ in range(20):
        straight([{"input_ids": [9, 9]} for _ in range(6)])
    resumed = ReplayCollator(lambda b: b, pool, 0.1, seed=2)
    resumed.seek(70)
    for _ in range(50 // 5):
        resumed([{"input_ids": [9, 9]} for _ in range(5)])
    assert (resumed.replayed, resumed.seen, resumed.replay_tokens) == (straight.replayed, straight.seen, straight.replay_tokens)
    assert straight.replayed == 12


def test_bad_replay_settings_are_recipe_errors() -> None:
    with pytest.raises(RecipeError, match=r"phases\[1\]\.replay\.ratio: Input should be less than 1"):
        load_recipe(SMOKE, ["phases[1].replay={kind: real, ratio: 1.5}"])
    with pytest.raises(RecipeError, match=r"phases\[0\]\.replay: real replay without 'source' replays earlier"):
        load_recipe(SMOKE, ["phases[0].replay={kind: real, ratio: 0.1}"])
    with pytest.raises(RecipeError, match="kind 'generative' needs 'prompts'"):
        load_recipe(SMOKE, ["phases[1].replay={kind: generative, ratio: 0.1}"])


def test_empty_prompt_source_fails_at_dry_run(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "--dry-run",
                 f"phases[1].replay={{kind: generative, ratio: 0.1, prompts: {{path: '{empty}', language: en}}}}"])
    assert code == 2
    assert "phases[1].replay.prompts:" in capsys.readouterr().err


def test_mostly_empty_generations_stop_the_phase(monkeypatch, tmp_path) -> None:
    import cft_adapters.replay as replay
    from rich.console import Console

    cfg = load_recipe(SMOKE, [GENERATIVE]).phases[1].replay
    monkeypatch.setattr(replay, "generate_answers", lambda model, tok, prompts, **kw: (
        ["" if i % 3 else "ok" for i in range(len(prompts))], {"seconds": 1.0}))
    with pytest.raises(CftError, match=r"of \d+ generated replay answers came back empty"):
        replay.build_pool(cfg, where="phases[1].replay", phase_dir=tmp_path, phase_examples=64, seed=0, model=None,
                          tokenizer=None, source_model="phase_1", earlier_sources=[], console=Console(quiet=True),
                          key={"test": 1})
    assert not (tmp_path / "replay.jsonl").exists()


@pytest.mark.slow
def test_replay_batches_carry_the_completion_only_mask(tmp_path, tiny_model_path) -> None:
    """Through TRL's real preparation and collator: replay rows mask the prompt like phase rows."""
    from trl import SFTTrainer

    from cft_adapters.data import load_phase_data
    from cft_adapters.hf_configs import sft_config
    from cft_adapters.modeling import load_base_model, load_tokenizer, new_adapter
    from cft_adapters.phases import PhaseRunner
    from cft_adapters.replay import ReplayPool

    recipe = load_recipe(SMOKE, ["phases[1].replay={kind: real, ratio: 0.25}"])
    tok = load_tokenizer(recipe.model, str(tiny_model_path))
    model = new_adapter(load_base_model(recipe.model, str(tiny_model_path)), recipe.adapter)
    data = load_phase_data(recipe.phases[1], 1, seed=0)
    trainer = SFTTrainer(model=model, args=sft_config(recipe.phase_training(1), recipe.model, tmp_path),
                         train_dataset=data.for_trainer(), processing_class=tok)
    answer = "REPLAYED ANSWER"
    pool = ReplayPool("real", [{"prompt": [{"role": "user", "content": "Name a colour."}], "answer": answer}])
    collator = PhaseRunner._attach_replay(trainer, pool, recipe.phases[1].replay, recipe.phase_training(1))
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_ids = tok.apply_chat_template(pool.rows[0]["prompt"], add_generation_prompt=True)
    prompt_ids = list(prompt_ids["input_ids"]) if hasattr(prompt_ids, "keys") else list(prompt_ids)
    found = 0
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        if ids[: len(prompt_ids)] != prompt_ids:
            continue
        found += 1
        assert all(label == -100 for label in labels[: len(prompt_ids)])
        learned = [t for t, label in zip(ids, labels) if label != -100]
        assert answer in tok.decode(learned)
    assert found == 2  # batch of 8 at ratio 0.25
    # accelerate's loader collates one batch ahead, so the collator may already have counted the next one
    assert collator.replayed in (2, 4)


@pytest.mark.slow
def test_generative_pool_comes_from_the_phase1_adapter_and_is_reused_on_resume(tmp_path) -> None:
    from peft import PeftModel

    from cft_adapters.modeling import load_base_model, load_tokenizer
    from cft_adapters.replay import generate_answers

    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", GENERATIVE]) == 0
    manifest = RunManifest.read(out)
    info = manifest.phases[2].replay
    assert info["kind"] == "generative" and info["ratio_requested"] == 0.1
    assert info["replayed_examples"] == math.floor(info["stream_examples"] * 0.1)
    assert info["ratio_achieved"] == pytest.approx(info["replayed_examples"] / info["stream_examples"], abs=1e-6)
    replay_file = out / "phase_2_french_german" / "replay.jsonl"
    rows = [json.loads(line) for line in replay_file.read_text().splitlines()]
    assert len(rows) == info["pool_examples"] == math.ceil(0.1 * 64)
    assert {r["source_model"] for r in rows} == {"phase_1_english/adapter"}

    recipe = load_recipe(out / "recipe.resolved.yaml")
    tok = load_tokenizer(recipe.model, manifest.base_model_path)
    settings = dict(batch_size=4, max_new_tokens=12, min_new_tokens=4)
    phase1 = PeftModel.from_pretrained(load_base_model(recipe.model, manifest.base_model_path), str(out / "phase_1_english/adapter"))
    direct, _ = generate_answers(phase1, tok, [r["prompt"] for r in rows], **settings)
    assert direct == [r["answer"] for r in rows]
    base_answers, _ = generate_answers(load_base_model(recipe.model, manifest.base_model_path), tok, [r["prompt"] for r in rows], **settings)
    assert base_answers != direct

    # Resume: phase 2 cut short after its pool was written. The rerun trains it again from the same pool.
    digest = hashlib.sha256(replay_file.read_bytes()).hexdigest()
    stamp = replay_file.stat().st_mtime_ns
    data = json.loads((out / "run.json").read_text())
    data["phases"][2].update(status="running", checkpoint=None)
    (out / "run.json").write_text(json.dumps(data))
    shutil.rmtree(out / "phase_2_french_german" / "adapter")
    (out / "phase_2_french_german" / "train.json").unlink()
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", GENERATIVE]) == 0
    assert hashlib.sha256(replay_file.read_bytes()).hexdigest() == digest
    assert replay_file.stat().st_mtime_ns == stamp
    assert RunManifest.read(out).phases[2].replay["pool_reused"] is True


@pytest.mark.slow
def test_mixed_baseline_sees_the_union_and_budgets_match_tokens(tmp_path) -> None:
    budget = 9000
    mixed, phased = tmp_path / "mixed", tmp_path / "phased"
    assert main([str(SMOKE), f"output_dir={mixed}", "eval.tasks=[]", "mixed_baseline=true",
                 f"training.token_budget={budget}"]) == 0
    assert main([str(SMOKE), f"output_dir={phased}", "eval.tasks=[]", "phases[0].training.token_budget=4500",
                 "phases[1].training.token_budget=4500"]) == 0
    m = RunManifest.read(mixed)
    assert [p.name for p in m.phases] == ["base", "mixed"]
    assert m.phases[1].data["languages"] == {"de": 32, "en": 64, "fr": 32}
    p = RunManifest.read(phased)
    one_batch = 8 * 256  # per_device_train_batch_size x max_length: the most one optimizer step can add
    mixed_tokens = m.phases[1].train.tokens
    phased_tokens = p.phases[1].train.tokens + p.phases[2].train.tokens
    assert budget <= mixed_tokens < budget + one_batch
    assert all(4500 <= ph.train.tokens < 4500 + one_batch for ph in p.phases[1:])
    assert abs(mixed_tokens - phased_tokens) <= 2 * one_batch


def test_mixed_baseline_refuses_per_phase_settings() -> None:
    with pytest.raises(RecipeError, match=r"phases\[1\]\.replay: not used with mixed_baseline"):
        load_recipe(SMOKE, ["mixed_baseline=true", "phases[1].replay={kind: real, ratio: 0.1}"])


def test_data_parallel_ranks_follow_the_single_process_schedule() -> None:
    """Rank r's local slot p is global slot p*W + r: together the ranks replay exactly what one process
    would, at the same global slots, and never the same example at once."""
    pool = [{"input_ids": [100 + i]} for i in range(7)]
    stream = [{"input_ids": [i]} for i in range(64)]
    single = ReplayCollator(lambda b: b, pool, 0.25, seed=3)
    expected = single(stream)
    ranks = [ReplayCollator(lambda b: b, pool, 0.25, seed=3, rank=r, world_size=2) for r in range(2)]
    got = [None] * 64
    for r, collator in enumerate(ranks):
        for local, feature in enumerate(collator([stream[g] for g in range(r, 64, 2)])):
            got[local * 2 + r] = feature
    assert got == expected
    assert sum(c.replayed for c in ranks) == single.replayed == 16
