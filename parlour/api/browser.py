"""Local mode and the browser: which Host names are served, which origins may call, and CORS.

Without authentication every request acts for the local owner, so a web page the user
visits must not reach the server: neither by rebinding a name of its own to 127.0.0.1
(the Host check) nor by a cross-site request (the Origin and content type checks).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from ..errors import Forbidden, ParlourError, UnsupportedMediaType
from ..settings import LOOPBACK_HOSTS, Settings

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Document uploads are multipart forms; every other body is JSON.
UPLOAD_PREFIX = "/admin/"


def host_name(host: str) -> str:
    """The name part of a Host header or `host[:port]` entry, lower case, no brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def served_hosts(settings: Settings) -> frozenset[str]:
    """Loopback names, the address the server listens on, and PARLOUR_ALLOWED_HOSTS."""
    names = {*LOOPBACK_HOSTS, *(host_name(h) for h in settings.allowed_hosts)}
    if settings.host not in WILDCARD_HOSTS:
        names.add(host_name(settings.host))
    return frozenset(names)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and "+json" in media)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() not in {"", "0"}
    return "transfer-encoding" in request.headers


def _origin_refused(request: Request, settings: Settings) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin in settings.cors_origins:
        return False
    own = request.headers.get("host", "").lower()
    return origin == "null" or urlsplit(origin.lower()).netloc != own


def local_refusal(request: Request, settings: Settings) -> ParlourError | None:
    """Why a request acting for the local owner is refused, or None when it is served."""
    host = request.headers.get("host", "")
    allowed = served_hosts(settings)
    name = host_name(host)
    if "*" not in allowed and name not in allowed and not name.startswith("127."):
        return Forbidden(
            f"Host {host!r} is not served without authentication (a page could rebind that "
            "name to this machine): use http://127.0.0.1 or http://localhost, or add the "
            "name to PARLOUR_ALLOWED_HOSTS."
        )
    if _origin_refused(request, settings):
        return Forbidden(
            f"Cross-site request from origin {request.headers.get('origin')!r} refused: add "
            "it to PARLOUR_CORS_ORIGINS to let its pages call this server."
        )
    if request.method in BODY_METHODS and _has_body(request):
        content_type = request.headers.get("content-type", "")
        upload = request.url.path.startswith(UPLOAD_PREFIX) and content_type.lower().startswith(
            "multipart/form-data"
        )
        if not upload and not _is_json(content_type):
            return UnsupportedMediaType(
                f"Content-Type {content_type or '(none)'!r} is not accepted: send the body "
                "as JSON with `Content-Type: application/json`."
            )
    return None


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Answer CORS preflights and add CORS headers for PARLOUR_CORS_ORIGINS, if any."""
    if not settings.cors_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["x-request-id"],
    )
