"""The feedback page at ``/``: look up a user's playlists and like one.

Server-rendered shell plus a little JavaScript that calls ``POST /api/impressions`` and
``POST /api/feedback``; no front-end build.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from recfleet.api.auth import PAGE_TOKEN_TTL_S, GuardDep, page_scope
from recfleet.api.limits import OrjsonRoute

HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(tags=["page"], route_class=OrjsonRoute)


def static_files() -> StaticFiles:
    """The page's stylesheet and script, mounted at ``/static`` under the name ``static``."""
    return StaticFiles(directory=HERE / "static")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, guard: GuardDep) -> HTMLResponse:
    """The page, with its own token for recording impressions (no key in the browser)."""
    token = guard.sign(page_scope(), PAGE_TOKEN_TTL_S)
    response = templates.TemplateResponse(request, "page.html", {"page_token": token})
    response.headers["Cache-Control"] = "no-store"  # the token is this page's alone
    return response
