"""Data-parallel runs under `accelerate launch` (or torchrun): who writes, and when ranks wait.

The Trainer (through accelerate) does the data parallelism itself. The runner only has to keep the
run directory single-writer: rank 0 writes run.json, adapters, replay pools, placement and
evaluation results; the other ranks train, then wait for rank 0 at the points where they read what
it wrote (set-up, the replay pool, a saved adapter, evaluation).

Without a launcher (WORLD_SIZE unset or 1) every function here is a no-op or trivial.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


# Rank 0 evaluates every checkpoint while the others wait for it; with the default 30-minute
# collective timeout a long evaluation (cft_en on a 7B model) would kill the waiting ranks.
WAIT_HOURS = 24


def check_engine() -> None:
    """Plain data parallelism (DDP) is supported. Sharded engines are refused, with the reason: the
    runner reads, digests and saves the adapter from the unwrapped PEFT model, and under FSDP or
    DeepSpeed ZeRO-3 each rank holds only a shard of it (a gathered state dict would be needed, and
    that path has not been run on a multi-GPU machine)."""
    from cft_adapters.errors import CftError

    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "false").lower() in ("1", "true"):
            raise CftError(
                f"{name}: cft-train runs data-parallel (DDP) only, e.g. accelerate launch --config_file "
                f"recipes/accelerate/ddp.yaml -m cft_adapters.cli RECIPE. Sharded training is not supported yet: "
                f"the adapter would be saved from one rank's shard. See the README section 'Several GPUs'."
            )


def init() -> None:
    """Join the process group before anything waits on it (accelerate picks gloo on CPUs, NCCL on
    GPUs); the Trainer's own accelerator then reuses it."""
    check_engine()
    if world_size() > 1:
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(timeout=timedelta(hours=WAIT_HOURS))


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-item list without a launcher)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def main_first(fn: Callable[[], T], what: str, others: Callable[[], T] | None = None) -> T:
    """Run `fn` on rank 0, then `others` (default: `fn`) on the other ranks, which can then read what
    rank 0 wrote. When it fails on rank 0 the others stop too, instead of waiting forever."""
    from cft_adapters.errors import RunError

    if world_size() == 1:
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    failed = gather(error is not None)[0]
    if is_main():
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    if failed:
        raise RunError(f"rank {rank()}: stopped because rank 0 failed during {what} (its error is above)")
    return (others or fn)()
