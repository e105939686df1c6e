"""Sharded models: a shard map (user-id range -> shard directory) and loading one shard.

A model split into N shards by user-id range is a directory holding::

    shards.json                       the shard map: format version, model version, sizes,
                                      metrics, and per shard its range, directory and the
                                      size and SHA-256 of each file
    shared/playlist_embeddings.safetensors   "playlist" [n_playlists, dim]
    shared/playlist_ids.npy, playlist_popularity.npy, fallback.npy
    shard-<K>/user_embeddings.safetensors    "user" [users of shard K, dim]
    shard-<K>/candidates_indptr.npy, candidates_indices.npy, user_ids.npy

Shard K owns the user ids ``lo <= id < hi``; the first shard starts at 0 and the last
has no upper bound, so every valid user id has exactly one shard (an unknown user goes
to the shard owning its range and comes back cold). The playlist table and the
fallback list are written once and memory-mapped by every worker on a host.

An unsharded artifact directory is a model of one shard.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recfleet.shared.artifacts import (
    MANIFEST,
    SHARD_MAP,
    Artifacts,
    check_recorded_files,
    check_shapes,
    current_dir,
    load_artifacts,
    load_npy,
    map_tensor,
    read_json_object,
    read_manifest,
    safetensors_layout,
    sha256_file,
)
from recfleet.shared.errors import ArtifactError

SHARD_MAP_VERSION = 1
SHARED_DIR = "shared"
USER_EMBEDDINGS = "user_embeddings.safetensors"
PLAYLIST_EMBEDDINGS = "playlist_embeddings.safetensors"
SHARD_NPY = {
    "candidates_indptr": "candidates_indptr.npy",
    "candidates_indices": "candidates_indices.npy",
    "user_ids": "user_ids.npy",
}
SHARED_NPY = {
    "playlist_ids": "playlist_ids.npy",
    "playlist_popularity": "playlist_popularity.npy",
    "fallback": "fallback.npy",
}
SHARD_FILES = (USER_EMBEDDINGS, *SHARD_NPY.values())
SHARED_FILES = (PLAYLIST_EMBEDDINGS, *SHARED_NPY.values())


def shard_dir_name(index: int) -> str:
    return f"shard-{index}"


@dataclass(frozen=True)
class ShardRange:
    """Shard ``index`` owns user ids ``lo <= id < hi`` (``hi`` None: no upper bound)."""

    index: int
    directory: str
    lo: int
    hi: int | None
    n_users: int
    files: dict[str, Any]


@dataclass(frozen=True)
class ShardMap:
    """A checked shard map. An unsharded directory reads as one shard owning every id."""

    path: Path
    model_version: str
    shards: tuple[ShardRange, ...]
    doc: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.shards)

    @property
    def sharded(self) -> bool:
        return (self.path / SHARD_MAP).is_file()

    def shard_of(self, user_ids: np.ndarray) -> np.ndarray:
        """The shard index of each user id (every id >= 0 has one)."""
        starts = np.array([s.lo for s in self.shards[1:]], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(user_ids, dtype=np.int64), side="right")


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARD_MAP).is_file()


def read_shard_map(path: Path | str) -> ShardMap:
    """Read and check the shard map of a model directory (one shard if unsharded).

    Raises ArtifactError naming the problem: unreadable map, another format version, a
    missing shard, a gap or an overlap between ranges, a missing shard directory.
    """
    path = Path(path)
    if not is_sharded(path):
        manifest = read_json_object(path / MANIFEST)
        whole = ShardRange(0, ".", 0, None, int(manifest.get("n_users", 0)), {})
        return ShardMap(path, str(manifest.get("model_version")), (whole,), manifest)
    doc = read_json_object(path / SHARD_MAP)
    if doc.get("format_version") != SHARD_MAP_VERSION:
        raise ArtifactError(
            f"{SHARD_MAP}: format_version {doc.get('format_version')!r} is not supported"
        )
    for key in ("model_version", "n_playlists", "dim", "shards", "shared"):
        if key not in doc:
            raise ArtifactError(f"{SHARD_MAP}: field {key!r} is missing")
    try:
        shards = tuple(
            ShardRange(
                int(s["index"]),
                str(s["dir"]),
                int(s["lo"]),
                None if s["hi"] is None else int(s["hi"]),
                int(s["n_users"]),
                dict(s["files"]),
            )
            for s in doc["shards"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{SHARD_MAP}: a shard entry is malformed ({exc!r})") from exc
    check_ranges(shards)
    for s in shards:
        if not (path / s.directory).is_dir():
            raise ArtifactError(
                f"{SHARD_MAP}: directory {s.directory} of shard {s.index} is missing"
            )
    return ShardMap(path, str(doc["model_version"]), shards, doc)


def check_ranges(shards: tuple[ShardRange, ...]) -> None:
    """Refuse a map whose shards are not 0..N-1 with contiguous ranges from 0 to no bound.

    Raises ArtifactError naming the missing shard, the gap or the overlap.
    """
    if not shards:
        raise ArtifactError(f"{SHARD_MAP}: no shards")
    indexes = sorted(s.index for s in shards)
    missing = sorted(set(range(len(shards))) - set(indexes))
    if missing or len(set(indexes)) != len(indexes):
        raise ArtifactError(
            f"{SHARD_MAP}: shards must be numbered 0..{len(shards) - 1}; "
            f"missing {missing}, listed {indexes}"
        )
    ordered = sorted(shards, key=lambda s: s.index)
    if ordered[0].lo != 0:
        raise ArtifactError(f"{SHARD_MAP}: shard 0 starts at {ordered[0].lo}, not 0")
    for a, b in itertools.pairwise(ordered):
        if a.hi is None or a.hi > b.lo:
            raise ArtifactError(
                f"{SHARD_MAP}: shards {a.index} and {b.index} overlap "
                f"(shard {a.index} ends at {a.hi}, shard {b.index} starts at {b.lo})"
            )
        if a.hi < b.lo:
            raise ArtifactError(
                f"{SHARD_MAP}: gap between shards {a.index} and {b.index}: "
                f"user ids {a.hi}..{b.lo - 1} belong to no shard"
            )
    if ordered[-1].hi is not None:
        raise ArtifactError(
            f"{SHARD_MAP}: the last shard ends at {ordered[-1].hi}; "
            f"user ids from {ordered[-1].hi} on belong to no shard"
        )


def load_model(path: Path | str, shard: int | None, *, verify_checksums: bool = True) -> Artifacts:
    """Load shard ``shard`` of a model directory, or a whole unsharded directory.

    ``shard`` None or 0 loads an unsharded directory; a sharded one needs its index.
    Raises ArtifactError for a bad map, a shard that does not exist, or a missing,
    corrupt or inconsistent file.
    """
    path = Path(path)
    if not is_sharded(path):
        if shard not in (None, 0):
            raise ArtifactError(f"{path} is not sharded; there is no shard {shard}")
        return load_artifacts(path, verify_checksums=verify_checksums)
    smap = read_shard_map(path)
    if shard is None or not 0 <= shard < smap.count:
        raise ArtifactError(
            f"{path} is split into {smap.count} shards; give a shard 0..{smap.count - 1} "
            f"(recfleet worker --shard K)"
        )
    entry = next(s for s in smap.shards if s.index == shard)
    shard_dir, shared_dir = path / entry.directory, path / SHARED_DIR
    for directory, names, recorded in (
        (shard_dir, SHARD_FILES, entry.files),
        (shared_dir, SHARED_FILES, smap.doc["shared"]),
    ):
        check_recorded_files(
            directory,
            names,
            recorded,
            record=SHARD_MAP,
            verify=verify_checksums,
            prefix=f"{directory.name}/",
        )
    users_path, playlists_path = shard_dir / USER_EMBEDDINGS, shared_dir / PLAYLIST_EMBEDDINGS
    manifest = {
        **{k: v for k, v in smap.doc.items() if k not in ("shards", "shared")},
        "n_users": entry.n_users,
        "shard": shard,
        "shards": smap.count,
    }
    arrays: dict[str, Any] = {k: load_npy(shard_dir / f, k) for k, f in SHARD_NPY.items()}
    arrays |= {k: load_npy(shared_dir / f, k) for k, f in SHARED_NPY.items()}
    art = Artifacts(
        path=path,
        manifest=manifest,
        user_embeddings=map_tensor(users_path, safetensors_layout(users_path), "user"),
        playlist_embeddings=map_tensor(
            playlists_path, safetensors_layout(playlists_path), "playlist"
        ),
        **arrays,
    )
    check_shapes(art)
    ids = art.user_ids
    if len(ids) and (int(ids[0]) < entry.lo or (entry.hi is not None and int(ids[-1]) >= entry.hi)):
        raise ArtifactError(f"shard {shard}: user ids outside its range {entry.lo}..{entry.hi}")
    return art


def file_entries(directory: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each named file, as the shard map records them."""
    return {
        n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)}
        for n in names
    }


def shard_count(root: Path | str) -> int:
    """Shards of the model in use under ``root`` (1 when unsharded, absent or unreadable)."""
    try:
        return read_shard_map(current_dir(Path(root))).count
    except (ArtifactError, OSError):
        return 1


def model_manifest(path: Path | str) -> dict[str, Any]:
    """The model-wide manifest fields (version, sizes, metrics) of a model directory,
    sharded or not. Raises ArtifactError when it does not read."""
    path = Path(path)
    if is_sharded(path):
        return read_shard_map(path).doc
    return read_manifest(path)


def interleave(runs: list[list[int]]) -> list[int]:
    """Ids taken round-robin from ``runs`` (a0, b0, a1, b1, ...), each run's order kept.

    Submitting users of every shard in every request keeps every shard busy from the
    start; in ascending order the first requests would all go to the first shard.
    """
    out: list[int] = []
    for i in range(max((len(r) for r in runs), default=0)):
        out += [r[i] for r in runs if i < len(r)]
    return out


def submit_order(path: Path | str) -> list[int]:
    """Every user id 0..n_users-1 of the model at ``path``, round-robin over its shards.

    Raises ArtifactError when the model does not read.
    """
    smap = read_shard_map(path)
    ids = np.arange(int(model_manifest(path)["n_users"]), dtype=np.int64)
    if smap.count == 1:
        return ids.tolist()
    owner = smap.shard_of(ids)
    return interleave([ids[owner == k].tolist() for k in range(smap.count)])
