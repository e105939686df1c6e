"""Split an artifact directory into shards by user-id range (see ``shared.shards``).

Each shard gets a contiguous run of user rows (about equal numbers of users), its
user embeddings, its candidate lists (row pointers rebased to 0) and its id map; the
playlist table and the fallback list are written once, in ``shared/``. The result is
checked by loading every shard before it is moved into place.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from recfleet.shared.artifacts import MANIFEST, SHARD_MAP, load_artifacts
from recfleet.shared.shards import (
    PLAYLIST_EMBEDDINGS,
    SHARD_FILES,
    SHARD_MAP_VERSION,
    SHARED_DIR,
    SHARED_FILES,
    SHARED_NPY,
    USER_EMBEDDINGS,
    file_entries,
    load_model,
    shard_dir_name,
)

logger = logging.getLogger(__name__)


def row_bounds(n_users: int, shards: int) -> list[tuple[int, int]]:
    """Row ranges of ``shards`` shards of about equal size (the first ones one larger)."""
    edges = np.linspace(0, n_users, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def shard_artifacts(src: Path | str, out: Path | str, shards: int) -> dict[str, Any]:
    """Write the model at ``src`` split into ``shards`` shards at ``out``; return the map.

    Raises ValueError when ``shards`` is below 1 or above the number of users,
    FileExistsError when ``out`` exists and is not empty, and ArtifactError when ``src``
    is not a valid artifact directory.
    """
    src, out = Path(src), Path(out)
    art = load_artifacts(src)
    if not 1 <= shards <= art.n_users:
        raise ValueError(f"--shards must be 1..{art.n_users} for {art.n_users} users; got {shards}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; not writing shards there")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.sharding-", dir=out.parent))
    try:
        doc = _write_shards(art, tmp, shards)
        for k in range(shards):
            load_model(tmp, k)
        _set_usual_modes(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("sharded %s into %d shards at %s", src, shards, out)
    return doc


def _write_shards(art: Any, tmp: Path, shards: int) -> dict[str, Any]:
    shared = tmp / SHARED_DIR
    shared.mkdir()
    save_file(
        {"playlist": np.ascontiguousarray(art.playlist_embeddings)},
        str(shared / PLAYLIST_EMBEDDINGS),
    )
    for key, name in SHARED_NPY.items():
        np.save(shared / name, np.asarray(getattr(art, key)), allow_pickle=False)
    entries = []
    bounds = row_bounds(art.n_users, shards)
    for k, (a, b) in enumerate(bounds):
        directory = tmp / shard_dir_name(k)
        directory.mkdir()
        _write_one_shard(art, directory, a, b)
        lo = 0 if k == 0 else int(art.user_ids[a])
        hi = None if k == shards - 1 else int(art.user_ids[bounds[k + 1][0]])
        entries.append(
            {
                "index": k,
                "dir": directory.name,
                "lo": lo,
                "hi": hi,
                "n_users": b - a,
                "files": file_entries(directory, SHARD_FILES),
            }
        )
    manifest = art.manifest
    doc = {
        **{k: v for k, v in manifest.items() if k not in ("files", "format_version")},
        "format_version": SHARD_MAP_VERSION,
        "source_manifest": MANIFEST,
        "shared": file_entries(shared, SHARED_FILES),
        "shards": entries,
    }
    (tmp / SHARD_MAP).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def _write_one_shard(art: Any, directory: Path, a: int, b: int) -> None:
    """Rows ``a..b-1``: their embeddings, candidate lists (rebased) and ids."""
    save_file(
        {"user": np.ascontiguousarray(art.user_embeddings[a:b])}, str(directory / USER_EMBEDDINGS)
    )
    indptr = np.asarray(art.candidates_indptr[a : b + 1], dtype=np.int64)
    start, end = int(indptr[0]), int(indptr[-1])
    np.save(directory / "candidates_indptr.npy", indptr - start, allow_pickle=False)
    np.save(
        directory / "candidates_indices.npy",
        np.asarray(art.candidates_indices[start:end], dtype=np.int32),
        allow_pickle=False,
    )
    np.save(directory / "user_ids.npy", np.asarray(art.user_ids[a:b]), allow_pickle=False)


def _set_usual_modes(path: Path) -> None:
    """The modes the umask gives new files (mkdtemp makes 0700, safetensors 0600), so
    workers running as another user can read the shards."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def build_sharded(out: Path | str, shards: int, **build_args: Any) -> dict[str, Any]:
    """Build a model as ``recfleet artifacts build`` does, then split it into ``shards``.

    Raises what ``build_artifacts`` and ``shard_artifacts`` raise.
    """
    from recfleet.offline.build import build_artifacts

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    whole = Path(tempfile.mkdtemp(prefix=f".{out.name}.whole-", dir=out.parent))
    try:
        build_artifacts(whole / "model", **build_args)
        return shard_artifacts(whole / "model", out, shards)
    finally:
        shutil.rmtree(whole, ignore_errors=True)
