"""The embedded default model: a tiny Mistral-architecture model built locally, never downloaded.

Random weights from a config, plus a byte-level BPE tokenizer trained with `tokenizers` on the text
bundled in `cft_adapters/data/smoke/`. Built once and cached under `cache_dir()`; the cache key is a digest
of the builder settings and the training text, so a change to either builds a new model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cft_adapters.util.fs import cache_dir  # noqa: F401  (re-exported: its old home)
from cft_adapters.util.jsonl import read_jsonl

BUILTIN_MODELS = {
    "tiny-mistral": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "vocab_size": 1024,  # the BPE target; the real size is the trained tokenizer's
        "seed": 0,
    }
}
_BUILDER_VERSION = 1
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _training_text_files() -> list[Path]:
    return sorted((Path(__file__).parent / "data" / "smoke").glob("*.jsonl"))


def _texts() -> list[str]:
    """Every string value in the bundled jsonl files (instructions, answers, chat turns)."""
    out: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in _training_text_files():
        for row in read_jsonl(path):
            walk(row)
    return out


def _digest(name: str) -> str:
    h = hashlib.sha256(json.dumps([_BUILDER_VERSION, BUILTIN_MODELS[name]], sort_keys=True).encode())
    for path in _training_text_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def builtin_model_path(name: str) -> Path:
    """Build (once) and return the local directory of a builtin model."""
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    from cft_adapters.util.fs import build_cached_dir

    target = cache_dir() / "models" / f"{name}-{_digest(name)}"
    return build_cached_dir(target, lambda tmp: _build(name, tmp), ready="config.json")


def _build(name: str, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    spec = BUILTIN_MODELS[name]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
    )
    tokenizer.model_max_length = spec["max_position_embeddings"]
    tokenizer.save_pretrained(out)

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    torch.manual_seed(spec["seed"])
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
