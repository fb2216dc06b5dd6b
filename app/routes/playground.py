"""`GET /`: the playground, one self-contained page that calls the API from the browser.

The page is public (it holds no data); the calls it makes go through the normal
routes, with the key a user types in when the deployment needs one.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = Path(__file__).resolve().parent.parent / "static" / "playground.html"


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page())
