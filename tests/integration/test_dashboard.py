"""The web dashboard over HTTP (Starlette's TestClient), against a real
PostgreSQL: every view, the filters and pages, mounting under a prefix, the
actions and their guards (CSRF, read-only, authorize), bad input, an
``AsyncAbsurd`` behind it, and ``absurd-sqla dashboard`` as a subprocess."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient

from absurd_sqla import Absurd, TaskContext
from absurd_sqla.dashboard import create_dashboard
from absurd_sqla.dashboard.csrf import COOKIE
from absurd_sqla.testing import run_until_idle
from tests.support import DEADLINE, async_app_for, run_states, served_dashboard

BASE = "http://testserver"


@dataclass
class World:
    completed: uuid.UUID
    failed: uuid.UUID
    waiter: uuid.UUID
    sleeper: uuid.UUID
    parent: uuid.UUID
    child: uuid.UUID
    other: uuid.UUID  # pending, on the queue "other"


@pytest.fixture
def world(app: Absurd) -> World:
    """One task in each interesting state, and a parent with its child."""
    app.create_queue("other")

    @app.register_task("greet")
    def greet(params: Any, ctx: TaskContext) -> Any:
        ctx.step("fetch-user", lambda: {"name": params["name"]})
        return f"hello {params['name']}"

    @app.register_task("explode", max_attempts=1)
    def explode(params: Any, ctx: TaskContext) -> Any:
        raise RuntimeError("boom <script>alert(1)</script>")

    @app.register_task("wait-for-shipping")
    def waiter(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("order-shipped:7")

    @app.register_task("nap")
    def nap(params: Any, ctx: TaskContext) -> Any:
        ctx.sleep_for("long-nap", 3600)

    @app.register_task("parent")
    def parent(params: Any, ctx: TaskContext) -> Any:
        return str(ctx.spawn("greet", {"name": "child"}).task_id)

    completed = app.spawn("greet", {"name": "ada"}, headers={"trace": "t-1"}).task_id
    failed = app.spawn("explode", {"n": 1}).task_id
    waiter_id = app.spawn("wait-for-shipping", {"order": 7}).task_id
    sleeper = app.spawn("nap").task_id
    parent_id = app.spawn("parent").task_id
    run_until_idle(app)
    other = app.spawn("greet", {"name": "later"}, queue="other").task_id
    app.emit_event("payment-received", {"amount": 42})
    child = app.get_task(parent_id).children[0].task_id
    return World(completed, failed, waiter_id, sleeper, parent_id, child, other)


@pytest.fixture
def client(app: Absurd) -> TestClient:
    return TestClient(create_dashboard(app), base_url=BASE)


def token(client: TestClient, path: str = "/") -> str:
    """The CSRF token of a page's forms (and the cookie the client now holds)."""
    page = client.get(path)
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if found is not None:
        return found.group(1)
    value = client.cookies.get(COOKIE)
    assert value is not None
    return value


def row_ids(html: str) -> list[str]:
    return re.findall(r'<tr id="task-([0-9a-f-]{36})"', html)


# -- views ---------------------------------------------------------------------


def test_overview_shows_counts_ages_and_a_chart(client: TestClient, world: World) -> None:
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert 'id="queue-default"' in html and 'id="queue-other"' in html
    failed_count = re.search(r'id="count-default-failed" href="[^"]*">(\d+)<', html)
    assert failed_count is not None and failed_count.group(1) == "1"
    assert re.search(r'id="count-other-pending" href="[^"]*">1<', html)
    assert html.count("<svg") == 2 and 'class="completed"' in html and 'class="failed"' in html
    assert "<script" not in html  # reading needs no JavaScript
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_tasks_lists_newest_first_with_links_to_details(client: TestClient, world: World) -> None:
    html = client.get("/tasks").text
    ids = row_ids(html)
    assert ids[0] == str(world.other)  # newest first
    assert set(ids) == {str(getattr(world, f)) for f in World.__dataclass_fields__}
    assert f'href="/tasks/{world.failed}"' in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"queue": "other"}, ["other"]),
        ({"state": "failed"}, ["failed"]),
        ({"state": "sleeping"}, ["sleeper", "waiter"]),
        ({"name": "greet"}, ["other", "child", "completed"]),
        ({"name": "greet", "queue": "default", "state": "completed"}, ["child", "completed"]),
        ({"since": "1h", "queue": "other"}, ["other"]),
        ({"since": "2099-01-01T00:00"}, []),
        ({"queue": "", "state": "", "name": "", "since": ""}, None),  # an empty form: no filter
    ],
)
def test_task_filters(
    client: TestClient, world: World, query: dict[str, str], expected: list[str] | None
) -> None:
    page = client.get("/tasks", params=query)
    assert page.status_code == 200
    listed = row_ids(page.text)
    if expected is None:
        assert len(listed) == 7
    else:
        assert listed == [str(getattr(world, name)) for name in expected]


def test_task_pages_follow_the_cursor_and_keep_the_filter(client: TestClient, world: World) -> None:
    seen: list[str] = []
    url = "/tasks?queue=default&limit=2"
    pages = 0
    while url:
        html = client.get(url).text
        seen += row_ids(html)
        pages += 1
        found = re.search(r'id="next-page" rel="next" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else ""
        if url:
            assert "queue=default" in url and "limit=2" in url and "after=" in url
    everything = row_ids(client.get("/tasks?queue=default").text)
    assert seen == everything and len(seen) == 6 and pages == 3


def test_a_failed_task_detail(client: TestClient, world: World) -> None:
    page = client.get(f"/tasks/{world.failed}")
    assert page.status_code == 200
    html = page.text
    assert 'id="task-state"><span class="state state-failed">failed' in html
    assert "RuntimeError" in html and 'id="traceback"' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html  # escaped
    assert 'id="run-1"' in html and "worker" in html
    assert 'id="retry-button"' in html and 'id="cancel-button"' not in html


def test_a_completed_task_detail_shows_result_params_headers_and_steps(
    client: TestClient, world: World
) -> None:
    html = client.get(f"/tasks/{world.completed}").text
    assert 'id="result"' in html and "hello ada" in html
    assert "&#34;ada&#34;" in html or "&quot;ada&quot;" in html  # params, escaped JSON
    assert "t-1" in html  # headers
    assert 'class="step-name">fetch-user<' in html
    assert 'id="retry-button"' not in html and 'id="cancel-button"' not in html


def test_waiting_tasks_say_what_they_wait_for(client: TestClient, world: World) -> None:
    waiter = client.get(f"/tasks/{world.waiter}").text
    assert 'id="waiting-for"' in waiter and "order-shipped:7" in waiter
    assert 'id="cancel-button"' in waiter
    sleeper = client.get(f"/tasks/{world.sleeper}").text
    assert "sleeping until" in sleeper and "long-nap" in sleeper


def test_parent_and_child_link_to_each_other(client: TestClient, world: World) -> None:
    parent = client.get(f"/tasks/{world.parent}").text
    assert f'class="child-link" href="/tasks/{world.child}"' in parent
    child = client.get(f"/tasks/{world.child}").text
    assert f'id="parent-link" href="/tasks/{world.parent}"' in child


def test_queues_and_events_views(client: TestClient, world: World) -> None:
    queues = client.get("/queues").text
    assert 'id="queue-row-default"' in queues and 'id="queue-row-other"' in queues
    events = client.get("/events").text
    assert "payment-received" in events and "order-shipped:7" in events
    assert f'href="/tasks/{world.waiter}"' in events
    only_other = client.get("/events", params={"queue": "other"}).text
    assert "payment-received" not in only_other and "order-shipped:7" not in only_other


def test_refresh_is_a_link_not_a_script(client: TestClient, world: World) -> None:
    off = client.get("/").text
    assert 'http-equiv="refresh"' not in off and 'href="?refresh=on"' in off
    on = client.get("/?refresh=on").text
    assert '<meta http-equiv="refresh" content="10">' in on


def test_mounted_under_a_prefix_every_link_stays_under_it(app: Absurd, world: World) -> None:
    host = Starlette(routes=[Mount("/ops/absurd", create_dashboard(app))])
    client = TestClient(host, base_url=BASE)
    html = client.get("/ops/absurd/tasks").text
    links = re.findall(r'(?:href|action)="([^"?]+)', html)
    assert links and all(link.startswith("/ops/absurd/") for link in links), links
    assert f'href="/ops/absurd/tasks/{world.failed}"' in html
    detail = client.get(f"/ops/absurd/tasks/{world.failed}")
    assert f'action="/ops/absurd/tasks/{world.failed}/retry"' in detail.text
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', detail.text)
    assert form_token is not None
    done = client.post(
        f"/ops/absurd/tasks/{world.failed}/retry",
        data={"csrf_token": form_token.group(1)},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/ops/absurd/tasks/{world.failed}?flash=")


# -- actions -------------------------------------------------------------------


def test_retry_makes_a_failed_task_pending_with_a_new_run(
    app: Absurd, client: TestClient, world: World
) -> None:
    form = {"csrf_token": token(client, f"/tasks/{world.failed}")}
    done = client.post(f"/tasks/{world.failed}/retry", data=form, follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/tasks/{world.failed}?flash=")
    assert app.get_task(world.failed).state == "pending"
    assert run_states(app.engine, world.failed) == ["failed", "pending"]
    shown = client.get(done.headers["location"]).text
    assert 'id="flash" class="flash ok"' in shown and "retried: attempt 2" in shown
    again = client.post(f"/tasks/{world.failed}/retry", data=form)  # not failed any more
    assert again.status_code == 200 and "flash error" in again.text
    assert run_states(app.engine, world.failed) == ["failed", "pending"]


def test_cancel_records_the_reason(app: Absurd, client: TestClient, world: World) -> None:
    form = {"csrf_token": token(client), "reason": "customer left <b>"}
    done = client.post(f"/tasks/{world.waiter}/cancel", data=form)
    assert done.status_code == 200 and "flash ok" in done.text
    task = app.get_task(world.waiter)
    assert task.state == "cancelled" and task.cancel_reason == "customer left <b>"
    assert "customer left &lt;b&gt;" in done.text
    finished = client.post(f"/tasks/{world.completed}/cancel", data=form)
    assert "not cancelled" in finished.text
    assert app.get_task(world.completed).state == "completed"


def states(app: Absurd) -> dict[uuid.UUID, str]:
    return {t.task_id: t.state for t in app.list_tasks(limit=1000)}


def test_bulk_retry_changes_exactly_the_failed_tasks_matching(
    app: Absurd, client: TestClient, world: World
) -> None:
    more = [app.spawn("explode", {"n": n}, queue="other").task_id for n in range(3)]
    run_until_idle(app, queue="other")
    before = states(app)
    form = {"csrf_token": token(client), "queue": "other"}
    done = client.post("/bulk/retry", data=form, follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"].startswith("/tasks?queue=other&flash=")
    assert "retried 3 failed tasks" in client.get(done.headers["location"]).text
    after = states(app)
    changed = {task for task in after if after[task] != before[task]}
    assert changed == set(more) and all(after[t] == "pending" for t in more)
    assert after[world.failed] == "failed"  # another queue: not matched


def test_bulk_cancel_changes_exactly_the_live_tasks_matching(
    app: Absurd, client: TestClient, world: World
) -> None:
    before = states(app)
    form = {"csrf_token": token(client), "queue": "default", "reason": "drain"}
    done = client.post("/bulk/cancel", data=form)
    assert "cancelled 2 live tasks" in done.text
    after = states(app)
    changed = {task for task in after if after[task] != before[task]}
    assert changed == {world.waiter, world.sleeper}
    assert app.get_task(world.sleeper).cancel_reason == "drain"
    assert after[world.other] == "pending"


def test_bulk_cancel_with_a_state_filter(app: Absurd, client: TestClient, world: World) -> None:
    form = {"csrf_token": token(client), "state": "pending"}
    assert "cancelled 1 live task" in client.post("/bulk/cancel", data=form).text
    assert app.get_task(world.other).state == "cancelled"
    assert app.get_task(world.waiter).state == "sleeping"
    form = {"csrf_token": token(client), "state": "completed"}  # nothing live matches
    assert "cancelled 0 live tasks" in client.post("/bulk/cancel", data=form).text


# -- guards --------------------------------------------------------------------


def forged_posts(world: World, good: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(path, form, headers) of POSTs that must be refused."""
    retry = f"/tasks/{world.failed}/retry"
    return [
        (retry, {}, {}),  # no token
        (retry, {"csrf_token": "abc.def"}, {}),  # wrong token
        (retry, {"csrf_token": good[:-2] + "00"}, {}),  # tampered signature
        (retry, {"csrf_token": good}, {"origin": "https://evil.example"}),
        (retry, {"csrf_token": good}, {"origin": "null"}),
        (retry, {"csrf_token": good}, {"referer": "https://evil.example/page"}),
        ("/bulk/retry", {"csrf_token": good}, {"origin": "https://evil.example"}),
        (f"/tasks/{world.waiter}/cancel", {"csrf_token": good + "x"}, {}),
    ]


def test_forged_posts_are_refused_and_write_nothing(
    app: Absurd, client: TestClient, world: World
) -> None:
    good = token(client)
    before = states(app)
    for path, form, headers in forged_posts(world, good):
        refused = client.post(path, data=form, headers=headers)
        assert refused.status_code == 403, (path, form, headers)
        assert "Traceback" not in refused.text and 'id="error-status">403' in refused.text
    assert states(app) == before
    assert run_states(app.engine, world.failed) == ["failed"]
    same_site = client.post(  # the checks pass for a same-origin browser POST
        f"/tasks/{world.failed}/retry",
        data={"csrf_token": good},
        headers={"origin": BASE, "referer": f"{BASE}/tasks"},
    )
    assert same_site.status_code == 200 and app.get_task(world.failed).state == "pending"


def test_a_token_without_its_cookie_is_refused(app: Absurd, world: World) -> None:
    first = TestClient(create_dashboard(app), base_url=BASE)
    good = token(first)
    no_cookie = TestClient(create_dashboard(app), base_url=BASE)
    refused = no_cookie.post(f"/tasks/{world.failed}/retry", data={"csrf_token": good})
    assert refused.status_code == 403
    other_secret = TestClient(create_dashboard(app), base_url=BASE)  # signed by another secret
    other_secret.cookies.set(COOKIE, good)
    refused = other_secret.post(f"/tasks/{world.failed}/retry", data={"csrf_token": good})
    assert refused.status_code == 403
    assert app.get_task(world.failed).state == "failed"


def test_a_forged_flash_is_not_shown(client: TestClient, world: World) -> None:
    html = client.get("/", params={"flash": "ok:send your password to x", "sig": "00"}).text
    assert "send your password" not in html


def test_read_only_hides_forms_and_refuses_posts(app: Absurd, world: World) -> None:
    client = TestClient(create_dashboard(app, read_only=True), base_url=BASE)
    detail = client.get(f"/tasks/{world.failed}").text
    assert "<form" not in detail.replace('<form id="filter-form"', "")
    assert 'id="retry-button"' not in detail and 'id="read-only"' in detail
    assert 'id="bulk-retry-form"' not in client.get("/tasks").text
    cookie = client.cookies.get(COOKIE)
    refused = client.post(f"/tasks/{world.failed}/retry", data={"csrf_token": cookie or ""})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert app.get_task(world.failed).state == "failed"


def test_authorize_guards_every_route(app: Absurd, world: World) -> None:
    asked: list[str] = []

    async def only_staff(request: Request) -> bool:
        asked.append(request.url.path)
        return request.headers.get("x-staff") == "yes"

    client = TestClient(create_dashboard(app, authorize=only_staff), base_url=BASE)
    for path in ["/", "/tasks", f"/tasks/{world.failed}", "/queues", "/events", "/nowhere"]:
        refused = client.get(path)
        assert refused.status_code == 403 and "not authorized" in refused.text
        assert str(world.failed) not in refused.text
    assert client.post(f"/tasks/{world.failed}/retry").status_code == 403
    assert client.get("/", headers={"x-staff": "yes"}).status_code == 200
    sync = TestClient(create_dashboard(app, authorize=lambda request: False), base_url=BASE)
    assert sync.get("/").status_code == 403
    assert len(asked) == 8


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        (f"/tasks/{uuid.UUID(int=7)}", 404, "not found"),
        ("/tasks/not-a-uuid", 400, "not a task id"),
        ("/tasks?state=exploded", 400, "state must be one of"),
        ("/tasks?since=yesterday-ish", 400, "since: not a time"),
        ("/tasks?since=inf", 400, "since: not a time"),
        ("/tasks?queue=bad%20queue", 400, "invalid queue name"),
        ("/tasks?after=zzz", 400, "not a task id"),
        ("/tasks?limit=5000", 400, "limit must be"),
        ("/events?queue=%2F", 400, "invalid queue name"),
        ("/no/such/page", 404, "Not Found"),
    ],
)
def test_bad_input_is_a_clear_4xx_page(
    client: TestClient, world: World, path: str, status: int, message: str
) -> None:
    page = client.get(path)
    assert page.status_code == status
    assert message in page.text and 'id="error-status"' in page.text
    assert "Traceback" not in page.text


def test_bad_posts_write_nothing(app: Absurd, client: TestClient, world: World) -> None:
    good = token(client)
    before = states(app)
    assert client.post("/tasks/xyz/retry", data={"csrf_token": good}).status_code == 400
    unknown = client.post(f"/tasks/{uuid.UUID(int=9)}/cancel", data={"csrf_token": good})
    assert unknown.status_code == 404
    bad_filter = client.post("/bulk/cancel", data={"csrf_token": good, "state": "nope"})
    assert bad_filter.status_code == 400
    too_long = client.post(
        f"/tasks/{world.waiter}/cancel", data={"csrf_token": good, "reason": "x" * 3000}
    )
    assert too_long.status_code == 400
    assert states(app) == before


# -- AsyncAbsurd ---------------------------------------------------------------


def test_an_async_client_behind_the_dashboard(database_url: str, world: World) -> None:
    async def scenario() -> None:
        async with async_app_for(database_url) as async_app:
            transport = httpx.ASGITransport(app=create_dashboard(async_app))
            async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
                overview = await http.get("/")
                assert overview.status_code == 200 and 'id="queue-other"' in overview.text
                detail = await http.get(f"/tasks/{world.failed}")
                assert detail.status_code == 200 and "RuntimeError" in detail.text
                missing = await http.get(f"/tasks/{uuid.UUID(int=3)}")
                assert missing.status_code == 404
                form = re.search(r'name="csrf_token" value="([^"]+)"', detail.text)
                assert form is not None
                done = await http.post(
                    f"/tasks/{world.failed}/retry", data={"csrf_token": form.group(1)}
                )
                assert done.status_code == 303
                assert (await async_app.get_task(world.failed)).state == "pending"

    asyncio.run(scenario())


# -- the command ---------------------------------------------------------------


def test_the_cli_serves_the_dashboard_on_loopback(database_url: str, app: Absurd) -> None:
    with served_dashboard(database_url) as served:
        page = httpx.get(f"{served.url}/", timeout=DEADLINE)
        assert page.status_code == 200 and 'id="queue-default"' in page.text
    assert served.returncode == 0, served.output
    assert "http://127.0.0.1:" in served.output.splitlines()[0]
    assert "warning" not in served.output


def test_the_cli_warns_on_a_public_address() -> None:
    from absurd_sqla.cli import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("example.com")
