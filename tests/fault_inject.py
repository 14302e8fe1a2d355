"""Run `cft-train` in this process and SIGKILL it at a chosen point (the fault-injection tests).

    python tests/fault_inject.py POINT RECIPE [overrides...]

POINT is one of:
  checkpoint:P:S   right after phase P's trainer saved its step-S checkpoint
  adapter-save:P   during phase P's adapter save: the files are written to the temporary folder,
                   not yet renamed into place
  generation:P     during phase P's replay generation (after the first generate() batch)
  before-record:P  between phase P's adapter rename and the run.json update that records it
  enospc:P:S       the disk fills up: phase P's step-S checkpoint save fails with ENOSPC (no kill)

The kill is a real SIGKILL of this process: nothing in it gets to clean up.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _phase_of(path: object) -> int:
    """phase_<k>_<name>/... -> k"""
    for part in str(path).split(os.sep):
        if part.startswith("phase_") and part.split("_")[1].isdigit():
            return int(part.split("_")[1])
    return -1


def install(point: str) -> None:
    kind, _, rest = point.partition(":")
    if kind == "checkpoint":
        from transformers import Trainer

        phase, step = (int(x) for x in rest.split(":"))
        original = Trainer._save_checkpoint

        def save_then_die(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if _phase_of(self.args.output_dir) == phase and self.state.global_step == step:
                _die()
            return out

        Trainer._save_checkpoint = save_then_die
    elif kind == "adapter-save":
        from peft import PeftModel

        original = PeftModel.save_pretrained

        def save_then_die(self, save_directory, *args, **kwargs):
            out = original(self, save_directory, *args, **kwargs)
            if ".adapter.tmp-" in str(save_directory) and _phase_of(save_directory) == int(rest):
                _die()
            return out

        PeftModel.save_pretrained = save_then_die
    elif kind == "generation":
        from cft_adapters import replay

        original = replay.generate_answers

        def generate_then_die(model, *args, **kwargs):
            real_generate = model.generate

            def die_midway(*a, **k):
                real_generate(*a, **k)  # the first batch is generated, then the process dies
                _die()

            model.generate = die_midway
            return original(model, *args, **kwargs)

        replay.generate_answers = generate_then_die
    elif kind == "before-record":
        from cft_adapters import rundir

        original = rundir.RunDirectory.record_phase_done

        def die_first(self, manifest, record, *args, **kwargs):
            if record.index == int(rest):
                _die()
            return original(self, manifest, record, *args, **kwargs)

        rundir.RunDirectory.record_phase_done = die_first
    elif kind == "enospc":
        import errno

        from transformers import Trainer

        phase, step = (int(x) for x in rest.split(":"))
        original = Trainer._save_checkpoint

        def disk_full(self, *args, **kwargs):
            if _phase_of(self.args.output_dir) == phase and self.state.global_step == step:
                path = os.path.join(self.args.output_dir, f"checkpoint-{step}", "optimizer.pt")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return original(self, *args, **kwargs)

        Trainer._save_checkpoint = disk_full
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as cli.main does, before the patches import it
    install(sys.argv[1])
    from cft_adapters.cli import main

    raise SystemExit(main(sys.argv[2:]))
