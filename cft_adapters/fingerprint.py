"""What a data source holds, for the phase config digest: a file's size and sha256, or the commit a
hub dataset's revision resolves to. A file edited in place, or a hub branch that moved, is another
phase (reconcile.phase_config_digest)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cft_adapters.errors import DataError
from cft_adapters.recipe import BUILTIN_PREFIX, DatasetSource, builtin_data_path
from cft_adapters.util.digest import file_sha256


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Per (file, size, mtime_ns) or (hub id, revision): every phase digest asks again, within one process.
_FINGERPRINTS: dict[tuple[Any, ...], dict[str, Any]] = {}


def source_fingerprint(src: DatasetSource) -> dict[str, Any]:
    """What a source holds. A local or builtin file: {"kind": "file", "size", "sha256"} of its
    bytes (the recipe takes single files, no folders or globs). A hub dataset: {"kind": "hub", "id",
    "revision": the commit if it can be found (the hub, or the local hub cache when offline), else
    the recipe's revision, "resolved": whether it is a commit}. Cached within the process."""
    if src.path is not None:
        return _file_fingerprint(local_file(src), src.describe())
    return _hub_fingerprint(str(src.hub), src.revision)


def _file_fingerprint(file: Path, name: str) -> dict[str, Any]:
    try:
        stat = file.stat()
        key = ("file", str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = {"kind": "file", "size": stat.st_size, "sha256": file_sha256(file)}
    except OSError as exc:
        raise DataError(f"{name}: cannot read: {exc.strerror}") from None
    return dict(_FINGERPRINTS[key])


def _hub_fingerprint(repo_id: str, revision: str | None) -> dict[str, Any]:
    key = ("hub", repo_id, revision)
    if key not in _FINGERPRINTS:
        commit = _hub_commit(repo_id, revision)
        _FINGERPRINTS[key] = {"kind": "hub", "id": repo_id, "revision": commit or revision, "resolved": commit is not None}
    return dict(_FINGERPRINTS[key])


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub dataset's revision (default: main) names: a commit id as written, else the
    hub's answer (not asked offline), else the ref the hub cache recorded at the last download."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import constants

    if not _hub_offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(repo_id, revision=revision, timeout=10).sha
            if sha and _COMMIT.match(sha):
                return sha
        except Exception:  # unreachable, gated or unknown: the cache may still know
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        sha = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return sha if _COMMIT.match(sha) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    hub = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    return bool(hub) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def local_file(src: DatasetSource) -> Path:
    """The file a local or builtin source names."""
    assert src.path is not None
    return builtin_data_path(src.path) if src.path.startswith(BUILTIN_PREFIX) else Path(src.path)
