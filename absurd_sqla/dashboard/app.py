"""The dashboard's routes: four read-only views, a page per task, and the
retry and cancel actions (one task, or every task matching a filter)."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import _render
from ..client import Absurd
from ..client_async import AsyncAbsurd
from ..errors import InvalidArgument, TaskNotFound, TaskStateError
from ..models import TASK_STATES
from . import csrf
from .chart import throughput_svg
from .data import Source
from .filters import (
    LIVE_STATES,
    PAGE_SIZE,
    BadInput,
    parse_filter,
    parse_page_size,
    parse_queue,
    parse_task_id,
)

Authorize = Callable[[Request], bool | Awaitable[bool]]

BULK_LIMIT = 1000  # tasks changed by one bulk POST at most
REFRESH_SECONDS = 10
PREVIEW_CHARS = 200
VALUE_CHARS = 100_000  # params, headers, results shown in full up to this size
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def create_dashboard(
    app: Absurd | AsyncAbsurd,
    *,
    read_only: bool = False,
    authorize: Authorize | None = None,
    secret: str | bytes | None = None,
) -> Starlette:
    """The dashboard of ``app``'s database, an ASGI application to mount.

    ``read_only`` hides the retry and cancel forms and refuses every POST.
    ``authorize(request)`` (a function or a coroutine function) is asked
    before every request; False refuses it with 403. ``secret`` signs the CSRF
    tokens and flash messages: random per dashboard unless given (give one when
    several processes serve the same dashboard, so a form rendered by one is
    accepted by another).
    """
    return Dashboard(Source(app), read_only, authorize, csrf.Signer(secret)).asgi


class Dashboard:
    def __init__(
        self,
        source: Source,
        read_only: bool,
        authorize: Authorize | None,
        signer: csrf.Signer,
    ) -> None:
        self.source = source
        self.read_only = read_only
        self.signer = signer
        self.templates = Environment(
            loader=PackageLoader("absurd_sqla.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.templates.filters.update(
            when=_render.when, age=_render.age, preview=_preview, pretty=_pretty
        )
        get, post = ["GET", "HEAD"], ["POST"]
        routes = [
            Route("/", self.overview, methods=get, name="overview"),
            Route("/tasks", self.tasks, methods=get, name="tasks"),
            Route("/tasks/{task_id}", self.task, methods=get, name="task"),
            Route("/tasks/{task_id}/retry", self.retry, methods=post, name="retry"),
            Route("/tasks/{task_id}/cancel", self.cancel, methods=post, name="cancel"),
            Route("/bulk/retry", self.bulk_retry, methods=post, name="bulk_retry"),
            Route("/bulk/cancel", self.bulk_cancel, methods=post, name="bulk_cancel"),
            Route("/queues", self.queues, methods=get, name="queues"),
            Route("/events", self.events, methods=get, name="events"),
            Route("/style.css", self.style, methods=get, name="style"),
        ]
        middleware = [] if authorize is None else [Middleware(_Authorize, authorize, self)]
        self.asgi = Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={
                HTTPException: self._http_error,
                BadInput: self._bad_input,
                InvalidArgument: self._bad_input,
                TaskNotFound: self._not_found,
                Exception: self._server_error,
            },
        )

    # -- rendering -------------------------------------------------------------

    def link(
        self, request: Request, name: str, query: Mapping[str, Any] | None = None, **path: Any
    ) -> str:
        """A URL path under the dashboard's mount point."""
        root = str(request.scope.get("root_path", "")).rstrip("/")
        url = root + str(self.asgi.router.url_path_for(name, **path))
        return url + ("?" + urlencode(query) if query else "")

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        token, new = csrf.token_for(request, self.signer)
        refresh = request.query_params.get("refresh") == "on"
        toggled = {
            k: v for k, v in request.query_params.items() if k not in ("refresh", "flash", "sig")
        }
        if not refresh:
            toggled["refresh"] = "on"
        page = self.templates.get_template(template).render(
            request=request,
            link=lambda name, query=None, **path: self.link(request, name, query, **path),
            csrf_field=csrf.FIELD,
            csrf_token=token,
            read_only=self.read_only,
            flash=self._flash(request),
            refresh_seconds=REFRESH_SECONDS if refresh and status == 200 else None,
            refresh_toggle="?" + urlencode(toggled),
            now=datetime.now(UTC),
            states=TASK_STATES,
            **context,
        )
        response = HTMLResponse(page, status_code=status)
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        if new:
            response.set_cookie(
                csrf.COOKIE,
                token,
                path=str(request.scope.get("root_path", "")).rstrip("/") or "/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def error_page(self, request: Request, status: int, message: str) -> Response:
        return self.render(
            request, "error.html", status=status, status_code=status, message=message
        )

    def _flash(self, request: Request) -> tuple[str, str] | None:
        text, signature = request.query_params.get("flash"), request.query_params.get("sig")
        if not text or not signature or not self.signer.verify(text, signature, "flash"):
            return None
        kind, _, message = text.partition(":")
        return (kind, message)

    def redirect(
        self,
        request: Request,
        name: str,
        message: str,
        *,
        ok: bool = True,
        query: Mapping[str, str] | None = None,
        **path: Any,
    ) -> Response:
        """303 See Other back to a view, with a signed flash message."""
        text = f"{'ok' if ok else 'error'}:{message}"
        params = {**(query or {}), "flash": text, "sig": self.signer.sign(text, "flash")}
        return RedirectResponse(self.link(request, name, params, **path), status_code=303)

    # -- errors ----------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.error_page(request, exc.status_code, str(exc.detail))

    async def _bad_input(self, request: Request, exc: Exception) -> Response:
        return self.error_page(request, 400, str(exc))

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return self.error_page(request, 404, str(exc))

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        return self.error_page(request, 500, "the dashboard failed; the server log has the details")

    # -- views -----------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        stats = await self.source.queue_stats()
        series = await asyncio.gather(*(self.source.throughput(q.queue_name) for q in stats))
        charts = {  # Markup: throughput_svg escapes what it draws
            q.queue_name: Markup(throughput_svg(s, title=f"{q.queue_name}: runs finished"))
            for q, s in zip(stats, series, strict=True)
        }
        return self.render(request, "overview.html", stats=stats, charts=charts)

    async def tasks(self, request: Request) -> Response:
        query = request.query_params
        selected = parse_filter(query)
        limit = parse_page_size(query.get("limit"))
        after = None if not query.get("after") else parse_task_id(query.get("after"))
        page = await self.source.list_tasks(**selected.list_args(), limit=limit, after=after)
        next_query = None
        if page.next_cursor is not None:
            next_query = {**selected.query(), "after": str(page.next_cursor)}
            if limit != PAGE_SIZE:
                next_query["limit"] = str(limit)
        queues = await self.source.list_queues()
        return self.render(
            request,
            "tasks.html",
            page=page,
            selected=selected,
            next_query=next_query,
            queues=queues,
            bulk_limit=BULK_LIMIT,
        )

    async def task(self, request: Request) -> Response:
        task_id = parse_task_id(request.path_params["task_id"])
        detail = await self.source.get_task(task_id)
        return self.render(request, "task.html", task=detail, live_states=LIVE_STATES)

    async def queues(self, request: Request) -> Response:
        return self.render(request, "queues.html", stats=await self.source.queue_stats())

    async def events(self, request: Request) -> Response:
        queue = parse_queue(request.query_params.get("queue"))
        events = await self.source.list_events(queue, 50)
        waits = await self.source.list_waits(queue, 50)
        queues = await self.source.list_queues()
        return self.render(
            request, "events.html", events=events, waits=waits, queue=queue, queues=queues
        )

    async def style(self, request: Request) -> Response:
        return Response(_STYLE, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # -- actions ---------------------------------------------------------------

    async def _checked_form(self, request: Request) -> FormData:
        """The POST's form, once it passed the read-only and CSRF checks."""
        if self.read_only:
            raise HTTPException(403, "this dashboard is read-only")
        form = await request.form()
        token = form.get(csrf.FIELD)
        why = csrf.refusal(request, token if isinstance(token, str) else None, self.signer)
        if why is not None:
            raise HTTPException(403, why)
        return form

    async def retry(self, request: Request) -> Response:
        await self._checked_form(request)
        task_id = parse_task_id(request.path_params["task_id"])
        try:
            result = await self.source.retry_task(task_id)
        except TaskStateError as exc:
            return self.redirect(request, "task", f"not retried: {exc}", ok=False, task_id=task_id)
        message = f"retried: attempt {result.attempt} is pending"
        return self.redirect(request, "task", message, task_id=task_id)

    async def cancel(self, request: Request) -> Response:
        form = await self._checked_form(request)
        task_id = parse_task_id(request.path_params["task_id"])
        reason = _reason(form)
        if await self.source.cancel_task(task_id, reason):
            return self.redirect(request, "task", "cancelled", task_id=task_id)
        message = "not cancelled: the task had already finished"
        return self.redirect(request, "task", message, ok=False, task_id=task_id)

    async def bulk_retry(self, request: Request) -> Response:
        form = await self._checked_form(request)
        selected = parse_filter(form)
        changed, more = 0, False
        if selected.state in (None, "failed"):
            args = {**selected.list_args(), "state": "failed"}
            page = await self.source.list_tasks(**args, limit=BULK_LIMIT)
            more = page.next_cursor is not None
            for summary in page:
                try:
                    await self.source.retry_task(summary.task_id)
                except TaskStateError:
                    continue  # retried or deleted since it was listed
                changed += 1
        message = f"retried {changed} failed task{'s' if changed != 1 else ''}"
        if more:
            message += f" (at most {BULK_LIMIT} at a time: more match, post again)"
        return self.redirect(request, "tasks", message, query=selected.query())

    async def bulk_cancel(self, request: Request) -> Response:
        form = await self._checked_form(request)
        selected = parse_filter(form)
        reason = _reason(form)
        states = [s for s in LIVE_STATES if selected.state in (None, s)]
        changed, more = 0, False
        for state in states:
            room = BULK_LIMIT - changed
            if room <= 0:
                more = True
                break
            page = await self.source.list_tasks(
                **{**selected.list_args(), "state": state}, limit=room
            )
            more = more or page.next_cursor is not None
            for summary in page:
                if await self.source.cancel_task(summary.task_id, reason):
                    changed += 1
        message = f"cancelled {changed} live task{'s' if changed != 1 else ''}"
        if more:
            message += f" (at most {BULK_LIMIT} at a time: more match, post again)"
        return self.redirect(request, "tasks", message, query=selected.query())


class _Authorize:
    """Asks the host's ``authorize(request)`` before every request."""

    def __init__(self, app: ASGIApp, authorize: Authorize, dashboard: Dashboard) -> None:
        self.app = app
        self.authorize = authorize
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            allowed = self.authorize(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                response = self.dashboard.error_page(request, 403, "not authorized")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _reason(form: FormData) -> str | None:
    value = form.get("reason")
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _preview(value: Any, width: int = PREVIEW_CHARS) -> str:
    return _render.short(value, width)


def _pretty(value: Any) -> str:
    text = json.dumps(_render.plain(value), indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > VALUE_CHARS:
        return text[:VALUE_CHARS] + f"\n… ({len(text) - VALUE_CHARS} more characters)"
    return text


_STYLE = (resources.files(__package__) / "static" / "dashboard.css").read_text()
