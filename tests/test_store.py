"""Result encoding and the batch ledger document."""

from __future__ import annotations

import numpy as np

from recfleet.shared.codec import decode_result, encode_results, model_tag
from recfleet.shared.keys import Keys
from recfleet.shared.ledger import BatchState, LedgerStatus


def test_results_round_trip_with_padding_and_cold_flag() -> None:
    playlists = np.array([[3, 1, 2], [7, -1, -1]], dtype=np.int64)
    raw = encode_results(playlists, np.array([False, True]), 1_700_000_000, model_tag("m1"))
    first, second = (decode_result(r) for r in raw)
    assert first.playlists == [3, 1, 2] and not first.cold
    assert second.playlists == [7] and second.cold
    assert first.generated_at == 1_700_000_000 and first.model_tag == model_tag("m1")


def test_wide_playlist_ids_survive() -> None:
    playlists = np.array([[2**40, 5]], dtype=np.int64)
    (raw,) = encode_results(playlists, np.array([False]), 1, 2)
    assert decode_result(raw).playlists == [2**40, 5]


def test_encoding_is_deterministic() -> None:
    playlists = np.arange(20).reshape(2, 10)
    a = encode_results(playlists, np.zeros(2, bool), 5, 6)
    b = encode_results(playlists.copy(), np.zeros(2, bool), 5, 6)
    assert a == b and len(a[0]) == 9 + 4 * 10


def test_keys_keep_a_batch_in_one_slot_and_spread_results() -> None:
    keys = Keys("rf")
    assert keys.batch("abc").endswith("{abc}") and "{abc}" in keys.batch_done("abc")
    gen = keys
    assert gen.result_bucket("g", 0) == gen.result_bucket("g", 127) != gen.result_bucket("g", 128)
    assert gen.result_field(127) == 127 and gen.result_field(128) == 0


def test_batch_state_machine() -> None:
    base = {"jobs_total": 4, "users_total": 4000, "created_at": "100.0"}
    assert LedgerStatus.parse("b", base).state == BatchState.QUEUED
    running = {**base, "jobs_done": 1, "users_done": 1000, "last_done_at": "102.0"}
    status = LedgerStatus.parse("b", running)
    assert status.state == BatchState.RUNNING and status.users_per_s == 500.0
    assert status.eta_s == 6.0 and status.document()["state"] == "running"
    assert LedgerStatus.parse("b", {**base, "jobs_done": 4}).state == BatchState.DONE
    assert LedgerStatus.parse("b", {**base, "jobs_done": 3, "jobs_dead": 1}).state == "failed"


def test_bucket_mappings_group_by_hash_and_keep_the_last_duplicate() -> None:
    from recfleet.shared.keys import Keys, bucket_mappings

    keys = Keys("p")
    ids = [5, 130, 3, 5, 300, 2**40 + 1]
    values = [b"a", b"b", b"c", b"d", b"e", b"f"]
    got = bucket_mappings(keys, "g", ids, values)
    want: dict[str, dict[int, bytes]] = {}
    for uid, value in zip(ids, values, strict=True):
        want.setdefault(keys.result_bucket("g", uid), {})[keys.result_field(uid)] = value
    assert got == want
    assert got[keys.result_bucket("g", 5)] == {5: b"d", 3: b"c"}
