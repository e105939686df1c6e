"""Hostile input against a real gateway process (uvicorn on loopback) with keys switched on.

One test per class of attack: missing and wrong credentials, forged page tokens, bodies
built to make errors expensive, JSON that is not plain JSON, loose path ids, oversized
headers, slow and idle connections, bodies past the limit, more requests than the
gateway takes at once, and a flood of bad bodies while the readiness probe is asked.
Each asserts the status and the size of the answer. Counts and sizes stay small, so the
module runs in seconds; the cost of each class in gateway CPU is measured by
``recfleet bench hostile``, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import orjson
import pika
import pytest
import redis
from pydantic import PostgresDsn

from recfleet.api.auth import LIKE_TOKEN_HEADER, PAGE_TOKEN_HEADER, Role, entry, new_key
from recfleet.api.idempotency import digest
from recfleet.cli.client import _post
from recfleet.cli.fleet import LocalFleet
from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings
from tests.support.net import free_port
from tests.support.polling import wait_until
from tests.support.settings import make_settings, purge

if TYPE_CHECKING:
    from recfleet.worker.consumer import Consumer

KEYS = {role: new_key() for role in Role}
# A second client with the submit role, to try acting on the first one's batch.
OTHER_SUBMIT_KEY = new_key()
SMALL = 1024  # bytes: the most any refusal below may answer with
SUBMIT = "/api/playlist/beta_recommend/"
SHOWN_USER = 4242
JSON = {"content-type": "application/json"}
# A /readyz probe on a fresh connection takes 5-10 ms on an idle 2-core machine.
QUIET_PROBE_S = 0.02


def bearer(role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


@pytest.fixture(scope="module")
def hostile_settings(
    services: None, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    s = make_settings(
        tmp_path_factory.mktemp("no-artifacts"),
        api_keys=",".join(
            [entry(role.value, key, [role]) for role, key in KEYS.items()]
            + [entry("other-client", OTHER_SUBMIT_KEY, [Role.SUBMIT])]
        ),
        page_secret="a-test-secret-of-enough-length",
        database_url=PostgresDsn(database_url),
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        keep_alive_s=1.0,
        max_concurrency=4,
        sync_timeout_s=2.0,
        api_metrics_port=free_port(),
    )
    yield s
    purge(s)


@pytest.fixture(scope="module")
def gateway(hostile_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``recfleet api`` in its own process; yields its URL. Fails if it never gets ready."""
    logs = tmp_path_factory.mktemp("hostile")
    with LocalFleet(hostile_settings, 0, logs) as fleet:
        yield fleet.base_url
        log = (logs / "api.log").read_text()
        assert "Traceback" not in log, log[-3000:]


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}{path}",
        content=body,
        headers={"content-type": "application/json", **bearer(Role.SUBMIT), **(headers or {})},
        timeout=30,
    )


def raw_exchange(url: str, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or
    ``wait_s`` passes with nothing more): everything the server answered."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        # Sent from a thread while this one reads: a server that answers early (413) and
        # closes with our bytes unread resets the connection, which could discard an
        # answer still waiting to be read.
        sender = threading.Thread(target=_send_until_reset, args=(sock, data), daemon=True)
        sender.start()
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received + b"<still open>"
        except ConnectionResetError:
            pass  # after the answer: the server closed with our upload unread
        sender.join(wait_s)
    return received


def _send_until_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


# -- who may call what ------------------------------------------------------------------


def test_operations_need_a_key_with_their_role(gateway: str) -> None:
    body = orjson.dumps({"user_ids": [1, 2]})
    missing = httpx.post(f"{gateway}{SUBMIT}", content=body, headers=JSON)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in missing.json()["detail"] and len(missing.content) < SMALL
    unknown = post(gateway, SUBMIT, body, {"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401 and unknown.json()["detail"] == "unknown API key"
    wrong = post(gateway, SUBMIT, body, bearer(Role.READ))
    assert wrong.status_code == 403 and "lacks the submit role" in wrong.json()["detail"]
    accepted = post(gateway, SUBMIT, body)
    assert accepted.status_code == 202, accepted.text
    status = f"{gateway}/api/batches/{accepted.json()['batch_id']}"
    assert httpx.get(status, headers=bearer(Role.READ)).status_code == 200
    assert httpx.get(status, headers=bearer(Role.SUBMIT)).status_code == 403
    pin = {"batch_id": accepted.json()["batch_id"]}
    reference = f"{gateway}/api/drift/reference"
    assert httpx.put(reference, json=pin, headers=bearer(Role.READ)).status_code == 403
    assert httpx.put(reference, json=pin, headers=bearer(Role.OPERATOR)).status_code == 200
    for probe in ("/healthz", "/readyz"):
        assert httpx.get(f"{gateway}{probe}").status_code == 200


def test_only_the_key_that_opened_a_batch_appends_to_it_or_seals_it(gateway: str) -> None:
    opened = httpx.post(f"{gateway}/api/batches", json={}, headers=bearer(Role.SUBMIT))
    assert opened.status_code == 201
    batch_id = opened.json()["batch_id"]
    other = {"Authorization": f"Bearer {OTHER_SUBMIT_KEY}"}
    body = orjson.dumps({"user_ids": [1, 2], "batch_id": batch_id})
    appended = post(gateway, SUBMIT, body, other)
    assert appended.status_code == 403 and "another API key" in appended.json()["detail"]
    sealed = httpx.post(f"{gateway}/api/batches/{batch_id}/seal", headers=other)
    assert sealed.status_code == 403 and len(sealed.content) < SMALL
    assert post(gateway, SUBMIT, body).status_code == 202  # its own key
    seal = httpx.post(f"{gateway}/api/batches/{batch_id}/seal", headers=bearer(Role.OPERATOR))
    assert seal.status_code == 403  # an operator key without the submit role
    seal = httpx.post(f"{gateway}/api/batches/{batch_id}/seal", headers=bearer(Role.SUBMIT))
    assert seal.status_code == 200 and seal.json()["sealed"] is True


def test_reading_a_result_needs_the_read_role(gateway: str) -> None:
    # The read route checks its key in the route itself (the hot path): same answers.
    url = f"{gateway}/api/playlist/5"
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in missing.json()["detail"]
    for value in ("Basic dXNlcjpwYXNz", "Bearer", f"Token {KEYS[Role.READ]}"):
        refused = httpx.get(url, headers={"Authorization": value})
        assert refused.status_code == 401, value
    unknown = httpx.get(url, headers={"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401 and unknown.json()["detail"] == "unknown API key"
    wrong = httpx.get(url, headers=bearer(Role.SUBMIT))
    assert wrong.status_code == 403 and "lacks the read role" in wrong.json()["detail"]
    lower = httpx.get(url, headers={"Authorization": f"bearer {KEYS[Role.READ]}"})
    assert lower.status_code in (200, 404)
    assert httpx.get(url, headers=bearer(Role.READ)).status_code in (200, 404)


def test_metrics_and_batch_ids_are_for_operators_only(
    gateway: str, hostile_settings: Settings
) -> None:
    accepted = post(gateway, SUBMIT, orjson.dumps({"user_ids": [3]}))
    assert accepted.status_code == 202
    assert httpx.get(f"{gateway}/metrics").status_code == 401
    assert httpx.get(f"{gateway}/metrics", headers=bearer(Role.READ)).status_code == 403
    scraped = httpx.get(f"{gateway}/metrics", headers=bearer(Role.OPERATOR))
    assert scraped.status_code == 200 and "recfleet_" in scraped.text
    # Prometheus's own port: no key, the same collectors.
    own_port = f"http://127.0.0.1:{hostile_settings.api_metrics_port}/metrics"
    assert "recfleet_batches_accepted_total" in httpx.get(own_port).text


def test_openapi_declares_the_scheme_on_every_protected_operation(gateway: str) -> None:
    schema = httpx.get(f"{gateway}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    open_paths = {"/healthz", "/readyz"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in open_paths:
                assert "security" not in operation, (method, path)
                continue
            assert {"HTTPBearer": []} in operation["security"], (method, path)
            assert {"401", "403"} <= set(operation["responses"]), (method, path)


def write_result(settings: Settings, user_id: int, playlists: list[int]) -> None:
    """A result as a worker writes it, in a generation made current."""
    client = redis.Redis.from_url(str(settings.redis_url))
    keys = gen_keys = Keys(settings.redis_prefix)
    tag = model_tag("bpr-test")
    (raw,) = encode_results(np.array([playlists]), np.array([False]), 1_700_000_000, tag)
    client.hset(gen_keys.result_bucket("gen1", user_id), gen_keys.result_field(user_id), raw)
    client.hset(keys.models, str(tag), "bpr-test")
    client.zadd(gen_keys.history, {"gen1": 1.0})
    client.close()


def test_the_page_records_feedback_only_for_impressions_it_served(
    gateway: str, hostile_settings: Settings
) -> None:
    write_result(hostile_settings, SHOWN_USER, [11, 12, 13])
    # The gateway re-reads the list of generations every generation_refresh_s.
    read = f"{gateway}/api/playlist/{SHOWN_USER}"
    wait_until(
        lambda: httpx.get(read, headers=bearer(Role.READ)).status_code == 200,
        timeout=10 + hostile_settings.generation_refresh_s,
        what="the new generation to be read",
    )
    page = httpx.get(f"{gateway}/")
    assert page.status_code == 200 and "Bearer" not in page.text
    token = page.text.split('name="recfleet-page-token" content="')[1].split('"')[0]
    impressions = f"{gateway}/api/impressions"
    user = {"user_id": SHOWN_USER}
    assert httpx.post(impressions, json=user).status_code == 401
    forged = httpx.post(impressions, json=user, headers={PAGE_TOKEN_HEADER: "1.abc"})
    assert forged.status_code == 403
    shown = [httpx.post(impressions, json=user, headers={PAGE_TOKEN_HEADER: token}) for _ in "ab"]
    assert [r.status_code for r in shown] == [201, 201], shown[0].text
    first, second = (r.json()["impression_id"] for r in shown)
    like_token = shown[0].headers[LIKE_TOKEN_HEADER]

    def like(impression_id: str, token: str, like_id: str) -> httpx.Response:
        body = {"like_id": like_id, "impression_id": impression_id}
        body |= {"user_id": SHOWN_USER, "playlist_id": 12}
        return httpx.post(f"{gateway}/api/feedback", json=body, headers={PAGE_TOKEN_HEADER: token})

    uuid = "00000000-0000-4000-8000-00000000000{}".format
    assert like(second, like_token, uuid(1)).status_code == 403  # another impression
    assert like(first, token, uuid(2)).status_code == 403  # the page token is no like token
    liked = like(first, like_token, uuid(3))
    assert liked.status_code == 201 and liked.json()["rank"] == 2


def test_pages_carry_security_headers_and_docs_need_no_internet(gateway: str) -> None:
    page = httpx.get(f"{gateway}/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    for answer in (page, httpx.get(f"{gateway}/healthz"), httpx.get(f"{gateway}/api/batches/x")):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    docs = httpx.get(f"{gateway}/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    scripts = [part.split('"')[0] for part in docs.text.split('src="')[1:]]
    assert scripts and all(src.startswith("/") for src in scripts), scripts
    for src in scripts:
        assert httpx.get(f"{gateway}{src}").status_code == 200, src


# -- bodies built to make errors expensive ----------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_ids": [' + b'"x",' * 900_000 + b'"x"]}',
        b'{"user_ids": [' + b"1," * 1_500_000 + b'"x"]}',
        b'{"user_ids": [1]' + b"".join(b',"k%d": 1' % i for i in range(290_000)) + b"}",
        b'{"user_ids": [1], "' + b"k" * 3_000_000 + b'": 1}',
    ],
    ids=["every-id-bad", "last-id-bad", "many-unknown-fields", "long-field-name"],
)
def test_a_body_of_megabytes_of_errors_gets_a_small_422(gateway: str, body: bytes) -> None:
    assert len(body) > 3_000_000
    resp = post(gateway, SUBMIT, body)
    assert resp.status_code == 422, resp.text[:300]
    assert len(resp.content) < SMALL, len(resp.content)
    assert b"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk" not in resp.content


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_ids": [1e400]}',
        b'{"user_ids": [1], "x": 1e400}',
        b'{"user_ids": [NaN]}',
        b'{"user_ids": [1], "x": NaN}',
        b'{"user_ids": [Infinity]}',
        b'{"user_ids": [-Infinity]}',
        b'{"user_ids": [18446744073709551616]}',
        b'{"user_ids": [1' + b"0" * 5000 + b"]}",
        b'{"user_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"user_ids": [1], "x": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
        b'\xff\xfe{"user_ids": [1]}',
    ],
    ids=[
        "1e400",
        "1e400-elsewhere",
        "NaN",
        "NaN-elsewhere",
        "Infinity",
        "-Infinity",
        "2**64",
        "5000-digits",
        "deep-arrays",
        "deep-objects",
        "not-utf8",
    ],
)
def test_json_that_is_not_plain_json_is_422(gateway: str, body: bytes) -> None:
    resp = post(gateway, SUBMIT, body)
    assert resp.status_code == 422, resp.text[:300]
    assert len(resp.content) < SMALL


@pytest.mark.parametrize("user_id", ["5.0", "+5", "%205", "5%20", "0x5", "1e3", "5_0", "٥"])
def test_path_ids_are_strict_integers(gateway: str, user_id: str) -> None:
    resp = httpx.get(f"{gateway}/api/playlist/{user_id}", headers=bearer(Role.READ))
    assert resp.status_code == 422, (user_id, resp.status_code)
    assert len(resp.content) < SMALL


# -- headers and connections ------------------------------------------------------------


def test_oversized_headers_are_refused_and_never_echoed(
    gateway: str, hostile_settings: Settings
) -> None:
    # Just over the bound is refused whatever the reads: the bound counts the target and
    # the headers as the parser hands them over (the method and version words aside).
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    pad = hostile_settings.max_header_bytes - len(head) - len(b"X-Pad: \r\n") + 32
    over = raw_exchange(gateway, head + b"X-Pad: " + b"p" * pad + b"\r\n\r\n")
    assert over.startswith(b"HTTP/1.1 400 ") and len(over) < SMALL
    within = raw_exchange(gateway, head + b"X-Pad: " + b"p" * (pad - 64) + b"\r\n\r\n")
    assert within.startswith(b"HTTP/1.1 200 ")
    # Far over it, the server answers and closes while the client is still sending, so the
    # client may see the answer or only the reset that the unread bytes cause: both refuse.
    huge = "k" * 1_000_000
    try:
        resp = post(gateway, SUBMIT, b'{"user_ids": [1]}', {"Idempotency-Key": huge})
        assert resp.status_code == 400 and len(resp.content) < SMALL
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        pass
    assert httpx.get(f"{gateway}/healthz", timeout=10).status_code == 200
    long_key = "k" * (hostile_settings.max_header_bytes // 2)  # within the limit, bad pattern
    resp = post(gateway, SUBMIT, b'{"user_ids": [1]}', {"Idempotency-Key": long_key})
    assert resp.status_code == 422 and len(resp.content) < SMALL
    assert long_key[:100] not in resp.text


def test_slow_headers_slow_bodies_and_idle_connections_are_closed(gateway: str) -> None:
    # The timeouts here are 1 s; a connection still open after 5 s fails the test.
    assert raw_exchange(gateway, b"") == b""
    assert raw_exchange(gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == b""
    slow_body = (
        b"POST /api/playlist/beta_recommend/ HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n"
        + f"Authorization: Bearer {KEYS[Role.SUBMIT]}\r\n\r\n".encode()
        + b'{"user_ids": ['
    )
    answer = raw_exchange(gateway, slow_body)
    assert answer.startswith(b"HTTP/1.1 408 ") and not answer.endswith(b"<still open>")
    idle = raw_exchange(gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.startswith(b"HTTP/1.1 200 ") and not idle.endswith(b"<still open>")


def test_the_body_limit_holds_through_uvicorn(gateway: str, hostile_settings: Settings) -> None:
    limit = hostile_settings.max_body_bytes
    head = (
        b"POST /api/playlist/beta_recommend/ HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\n"
        + f"Authorization: Bearer {KEYS[Role.SUBMIT]}\r\n".encode()
    )
    declared = raw_exchange(gateway, head + f"Content-Length: {limit + 1}\r\n\r\n".encode())
    assert declared.startswith(b"HTTP/1.1 413 ")
    chunk = b"1," * 32768
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 2))
    chunked = raw_exchange(gateway, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert len(chunked) < SMALL


def test_past_the_concurrency_limit_the_answer_is_503_with_retry_after(
    gateway: str, hostile_settings: Settings
) -> None:
    # No worker consumes here: each synchronous request holds its slot until its 504.
    n = hostile_settings.max_concurrency * 2
    with ThreadPoolExecutor(n) as pool:
        answers = list(
            pool.map(
                lambda _: post(gateway, "/api/playlist/recommend/", b'{"user_ids": [1]}'),
                range(n),
            )
        )
        statuses = sorted(r.status_code for r in answers)
    busy = [r for r in answers if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" for r in busy), statuses
    assert set(statuses) <= {503, 504}, statuses
    assert httpx.get(f"{gateway}/readyz").status_code == 200


FLOOD = """
import sys, httpx
url, key = sys.argv[1], sys.argv[2]
bad = b'{"user_ids": [' + b'"x",' * 300_000 + b'"x"]}'  # 1.2 MB of bad ids, as in the issue
headers = {"content-type": "application/json", "Authorization": f"Bearer {key}"}
with httpx.Client(timeout=30) as client:
    while True:
        status = client.post(url, content=bad, headers=headers).status_code
        assert status in (422, 503), status
        print(status, flush=True)
"""


def probe_readyz(url: str, n: int = 5) -> list[float]:
    """Seconds each of ``n`` probes took, each on a fresh connection, 0.1 s apart."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        took.append(time.perf_counter() - start)
        time.sleep(0.1)
    return took


def test_readyz_answers_within_100_ms_during_a_flood_of_bad_bodies(gateway: str) -> None:
    # What a probe takes on this machine right now, without the flood: the machine's own
    # share (other processes, a busy 2-core box), which the flood must not add 100 ms to.
    quiet = probe_readyz(gateway)
    # The flood comes from other processes, so the probe's own timing is not slowed by
    # flooding threads of this one, and they run at a lower priority: the load generator
    # must not starve the gateway of CPU, the flood's requests must be what costs.
    command = [sys.executable, "-c", FLOOD, f"{gateway}{SUBMIT}", KEYS[Role.SUBMIT]]
    flooders = [
        subprocess.Popen(["nice", "-n", "10", *command], stdout=subprocess.PIPE) for _ in range(2)
    ]
    try:
        for flooder in flooders:  # each has had a bad body refused: the flood is on
            assert flooder.stdout is not None and flooder.stdout.readline().strip() == b"422"
        flooded = probe_readyz(gateway, n=7)
        assert all(f.poll() is None for f in flooders), "a flooder saw an unexpected answer"
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait()
            assert flooder.stdout is not None
            flooder.stdout.close()
    # The bound, 100 ms, on a machine where quiet probes take what they take on an
    # idle one (under QUIET_PROBE_S); on a loaded machine every wait stretches, the flood's
    # included, so the bound stretches by as much. The typical flooded probe meets it, and
    # no probe stalls (the old gateway took 6.5 s here), allowing one scheduling hiccup of
    # a shared 2-core box per run.
    slowdown = max(1.0, statistics.median(quiet) / QUIET_PROBE_S)
    shown = [f"{p * 1000:.0f} ms" for p in quiet + flooded]
    assert statistics.median(flooded) < 0.1 * slowdown, f"quiet, then flooded: {shown}"
    assert max(flooded) < 1.0 * slowdown, f"quiet, then flooded: {shown}"


# -- idempotency and the CLI -------------------------------------------------------------


def test_submit_retries_a_key_still_held_until_the_lease_ends(
    gateway: str, hostile_settings: Settings
) -> None:
    body = orjson.dumps({"user_ids": [5, 6]})
    key = "nightly-2026-11-30-0"
    # What a gateway that died mid-publish leaves: a pending claim, with its lease.
    client = redis.Redis.from_url(str(hostile_settings.redis_url))
    claim = orjson.dumps({"state": "pending", "body": digest(orjson.dumps([None, [5, 6]]))})
    client.set(f"{hostile_settings.redis_prefix}:idem:{digest(key)}", claim, px=1500)
    client.close()
    headers = {"content-type": "application/json", "Idempotency-Key": key}
    assert post(gateway, SUBMIT, body, headers).status_code == 409
    with httpx.Client(base_url=gateway, timeout=30, headers=bearer(Role.SUBMIT)) as http:
        answer = _post(http, SUBMIT, 202, content=body, headers=headers, still_running_for_s=20)
    assert answer["users"] == 2


# -- artifacts a user brings -------------------------------------------------------------


def _break(artifacts: Path, tmp_path: Path, name: str, change: object) -> Path:
    import json
    import shutil

    from recfleet.shared.artifacts import write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(artifacts, broken)
    array = np.load(broken / name).copy()
    change(array)  # type: ignore[operator]
    np.save(broken / name, array)
    write_manifest(broken, json.loads((broken / "manifest.json").read_text()))
    return broken


@pytest.mark.parametrize(
    ("name", "change", "reason"),
    [
        ("candidates_indices.npy", lambda a: a.__setitem__(3, 10**6), "out of range"),
        ("candidates_indices.npy", lambda a: a.__setitem__(3, -1), "out of range"),
        ("fallback.npy", lambda a: a.__setitem__(0, 10**6), "out of range"),
        ("user_ids.npy", lambda a: a.__setitem__(slice(0, 2), a[1::-1].copy()), "ascending"),
        ("user_ids.npy", lambda a: a.__setitem__(1, a[0]), "ascending"),
    ],
    ids=["candidate-too-big", "candidate-negative", "fallback-too-big", "swapped", "repeated"],
)
def test_artifacts_with_bad_candidates_or_user_ids_are_refused(
    small_artifacts: Path, tmp_path: Path, name: str, change: object, reason: str
) -> None:
    from recfleet.shared.artifacts import load_artifacts
    from recfleet.shared.errors import ArtifactError

    with pytest.raises(ArtifactError, match=reason):
        load_artifacts(_break(small_artifacts, tmp_path, name, change))


# -- workers ------------------------------------------------------------------------------


def test_a_created_at_the_result_encoder_cannot_hold_is_refused_by_the_schema() -> None:
    from recfleet.shared.errors import UndecodableMessage
    from recfleet.shared.messages import Job, decode_job

    job = Job(job_id="j", batch_id="b", user_ids=[1], created_at=1.0).model_dump()
    for created_at in (2**32, 1e300, -1.0, 0):
        with pytest.raises(UndecodableMessage, match="created_at"):
            decode_job(orjson.dumps({**job, "created_at": created_at}))
    for user_ids in ([], list(range(1001)), [2**63]):
        with pytest.raises(UndecodableMessage, match="user_ids"):
            decode_job(orjson.dumps({**job, "user_ids": user_ids}))


async def test_a_job_that_fails_in_any_way_is_dead_lettered_and_counted(
    running_consumer: Consumer,
    fleet_api: httpx.AsyncClient,
    fleet_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def encoder_refuses(job: object, **_: object) -> None:
        raise OverflowError("int too big to convert")  # what the result encoder raised

    monkeypatch.setattr(running_consumer.handler, "start", encoder_refuses)
    accepted = await fleet_api.post(SUBMIT, json={"user_ids": [1, 2, 3]})
    assert accepted.status_code == 202
    batch = f"/api/batches/{accepted.json()['batch_id']}"
    deadline = time.monotonic() + 30
    while (status := (await fleet_api.get(batch)).json())["state"] != "failed":
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert status["jobs_dead"] == 1 and status["users_dead"] == 3
    channel = pika.BlockingConnection(pika.URLParameters(str(fleet_settings.amqp_url))).channel()
    try:
        jobs = channel.queue_declare(fleet_settings.jobs_queue, passive=True).method
        dead = channel.queue_declare(fleet_settings.dead_letter_queue, passive=True).method
    finally:
        channel.connection.close()
    assert jobs.message_count == 0 and dead.message_count == 1
    assert running_consumer.healthy  # the lane went on; nothing was left unacked


def test_healthz_is_503_while_the_compute_lane_is_stuck(running_consumer: Consumer) -> None:
    from recfleet.worker.lanes import URGENT
    from recfleet.worker.server import serve

    running_consumer.settings = running_consumer.settings.model_copy(
        update={"job_stuck_after_s": 0.3}
    )
    server = serve(
        "127.0.0.1",
        0,
        lambda: running_consumer.healthy,
        lambda: running_consumer.alive,
        lambda: running_consumer.stuck,
    )
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    release = threading.Event()
    try:
        assert httpx.get(url).status_code == 200
        running_consumer._lane.submit(URGENT, lambda: release.wait(30))  # a job that hangs
        deadline = time.monotonic() + 10
        while (answer := httpx.get(url)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert answer.status_code == 503 and answer.text == "compute lane stuck\n"
        release.set()
        while httpx.get(url).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
