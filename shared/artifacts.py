"""The artifact directory: what ``recfleet artifacts build`` writes and workers load.

A directory holds::

    manifest.json                format version, model version, sizes, checksums, metrics
    embeddings.safetensors       "user" [n_users, dim] and "playlist" [n_playlists, dim], F32
    candidates_indptr.npy        int64 [n_users + 1]   CSR row pointers, one row per user row
    candidates_indices.npy       int32 [nnz]           candidate playlist rows
    user_ids.npy                 int64 [n_users]       external user id of each row, ascending
    playlist_ids.npy             int64 [n_playlists]   external playlist id of each row
    playlist_popularity.npy      int64 [n_playlists]   training interactions per playlist row
    fallback.npy                 int32 [n_fallback]    playlist rows for cold users, best first

Every array is memory-mapped, so worker processes on one host share one copy
in the page cache. This module needs only numpy; it never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recfleet.shared.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# In a directory of artifact directories: the name of the one in use.
CURRENT = "CURRENT"
# A sharded model's map (see shared.shards); its directory has no manifest.json.
SHARD_MAP = "shards.json"
EMBEDDINGS = "embeddings.safetensors"
NPY_FILES: dict[str, str] = {
    "candidates_indptr": "candidates_indptr.npy",
    "candidates_indices": "candidates_indices.npy",
    "user_ids": "user_ids.npy",
    "playlist_ids": "playlist_ids.npy",
    "playlist_popularity": "playlist_popularity.npy",
    "fallback": "fallback.npy",
}
NPY_DTYPES: dict[str, type] = {
    "candidates_indptr": np.int64,
    "candidates_indices": np.int32,
    "user_ids": np.int64,
    "playlist_ids": np.int64,
    "playlist_popularity": np.int64,
    "fallback": np.int32,
}
ALL_FILES = (EMBEDDINGS, *NPY_FILES.values())
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16}


@dataclass(frozen=True)
class Artifacts:
    """A loaded, checked artifact directory.

    Arrays are copy-on-write memory maps: pages stay shared between processes unless
    written, and nothing written ever reaches the files.
    """

    path: Path
    manifest: dict[str, Any]
    user_embeddings: np.ndarray
    playlist_embeddings: np.ndarray
    candidates_indptr: np.ndarray
    candidates_indices: np.ndarray
    user_ids: np.ndarray
    playlist_ids: np.ndarray
    playlist_popularity: np.ndarray
    fallback: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def n_users(self) -> int:
        return int(self.manifest["n_users"])

    @property
    def n_playlists(self) -> int:
        return int(self.manifest["n_playlists"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Map external user ids to rows; -1 where the user is unknown."""
        ids = np.asarray(user_ids, dtype=np.int64)
        pos = np.searchsorted(self.user_ids, ids)
        pos_clipped = np.minimum(pos, len(self.user_ids) - 1)
        found = (pos < len(self.user_ids)) & (self.user_ids[pos_clipped] == ids)
        return np.where(found, pos_clipped, -1)


def check_recorded_files(
    directory: Path,
    names: Iterable[str],
    recorded: Mapping[str, Any],
    *,
    record: str,
    verify: bool,
    prefix: str = "",
) -> None:
    """Check that each of ``names`` is in ``directory`` with the size (and, with
    ``verify``, the SHA-256) that ``record`` (a manifest or shard map) wrote down in
    ``recorded``. Messages name a file as ``prefix + name``.

    Raises ArtifactError naming the file and the problem.
    """
    for name in names:
        label = f"{prefix}{name}"
        fpath = directory / name
        if not fpath.is_file():
            raise ArtifactError(f"{label} is missing from {directory}")
        expected = recorded.get(name)
        if not isinstance(expected, dict):
            raise ArtifactError(f"{record}: no checksum recorded for {label}")
        size = fpath.stat().st_size
        if size != expected.get("bytes"):
            raise ArtifactError(f"{label}: {size} bytes, {record} says {expected.get('bytes')}")
        if verify and sha256_file(fpath) != expected.get("sha256"):
            raise ArtifactError(f"{label}: checksum mismatch (file changed or corrupt)")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def safetensors_layout(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """Read a safetensors header: name -> (dtype, shape, absolute begin, absolute end).

    The format is an 8-byte little-endian header length, a JSON header, then raw
    tensor bytes; reading it here lets workers memory-map tensors instead of
    copying them into each process.

    Raises ArtifactError when the header is unreadable.
    """
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ArtifactError(f"{path.name}: header length {n} is not plausible")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise ArtifactError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    base = 8 + n
    layout = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        layout[name] = (info["dtype"], list(info["shape"]), base + begin, base + end)
    return layout


def map_tensor(path: Path, layout: dict, name: str) -> np.ndarray:
    if name not in layout:
        raise ArtifactError(f"{path.name}: tensor {name!r} is missing")
    dtype_name, shape, begin, end = layout[name]
    dtype = _SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise ArtifactError(f"{path.name}: tensor {name!r} has dtype {dtype_name}, want F32 or F16")
    if len(shape) != 2 or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ArtifactError(f"{path.name}: tensor {name!r} size does not match shape {shape}")
    return _plain(np.memmap(path, dtype=dtype, mode="c", offset=begin, shape=tuple(shape)))


def _plain(mapped: np.memmap) -> np.ndarray:
    """A plain ndarray view of a mapped array (the mapping stays open through it): a
    np.memmap runs Python-level __getitem__ and __array_finalize__ on every indexing,
    a few microseconds each on a worker's hot path."""
    return np.asarray(mapped)


def load_npy(path: Path, key: str) -> np.ndarray:
    try:
        arr = _plain(np.load(path, mmap_mode="c", allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path.name}: not a readable .npy file ({exc})") from exc
    want = np.dtype(NPY_DTYPES[key])
    if arr.dtype != want or arr.ndim != 1:
        raise ArtifactError(f"{path.name}: dtype {arr.dtype} ndim {arr.ndim}, want 1-d {want}")
    return arr


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object read from ``path``.

    Raises ArtifactError when the file is missing, not JSON, or not an object.
    """
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing from {path.parent}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path.name} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path.name} is not a JSON object")
    return doc


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check the manifest of an artifact directory.

    Raises ArtifactError for a missing directory or manifest, bad JSON, or another format version.
    """
    if not path.is_dir():
        raise ArtifactError(f"artifact directory {path} does not exist")
    manifest = read_json_object(path / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{MANIFEST}: format_version {version!r} is not supported (this build reads "
            f"{FORMAT_VERSION})"
        )
    for key in ("model_version", "n_users", "n_playlists", "dim", "files"):
        if key not in manifest:
            raise ArtifactError(f"{MANIFEST}: field {key!r} is missing")
    return dict(manifest)


def load_artifacts(path: Path | str, *, verify_checksums: bool = True) -> Artifacts:
    """Load an artifact directory, refusing anything missing, corrupt or inconsistent.

    Raises ArtifactError naming the file and the problem.
    """
    path = Path(path)
    manifest = read_manifest(path)
    check_recorded_files(
        path, ALL_FILES, manifest["files"], record=MANIFEST, verify=verify_checksums
    )

    emb_path = path / EMBEDDINGS
    layout = safetensors_layout(emb_path)
    users = map_tensor(emb_path, layout, "user")
    playlists = map_tensor(emb_path, layout, "playlist")
    arrays: dict[str, Any] = {key: load_npy(path / fname, key) for key, fname in NPY_FILES.items()}
    art = Artifacts(
        path=path,
        manifest=manifest,
        user_embeddings=users,
        playlist_embeddings=playlists,
        **arrays,
    )
    check_shapes(art)
    return art


def check_shapes(art: Artifacts) -> None:
    n_users, n_playlists, dim = art.n_users, art.n_playlists, art.dim
    checks = [
        (
            art.user_embeddings.shape == (n_users, dim),
            "user embeddings",
            art.user_embeddings.shape,
            (n_users, dim),
        ),
        (
            art.playlist_embeddings.shape == (n_playlists, dim),
            "playlist embeddings",
            art.playlist_embeddings.shape,
            (n_playlists, dim),
        ),
        (
            art.candidates_indptr.shape == (n_users + 1,),
            "candidates_indptr",
            art.candidates_indptr.shape,
            (n_users + 1,),
        ),
        (art.user_ids.shape == (n_users,), "user_ids", art.user_ids.shape, (n_users,)),
        (
            art.playlist_ids.shape == (n_playlists,),
            "playlist_ids",
            art.playlist_ids.shape,
            (n_playlists,),
        ),
        (
            art.playlist_popularity.shape == (n_playlists,),
            "playlist_popularity",
            art.playlist_popularity.shape,
            (n_playlists,),
        ),
    ]
    for ok, what, got, want in checks:
        if not ok:
            raise ArtifactError(f"{what}: shape {tuple(got)}, manifest implies {want}")
    indptr = art.candidates_indptr
    if len(indptr) and (int(indptr[0]) != 0 or bool(np.any(np.diff(indptr) < 0))):
        raise ArtifactError("candidates_indptr must start at 0 and never decrease")
    nnz = int(art.candidates_indptr[-1]) if n_users else 0
    if art.candidates_indices.shape != (nnz,):
        raise ArtifactError(
            f"candidates_indices: shape {art.candidates_indices.shape}, indptr implies ({nnz},)"
        )
    if len(art.fallback) == 0:
        raise ArtifactError("fallback.npy is empty; cold users would get nothing")
    for name, arr in (("candidates_indices", art.candidates_indices), ("fallback", art.fallback)):
        if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= n_playlists):
            raise ArtifactError(f"{name}: playlist row out of range 0..{n_playlists - 1}")
    if n_users > 1 and not bool(np.all(art.user_ids[1:] > art.user_ids[:-1])):
        raise ArtifactError("user_ids.npy must be strictly ascending")


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in format version, sizes and checksums of every file, then write manifest.json."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {
        name: {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
        for name in ALL_FILES
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def current_dir(root: Path) -> Path:
    """The artifact directory to use now. Raises ArtifactError when there is none."""
    if (root / MANIFEST).is_file() or (root / SHARD_MAP).is_file():
        return root
    pointer = root / CURRENT
    if not pointer.is_file():
        raise ArtifactError(f"{root} has neither {MANIFEST} nor a {CURRENT} file")
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise ArtifactError(f"{pointer}: {name!r} is not a directory name")
    return root / name
