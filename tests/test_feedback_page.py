"""The feedback page in a real browser (Debian's headless Chromium driven by Playwright)
against a real gateway and worker: look a user up with the keyboard only, like a playlist,
find the rows in PostgreSQL. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pydantic import PostgresDsn

from recfleet.cli.client import submit, wait
from recfleet.cli.fleet import LocalFleet
from recfleet.shared.artifacts import read_manifest
from recfleet.shared.settings import Settings
from tests.support.net import free_port
from tests.support.settings import make_settings, purge

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PHONE = {"width": 390, "height": 844}
SMALLEST = {"width": 320, "height": 640}
DESKTOP = {"width": 1100, "height": 900}
SUBMITTED = list(range(100))
NOT_SUBMITTED = 5000  # a known user whose result was never computed
COLD_USER = 10**12  # unknown to the model: the workers give the popularity fallback


@pytest.fixture(scope="module")
def fleet(
    services: None,
    small_artifacts: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalFleet]:
    """A gateway and a worker that have ranked SUBMITTED and COLD_USER."""
    settings = make_settings(small_artifacts, database_url=database_url)
    try:
        with LocalFleet(settings, processes=1, log_dir=tmp_path_factory.mktemp("fleet")) as fl:
            fl.wait_workers_consuming()
            with httpx.Client(base_url=fl.base_url, timeout=60) as client:
                sub = submit(client, [*SUBMITTED, COLD_USER], chunk=1000)
                (status,) = wait(client, sub.batch_ids, sub.users, show=False)
                assert status["state"] == "done"
            yield fl
    finally:
        purge(settings)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (./run test does)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=PHONE)  # type: ignore[arg-type]
    yield context.new_page()
    context.close()


def look_up(page: Page, user_id: str) -> None:
    """Type a user id and press Enter, keyboard only."""
    page.locator("#user-id").fill("")
    page.locator("#user-id").focus()
    page.keyboard.type(user_id)
    page.keyboard.press("Enter")


def focused(page: Page) -> str:
    return str(page.evaluate("document.activeElement.id || document.activeElement.className"))


def fits_the_screen(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_keyboard_only_lookup_and_like_reach_postgresql(
    fleet: LocalFleet, page: Page, database_url: str
) -> None:
    user = 7
    served = httpx.get(f"{fleet.base_url}/api/playlist/{user}").json()
    page.goto(f"{fleet.base_url}/")
    page.keyboard.press("Tab")
    assert focused(page) == "user-id"
    page.keyboard.type(str(user))
    page.keyboard.press("Enter")

    expect(page.locator("#results")).to_be_visible()
    assert focused(page) == "results-title"  # focus moves to the list
    items = page.locator("#playlists li")
    expect(items).to_have_count(len(served["playlists"]))
    for rank, playlist in enumerate(served["playlists"], 1):
        expect(items.nth(rank - 1)).to_contain_text(f"{rank}")
        expect(items.nth(rank - 1)).to_contain_text(f"Playlist {playlist}")
    expect(page.locator("#meta-model")).to_have_text(served["model_version"])
    expect(page.locator("#meta-generation")).to_have_text(served["generation"])
    expect(page.locator("#meta-generated")).to_contain_text("UTC")
    expect(page.locator("#cold-note")).to_be_hidden()

    page.keyboard.press("Tab")
    page.keyboard.press("Tab")  # the second playlist's Like button
    page.keyboard.press("Enter")
    second = page.locator("#playlists li").nth(1).locator("button")
    expect(second).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#message")).to_contain_text(
        f"You liked playlist {served['playlists'][1]} (rank 2)"
    )
    assert fits_the_screen(page)
    page.set_viewport_size(SMALLEST)  # type: ignore[arg-type]
    assert fits_the_screen(page)
    page.set_viewport_size(PHONE)  # type: ignore[arg-type]
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "feedback-page.png", full_page=True)
    page.set_viewport_size(DESKTOP)  # type: ignore[arg-type]
    page.screenshot(path=SCREENSHOTS / "feedback-page-desktop.png", full_page=True)

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT f.playlist_id, f.rank, i.playlists, i.model_version, i.generation "
            "FROM feedback AS f JOIN impressions AS i USING (impression_id) "
            "WHERE f.user_id = %s",
            (user,),
        ).fetchall()
    assert len(rows) == 1
    playlist_id, rank, shown, model_version, generation = rows[0]
    assert (playlist_id, rank) == (served["playlists"][1], 2)
    assert shown == served["playlists"] and model_version == served["model_version"]
    assert generation == served["generation"]


def test_messages_for_bad_input_missing_and_unknown_users_and_a_failed_like(
    fleet: LocalFleet, small_artifacts: Path, page: Page, database_url: str
) -> None:
    page.goto(f"{fleet.base_url}/")
    message = page.locator("#message")

    look_up(page, "forty-two")
    expect(message).to_contain_text("Enter a user id: a whole number")
    expect(page.locator("#user-id")).to_have_attribute("aria-invalid", "true")

    look_up(page, str(NOT_SUBMITTED))
    expect(message).to_contain_text(f"No recommendations for user {NOT_SUBMITTED} yet")
    expect(page.locator("#results")).to_be_hidden()

    look_up(page, str(COLD_USER))
    expect(page.locator("#cold-note")).to_contain_text(f"User {COLD_USER} is new to the model")
    expect(page.locator("#meta-model")).to_have_text(
        read_manifest(small_artifacts)["model_version"]
    )

    # A like lost on the way is retried with the same id and recorded once.
    page.route("**/api/feedback", lambda route: route.abort())
    first = page.locator("#playlists li").first.locator("button")
    first.press("Enter")
    expect(message).to_contain_text("Your like was not sent")
    expect(first).to_have_attribute("aria-pressed", "false")
    page.unroute("**/api/feedback")
    first.press("Enter")
    expect(first).to_have_attribute("aria-pressed", "true")
    first.press("Enter")  # a second press of a liked playlist sends nothing
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM feedback WHERE user_id = %s", (COLD_USER,))
        assert row.fetchone() == (1,)


@contextmanager
def gateway(settings: Settings, log_dir: Path) -> Iterator[str]:
    """A gateway process alone (its log is ``api.log`` in ``log_dir``); yields its URL.
    Raises FleetError if it exits or never gets ready."""
    with LocalFleet(settings, 0, log_dir) as fleet:
        yield fleet.base_url


def test_the_page_says_so_when_postgresql_is_down(
    fleet: LocalFleet, page: Page, tmp_path: Path
) -> None:
    closed = PostgresDsn(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    settings = fleet.settings.model_copy(update={"database_url": closed, "api_port": free_port()})
    with gateway(settings, tmp_path) as url:
        page.goto(f"{url}/")
        look_up(page, "7")
        message = page.locator("#message")
        expect(message).to_contain_text("can't be shown right now", timeout=15_000)
        expect(message).to_contain_text("feedback database unreachable")
        expect(page.locator("#results")).to_be_hidden()
        page.screenshot(path=SCREENSHOTS / "feedback-page-database-down.png", full_page=True)
