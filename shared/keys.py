"""Every Redis key recfleet writes, in one place (``P`` is the prefix, ``rf`` by default).

::

    P:r:<gen>:{<bucket>}    hash of one generation's results: bucket = user_id >> BUCKET_BITS,
                            field = the low bits of the id, value = a packed result
                            (shared.codec); small hashes keep Redis's compact listpack.
                            ``<gen>`` is a declared run's batch id, or ``live`` (BASE)
    P:gen:history           sorted set, active generation -> time it became current
    P:gen:runs              sorted set, declared run -> time its first result was written
                            (prune finds the keyspaces of rejected and retired runs here)
    P:models                hash, model tag (decimal) -> model version string
    P:b:{<batch_id>}        hash, the batch ledger (shared.ledger)
    P:b:{<batch_id>}:done   set of finished job ids (makes progress idempotent)
    P:b:{<batch_id>}:dead   set of dead-lettered job ids
    P:b:{<batch_id>}:dead-users  hash, dead-lettered job id -> its users (packed int64)
    P:batches               sorted set, batch id -> time of its latest progress
    P:drift:reference       string, the batch id an operator pinned as drift reference
    P:idem:<sha256>         string, an Idempotency-Key's stored answer

Cluster: the ``{batch_id}`` hash tag keeps a batch's keys in one slot, so the ledger
scripts touch one slot only. The ``{<bucket>}`` hash tag puts every generation's copy of
one bucket in the same slot, so the read script looks a user up in all generations on one
node in one round trip; buckets spread over all slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BUCKET_BITS = 7
# The keyspace that ad-hoc results go to while no generation is current; read last.
BASE = "live"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}"

    def batch_done(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}:done"

    def batch_dead(self, batch_id: str) -> str:
        return f"{self.prefix}:b:{{{batch_id}}}:dead"

    def batch_dead_users(self, batch_id: str) -> str:
        """Hash: dead-lettered job id -> its user ids as packed little-endian int64."""
        return f"{self.prefix}:b:{{{batch_id}}}:dead-users"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    @property
    def drift_reference(self) -> str:
        return f"{self.prefix}:drift:reference"

    def idempotency(self, key_digest: str) -> str:
        return f"{self.prefix}:idem:{key_digest}"

    @property
    def history(self) -> str:
        """Sorted set: active generation -> time it became current (newest = current)."""
        return f"{self.prefix}:gen:history"

    @property
    def runs(self) -> str:
        """Sorted set: declared run -> time its first result was written."""
        return f"{self.prefix}:gen:runs"

    def result_bucket(self, generation: str, user_id: int) -> str:
        return f"{self.result_prefix(generation)}{user_id >> BUCKET_BITS}}}"

    def result_prefix(self, generation: str) -> str:
        """A generation's result keys up to the bucket: ``P:r:<gen>:{`` (the reader adds
        ``<bucket>}``)."""
        return f"{self.prefix}:r:{generation}:{{"

    @staticmethod
    def result_field(user_id: int) -> int:
        """The user's field in its bucket: the low bits of the id (the key holds the rest).

        A small integer field keeps each listpack entry a few bytes shorter.
        """
        return user_id & ((1 << BUCKET_BITS) - 1)

    def result_pattern(self, generation: str = "*") -> str:
        return f"{self.prefix}:r:{generation}:*"

    def generation_of(self, result_key: str) -> str:
        """The generation a result key belongs to (its third part)."""
        return result_key.split(":")[2]


@dataclass(frozen=True)
class BucketGroups:
    """A job's users grouped by result hash: ``order`` sorts the users by bucket (stably),
    group ``g`` is ``order[ends[g-1]:ends[g]]``, its hash holds user ids from
    ``firsts[g]``, and ``fields[i]`` is the field of user ``order[i]``."""

    order: np.ndarray
    ends: np.ndarray
    firsts: list[int]
    fields: np.ndarray

    @classmethod
    def of(cls, user_ids: Sequence[int] | np.ndarray) -> BucketGroups:
        """Grouped with numpy (a Python call per user cost ~4 ms per job of 1000 users)."""
        ids = np.asarray(user_ids, dtype=np.int64)
        buckets = ids >> BUCKET_BITS
        order = np.argsort(buckets, kind="stable")
        firsts, starts = np.unique(buckets[order], return_index=True)
        ends = np.append(starts[1:], len(ids)) if len(ids) else starts
        ends = ends.astype(np.int64)
        fields = ids[order] & ((1 << BUCKET_BITS) - 1)
        return cls(order, ends, (firsts << BUCKET_BITS).tolist(), fields)

    def mappings(self, values: Sequence[bytes]) -> list[dict[int, bytes]]:
        """``{field: value}`` of each group, ``values`` in the users' original order; a
        later duplicate of a user overrides an earlier one, as a dict does."""
        fields = self.fields.tolist()
        ordered = [values[i] for i in self.order.tolist()]
        ends = self.ends.tolist()
        return [
            dict(zip(fields[lo:hi], ordered[lo:hi], strict=True))
            for lo, hi in zip([0, *ends][:-1], ends, strict=True)
        ]


def bucket_mappings(
    keys: Keys, generation: str, user_ids: Sequence[int] | np.ndarray, values: list[bytes]
) -> dict[str, dict[int, bytes]]:
    """Group packed results by result hash: ``{key: {field: value}}``, one HSET each.

    Within a hash, a later duplicate of a user overrides an earlier one, as a dict would.
    """
    if len(values) != len(user_ids):
        raise ValueError(f"{len(user_ids)} user ids but {len(values)} values")
    groups = BucketGroups.of(user_ids)
    return {
        keys.result_bucket(generation, first): mapping
        for first, mapping in zip(groups.firsts, groups.mappings(values), strict=True)
    }
