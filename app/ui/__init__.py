"""The review page: plain HTML, JavaScript and CSS shipped in this package (no build step, nothing fetched
from elsewhere), served by the app at /ui under a strict Content-Security-Policy. The page talks to the
same /v1 API as every client; its API key lives in the tab's sessionStorage and travels only in the
Authorization header."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

# Everything from this origin, nothing inline, nothing framed; canvas drawings and Blob downloads need no
# exception. connect-src 'self' keeps the key from being sent anywhere but this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


@lru_cache
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@router.get("/")
def root():
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def page():
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{name}")
def asset(name: str):
    if name not in ASSETS:
        return Response("not found", status_code=404, media_type="text/plain", headers=HEADERS)
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)
