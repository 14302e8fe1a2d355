from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch

from cft_adapters.cli import main
from cft_adapters.errors import CftError, RecipeError
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import load_recipe
from cft_adapters.replay import ReplayCollator

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
    """A collator sought to slot 40 hands out what an uninterrupted one did at slots 40-59: the same
    slots (ratio 0.1: every tenth, 49 and 59) with the same pool examples (the 5th and 6th replays)."""
    pool = [{"input_ids": [100 + i]} for i in range(5)]
    stream = [{"input_ids": [i]} for i in range(60)]
    straight = ReplayCollator(lambda b: b, pool, 0.1, seed=0)
    whole = straight(stream[:25]) + straight(stream[25:])
    assert [p for p, f in enumerate(whole) if f["input_ids"][0] >= 100] == [9, 19, 29, 39, 49, 59]
    replayed = [whole[p]["input_ids"][0] for p in (9, 19, 29, 39, 49, 59)]
    assert sorted(replayed[:5]) == [100, 101, 102, 103, 104] and replayed[5] == replayed[0]  # a pass, then again
    resumed = ReplayCollator(lambda b: b, pool, 0.1, seed=0)
    resumed.seek(40)
    assert resumed(stream[40:60]) == whole[40:60]
    assert (resumed.position, resumed.replayed) == (straight.position, straight.replayed) == (60, 6)


def _chat_example(tok, question: str, answer: str) -> dict[str, list[int]]:
    """One example as TRL's dataset preparation leaves it: the chat's token ids, and labels with the
    prompt masked (-100) and the answer learned."""
    prompt = list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"])
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = list(tok.apply_chat_template(chat)["input_ids"])
    assert ids[: len(prompt)] == prompt
    return {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]}


def test_collator_mixes_tokenized_replay_rows_into_real_batches(tiny_model_path) -> None:
    """Tokenized chats through TRL's own collator: at ratio 0.25 every fourth row of the stream is a
    replay example, whole (its ids and its labels, prompt masked), the other rows are the phase's own,
    and the batch is padded to its longest row, replay rows included."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from cft_adapters.modeling import load_tokenizer
    from cft_adapters.recipe import ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-mistral"), str(tiny_model_path))
    phase = [_chat_example(tok, f"Traduis {i}.", "Bonjour.") for i in range(24)]
    replay = [_chat_example(tok, f"Name a colour for thing number {j}, please.", f"The colour of thing {j} is red.")
              for j in range(3)]
    collator = ReplayCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id), replay, 0.25, seed=0)
    picked = []
    for start in range(0, 24, 6):  # batches of 6: the replay slots 3, 7, 11, ... fall at different rows
        batch = collator(phase[start:start + 6])
        rows = []
        for row in range(6):
            slot = start + row
            n = int(batch["attention_mask"][row].sum())
            got = {"input_ids": batch["input_ids"][row, :n].tolist(), "labels": batch["labels"][row, :n].tolist()}
            assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all() and batch["labels"][row, n:].eq(-100).all()
            if slot % 4 == 3:
                assert got in replay, slot
                picked.append(replay.index(got))
                learned = tok.decode([t for t in got["labels"] if t != -100])
                assert f"The colour of thing {picked[-1]} is red." in learned
            else:
                assert got == phase[slot], slot
            rows.append(got)
        assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
    assert len(picked) == 6 and sorted(picked[:3]) == [0, 1, 2] and picked[3:] == picked[:3]
    assert collator.replayed == 6 and collator.seen == 24
    assert collator.replay_tokens == sum(len(replay[k]["input_ids"]) for k in picked)


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
    with pytest.raises(RecipeError, match="kind 'generative' needs exactly one of 'prompts'"):
        load_recipe(SMOKE, ["phases[1].replay={kind: generative, ratio: 0.1}"])
    with pytest.raises(RecipeError, match="kind 'generative' needs exactly one of 'prompts'"):
        load_recipe(SMOKE, ["phases[1].replay={kind: generative, ratio: 0.1, translate: {}, "
                            "prompts: {path: 'builtin:smoke/en_prompts.jsonl', language: en}}"])
    with pytest.raises(RecipeError, match=r"phases\[1\]\.replay\.translate\.prompt: .*must contain \{text\}"):
        load_recipe(SMOKE, ["phases[1].replay={kind: generative, ratio: 0.1, translate: {prompt: 'Translate.'}}"])


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


def test_an_empty_pool_is_refused_naming_the_replay_key_and_nothing_is_written(monkeypatch, tmp_path) -> None:
    import cft_adapters.replay as replay
    from rich.console import Console

    cfg = load_recipe(SMOKE, [GENERATIVE]).phases[1].replay
    monkeypatch.setattr(replay, "load_prompts", lambda src, where, seed: [])  # a source with no usable prompt
    with pytest.raises(CftError, match=r"phases\[1\]\.replay: the generative replay pool came out empty"):
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
    from cft_adapters.replay import ReplayPool, attach_replay

    recipe = load_recipe(SMOKE, ["phases[1].replay={kind: real, ratio: 0.25}"])
    tok = load_tokenizer(recipe.model, str(tiny_model_path))
    model = new_adapter(load_base_model(recipe.model, str(tiny_model_path)), recipe.adapter)
    data = load_phase_data(recipe.phases[1], 1, seed=0)
    trainer = SFTTrainer(model=model, args=sft_config(recipe.phase_training(1), recipe.model, tmp_path),
                         train_dataset=data.for_trainer(), processing_class=tok)
    answer = "REPLAYED ANSWER"
    pool = ReplayPool("real", [{"prompt": [{"role": "user", "content": "Name a colour."}], "answer": answer}])
    collator = attach_replay(trainer, pool, recipe.phases[1].replay, recipe.phase_training(1))
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


def test_replay_generation_records_no_gradients(tiny_model_path) -> None:
    """Answering thousands of prompts must not build autograd graphs (memory), even when the caller
    has gradients on, as the trainer's process does."""
    from cft_adapters.modeling import load_base_model, load_tokenizer, new_adapter
    from cft_adapters.replay import generate_answers

    recipe = load_recipe(SMOKE)
    tok = load_tokenizer(recipe.model, str(tiny_model_path))
    model = new_adapter(load_base_model(recipe.model, str(tiny_model_path)), recipe.adapter)
    seen = []
    real_generate = model.generate

    def generate(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real_generate(*args, **kwargs)

    model.generate = generate
    assert torch.is_grad_enabled()
    answers, stats = generate_answers(model, tok, [[{"role": "user", "content": "Name a colour."}]], batch_size=1,
                                      max_new_tokens=4, min_new_tokens=4)
    assert len(answers) == 1 and seen == [False]
    assert stats["truncated"] == 1  # no stop token is allowed before the 4th token: cut at max_new_tokens


TRANSLATED = ("phases[1].replay={kind: generative, ratio: 0.1, max_new_tokens: 12, min_new_tokens: 4, "
              "generation_batch_size: 4, translate: {max_new_tokens: 16, batch_size: 1}}")


def test_generative_replay_on_english_versions_of_the_phase_instructions(tmp_path) -> None:
    """The paper's GR: the phase-2 instructions, translated to English by the phase-1 model (here
    'self'), answered by it; each replay row keeps its original and language."""
    from cft_adapters.data import load_source
    from cft_adapters.modeling import load_base_model, load_tokenizer
    from cft_adapters.replay import LANGUAGE_NAMES, generate_answers

    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", TRANSLATED]) == 0
    manifest = RunManifest.read(out)
    info = manifest.phases[2].replay
    rows = [json.loads(line) for line in (out / "phase_2_french_german" / "replay.jsonl").read_text().splitlines()]
    recipe = load_recipe(out / "recipe.resolved.yaml")
    phase_rows = load_source(recipe.phases[1].datasets[0], "x", recipe.phase_training(1).seed)
    originals = {(m["content"], r["language"]) for r in phase_rows for m in r["prompt"] if m["role"] == "user"}
    assert rows and len(rows) <= math.ceil(0.1 * 64)
    for row in rows:
        origin = row["translated_from"]
        assert (origin["instruction"], origin["language"]) in originals  # the pairing: a real phase-2 instruction
        assert origin["language"] in {"fr", "de"} and origin["translator"] == "phase_1_english/adapter"
        assert row["language"] == "en" and row["prompt"][0]["content"] and row["answer"]
    translation = info["generation"]["translation"]
    assert translation["translator"] == "phase_1_english/adapter" and translation["translated"] == len(rows)

    # The English prompt is what the phase-1 model itself answers to the translation request.
    from peft import PeftModel

    tok = load_tokenizer(recipe.model, manifest.base_model_path)
    phase1 = PeftModel.from_pretrained(load_base_model(recipe.model, manifest.base_model_path),
                                       str(out / "phase_1_english/adapter"))
    first = rows[0]["translated_from"]
    request = recipe.phases[1].replay.translate.prompt.replace("{language}", LANGUAGE_NAMES[first["language"]]).replace(
        "{text}", first["instruction"])
    again, _ = generate_answers(phase1, tok, [[{"role": "user", "content": request}]], batch_size=1, max_new_tokens=16)
    assert again == [rows[0]["prompt"][0]["content"]]


def test_the_token_budget_sizes_max_steps_with_the_replay_lengths_in() -> None:
    """Replay examples half as long as the phase's take 10% of the stream: tokens per step fall,
    so more steps are needed than the phase's own lengths say."""
    from types import SimpleNamespace

    from cft_adapters.train_phase import BUDGET_MARGIN, size_to_token_budget

    def trainer() -> SimpleNamespace:
        args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1, max_steps=-1)
        return SimpleNamespace(train_dataset={"input_ids": [[0] * 100] * 400}, args=args, add_callback=lambda cb: None)

    budget = 100_000
    plain, mixed = trainer(), trainer()
    size_to_token_budget(plain, budget)
    size_to_token_budget(mixed, budget, ([50] * 40, 0.1))
    assert plain.args.max_steps == math.ceil(budget / 400 * (1 + BUDGET_MARGIN)) + 1  # 400 tokens a step
    per_step = 0.9 * 400 + 0.1 * 4 * 50  # 380
    assert mixed.args.max_steps == math.ceil(budget / per_step * (1 + BUDGET_MARGIN)) + 1
    assert mixed.args.max_steps * per_step >= budget > plain.args.max_steps * per_step  # sized without replay: short
