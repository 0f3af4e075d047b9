"""``realm serve``: the dashboard, a starlette app in its own process (the daemon stays light).

Read-only by default: every GET reads the realm the way ``realm queue status`` does and writes
nothing. The two actions, ``POST /api/jobs/<job>/cancel`` and ``.../retry``, run the CLI's own
code (``cli.queue_cmds``) and need the token in an ``Authorization: Bearer`` header, never in a
cookie or the URL, so a page on another site cannot make a browser send them. Without a token
the actions are off (403). Bound to anything but loopback, realm refuses to start without a token
and then asks it of every request (the browser's event stream may give it as ``?token=``) but
those for the page's own script and styles under ``/static/``: a browser fetches them without the
token, and they hold no realm data. On loopback, requests must name a loopback host, so a web page
cannot reach the dashboard through a DNS name that resolves to 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import socket
from pathlib import Path

import uvicorn

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cli.status import build_list, build_status, LIST_STATES
from core.errors import (CampaignNotFound, IllegalTransition, JobNotFound, RealmError,
                         UsageError)
from core.training_queue import TrainingQueue
from cli.dashboard.views import campaign_view, campaigns_view, job_view

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
MAX_BODY = 16 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(base: Path, *, token: str | None, loopback: bool, interval: float = 1.0,
               host: str | None = None) -> Starlette:
    """``host``: the address listened on; on loopback it is a Host name requests may give
    beside ``LOOPBACK_NAMES`` (``--host 127.0.0.2`` is reached as ``http://127.0.0.2:PORT/``)."""
    queue = TrainingQueue(base)
    paths = queue.paths

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"schema": 1, "ok": False, "error": message}, status_code=status)

    def failure(exc: RealmError, refused: int) -> JSONResponse:
        """A realm error as its answer: 404 for what does not exist, ``refused`` for a request
        realm refuses (400 for a view, 409 for an action the job's state forbids), else 500."""
        if isinstance(exc, (JobNotFound, CampaignNotFound)):
            return error(404, str(exc))
        return error(refused if isinstance(exc, (UsageError, IllegalTransition)) else 500,
                     str(exc))

    def token_given(request: Request, *, query: bool) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query_params.get("token") if query else None

    def token_ok(given: str | None) -> bool:
        return token is not None and given is not None and \
            hmac.compare_digest(given.encode(), token.encode())

    async def guard(request: Request, call_next):
        """Non-loopback: every request but ``/static/`` carries the token. Actions: always the
        token, header only (a cross-site form can set neither the header nor read the answer)."""
        if request.method == "POST":
            if token is None:
                return error(403, "actions are off: this dashboard was started without a token. "
                                  "Restart it with `realm serve --token-file FILE` (or "
                                  "REALM_SERVE_TOKEN) to cancel and retry from the page, or use "
                                  "`realm queue cancel|retry JOB`.")
            if not token_ok(token_given(request, query=False)):
                return error(401, "this action needs the dashboard's token in an "
                                  "'Authorization: Bearer TOKEN' header.")
        elif not loopback and not request.url.path.startswith("/static/") and \
                not token_ok(token_given(request, query=True)):
            return error(401, "this dashboard needs its token: open it as /?token=TOKEN, or send "
                              "'Authorization: Bearer TOKEN'.")
        return await call_next(request)

    def api(view):
        async def endpoint(request: Request) -> Response:
            try:
                data = await run_in_threadpool(view, request)
            except RealmError as exc:
                return failure(exc, 400)
            return JSONResponse(json_safe(data))
        return endpoint

    def status(_request):
        return build_status(queue)

    def listing(request):
        state = request.query_params.get("state", "queued")
        if state not in LIST_STATES:
            raise UsageError(f"state={state!r}: one of {', '.join(LIST_STATES)}")
        return build_list(queue, state)

    def job(request):
        return job_view(queue, request.path_params["job"])

    def campaigns(_request):
        return campaigns_view(paths, queue)

    def campaign(request):
        return campaign_view(paths, queue, request.path_params["hero"],
                             request.path_params["name"])

    async def events(request: Request) -> StreamingResponse:
        """Server-sent events: the status (``/api/status``) every ``interval`` seconds."""
        async def stream():
            while not await request.is_disconnected():
                data = json_safe(await run_in_threadpool(build_status, queue))
                yield f"event: status\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                await asyncio.sleep(interval)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    def action(name: str):
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            if len(body) > MAX_BODY:
                return error(413, f"request body over {MAX_BODY} bytes")
            try:
                given = json.loads(body) if body.strip() else {}
                reason = given.get("reason") if isinstance(given, dict) else None
            except ValueError:
                return error(400, "the body must be JSON, for example {\"reason\": \"...\"}")
            if reason is not None and not isinstance(reason, str):
                return error(400, "reason must be a string")
            try:
                who = f"dashboard ({request.client.host if request.client else 'unknown'})"
                message = await run_in_threadpool(_act, queue, name, request.path_params["job"],
                                                  reason, who)
            except RealmError as exc:
                return failure(exc, 409)
            return JSONResponse({"schema": 1, "ok": True, "message": message})
        return endpoint

    def page(_request) -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return PlainTextResponse(f"the dashboard's page is missing ({index}): reinstall "
                                     "realm; the JSON endpoints under /api/ still answer",
                                     status_code=404)
        return FileResponse(index, headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", page),
        Route("/api/status", api(status)),
        Route("/api/queue", api(listing)),
        Route("/api/jobs/{job}", api(job)),
        Route("/api/campaigns", api(campaigns)),
        Route("/api/campaigns/{hero}/{name}", api(campaign)),
        Route("/api/events", events),
        Route("/api/jobs/{job}/cancel", action("cancel"), methods=["POST"]),
        Route("/api/jobs/{job}/retry", action("retry"), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=guard)]
    if loopback:
        names = [*LOOPBACK_NAMES, *([host] if host else [])]
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=names))
    return Starlette(routes=routes, middleware=middleware)


def json_safe(value):
    """NaN and infinities (a NaN step's loss in a progress file) as null: browsers' JSON.parse
    refuses them, and so does starlette's JSONResponse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _act(queue: TrainingQueue, name: str, ref: str, reason: str | None, who: str) -> str:
    """The CLI's own cancel and retry, with their checks and messages."""
    from cli.queue_cmds import cancel_job

    job = queue.find(ref)
    if name == "cancel":
        return cancel_job(queue, job, reason or f"cancelled from the {who}", who=who)[1]
    moved = queue.retry(job, reason=reason or f"retried from the {who}")
    return f"{moved.id}: requeued as {moved.dataset_path}"


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve on an already bound socket until SIGINT or SIGTERM (open event streams get two
    seconds to end)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
