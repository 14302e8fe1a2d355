"""Replay: English examples mixed into a later phase's batches by a data collator.

- generative (the paper's GR_5 / GR_10): before phase k, the phase k-1 model answers English
  prompts (the English versions of phase k's instructions); the answers are the replay pool.
- real (ER): real English examples, from a given source or from the earlier phases' data.

`ratio` is the share of the *examples in this phase's training stream* that are replay. The
`ReplayCollator` swaps replay examples into the phase's batches on a deterministic schedule: example
slot p is replay when floor((p+1)·ratio) − floor(p·ratio) = 1. So every window of 1/ratio
consecutive examples holds exactly one replay example (exact for ratios like 0.05 or 0.1; otherwise
the count in any window is the floor or ceiling of window·ratio). Swapping, not inserting, keeps the
phase's steps, batch shapes and token budget those of the phase, so conditions compare at equal
compute. Replay examples are tokenized by TRL exactly like phase examples, so they carry the same
completion-only loss mask.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cft_adapters import distributed
from cft_adapters.data import load_prompts, load_source, truncate_tokenized
from cft_adapters.errors import CftError
from cft_adapters.util.fs import move_aside, write_atomic
from cft_adapters.recipe import DatasetSource, ReplayConfig, TrainingConfig
from cft_adapters.util.jsonl import read_jsonl, write_jsonl

REPLAY_FILE = "replay.jsonl"
REPLAY_META = "replay_meta.json"


def is_replay_slot(position: int, ratio: float) -> bool:
    return math.floor((position + 1) * ratio) - math.floor(position * ratio) == 1


def pool_size(cfg: ReplayConfig, phase_examples: int, available: int) -> int:
    """auto: enough distinct replay examples for one pass over the phase (ratio × examples)."""
    wanted = math.ceil(cfg.ratio * phase_examples) if cfg.pool_size == "auto" else int(cfg.pool_size)
    return max(1, min(wanted, available))


@dataclass
class ReplayPool:
    kind: str
    rows: list[dict[str, Any]]  # {"prompt": [messages], "answer": str, "source": str, ...}
    generation: dict[str, Any] | None = None
    reused: bool = False

    def to_dataset(self) -> Any:
        import datasets

        return datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["answer"]}]} for r in self.rows]
        )


class ReplayCollator:
    """Wraps the collator TRL would use; swaps replay examples into each batch on the schedule."""

    def __init__(self, collator: Any, replay_features: list[dict[str, Any]], ratio: float, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not replay_features:  # build_pool refuses an empty pool first; this guards other callers
            raise CftError("the replay pool is empty: nothing to mix into the batches")
        self.collator = collator
        self.features = replay_features
        self.ratio = ratio
        self.order = list(range(len(replay_features)))
        random.Random(seed).shuffle(self.order)
        # Data parallel: local slot p of rank r is numbered p * world_size + r, a one-to-one map onto
        # the slots of all ranks together, so the totals are exactly ratio x examples and ranks never
        # replay the same example at the same time. (accelerate deals whole batches to ranks, so this
        # numbering is not the order examples are drawn in, and the per-rank share is uneven: at 2
        # ranks and ratio 0.1 every replay slot is odd, all on rank 1. Gradients are averaged over
        # ranks, so the step sees the same mix.)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # index of the next example slot in this rank's stream
        self.seen = 0
        self.replayed = 0
        self.replay_tokens = 0

    def seek(self, position: int) -> None:
        """Resume at local slot `position`, with the counters an uninterrupted run has there. The
        schedule is a pure function of the slot, so the counters are recomputed, not stored: a
        resumed phase reports every replayed example of every attempt."""
        self.position = self.seen = position
        self.replayed = self.replay_tokens = 0
        for p in range(position):
            slot = p * self.world_size + self.rank
            if is_replay_slot(slot, self.ratio):
                self.replayed += 1
                self.replay_tokens += len(self._replay_for(slot)["input_ids"])

    def _replay_for(self, slot: int) -> dict[str, Any]:
        # the k-th replay slot of the global stream takes the k-th example of the shuffled pool
        return self.features[self.order[math.floor(slot * self.ratio) % len(self.order)]]

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = []
        for feature in features:
            slot = self.position * self.world_size + self.rank
            if is_replay_slot(slot, self.ratio):
                replay = self._replay_for(slot)
                feature = {key: replay[key] for key in feature if key in replay}
                self.replayed += 1
                self.replay_tokens += len(feature["input_ids"])
            batch.append(feature)
            self.position += 1
            self.seen += 1
        return self.collator(batch)

    @property
    def achieved_ratio(self) -> float:
        return self.replayed / self.seen if self.seen else 0.0


def examples_before_step(step: int, *, examples_per_epoch: int, batches_per_epoch: int, batch_size: int,
                         accumulation: int) -> int:
    """How many examples this process's stream held before optimizer step `step`, counted the way the
    Trainer skips on resume: whole epochs first (the last batch of an epoch may be short), then
    `accumulation` full batches per step of the current epoch."""
    steps_per_epoch = batches_per_epoch // accumulation + int(batches_per_epoch % accumulation > 0)
    epochs, within = divmod(step, max(1, steps_per_epoch))
    return epochs * examples_per_epoch + within * accumulation * batch_size


class ReplayPositionCallback(TrainerCallback):
    """On a resumed phase the trainer skips batches without collating them; keep the schedule."""

    def __init__(self, collator: ReplayCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: ANN001
        if state.global_step == 0:
            return
        batches = len(train_dataloader)
        # One process: the last batch of an epoch holds the remainder. Several (accelerate's even
        # batches): every batch is full, the last ones completed from the start of the epoch.
        per_epoch = len(train_dataloader.dataset) if args.world_size == 1 else batches * args.per_device_train_batch_size
        self.collator.seek(examples_before_step(
            state.global_step, examples_per_epoch=per_epoch, batches_per_epoch=batches,
            batch_size=args.per_device_train_batch_size, accumulation=args.gradient_accumulation_steps,
        ))


def attach_replay(trainer: Any, pool: ReplayPool, cfg: ReplayConfig, training: TrainingConfig) -> ReplayCollator:
    """Mix `pool` into `trainer`'s batches: its data collator is wrapped by a ReplayCollator, and a
    callback keeps the schedule's position across a resume. Returns the collator (its counters)."""
    # The replay pool goes through TRL's own dataset preparation (chat template, tokenization,
    # completion mask), so replay examples are masked exactly like phase examples. TRL has no public
    # API for it: the call is private, so pyproject.toml pins TRL to the minor version tested.
    prepared = trainer._prepare_dataset(pool.to_dataset(), trainer.processing_class, trainer.args,
                                        packing=False, formatting_func=None, dataset_name="replay")
    if training.padding_free:
        prepared = truncate_tokenized(prepared, training.max_length)
    keep = [c for c in prepared.column_names if c not in ("prompt", "completion")]
    collator = ReplayCollator(trainer.data_collator, prepared.select_columns(keep).to_list(), cfg.ratio, training.seed,
                              rank=distributed.rank(), world_size=distributed.world_size())
    trainer.data_collator = collator
    trainer.add_callback(ReplayPositionCallback(collator))
    return collator


def replay_record(collator: ReplayCollator, pool: ReplayPool, cfg: ReplayConfig, file: str) -> dict[str, Any]:
    """The phase's `replay` entry in run.json, summed over every data-parallel rank."""
    counts = distributed.gather((collator.replayed, collator.seen, collator.replay_tokens))
    replayed, seen, replay_tokens = (sum(c[i] for c in counts) for i in range(3))
    return {
        "kind": cfg.kind,
        "ratio_requested": cfg.ratio,
        "ratio_achieved": round(replayed / seen, 6) if seen else 0.0,
        "replayed_examples": replayed,
        "stream_examples": seen,
        "replay_tokens": replay_tokens,
        "pool_examples": len(pool.rows),
        "pool_reused": pool.reused,
        "file": file,
        "generation": pool.generation,
    }


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], *, batch_size: int, max_new_tokens: int,
    min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
) -> tuple[list[str], dict[str, Any]]:
    """Batched, left-padded `generate` with a KV cache. Prompts are batched by length (less padding)
    and the answers returned in the prompts' order. Generation stops on modeling.stop_token_ids: the
    tokenizer's EOS, which ends every trained assistant turn, and the model's own EOS ids."""
    from cft_adapters.modeling import stop_token_ids

    was_training, side = model.training, tokenizer.padding_side
    stops = stop_token_ids(model, tokenizer)
    model.eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    new_tokens, truncated, started = 0, 0, time.perf_counter()
    stop_set = set(stops)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, use_cache=True,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            out = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                tokens = out[row]
                truncated += not stop_set.intersection(tokens.tolist())  # no stop token: cut at max_new_tokens
                real = tokens[tokens != tokenizer.pad_token_id]
                new_tokens += int(real.numel())
                answers[i] = tokenizer.decode(real, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    seconds = time.perf_counter() - started
    return answers, {"seconds": round(seconds, 3), "new_tokens": new_tokens, "truncated": truncated,
                     "tokens_per_second": round(new_tokens / seconds, 1) if seconds else 0.0}


def build_pool(
    cfg: ReplayConfig, *, where: str, phase_dir: Path, phase_examples: int, seed: int, model: Any, tokenizer: Any,
    source_model: str, earlier_sources: list[DatasetSource], console: Any, key: dict[str, Any],
    phase_sources: list[DatasetSource] | None = None, earlier_seeds: list[int] | None = None,
) -> ReplayPool:
    """The phase's replay pool: read back from replay.jsonl when it was built under the same `key`
    (the phase's settings and the digest of the adapter that answers), else built anew. A pool from
    other settings is moved aside, never reused and never deleted."""
    path, meta_path = phase_dir / REPLAY_FILE, phase_dir / REPLAY_META
    if path.is_file():
        meta = _read_meta(meta_path)
        why, tag = "was built under other settings", "stale"
        if meta.get("key") == key:
            try:
                return ReplayPool(cfg.kind, read_jsonl(path), meta.get("generation"), reused=True)
            except (OSError, ValueError) as exc:  # cut short, edited, not UTF-8: rebuilt, and kept aside
                why, tag = f"cannot be read back ({exc})", "damaged"
        for old in (path, meta_path):
            if old.exists():
                move_aside(old, tag)
        console.print(f"{where}: the replay pool in {phase_dir} {why}; moved aside ({REPLAY_FILE}.{tag}-*), "
                      "building a new one", markup=False, highlight=False)
    inputs = PoolInputs(cfg, where, phase_examples, seed, model, tokenizer, source_model, earlier_sources, console,
                        list(phase_sources or []), list(earlier_seeds or []))
    pool = KINDS[cfg.kind].build(inputs)
    if not pool.rows:  # never written as a valid pool: a rerun builds it again
        raise CftError(f"{where}: the {cfg.kind} replay pool came out empty (no usable prompt or example in "
                       f"{'the earlier phases' if cfg.kind == 'real' and cfg.source is None else 'its source'}); "
                       "nothing was written")
    write_jsonl(path, pool.rows)
    write_atomic(meta_path, json.dumps({"kind": pool.kind, "key": key, "generation": pool.generation}, indent=2) + "\n")
    return pool


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class PoolInputs:
    """What a replay kind may use to build its pool."""

    cfg: ReplayConfig
    where: str  # the key path, for messages
    phase_examples: int
    seed: int
    model: Any  # the model as phase k-1 left it (it answers generative prompts)
    tokenizer: Any
    source_model: str
    earlier_sources: list[DatasetSource]  # the earlier phases' data (real replay without a source)
    console: Any
    phase_sources: list[DatasetSource] = field(default_factory=list)  # this phase's data (generative + translate)
    earlier_seeds: list[int] = field(default_factory=list)  # the seed each earlier source was sampled with in its phase


@dataclass(frozen=True)
class ReplayKind:
    build: Any  # Callable[[PoolInputs], ReplayPool]
    summary: str


def _build_generative(x: PoolInputs) -> ReplayPool:
    if x.cfg.translate is not None:
        return _translated_pool(x)
    return _generative_pool(x.cfg, x.where, x.phase_examples, x.seed, x.model, x.tokenizer, x.source_model, x.console)


def _build_real(x: PoolInputs) -> ReplayPool:
    return _real_pool(x.cfg, x.where, x.phase_examples, x.seed, x.earlier_sources, x.earlier_seeds)


# One entry per value of ReplayConfig.kind (a test checks the keys against the schema's Literal): a
# new kind is an entry here, never a fall-through to another kind.
KINDS: dict[str, ReplayKind] = {
    "generative": ReplayKind(_build_generative, "GR: the phase k-1 model answers English prompts; its answers are replayed"),
    "real": ReplayKind(_build_real, "ER: real English examples (a source, or the earlier phases' data) are replayed"),
}


def _generative_pool(
    cfg: ReplayConfig, where: str, phase_examples: int, seed: int, model: Any, tokenizer: Any, source_model: str, console: Any,
    prompts: list[dict[str, Any]] | None = None,
) -> ReplayPool:
    if prompts is None:
        assert cfg.prompts is not None
        prompts = load_prompts(cfg.prompts, f"{where}.prompts", seed)
        prompts = prompts[: pool_size(cfg, phase_examples, len(prompts))]
    if not prompts:  # nothing to answer: build_pool says so
        return ReplayPool("generative", [])
    console.print(f"{where}: generating {len(prompts)} replay answers with {source_model}")
    if cfg.do_sample:  # the same pool whether or not the process trained the earlier phases first
        from transformers import set_seed

        set_seed(seed)
    answers, stats = generate_answers(
        model, tokenizer, [p["prompt"] for p in prompts], batch_size=cfg.generation_batch_size,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, do_sample=cfg.do_sample,
        temperature=cfg.temperature, top_p=cfg.top_p,
    )
    rows = [{"prompt": p["prompt"], "answer": a, "source_model": source_model, "language": p["language"],
             **({"translated_from": p["translated_from"]} if "translated_from" in p else {})}
            for p, a in zip(prompts, answers) if a]
    empty = len(prompts) - len(rows)
    stats["empty_dropped"] = empty
    if stats.get("truncated"):  # kept as generated (the paper's replay answers are the model's own), and said
        console.print(f"[yellow]{where}: {stats['truncated']} of {len(prompts)} replay answers reached max_new_tokens "
                      f"({cfg.max_new_tokens}) before a stop token; they are trained as they are, ending mid-answer. "
                      f"Raise {where}.max_new_tokens to let them finish[/]")
    if empty:
        console.print(f"[yellow]{where}: {empty} of {len(prompts)} generated answers were empty and were dropped[/]")
    if empty * 2 > len(prompts):
        raise CftError(f"{where}: {empty} of {len(prompts)} generated replay answers came back empty; the "
                       f"{source_model} model does not answer these prompts (check the chat template and max_new_tokens)")
    return ReplayPool("generative", rows, stats)


def _real_pool(cfg: ReplayConfig, where: str, phase_examples: int, seed: int, earlier: list[DatasetSource],
               earlier_seeds: list[int] | None = None) -> ReplayPool:
    """The earlier phases' data is sampled as each phase sampled it (its own seed), so the examples
    replayed are ones that phase trained on; a `source` is sampled with this phase's seed."""
    sources = [cfg.source] if cfg.source is not None else earlier
    seeds = [seed] if cfg.source is not None else (earlier_seeds or [seed] * len(earlier))
    if not sources:
        raise CftError(f"{where}: real replay needs 'source' or an earlier phase's data, and this is the first phase")
    parts = []
    for j, src in enumerate(sources):
        label = f"{where}.source" if cfg.source is not None else f"{where} (earlier data {j})"
        parts.extend(load_source(src, label, seeds[j]))
    random.Random(seed).shuffle(parts)
    parts = parts[: pool_size(cfg, phase_examples, len(parts))]
    rows = [{"prompt": r["prompt"], "answer": r["completion"][0]["content"], "source": "real", "language": r["language"]}
            for r in parts]
    return ReplayPool("real", rows)


# Names for the translation request ({language}); a code without a name is used as it is.
LANGUAGE_NAMES = {"ar": "Arabic", "de": "German", "el": "Greek", "es": "Spanish", "fr": "French", "hi": "Hindi",
                  "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
                  "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "th": "Thai", "tr": "Turkish",
                  "vi": "Vietnamese", "zh": "Chinese"}


def _user_text(prompt: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _translated_pool(x: PoolInputs) -> ReplayPool:
    """The paper's GR prompts: a seeded sample of this phase's own instructions, translated to English
    (rows already in English kept as they are), answered by the previous phase's model. Each row
    keeps its original (`translated_from`: language, instruction, source), so the pairing is on disk.
    The original's system prompt, if any, is not carried over: the English version is the instruction."""
    t = x.cfg.translate
    assert t is not None
    if not x.phase_sources:
        raise CftError(f"{x.where}.translate: the phase has no data to translate")
    rows: list[dict[str, Any]] = []
    for j, src in enumerate(x.phase_sources):
        for r in load_source(src, f"{x.where}.translate (the phase's datasets[{j}])", x.seed):
            rows.append({"text": _user_text(r["prompt"]), "language": r["language"], "source": src.describe()})
    random.Random(x.seed).shuffle(rows)
    rows = [r for r in rows if r["text"].strip()][: pool_size(x.cfg, x.phase_examples, len(rows))]
    foreign = [r for r in rows if r["language"] != "en"]
    translator, tokenizer, who = x.model, x.tokenizer, x.source_model
    loaded = t.model != "self"
    if loaded:
        from cft_adapters.modeling import load_inference_model

        translator, tokenizer = load_inference_model(t.model, trust_remote_code=t.trust_remote_code,
                                                     where=f"{x.where}.translate.model")
        who = t.model
    x.console.print(f"{x.where}: translating {len(foreign)} of the phase's instructions to English with {who}")
    requests = [[{"role": "user", "content": t.prompt.replace("{language}", LANGUAGE_NAMES.get(r["language"], r["language"]))
                  .replace("{text}", r["text"])}] for r in foreign]
    try:
        english, stats = generate_answers(translator, tokenizer, requests, batch_size=t.batch_size,
                                          max_new_tokens=t.max_new_tokens) if requests else ([], {})
    finally:
        if loaded:
            del translator
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for r, text in zip(foreign, english):
        r["english"] = text
    prompts, dropped = [], 0
    for r in rows:
        text = r["text"] if r["language"] == "en" else r.get("english", "")
        if not text:
            dropped += 1
            continue
        origin = {"language": r["language"], "instruction": r["text"], "source": r["source"],
                  "translator": None if r["language"] == "en" else who}
        prompts.append({"prompt": [{"role": "user", "content": text}], "language": "en", "translated_from": origin})
    if dropped * 2 > len(rows):
        raise CftError(f"{x.where}.translate: {dropped} of {len(rows)} translations came back empty; {who} does not "
                       f"translate with this prompt (check translate.prompt and translate.max_new_tokens)")
    if dropped:
        x.console.print(f"[yellow]{x.where}: {dropped} of {len(rows)} translations were empty and were dropped[/]")
    pool = _generative_pool(x.cfg, x.where, x.phase_examples, x.seed, x.model, x.tokenizer, x.source_model, x.console,
                            prompts=prompts)
    pool.generation = {**(pool.generation or {}), "translation": {"translator": who, "translated": len(foreign),
                                                                  "kept_english": len(rows) - len(foreign),
                                                                  "empty_dropped": dropped, **stats}}
    return pool
