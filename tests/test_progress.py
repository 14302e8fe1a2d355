"""Progress when stdout is not a terminal: plain lines while a phase trains, not only at the end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMOKE


@pytest.mark.slow
def test_redirected_output_shows_progress_lines_while_phase_one_trains(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "cft_adapters.cli", str(SMOKE), f"output_dir={out}",
                                 "eval.tasks=[]", "phases[0].training.num_train_epochs=12"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline, seen = time.monotonic() + 600, None
            while time.monotonic() < deadline and proc.poll() is None:
                text = log.read_text()
                if "phase 1 english: step " in text:
                    seen = text
                    break
                time.sleep(0.05)
            assert seen is not None, log.read_text()[-2000:]
            # phase 1 was still training when its line reached the file
            assert proc.poll() is None and not (out / "phase_1_english" / "adapter").exists()
            line = next(row for row in seen.splitlines() if row.startswith("phase 1 english: step "))
            assert "loss " in line and "tok/s" in line and "elapsed" in line and "ETA" in line
        finally:
            assert proc.wait(timeout=900) == 0
    assert "phase 2 french_german: step " in log.read_text()
