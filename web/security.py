"""Who may change things: one access token, a session cookie derived from it, and cross-site post checks.

Scripts send `Authorization: Bearer <token>`. Browsers log in once and then carry an HttpOnly session
cookie, which a hostile page could make them send too; so cookie-authenticated posts must also echo the
double-submit CSRF cookie in a form field (or X-CSRF-Token header) and come from this server's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from fastapi import HTTPException, Request

from faceforge.locks import held

TOKEN_ENV = "FACEFORGE_TOKEN"
TOKEN_FILE = "web_token"
SESSION_COOKIE, CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER = "ff_session", "ff_csrf", "csrf", "x-csrf-token"


def resolve_token(home: Path) -> str:
    """$FACEFORGE_TOKEN, else home/web_token; the first start creates that file (0600) and prints it once.

    A blank token would key the session cookie's HMAC with nothing, so anyone could make one: a blank file (a first
    start killed before writing it, or `touch web_token`) gets a new token too, which only this printout has shown.
    The file is written under a temporary name and renamed, so it is never seen half written; servers starting
    together take turns, so the second reads the first's token rather than printing one the file no longer holds.
    """
    if value := os.environ.get(TOKEN_ENV, "").strip():
        return value
    path = home / TOKEN_FILE
    home.mkdir(parents=True, exist_ok=True)
    with held(home / f".{TOKEN_FILE}.lock"):
        if path.is_file() and (existing := path.read_text().strip()):
            return existing
        token = secrets.token_urlsafe(24)
        fd, temporary = tempfile.mkstemp(prefix=f".{TOKEN_FILE}.", dir=home)  # mode 0600
        try:
            with os.fdopen(fd, "w") as file:
                file.write(token + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    print(f"faceforge web: access token (shown once, kept in {path}): {token}", flush=True)
    return token


def session_value(token: str) -> str:
    """What the session cookie holds: derived from the token, so changing the token ends every session."""
    return hmac.new(token.encode(), b"faceforge-web-session", hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    """Constant-time equality (any text: compare_digest refuses non-ASCII str)."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def new_csrf() -> str:
    return secrets.token_urlsafe(18)


def check_origin(request: Request) -> None:
    """Refuse posts that a browser marks as coming from another site."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None and origin != own:
        raise HTTPException(403, f"cross-site request refused (origin {origin})")
    if origin is None and request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(403, "cross-site request refused")


def check_csrf(request: Request, submitted: str | None) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not same(submitted or "", cookie):
        raise HTTPException(403, "CSRF check failed: reload the page and submit the form again")


async def require_token(request: Request) -> None:
    """The dependency of every mutating endpoint."""
    token: str = request.app.state.token
    if not token.strip():  # its session cookie is an HMAC keyed with nothing: anyone could make it
        raise HTTPException(503, "the server has no access token: restart it to have one made")
    check_origin(request)
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and bearer:
        if not same(bearer, token):
            raise HTTPException(401, "wrong access token")
        return
    session = request.cookies.get(SESSION_COOKIE, "")
    if not same(session, session_value(token)):
        raise HTTPException(401, "log in with the access token first (printed by `faceforge web` at first start)")
    form = await request.form()
    submitted = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    check_csrf(request, submitted if isinstance(submitted, str) else None)
