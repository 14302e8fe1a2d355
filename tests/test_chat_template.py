"""A base model without a chat template (like Mistral-7B-v0.1) is trained to stop.

The fallback template ends every assistant turn with the tokenizer's own EOS, inside the part TRL
trains on, so an adapter learns to emit the token generation stops on. The old fallback (plain
ChatML, whose '<|im_end|>' is several BPE pieces in such a tokenizer) is kept as the contrast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cft_adapters.cli import main
from cft_adapters.modeling import (
    FALLBACK_CHAT_TEMPLATE,
    FALLBACK_TEMPLATE_NAME,
    ChatTemplateWarning,
    load_base_model,
    load_tokenizer,
    template_record,
)
from cft_adapters.recipe import ModelConfig, load_recipe
from cft_adapters.tiny import CHATML_TEMPLATE

from conftest import SMOKE

MAX_NEW_TOKENS = 32
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def without_chat_template(src: Path, dst: Path) -> Path:
    """Copy the tiny model and make it look like a base model: no chat template, EOS '</s>', and the
    ChatML markers no longer tokens of their own (plain text, several BPE pieces each)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config["eos_token"] = "</s>"
    config["added_tokens_decoder"] = {k: v for k, v in config.get("added_tokens_decoder", {}).items()
                                      if v["content"] not in CHATML_MARKERS}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((dst / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in CHATML_MARKERS]
    eos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "</s>")
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg["eos_token_id"] = eos_id
        (dst / name).write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_path: Path) -> Path:
    return without_chat_template(tiny_model_path, tmp_path_factory.mktemp("base") / "tiny-base")


def _model(base_dir: Path, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=str(base_dir), quantization="none", **kw)


def test_copy_looks_like_a_base_model(base_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    assert not tok.chat_template
    assert tok.eos_token == "</s>"
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1


def test_fallback_is_recorded_and_warned(base_dir: Path) -> None:
    with pytest.warns(ChatTemplateWarning, match="no chat template; using fallback-chatml-eos"):
        tok = load_tokenizer(_model(base_dir), str(base_dir))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    record = template_record(tok)
    assert record["source"] == FALLBACK_TEMPLATE_NAME and record["completion_has_stop"] is True
    assert record["stop_token_ids"] == [tok.eos_token_id]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=False)
    assert rendered == "<s><|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA</s>"

    # The recipe's template wins over the fallback; the old ChatML one is flagged as never stopping.
    with pytest.warns(ChatTemplateWarning, match="does not contain the EOS token '</s>'"):
        old = load_tokenizer(_model(base_dir, chat_template=CHATML_TEMPLATE), str(base_dir))
    assert old.chat_template == CHATML_TEMPLATE
    assert template_record(old)["source"] == "recipe" and template_record(old)["completion_has_stop"] is False
    assert template_record(old)["sha256"] != record["sha256"]


def test_fallback_targets_end_with_eos_inside_the_completion_mask(tmp_path: Path, base_dir: Path) -> None:
    """Through TRL's real dataset preparation, for single-turn (alpaca) and chat (messages) data."""
    from trl import SFTTrainer

    from cft_adapters.data import load_phase_data
    from cft_adapters.hf_configs import sft_config
    from cft_adapters.modeling import new_adapter

    recipe = load_recipe(SMOKE, [f"model.name_or_path={base_dir}", "model.quantization=none"])
    with pytest.warns(ChatTemplateWarning):
        tok = load_tokenizer(recipe.model, str(base_dir))
    model = new_adapter(load_base_model(recipe.model, str(base_dir)), recipe.adapter)
    for k in range(len(recipe.phases)):
        data = load_phase_data(recipe.phases[k], k, seed=0)
        trainer = SFTTrainer(model=model, args=sft_config(recipe.phase_training(k), recipe.model, tmp_path),
                             train_dataset=data.for_trainer(), processing_class=tok)
        rows = trainer.train_dataset
        assert len(rows) == len(data.dataset)
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            assert labels[-1] == ids[-1] == tok.eos_token_id  # the last target is EOS, and it is trained
            assert labels[0] == -100  # the prompt is masked
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def _one_phase_recipe(path: Path, chat_template: str | None = None) -> Path:
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["phases"] = recipe["phases"][:1]
    if chat_template is not None:
        recipe["model"]["chat_template"] = chat_template
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def _greedy(run: Path, base_dir: Path, with_adapter: bool = True) -> tuple[list[str], list[int], object, object]:
    """Greedy answers to 16 training prompts, and the generated token count of each."""
    from peft import PeftModel

    from cft_adapters.data import load_phase_data
    from cft_adapters.replay import generate_answers

    recipe = load_recipe(run / "recipe.resolved.yaml")
    tok = load_tokenizer(recipe.model, str(base_dir))
    model = load_base_model(recipe.model, str(base_dir))
    if with_adapter:
        model = PeftModel.from_pretrained(model, str(run / "phase_1_english" / "adapter"))
    prompts = [row["prompt"] for row in load_phase_data(recipe.phases[0], 0, seed=0).dataset.select(range(16))]
    answers, lengths = [], []
    for prompt in prompts:  # one at a time: new_tokens is then this answer's count
        answer, stats = generate_answers(model, tok, [prompt], batch_size=1, max_new_tokens=MAX_NEW_TOKENS)
        answers += answer
        lengths.append(stats["new_tokens"])
    return answers, lengths, model, tok


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::cft_adapters.modeling.ChatTemplateWarning")
def test_adapter_on_a_base_without_template_learns_to_stop(tmp_path: Path, base_dir: Path) -> None:
    overrides = ["eval.tasks=[]", f"model.name_or_path={base_dir}", "model.quantization=none"]
    fixed, old = tmp_path / "fallback", tmp_path / "old_chatml"
    assert main([str(_one_phase_recipe(tmp_path / "fallback.yaml")), f"output_dir={fixed}", *overrides]) == 0
    assert main([str(_one_phase_recipe(tmp_path / "old.yaml", CHATML_TEMPLATE)), f"output_dir={old}", *overrides]) == 0

    # run.json and each adapter folder say which template trained it, and the run said so at start.
    manifest = json.loads((fixed / "run.json").read_text())
    assert manifest["chat_template"]["source"] == "fallback-chatml-eos"
    saved = json.loads((fixed / manifest["phases"][1]["checkpoint"] / "chat_template.cft.json").read_text())
    assert saved["source"] == "fallback-chatml-eos" and saved["sha256"] == manifest["chat_template"]["sha256"]
    assert json.loads((old / "run.json").read_text())["chat_template"]["source"] == "recipe"

    answers, lengths, model, tok = _greedy(fixed, base_dir)
    stopped = sum(n < MAX_NEW_TOKENS for n in lengths)
    assert stopped >= 12, lengths  # deterministic on CPU: all 16 stop here
    _, untrained, _, _ = _greedy(fixed, base_dir, with_adapter=False)
    assert all(n == MAX_NEW_TOKENS for n in untrained), untrained
    _, old_lengths, _, _ = _greedy(old, base_dir)
    assert sum(n < MAX_NEW_TOKENS for n in old_lengths) <= 2, old_lengths  # '<|im_end|>' is no stop token

    # lm-eval's generate_until (HFLM on the model in memory, as evaluation.py runs it) stops on the
    # same EOS and sees the same single BOS: its greedy answers are replay's.
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from cft_adapters.data import load_phase_data

    prompts = [row["prompt"] for row in load_phase_data(load_recipe(fixed / "recipe.resolved.yaml").phases[0], 0, seed=0)
               .dataset.select(range(16))]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    requests = [Instance("generate_until", {}, (lm.apply_chat_template(p), {"until": [], "max_gen_toks": MAX_NEW_TOKENS,
                                                                          "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    assert [a.strip() for a in lm.generate_until(requests)] == answers
