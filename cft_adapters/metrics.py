"""Per-sample metrics shared by the lm-eval task families in lm_eval_tasks/ (their utils.py files
import from here, so the stock `lm_eval` CLI and the in-process runner score identically)."""

from __future__ import annotations

import re
from functools import lru_cache

# Some tasks name languages by ISO 639-1 code with a region or script suffix; the detectors speak 639-1.
_LANGID_ALIASES = {"zh-cn": "zh", "zh-tw": "zh", "pt-br": "pt"}

# The detector behind language fidelity, chosen by measurement (benchmarks/langid_compare.py, its JSON in
# benchmarks/results/): lingua-language-detector over all its 75 languages. On the mini-study's short
# reference answers it read 59.6% right against langid's 31.1%; on full sentences both ~98-99%; on
# SmolLM2's real answers they agree 91.7%. langid (last released 2016) is kept for that comparison.
LANGUAGE_ID = "lingua-language-detector (all languages)"


@lru_cache(maxsize=1)
def _lingua():
    """Built once per process; its language models load on first use (about 1 GB, a few seconds)."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def identify_language(text: str) -> str:
    """The ISO 639-1 code lingua reads `text` as ('unknown' when it cannot tell)."""
    found = _lingua().detect_language_of(text)
    return found.iso_code_639_1.name.lower() if found is not None else "unknown"


@lru_cache(maxsize=1)
def _langid():
    """A private langid identifier over all its 97 languages (the module-level one is global state)."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def identify_language_langid(text: str) -> str:
    """langid's reading, for benchmarks/langid_compare.py."""
    return _langid().classify(text)[0]


def language_fidelity(prediction: str, language: str) -> float:
    """1.0 when the detector (LANGUAGE_ID) reads `prediction` as `language`, else 0.0 (empty answers score 0)."""
    text = prediction.strip()
    if not text:
        return 0.0
    expected = _LANGID_ALIASES.get(language.lower(), language.lower())
    return float(identify_language(text) == expected)


# Scripts written without spaces between words: each character is a token.
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.UNICODE)


class MultilingualTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9], so Arabic, Russian or Thai summaries
    would score 0. This one keeps every Unicode word, lowercased, and splits unspaced scripts
    (Thai, Lao, Myanmar, Khmer, kana, CJK) into characters. No stemming: Porter is English-only."""

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for word in _WORD.findall(text.lower()):
            if _UNSPACED.search(word):
                tokens.extend(ch for ch in word)
            else:
                tokens.append(word)
        return tokens


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=MultilingualTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] over MultilingualTokenizer tokens."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF (sacrebleu defaults: char 6-grams, beta 2), rescaled to [0, 1]."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100.0


_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def _words(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


def contains_answer(prediction: str, reference: str) -> float:
    """1.0 when the reference occurs in the prediction as whole words (case-insensitive, punctuation
    and quotes ignored, accents kept: "fevrier" is not "février"), else 0.0."""
    ref = _words(reference)
    return float(bool(ref) and f" {ref} " in f" {_words(prediction)} ")
