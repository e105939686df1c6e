"""The packed result stored per user: ``<B flags><I generated_at><I model_tag>`` then the
playlist ids as little-endian uint32 (or int64 when flag WIDE is set)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import overload

import numpy as np

HEADER = struct.Struct("<BII")
FLAG_COLD = 1
FLAG_WIDE = 2
NO_PLAYLIST = -1


@overload
def as_text(value: None) -> None: ...
@overload
def as_text(value: object) -> str: ...
def as_text(value: object) -> str | None:
    """A Redis reply as text: bytes decoded, None kept (a missing field), anything else
    through ``str``."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def model_tag(model_version: str) -> int:
    """A stable 32-bit tag for a model version, stored in every result instead of the string."""
    return zlib.crc32(model_version.encode())


def result_records(
    playlists: np.ndarray, cold: np.ndarray, generated_at: int, tag: int
) -> np.ndarray:
    """Pack one result per row of ``playlists`` ([n, k] external ids, NO_PLAYLIST = padding)
    as uint8 [n, width]: row ``i`` holds user ``i``'s packed result. The whole job is
    encoded with numpy at once."""
    n, k = playlists.shape
    wide = bool(n and (playlists.max() >= 2**32))
    item = np.dtype("<i8") if wide else np.dtype("<u4")
    rec = np.dtype([("flags", "u1"), ("ts", "<u4"), ("tag", "<u4"), ("p", item, (k,))])
    out = np.empty(n, dtype=rec)
    out["flags"] = np.where(cold, FLAG_COLD, 0) | (FLAG_WIDE if wide else 0)
    out["ts"] = generated_at
    out["tag"] = tag
    out["p"] = (
        playlists.astype(item.type, copy=False)
        if wide
        else np.where(playlists < 0, 0xFFFFFFFF, playlists).astype(np.uint32)
    )
    return out.view(np.uint8).reshape(n, rec.itemsize)


def split_records(records: np.ndarray) -> list[bytes]:
    """One ``bytes`` per row of ``result_records``'s array."""
    raw, size = records.tobytes(), records.shape[1]
    return [raw[i * size : (i + 1) * size] for i in range(len(records))]


def encode_results(
    playlists: np.ndarray, cold: np.ndarray, generated_at: int, tag: int
) -> list[bytes]:
    """``result_records`` as one ``bytes`` per user."""
    return split_records(result_records(playlists, cold, generated_at, tag))


@dataclass(frozen=True)
class Result:
    playlists: list[int]
    cold: bool
    generated_at: int
    model_tag: int


def decode_result(raw: bytes) -> Result:
    """Unpack one result. Raises ValueError when the bytes are not a packed result."""
    if len(raw) < HEADER.size:
        raise ValueError("result shorter than its header")
    flags, ts, tag = HEADER.unpack_from(raw)
    # struct (its format cache makes this a few hundred ns) rather than numpy: one short
    # row per read on the gateway's hottest path.
    body = len(raw) - HEADER.size
    if flags & FLAG_WIDE:
        ids = struct.unpack_from(f"<{body // 8}q", raw, HEADER.size)
        playlists = [x for x in ids if x != NO_PLAYLIST]
    else:
        ids = struct.unpack_from(f"<{body // 4}I", raw, HEADER.size)
        playlists = [x for x in ids if x != 0xFFFFFFFF]
    return Result(playlists=playlists, cold=bool(flags & FLAG_COLD), generated_at=ts, model_tag=tag)
