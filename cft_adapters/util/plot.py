"""Plots: matplotlib without a display, and figures saved atomically (a killed run never leaves a
half-written PNG where a finished one is expected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cft_adapters.util.fs import atomic_file


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Write `fig` as a PNG at `path` atomically, then close it."""
    plt = pyplot()
    try:
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
