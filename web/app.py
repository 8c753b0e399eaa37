"""The web UI: server-rendered pages over the job store and MLflow, with htmx swapping in the parts that change.

Reads are open (the server listens on 127.0.0.1 by default); every post needs the access token (see
security.py). Nothing here runs a command: jobs go into the store and the scheduler starts them.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from html import escape
from pathlib import Path
from typing import Any

import mlflow
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from mlflow.exceptions import MlflowException
from starlette.exceptions import HTTPException as StarletteHTTPException

from faceforge.data_pipeline.autolabel import status as autolabel_status
from faceforge.data_pipeline.autolabel_state import StateError
from faceforge.export.tracking import LoggedExport, export_file, list_exports
from faceforge.jobs import CANCELLED, STATES, Job, JobStore, JobStoreBusyError, expand_sweep, make_jobs, store_path
from faceforge.jobs.logs import read_log
from faceforge.jobs.store import EXECUTORS, LARGEST_NUMBER
from faceforge.registry import (
    CHAMPION_ALIAS,
    REGISTERED_MODEL,
    Policy,
    Version,
    pareto_front,
    select,
    select_and_register,
    sweep_candidates,
    sweep_policy,
    versions,
)
from faceforge.registry.selection import LATENCY
from faceforge.train.app import CONFIG_DIR
from faceforge.web import runs
from faceforge.web.datasets import DEMO, UNDECODABLE, Dataset, data_roots, describe_or_error, list_datasets
from faceforge.web.forms import JobForm, trained_datasets
from faceforge.web.plots import line_chart, pareto_chart
from faceforge.web.security import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    check_csrf,
    check_origin,
    new_csrf,
    require_token,
    resolve_token,
    same,
    session_value,
)

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
POLL_SECONDS = 0.5  # how often a log stream looks for new bytes
MLFLOW_UI_ENV = "FACEFORGE_MLFLOW_UI"
REGISTRATION_WAIT_SECONDS = 60.0  # a finished sweep page polls this long for the champion the scheduler registers
FRONTS_ON_MODELS_PAGE = 6  # the newest sweeps' Pareto fronts; older ones are on their sweep pages
# How long a submission waits for its datasets' descriptions; a slower one is taken undescribed, and its
# description goes on, cached for the datasets page and the next submission.
DESCRIBE_WAIT_SECONDS = 5.0
# Hydra's global state is per process: two requests composing configs at once would trip over each other.
HYDRA_LOCK = threading.Lock()
REGISTRY_LOCK = threading.Lock()
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else ""


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    seconds = (end or time.time()) - start
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def printable(value: Any) -> Any:
    """What `{{ ... }}` prints: a file name's bytes that are not UTF-8 as U+FFFD, which a page can carry."""
    if not isinstance(value, str) and not hasattr(value, "__html__"):
        value = str(value)  # as Jinja prints it (a Path, an error)
    if isinstance(value, str) and UNDECODABLE.search(value):
        return type(value)(UNDECODABLE.sub("\ufffd", value))  # Markup stays Markup
    return value


def sse_event(text: str, offset: int) -> str:
    """One server-sent event; its id is the byte offset a reconnecting client resumes from (Last-Event-ID)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n").split("\n")
    return f"id: {offset}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def compose_jobs(overrides: list[str], **options: Any) -> list[Job]:
    with HYDRA_LOCK:
        return make_jobs(overrides, **options)


def register_champion(tracking_uri: str, sweep_id: str, policy: Policy, name: str) -> None:
    """Select and register a sweep's winner.

    MLflow resolves the `models:/<id>` source of a new model version through its process-wide tracking URI,
    not the client's, so that URI must point at the sweep's database while registering.
    """
    with REGISTRY_LOCK:
        mlflow.set_tracking_uri(tracking_uri)
        select_and_register(tracking_uri, sweep_id, policy, name)


def create_app(home: Path, token: str | None = None, roots: list[Path] | None = None) -> FastAPI:
    """The app over the job store of `home`; `token` defaults to $FACEFORGE_TOKEN or home/web_token (created once)."""
    home = Path(home)
    store = JobStore(store_path(home))
    autolabel_dir = home / "autolabel"
    # The auto-labeller's dataset versions are training sets too: the loop closes in the job form.
    roots = [*(data_roots() if roots is None else [Path(r) for r in roots]), autolabel_dir / "versions"]
    app = FastAPI(title="FaceForge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = token or resolve_token(home)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.finalize = printable
    templates.env.filters |= {"when": _when}
    templates.env.globals |= {"duration": _duration, "states": STATES}
    backbones, heads = (sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) for group in ("model", "head"))
    mlflow_ui = os.environ.get(MLFLOW_UI_ENV, "http://127.0.0.1:5000").rstrip("/")
    home_uri = f"sqlite:///{home}/mlflow.db"
    describing: dict[Path, Future] = {}  # one pass per folder at a time, however often it is submitted meanwhile
    describing_lock = threading.Lock()

    def description(dataset: Dataset) -> Future:
        """describe_or_error(dataset), computed once in a daemon thread of its own: a slow folder holds neither the
        other datasets' checks nor the server's exit."""
        with describing_lock:
            future = describing.get(dataset.path)
            if future is None or future.done():
                future = describing[dataset.path] = Future()
                threading.Thread(target=fill, args=(future, dataset), name="describe", daemon=True).start()
            return future

    def fill(future: Future, dataset: Dataset) -> None:
        try:
            future.set_result(describe_or_error(dataset))
        except BaseException as err:  # a bug, not a broken dataset: the submission shows it rather than hang
            future.set_exception(err)

    def page_context(request: Request, name: str, context: dict[str, Any]) -> dict[str, Any]:
        # Where "Log in" returns to: this page with its query (a clone, a sweep's metric), or a form re-shown.
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        here = here if request.method == "GET" else "/jobs/new" if name == "job_form.html" else "/"
        return context | {"csrf": request.state.csrf, "logged_in": _logged_in(request), "here": here}

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, page_context(request, name, context), status_code=status)

    def digest(request: Request, name: str, context: dict[str, Any]) -> str:
        """A digest of what the polled fragment `name` shows: its poll URL carries it, so that an unchanged
        fragment is answered 204 and left in place (the browser drops a click on a link replaced mid-press)."""
        shown = page_context(request, name, context) | {"request": request, "digest": ""}
        return hashlib.sha256(templates.get_template(name).render(shown).encode()).hexdigest()[:16]

    def refresh(request: Request, name: str, shown: str | None, context: dict[str, Any]) -> Response:
        """The polled fragment `name`, or 204 (htmx swaps nothing and polls on) when it is the `shown` digest."""
        current = digest(request, name, context)
        if current == shown:
            return Response(status_code=204)
        return render(request, name, **context, digest=current)

    def _logged_in(request: Request) -> bool:
        token = app.state.token
        return bool(token.strip()) and same(request.cookies.get(SESSION_COOKIE, ""), session_value(token))

    def get_job(job_id: str) -> Job:
        try:
            return store.get(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.middleware("http")
    async def csrf_cookie_and_headers(request: Request, call_next: Any) -> Response:
        known = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = known or new_csrf()
        response = await call_next(request)
        if not known:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def error_page(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        return render(request, "error.html", exc.status_code, message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def bad_request_page(request: Request, exc: RequestValidationError) -> HTMLResponse:
        """A malformed query (`?page=x`) gets the error page, not FastAPI's JSON."""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return render(request, "error.html", 400, message=problems)

    @app.exception_handler(JobStoreBusyError)
    async def busy_page(request: Request, exc: JobStoreBusyError) -> HTMLResponse:
        return render(request, "error.html", 503, message=str(exc))  # nothing changed: the page can be retried

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/queue", 303)

    @app.get("/healthz")
    def healthz() -> Response:
        """For container healthchecks: the job store answers."""
        store.positions()
        return Response("ok", media_type="text/plain")

    @app.get("/login")
    def login_form(request: Request, next: str = "/queue") -> HTMLResponse:
        return render(request, "login.html", next=next, error=None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        check_origin(request)
        form = await request.form()
        check_csrf(request, str(form.get("csrf", "")))
        target = str(form.get("next", "/queue"))
        target = target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/queue"
        if not same(str(form.get("token", "")).strip(), app.state.token):
            return render(request, "login.html", 401, next=target, error="wrong access token")
        response = RedirectResponse(target, 303)
        response.set_cookie(SESSION_COOKIE, session_value(app.state.token), httponly=True, samesite="strict")
        return response

    @app.post("/logout", dependencies=[Depends(require_token)])
    def logout() -> RedirectResponse:
        response = RedirectResponse("/queue", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    def queue_context(state: str | None, page: int) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise HTTPException(400, f"unknown state {state!r}; choose from {', '.join(STATES)}")
        if page > LARGEST_NUMBER:
            raise HTTPException(400, f"page must be at most {LARGEST_NUMBER}")
        page = max(page, 1)
        found = store.list(states=[state] if state else None, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
        return {
            "jobs": found[:PAGE_SIZE],
            "positions": store.positions(),
            "state": state,
            "page": page,
            "has_next": len(found) > PAGE_SIZE,
            "page_size": PAGE_SIZE,
        }

    @app.get("/queue")
    def queue(request: Request, state: str | None = None, page: int = 1) -> HTMLResponse:
        context = queue_context(state, page)
        return render(request, "queue.html", **context, digest=digest(request, "_queue_table.html", context))

    @app.get("/queue/table")
    def queue_table(request: Request, state: str | None = None, page: int = 1, v: str | None = None) -> Response:
        return refresh(request, "_queue_table.html", v, queue_context(state, page))

    def form_page(request: Request, form: JobForm, error: str | None, clone_of: str | None = None) -> HTMLResponse:
        # By form value: the built-in set (listed first) is `demo`, a folder its path, even a folder named demo.
        demo, *folders = list_datasets(roots)
        return render(
            request,
            "job_form.html",
            400 if error else 200,
            form=form,
            error=error,
            clone_of=clone_of,
            datasets={DEMO: demo} | {str(d.path): d for d in folders},
            backbones=backbones,
            heads=heads,
            executors=EXECUTORS,
        )

    @app.get("/jobs/new")
    def new_job(request: Request, clone: str | None = None) -> HTMLResponse:
        form = JobForm.from_job(get_job(clone)) if clone else JobForm()
        return form_page(request, form, None, clone)

    @app.get("/jobs/preview")
    def preview(request: Request) -> HTMLResponse:
        """How many jobs the form's fields and sweep grammar expand to, before anything is submitted."""
        form = JobForm.from_form(request.query_params)
        try:
            count = len(expand_sweep([*form.field_overrides(), *form.typed_overrides()]))
        except ValueError as err:
            return HTMLResponse(f'<span class="error">{escape(str(err))}</span>')
        return HTMLResponse(f"{count} point{'s' if count != 1 else ''}")

    async def refuse_broken(datasets: list[Dataset]) -> None:
        """ValueError with the datasets page's words for one the page shows broken (the job would fail at its
        start); a description not ready within DESCRIBE_WAIT_SECONDS does not hold the form."""
        try:
            async with asyncio.timeout(DESCRIBE_WAIT_SECONDS):
                for dataset in datasets:
                    _, error = await asyncio.shield(asyncio.wrap_future(description(dataset)))  # goes on
                    if error:
                        raise ValueError(f"dataset {dataset.name} cannot be trained on: {error}")
        except TimeoutError:  # still being described: taken, as before; the job's start says what is wrong
            return

    @app.post("/jobs", dependencies=[Depends(require_token)])
    async def submit(request: Request) -> Response:
        form = JobForm.from_form(await request.form())
        try:
            if form.executor not in EXECUTORS:
                raise ValueError(f"unknown executor {form.executor!r}")
            overrides = form.overrides_list(roots)
            await refuse_broken(trained_datasets(overrides))
            priority, slots = form.number("priority") or 0, form.number("slots")
            jobs = await asyncio.to_thread(
                compose_jobs, overrides, name=form.name or None, priority=priority, slots=slots, executor=form.executor
            )
            await asyncio.to_thread(store.submit, jobs)
        except (ValueError, JobStoreBusyError) as err:  # the form comes back as typed: nothing is lost
            return form_page(request, form, str(err))
        target = f"/sweeps/{jobs[0].sweep_id}" if len(jobs) > 1 else f"/jobs/{jobs[0].id}"
        return RedirectResponse(target, 303)

    @app.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: str, diff: str | None = None) -> HTMLResponse:
        job = get_job(job_id)
        diff_lines = None
        if diff:
            other = get_job(diff)
            diff_lines = list(
                difflib.unified_diff(
                    other.config_yaml.splitlines(), job.config_yaml.splitlines(), other.id, job.id, lineterm=""
                )
            )
        recent = [j.id for j in store.list(limit=50) if j.id != job.id]
        return render(request, "job.html", job=job, diff=diff, diff_lines=diff_lines, recent=recent)

    @app.get("/jobs/{job_id}/status")
    def job_status(request: Request, job_id: str) -> HTMLResponse:
        return render(request, "_job_status.html", job=get_job(job_id), polled=True)

    @app.get("/jobs/{job_id}/metrics")
    def job_metrics(request: Request, job_id: str, shown_run: str | None = Query(None, alias="run")) -> HTMLResponse:
        """The metrics section; polled (`run`: the run line shown), its charts and the run line if it changed."""
        job = get_job(job_id)
        charts, values, link, error = [], {}, None, None
        try:
            run = runs.job_run(job)
            if run is not None:
                for key, points in runs.curves(runs.tracking_uri(job), run).items():
                    if len({step for step, _ in points}) > 1:
                        charts.append(line_chart(key, points))
                    else:
                        values[key] = points[-1][1]
                link = f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        except MlflowException as err:
            run, error = None, runs.unreadable(runs.tracking_uri(job), err)
        run_key = f"{run.info.run_id} {run.info.status}" if run else ""
        return render(
            request,
            "_job_metrics.html",
            job=job,
            run=run,
            run_key=run_key,
            shown_run=shown_run,
            charts=charts,
            values=values,
            link=link,
            error=error,
        )

    @app.get("/jobs/{job_id}/logs")
    async def job_logs(request: Request, job_id: str, offset: int = 0) -> StreamingResponse:
        """Server-sent log lines; a reconnecting EventSource resumes after the last byte it got."""
        get_job(job_id)
        last_id = request.headers.get("last-event-id", "")
        resumable = last_id.isascii() and last_id.isdigit() and len(last_id) <= 18  # int() refuses 4,300 digits
        start = int(last_id) if resumable else max(offset, 0)

        async def events() -> AsyncIterator[str]:
            position, attempt = start, None
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                job = await asyncio.to_thread(store.get, job_id)
                if attempt is not None and (job.log_path, job.attempts) != attempt:  # a new start's new log
                    position = 0
                attempt = job.log_path, job.attempts
                text, position_after = await asyncio.to_thread(read_log, job.log_path, position, job.terminal)
                if text:
                    position = position_after
                    yield sse_event(text, position)
                elif job.terminal:
                    yield f"id: {position}\nevent: end\ndata: {job.state}\n\n"
                    return
                else:
                    await asyncio.sleep(POLL_SECONDS)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_token)])
    def cancel(job_id: str) -> RedirectResponse:
        """A job that had ended (a page left open, or it ended just before the cancel) is left so, and the page
        says so rather than seem to have cancelled it."""
        job = get_job(job_id)
        if not job.terminal:
            job = store.cancel(job_id)
            if job.state == CANCELLED or not job.terminal:  # cancelled at once, or its scheduler stops it
                return RedirectResponse(f"/jobs/{job_id}", 303)
        raise HTTPException(409, f"{job_id} had already ended ({job.state}): there was nothing to cancel")

    def sweep_context(sweep_id: str, metric: str | None) -> dict[str, Any]:
        jobs = list(reversed(store.list(sweep_id=sweep_id, limit=100_000)))
        if not jobs:
            raise HTTPException(404, f"no sweep {sweep_id}")
        uri = runs.tracking_uri(jobs[0])
        # The sweep's own metric, limits and model name: another metric chosen on the page keeps the limits.
        candidates, (policy, name), registered, error = [], (Policy(metric=metric or Policy.metric), None), [], None
        if runs.database_ready(uri):
            try:
                candidates = sweep_candidates(uri, sweep_id)
                policy, name = sweep_policy(uri, sweep_id, metric=metric or None)
                registered = [v for v in versions(uri, name or REGISTERED_MODEL) if v.sweep_id == sweep_id]
            except MlflowException as err:  # the points are still listed, beside what to do about it
                candidates, registered, error = [], [], runs.unreadable(uri, err)
        by_job = {c.job_id: c for c in candidates}  # oldest first: a job's latest attempt wins
        name = name or REGISTERED_MODEL
        selection = select(candidates, policy, sweep_id) if candidates else None
        settings = {job.id: dict(o.partition("=")[::2] for o in job.overrides) for job in jobs}
        points = list(settings.values())
        varying = sorted({key for point in points for key in point if len({p.get(key) for p in points}) > 1})
        columns = sorted({key for c in candidates for key in c.metrics if key.startswith("eval.") or key == "loss"})
        front = pareto_front(candidates, policy.metric, LATENCY, sweep_id)
        leader = selection.winner if selection else None  # the champion once registered, else who leads
        marked = registered[0].run_id if registered else leader.run_id if leader else None
        done = all(job.terminal for job in jobs)
        last_end = max((job.finished_at or 0.0 for job in jobs), default=0.0)
        return {
            "sweep_id": sweep_id,
            "jobs": jobs,
            "by_job": by_job,
            "varying": varying,
            "settings": settings,
            "columns": columns,
            "selection": selection,
            "registered": registered,
            "front": front,
            "pareto": pareto_chart(front, marked) if front.points else None,
            "marked": marked,
            "done": done,
            # Until the scheduler has registered the champion, which it does just after the last point ends.
            "polling": not done or (not registered and time.time() - last_end < REGISTRATION_WAIT_SECONDS),
            "policy": policy,
            "registered_model": name,
            "metric": policy.metric,
            "lower_is_better": policy.lower_is_better,
            "error": error,
        }

    def render_sweep(request: Request, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        return render(request, "sweep.html", status, **context, digest=digest(request, "_sweep_body.html", context))

    @app.get("/sweeps/{sweep_id}")
    def sweep_page(request: Request, sweep_id: str, metric: str | None = None) -> HTMLResponse:
        return render_sweep(request, sweep_context(sweep_id, metric))

    @app.get("/sweeps/{sweep_id}/body")
    def sweep_body(request: Request, sweep_id: str, metric: str | None = None, v: str | None = None) -> Response:
        return refresh(request, "_sweep_body.html", v, sweep_context(sweep_id, metric))

    @app.post("/sweeps/{sweep_id}/register", dependencies=[Depends(require_token)])
    async def register(request: Request, sweep_id: str) -> Response:
        metric = str((await request.form()).get("metric", "")) or None
        context = sweep_context(sweep_id, metric)
        try:
            if not context["done"]:
                raise ValueError("the sweep is still running: register its champion when every point has ended")
            uri = runs.tracking_uri(context["jobs"][0])
            await asyncio.to_thread(register_champion, uri, sweep_id, context["policy"], context["registered_model"])
        except (ValueError, MlflowException) as err:
            return render_sweep(request, context | {"error": str(err).splitlines()[0]}, 400)
        return RedirectResponse(f"/sweeps/{sweep_id}", 303)

    @app.get("/models")
    def models_page(request: Request) -> HTMLResponse:
        found: list[Version] = []
        exports: list[LoggedExport] = []
        fronts: list[tuple[str, Markup]] = []
        error = None
        if runs.database_ready(home_uri):
            try:
                found, exports = versions(home_uri), list_exports(home_uri)
                fronts = sweep_fronts(found)
            except MlflowException as err:  # the page still renders, beside what to do about it
                found, exports, error = [], [], runs.unreadable(home_uri, err)
        by_version: dict[tuple[str | None, str | None], list[LoggedExport]] = {}
        for export in exports:
            by_version.setdefault((export.model_name, export.model_version), []).append(export)
        versioned = [(v, by_version.pop((v.name, v.version))) for v in found if (v.name, v.version) in by_version]
        return render(
            request,
            "models.html",
            versions=found,
            uri=home_uri,
            error=error,
            fronts=fronts,
            versioned_exports=versioned,
            other_exports=[export for exports in by_version.values() for export in exports],
            mlflow_ui=mlflow_ui,
        )

    @app.get("/exports/{run_id}/{name}")
    def export_download(run_id: str, name: str) -> FileResponse:
        """An exported file, served from its export run's artifact directory and never from outside it."""
        if not runs.database_ready(home_uri):
            raise HTTPException(404, "no MLflow database yet")
        try:
            path = export_file(home_uri, run_id, name)
        except (ValueError, FileNotFoundError) as err:
            raise HTTPException(404, str(err)) from None
        return FileResponse(path, filename=path.name)

    def sweep_fronts(found: list[Version]) -> list[tuple[str, Markup]]:
        """Each recent sweep's front over the metric its champion was chosen by, that champion ringed."""
        chosen: dict[str, Version] = {}
        for version in found:  # newest first, so a sweep's latest registration marks it
            if version.sweep_id and version.sweep_id not in chosen and len(chosen) < FRONTS_ON_MODELS_PAGE:
                chosen[version.sweep_id] = version
        fronts = []
        for sweep_id, version in chosen.items():
            front = pareto_front(
                sweep_candidates(home_uri, sweep_id), version.metric or Policy.metric, LATENCY, sweep_id
            )
            if front.points:
                mark = CHAMPION_ALIAS if CHAMPION_ALIAS in version.aliases else f"v{version.version}"
                fronts.append((sweep_id, pareto_chart(front, version.run_id, mark)))
        return fronts

    @app.get("/datasets")
    def datasets_page(request: Request) -> HTMLResponse:
        rows = [(dataset, *describe_or_error(dataset)) for dataset in list_datasets(roots)]
        try:
            autolabel = autolabel_status(autolabel_dir)
        except StateError as err:  # a damaged state.db: the datasets are still listed, beside what to do about it
            autolabel = {"workdir": str(autolabel_dir), "error": str(err)}
        return render(request, "datasets.html", rows=rows, roots=roots, autolabel=autolabel)

    return app
