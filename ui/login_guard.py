"""With `--auth`, nothing but the login page answers a request without a login.

Gradio 6 checks the login on its data routes (/config, /gradio_api/info, the queue, uploads, file=...) but not
on its helpers: FastAPI's /openapi.json (every route), /gradio_api/cancel, /reset, /heartbeat/<session>,
/user, /token, /app_id, /stream/..., the run-history page; and its login page embeds the description of the
whole API (`window.gradio_api_info`). None of them hands out workspace data, but none needs to answer a
stranger either. `LoginRequired`, an ASGI middleware on Gradio's FastAPI app (`server_options`), answers 401
to every request without Gradio's login cookie except:

- the login page (`/`, without the API description) and its assets (`/assets/`, `/static/`, `/svelte/`,
  `/theme.css`, `/favicon.ico`, `/manifest.json`, `/robots.txt`), `POST /login` and `/logout`;
- `/gradio_api/startup-events` until the app has started: `launch()` itself calls it once, without a login, to
  start the queue (afterwards it does nothing and is closed too).

Without `--auth` it lets everything through.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any, Awaitable, Callable, Optional

import gradio as gr
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOGIN_PAGE = "/"
OPEN_PATHS = frozenset({"/login", "/login/", "/logout", "/theme.css", "/gradio_api/theme.css", "/favicon.ico",
                        "/manifest.json", "/robots.txt"})
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/")
STARTUP_EVENTS = "/gradio_api/startup-events"
API_INFO = re.compile(rb"(window\.gradio_api_info = ).*?(;</script>)", re.DOTALL)
NO_API_INFO = rb'\1{"named_endpoints":{},"unnamed_endpoints":{}}\2'
"""The page's API description (JSON with '<' escaped, so it holds no ';</script>') replaced by an empty one."""


def server_options() -> dict[str, Any]:
    """`launch()` arguments that close what the app does not use: FastAPI's schema and docs pages (Gradio's
    own API page, for a signed-in user, stays), the run history (it keeps inputs and outputs in the browser,
    or sends them to a Hugging Face bucket), the monitoring dashboard; and the middleware above."""
    options = {"app_kwargs": {"openapi_url": None, "docs_url": None, "redoc_url": None,
                              "middleware": [Middleware(LoginRequired)]},
               "run_history": False, "enable_monitoring": False}
    known = inspect.signature(gr.Blocks.launch).parameters   # run_history is younger than Gradio 6.0
    return {key: value for key, value in options.items() if key in known}


def signed_in(app: Any, scope: Scope) -> bool:
    """Whether the request carries the cookie of a login to Gradio's `app`, read as Gradio's own login check
    reads it; True when the app asks for no password (no `auth`; an `auth_dependency` Gradio checks itself)."""
    if getattr(app, "auth", None) is None:
        return True
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return token is not None and token in app.tokens


def open_without_login(app: Any, path: str, method: str) -> bool:
    """The login page, its assets and Gradio's start-up call: what a stranger may reach."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    if path == LOGIN_PAGE and method in ("GET", "HEAD"):
        return True
    return path == STARTUP_EVENTS and not getattr(app, "startup_events_triggered", True)


class LoginRequired:
    """ASGI middleware: 401 for a request without a login, but for the login page (sent without the API
    description) and its assets; see the module's docstring."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gradio_app = scope.get("app")
        if scope["type"] not in ("http", "websocket") or signed_in(gradio_app, scope):
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "") or ""
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        method = scope.get("method", "GET")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif path == LOGIN_PAGE and method == "GET":
            await self.app(scope, receive, _without_api_info(send))
        elif open_without_login(gradio_app, path, method):
            await self.app(scope, receive, send)
        else:
            await _unauthorized(gradio_app, send)


async def _unauthorized(app: Any, send: Send) -> None:
    """Gradio's own answer to a request without a login (its front end reads `auth_message`)."""
    blocks = app.get_blocks() if hasattr(app, "get_blocks") else None
    body = json.dumps({"detail": {"error": "Not authenticated",
                                  "auth_message": getattr(blocks, "auth_message", None)}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _without_api_info(send: Send) -> Send:
    """`send` for the login page: the HTML is held until complete, then sent with an empty API description
    (and its new length)."""
    start: Optional[Message] = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = API_INFO.sub(NO_API_INFO, b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped

