"""AlpacaEval 2.0 through the `alpaca-eval` package: the judge, the annotation, the win rates.

The checkpoint under test answers the prompts inside lm-eval (a `generate_until` task, on the model
in memory, like every other task); the task's aggregation hands the answers and the reference
answers to `alpaca_eval.evaluate`, which annotates each pair with the judge and computes the
length-controlled win rate (`get_length_controlled_winrate`). Nothing of its statistics is
re-implemented here.

The judge is the package's logprob classifier (the `weighted_alpaca_eval_gpt4_turbo` annotator:
its prompt template, `logprob_parser` on the tokens 'm' / 'M'), answered by either
- a local Hugging Face model (`eval.judge.model`: a directory, hub id or `builtin:` model), whose
  next-token log-probabilities of 'm' and 'M' after the judge prompt are what the parser reads, or
- any OpenAI-compatible endpoint (`eval.judge.endpoint`, e.g. a local vLLM server), through the
  package's own `openai_completions` with `logprobs`.

Outside a recipe (the stock `lm_eval --include_path lm_eval_tasks` CLI), the judge is read from
`CFT_JUDGE_MODEL` (and `CFT_JUDGE_ENDPOINT`). Without a judge a recipe skips the member with a
message and the report says EA has four members.

Offline, the one download the package cannot avoid is `df_gamed.csv` (the AlpacaEval set's
instruction difficulties), fetched unconditionally by its GLM featurization. For a prompt set other
than AlpacaEval's own (the bundled smoke prompts) the task uses the `length_controlled_minimal` GLM,
whose formula does not read instruction difficulty, and `_local_instruction_difficulty` serves a
placeholder file in its place (difficulty 0 for each prompt) instead of going to the hub.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from cft_adapters.errors import CftError
from cft_adapters.recipe import JudgeConfig

# The AlpacaEval 2.0 annotator whose prompt and parser we use (see the module docstring).
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
PROMPT_TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
JUDGE_TOKENS = ("m", "M")  # 'm': the first output (the reference) is better; 'M': the second (ours)
GLMS = ("length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal")
BENCHMARK = "alpacaeval"
MIN_ITEMS = 5  # the package's GLM is fitted with 5-fold cross-validation over examples
ENV_MODEL, ENV_ENDPOINT = "CFT_JUDGE_MODEL", "CFT_JUDGE_ENDPOINT"

_active: list[JudgeConfig] = []  # the judge of the evaluation in progress (set by `judging`)


class JudgeError(CftError):
    """The AlpacaEval member cannot be judged: no judge, or a judge that cannot be loaded or reached."""


@contextlib.contextmanager
def judging(judge: JudgeConfig | None) -> Iterator[None]:
    """Make `judge` the one the AlpacaEval tasks' aggregations use while lm-eval runs."""
    if judge is None:
        yield
        return
    _active.append(judge)
    try:
        yield
    finally:
        _active.pop()


def configured_judge() -> JudgeConfig | None:
    """The judge of the evaluation in progress (`judging`), else the one the environment names (the
    stock lm_eval CLI), else None."""
    if _active:
        return _active[-1]
    model = os.environ.get(ENV_MODEL)
    if model:
        return JudgeConfig(model=model, endpoint=os.environ.get(ENV_ENDPOINT) or None)
    return None


def judged_tasks(names: list[str]) -> list[str]:
    """The requested names that are AlpacaEval members (they need a judge)."""
    from cft_adapters.task_semantics import TaskSemanticsError, classify

    out = []
    for name in names:
        try:
            units = classify([name])
        except TaskSemanticsError:
            continue
        if any(s.benchmark == BENCHMARK for s in units.values()):
            out.append(name)
    return out


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """The tasks' process_results: one item (instruction, our answer, the reference) per metric; the
    aggregations (`win_rates`) judge them all at once."""
    item = {"index": doc["index"], "instruction": doc["instruction"], "output": results[0].strip(),
            "reference": doc["reference"]}
    return {"lc_win_rate": item, "win_rate": item}


def win_rates(glm: str, instruction_difficulty: str | None = None) -> tuple[Any, Any]:
    """The tasks' two aggregations (lc_win_rate, win_rate) for this GLM; they share one judging."""

    def lc_win_rate(items: list[dict[str, Any]]) -> float:
        return score(items, glm, instruction_difficulty)["lc_win_rate"]

    def win_rate(items: list[dict[str, Any]]) -> float:
        return score(items, glm, instruction_difficulty)["win_rate"]

    return lc_win_rate, win_rate


def check_judge(judge: JudgeConfig, source: str) -> None:
    """Fail before training, not at the first checkpoint's aggregation: an endpoint must answer
    GET <endpoint>/models; a local judge given as a path must exist."""
    if judge.endpoint:
        import urllib.error
        import urllib.request

        url = judge.endpoint.rstrip("/") + "/models"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"})
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise JudgeError(f"{source}: eval.judge.endpoint: cannot reach {url} ({exc}); start the server, "
                             f"or remove eval.judge to skip AlpacaEval") from None
    elif judge.model.startswith((".", "/", "~")) and not Path(judge.model).expanduser().exists():
        raise JudgeError(f"{source}: eval.judge.model: no model at '{judge.model}' (expected a directory, a hub id "
                         f"or 'builtin:<name>')")


def describe(judge: JudgeConfig) -> str:
    return f"{judge.model} at {judge.endpoint}" if judge.endpoint else f"{judge.model} (local)"


# -- the annotation ------------------------------------------------------------------------------


def score(items: list[dict[str, Any]], glm: str, instruction_difficulty: str | None = None) -> dict[str, float]:
    """Judge `items` ({instruction, output, reference, index}) and return the package's win rates as
    fractions: {'lc_win_rate', 'win_rate', 'n_judged', 'lc_standard_error'}. Cached on the items, so
    the task's several metrics judge once. `instruction_difficulty`: 'hub' (the package fetches
    AlpacaEval's own, for AlpacaEval's prompts), a df_gamed.csv-format file, or None (a placeholder,
    for GLMs that do not read it)."""
    key = _items_key(items, glm, instruction_difficulty)
    if key not in _scores:
        _scores.clear()  # one task's items at a time
        _scores[key] = judge_items(items, glm, instruction_difficulty)[0]
    return _scores[key]


_scores: dict[str, dict[str, float]] = {}


def _items_key(items: list[dict[str, Any]], glm: str, difficulty: str | None) -> str:
    from cft_adapters.util.digest import canonical_json, short_digest

    judge = configured_judge()
    return short_digest(canonical_json({"items": items, "glm": glm, "difficulty": str(difficulty),
                                        "judge": judge.model_dump() if judge else None}))


def judge_items(items: list[dict[str, Any]], glm: str, instruction_difficulty: str | None = None) -> tuple[dict[str, float], Any]:
    """`score` without the cache, with the package's annotations (a DataFrame: one row per pair,
    `preference` 1..2, 2 meaning ours is better)."""
    judge = configured_judge()
    if judge is None:
        raise JudgeError(f"AlpacaEval needs a judge: set eval.judge in the recipe (a local model, or an "
                         f"OpenAI-compatible endpoint), or {ENV_MODEL} (and {ENV_ENDPOINT}) for the lm_eval CLI")
    if glm not in GLMS:
        raise JudgeError(f"unknown length-controlled GLM '{glm}' (known: {', '.join(GLMS)})")
    if len(items) < MIN_ITEMS:
        raise JudgeError(f"AlpacaEval's length-controlled win rate is fitted with {MIN_ITEMS}-fold cross-validation and "
                         f"needs at least {MIN_ITEMS} examples; got {len(items)} (raise eval.limit / eval.limits)")
    import pandas as pd

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from alpaca_eval import constants, main

    rows = sorted(items, key=lambda r: r["index"])
    instructions = [r["instruction"] for r in rows]
    ours = pd.DataFrame({"instruction": instructions, "output": [r["output"] for r in rows], "generator": "model",
                         "index": [r["index"] for r in rows]})
    reference = pd.DataFrame({"instruction": instructions, "output": [r["reference"] for r in rows],
                              "generator": "reference", "index": [r["index"] for r in rows]})
    with tempfile.TemporaryDirectory(prefix="cft_alpacaeval_") as tmp:
        config = _annotator_config(Path(tmp), judge, Path(constants.EVALUATORS_CONFIG_DIR))
        extra = {} if judge.endpoint else {"fn_completions": _local_completions}
        with _local_instruction_difficulty(instruction_difficulty, len(rows)), _quiet():
            leaderboard, annotations = main.evaluate(
                model_outputs=ours, reference_outputs=reference, annotators_config=str(config),
                name="model", output_path=None, precomputed_leaderboard=None, is_return_instead_of_print=True,
                fn_metric="get_length_controlled_winrate",
                metric_kwargs={"glm_name": glm, "save_weights_dir": None, "is_warn_extreme_changes": False},
                caching_path=None, is_cache_leaderboard=False, **extra,
            )
    row = leaderboard.loc["model"]
    metrics = {"lc_win_rate": float(row["length_controlled_winrate"]) / 100, "win_rate": float(row["win_rate"]) / 100,
               "lc_standard_error": float(row["lc_standard_error"]) / 100, "n_judged": float(row["n_total"])}
    return metrics, pd.DataFrame(annotations)


def _annotator_config(tmp: Path, judge: JudgeConfig, package_configs: Path) -> Path:
    """The package's logprob annotator, with our judge: written to tmp/<name>/configs.yaml."""
    import yaml

    completions: dict[str, Any] = {"model_name": judge.model, "max_tokens": 1, "temperature": 1, "logprobs": True,
                                   "top_logprobs": 5}
    spec: dict[str, Any] = {
        "prompt_template": str(package_configs / PROMPT_TEMPLATE),
        "completions_kwargs": completions,
        "fn_completion_parser": "logprob_parser",
        "completion_parser_kwargs": {"numerator_token": JUDGE_TOKENS[0], "denominator_tokens": list(JUDGE_TOKENS),
                                     "is_binarize": False},
        "completion_key": "completions_all",
        "batch_size": 1,
    }
    if judge.endpoint:
        spec["fn_completions"] = "openai_completions"
        completions["client_kwargs"] = {"base_url": judge.endpoint}
        completions["requires_chatml"] = True
    else:
        completions.update({"quantization": judge.quantization, "trust_remote_code": judge.trust_remote_code,
                            "max_prompt_tokens": judge.max_prompt_tokens})
    folder = tmp / "cft_judge"
    folder.mkdir()
    (folder / "configs.yaml").write_text(yaml.safe_dump({"cft_judge": spec}, sort_keys=False), encoding="utf-8")
    return folder / "configs.yaml"


@contextlib.contextmanager
def _local_instruction_difficulty(path: str | None, n: int) -> Iterator[None]:
    """Serve the package's `df_gamed.csv` download from `path`, or, when None, from a placeholder
    (difficulty 0 for each of the n prompts) for GLMs that do not read it (see the module docstring).
    'hub': leave the package's download alone."""
    from alpaca_eval.metrics import glm_winrate

    if path == "hub":
        yield
        return
    real = glm_winrate.hf_hub_download
    with tempfile.TemporaryDirectory(prefix="cft_difficulty_") as tmp:
        local = Path(path) if path else None
        if local is None:
            local = Path(tmp) / "df_gamed.csv"
            local.write_text("index,instruction_difficulty,model\n"
                             + "".join(f"{i},0.0,placeholder\n" for i in range(n)), encoding="utf-8")

        def download(*args: Any, **kwargs: Any) -> str:
            if kwargs.get("filename") == "df_gamed.csv":
                return str(local)
            return real(*args, **kwargs)

        glm_winrate.hf_hub_download = download
        try:
            yield
        finally:
            glm_winrate.hf_hub_download = real


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The package logs every step at INFO and warns through pandas/sklearn; keep the run's console clean."""
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


# -- the local judge -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_judge(name: str, quantization: str, trust_remote_code: bool) -> tuple[Any, Any]:
    from cft_adapters import modeling

    try:
        return modeling.load_inference_model(name, quantization, trust_remote_code, where="eval.judge.model")
    except CftError as exc:
        raise JudgeError(str(exc)) from None


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids a judge may use to say `text` first: the plain token, its word-start forms, the encoding."""
    ids = set()
    for form in (text, "\u2581" + text, "\u0120" + text):
        tid = tokenizer.convert_tokens_to_ids(form)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if encoded:
        ids.add(encoded[0])
    return sorted(ids)


def _local_completions(prompts: list[str], model_name: str, quantization: str = "none",
                       trust_remote_code: bool = False, max_prompt_tokens: int = 4096,
                       **_: Any) -> dict[str, list]:
    """The package's completion interface (see alpaca_eval.decoders.openai), answered by a local model:
    one forward pass per prompt; 'completions_all' carries the log-probabilities of the judge tokens
    in the shape `logprob_parser` reads."""
    import torch
    from alpaca_eval.utils import prompt_to_chatml

    model, tokenizer = _load_judge(model_name, quantization, trust_remote_code)
    candidates = {token: _token_ids(tokenizer, token) for token in JUDGE_TOKENS}
    completions, completions_all, seconds = [], [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        started = time.perf_counter()
        messages = prompt_to_chatml(prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)[-max_prompt_tokens:]  # the task statement is at the end; keep it
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = [{"token": token, "logprob": float(torch.logsumexp(logprobs[tids], dim=0))}
               for token, tids in candidates.items() if tids]
        best = max(top, key=lambda t: t["logprob"])
        completions.append(best["token"])
        completions_all.append({"logprobs": {"content": [{**best, "top_logprobs": top}]}, "text": best["token"],
                                "total_tokens": len(ids)})
        seconds.append(time.perf_counter() - started)
    return {"completions": completions, "completions_all": completions_all,
            "price_per_example": [0.0] * len(prompts), "time_per_example": seconds}
