"""The web UI in a real browser: Debian's chromium driven by Playwright, against `faceforge web` and a real
`faceforge scheduler` training tiny models on real faces."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, expect, sync_playwright

from faceforge import models
from faceforge.jobs import TERMINAL, Job, JobStore, make_jobs, store_path
from faceforge.registry import prepare_tracking
from faceforge.registry.selection import JOB_TAG, SWEEP_TAG
from faceforge.train.tracking import RunTracker

from conftest import shared_data
from test_web import TOKEN as WEB_TOKEN
from test_web import Server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]
TOKEN = "browser-test-token"
TIMEOUT_MS = 150_000  # a tiny job: a fresh interpreter, torch, MLflow and a few steps on a shared 2-core machine
TINY = "model.embedding_dim=32 trainer.nproc=1 data.num_workers=0 trainer.log_every=1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_train_root: Path, tiny_pairs: Path) -> Iterator[str]:
    """`faceforge web` and `faceforge scheduler` (2 slots) sharing one FACEFORGE_HOME; the web server's URL."""
    home = tmp_path_factory.mktemp("home")
    roots = [tiny_train_root, tiny_pairs.parent, shared_data() / "lfw"]
    env = os.environ | {
        "FACEFORGE_HOME": str(home),
        "FACEFORGE_TOKEN": TOKEN,
        "FACEFORGE_DATA_ROOTS": os.pathsep.join(str(root) for root in roots),
    }
    port = _free_port()
    cli = [str(Path(sys.executable).with_name("faceforge"))]  # the installed console script
    logs = {name: (home / f"{name}.log").open("wb") for name in ("web", "scheduler")}
    web = subprocess.Popen([*cli, "web", "--port", str(port)], env=env, stdout=logs["web"], stderr=subprocess.STDOUT)
    scheduler = subprocess.Popen(
        [*cli, "scheduler", "--slots", "2", "--poll-seconds", "0.5"],
        env=env,
        stdout=logs["scheduler"],
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "/queue", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        assert web.poll() is None and time.monotonic() < deadline, (home / "web.log").read_text()
        time.sleep(0.2)
    yield url
    store = JobStore(store_path(home))  # jobs outlive their scheduler by design: cancel them before it stops
    for job in store.list(limit=100_000):
        if not job.terminal:
            store.cancel(job.id)
    deadline = time.monotonic() + 60
    while any(job.state not in TERMINAL for job in store.list(limit=100_000)) and time.monotonic() < deadline:
        time.sleep(0.5)
    _stop(scheduler)
    _stop(web)
    for file in logs.values():
        file.close()


def sign_in(page: Page, site: str, token: str, landing: str) -> None:
    """Log `page` in to the web UI at `site` with `token`, leaving it on `landing`."""
    page.set_default_timeout(30_000)
    page.goto(f"{site}/login?next={landing}")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}{landing}")


@contextmanager
def logged_in(site: str, token: str, landing: str) -> Iterator[Page]:
    """A chromium page signed in to the web UI at `site` with `token`, left on `landing`."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        sign_in(page, site, token, landing)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def page(site: str) -> Iterator[Page]:
    with logged_in(site, TOKEN, "/jobs/new") as page:
        yield page


def fill_tiny_job(page: Page, site: str, train_root: Path, steps: int, overrides: str) -> None:
    page.goto(f"{site}/jobs/new")
    page.select_option("select[name=dataset]", str(train_root.resolve()))
    page.select_option("select[name=model]", "mobilefacenet")
    page.fill("input[name=lr]", "0.05")
    page.fill("input[name=steps]", str(steps))
    page.fill("input[name=batch_size]", "8")
    page.fill("input[name=width]", "0.25")
    page.fill("input[name=input_size]", "56")
    page.fill("textarea[name=overrides]", f"{TINY} {overrides}")
    page.fill("input[name=sweep]", "")


def job_id(page: Page) -> str:
    return page.url.rsplit("/", 1)[-1]


def test_bad_form_is_rejected_with_its_message(page: Page, site: str, tiny_train_root: Path) -> None:
    fill_tiny_job(page, site, tiny_train_root, steps=3, overrides="eval=none")
    page.fill("input[name=lr]", "-1")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("optim.lr must be positive")
    expect(page.locator("input[name=lr]")).to_have_value("-1")  # kept for fixing
    page.goto(f"{site}/queue")
    expect(page.locator("#queue-table")).to_contain_text("No jobs")


def test_submit_watch_state_logs_and_loss_plot(page: Page, site: str, tiny_train_root: Path, shared: dict) -> None:
    fill_tiny_job(page, site, tiny_train_root, steps=6, overrides="eval=none mlflow.log_model=false")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/job-\w+$"))
    shared["job"] = job_id(page)
    state = page.locator("#job-state")
    expect(state).to_have_text(re.compile("queued|running"))
    expect(state).to_have_text("running", timeout=TIMEOUT_MS)
    expect(page.locator("#log")).to_contain_text("mlflow:", timeout=TIMEOUT_MS)
    expect(state).to_have_text("succeeded", timeout=TIMEOUT_MS)
    expect(page.locator("#log-state")).to_contain_text("log complete")
    expect(page.locator("#log")).to_contain_text("train: 100%")
    expect(page.locator("svg.chart[aria-label=loss] polyline")).to_be_visible()
    expect(page.locator("svg.chart[aria-label=img_per_s]")).to_be_visible()
    expect(page.locator("#job-metrics a[href*='/runs/']")).to_be_visible()


def test_clone_with_an_edit(page: Page, site: str, shared: dict) -> None:
    original = shared["job"]
    page.goto(f"{site}/jobs/{original}")
    page.click("#clone")
    expect(page.locator("input[name=steps]")).to_have_value("6")
    page.fill("input[name=steps]", "4")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/job-\w+$"))
    assert job_id(page) != original
    expect(page.locator("main")).to_contain_text("trainer.steps=4")
    page.fill("input[name=diff]", original)
    page.click("#diff-button")
    expect(page.locator("#diff")).to_contain_text("-  steps: 6")
    expect(page.locator("#diff")).to_contain_text("+  steps: 4")
    page.click("#cancel")  # the clone itself need not train: cancelled while queued or just started
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=TIMEOUT_MS)


def hold_a_press_across_a_poll(tab: Page, target: str, poll: str, change: Callable[[], object] | None = None) -> None:
    """Press the mouse on `target`, make the `change` (if any), and release the press only once htmx has handled a
    poll of a URL containing `poll` sent after both (the poll sees the change): a person's slow click meeting the
    page's refresh."""
    box = tab.locator(target).bounding_box()
    assert box is not None
    tab.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.evaluate(
        """poll => {
            window.sent = 0; window.handled = 0;  // polls numbered as sent; the latest one htmx has swapped or left
            const polled = event => event.detail.pathInfo.requestPath.includes(poll);
            document.addEventListener("htmx:beforeRequest", event => {
                if (polled(event)) event.detail.xhr.number = ++window.sent; });
            document.addEventListener("htmx:afterRequest", event => {
                if (polled(event)) window.handled = Math.max(window.handled, event.detail.xhr.number); });
        }""",
        poll,
    )
    tab.mouse.down()
    if change is not None:
        change()
    sent = tab.evaluate("() => window.sent")
    tab.wait_for_function("sent => window.handled > sent", arg=sent, timeout=30_000)
    tab.mouse.up()


@contextmanager
def unscheduled(page: Page, home: Path, roots: list[Path]) -> Iterator[tuple[Server, Page]]:
    """An in-process server without a scheduler (its jobs stay as the test leaves them) and a tab of the module's
    browser (one Playwright per thread) with cookies of its own."""
    served = Server(home, roots)
    tab = page.context.browser.new_page()
    try:
        yield served, tab
    finally:
        tab.close()
        served.stop()


def test_a_press_on_cancel_held_across_a_status_poll_still_cancels(
    page: Page, tmp_path: Path, tiny_train_root: Path
) -> None:
    """A person's click lasts a tenth of a second, a tenth of the job page's poll: chromium drops a click whose
    button the poll replaced between its press and its release."""
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):  # the job stays queued, its page polling
        [job] = served.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"]))
        sign_in(tab, served.url, WEB_TOKEN, f"/jobs/{job.id}")
        hold_a_press_across_a_poll(tab, "#cancel", "/status")
        expect(tab.locator("#job-state")).to_have_text("cancelled", timeout=30_000)
        expect(tab.locator("#cancel")).to_have_count(0)


@pytest.mark.parametrize(
    ("landing", "target", "poll", "link"),
    [
        ("/queue", "a[href='/jobs/{job}']", "/queue/table", "/jobs/{job}"),
        ("/jobs/{job}", "#clone", "/status", "/jobs/new?clone={job}"),
    ],
    ids=["queue-table", "job-page"],
)
def test_a_press_held_across_a_poll_bringing_a_change_still_follows_its_link(
    page: Page, tmp_path: Path, tiny_train_root: Path, landing: str, target: str, poll: str, link: str
) -> None:
    """The job ends during the press: the queue table's poll brings its new state, the job page's brings its ended
    state with the buttons under it (Clone without Cancel). Either swap waits for the release."""
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):
        [job] = served.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"]))
        sign_in(tab, served.url, WEB_TOKEN, landing.format(job=job.id))
        hold_a_press_across_a_poll(tab, target.format(job=job.id), poll, lambda: served.store.cancel(job.id))
        tab.wait_for_url(served.url + link.format(job=job.id), timeout=10_000)


def test_a_change_held_back_by_a_press_is_shown_after_its_release(
    page: Page, tmp_path: Path, tiny_train_root: Path
) -> None:
    """The table held back under the press keeps the digest of what it shows, so a poll after the release brings
    the change."""
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):
        [job] = served.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"]))
        sign_in(tab, served.url, WEB_TOKEN, "/queue")
        hold_a_press_across_a_poll(
            tab, "#queue-table td:nth-child(2)", "/queue/table", lambda: served.store.cancel(job.id)
        )
        expect(tab.locator("#queue-table .state")).to_have_text("cancelled", timeout=10_000)


def tracked_jobs(served: Server, folder: Path, root: Path, *overrides: str) -> tuple[str, str, list[Job]]:
    """Jobs on `root` submitted to `served`, logging to an MLflow database in `folder`: its URI, experiment, jobs."""
    uri = f"sqlite:///{folder}/mlflow.db"
    experiment = prepare_tracking(uri)
    overrides = ("data=folder", f"data.root={root}", f"mlflow.tracking_uri={uri}", *overrides)
    return uri, experiment, served.store.submit(make_jobs(list(overrides)))


@pytest.mark.parametrize(
    ("landing", "link", "poll"),
    [("/queue", "/jobs/{job}", "/queue/table"), ("/jobs/{job}", "/sweeps/{sweep}", "/status")],
    ids=["queue-table", "job-status"],
)
def test_a_press_on_a_link_held_across_a_poll_still_follows_it(
    page: Page, tmp_path: Path, tiny_train_root: Path, landing: str, link: str, poll: str
) -> None:
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):
        [job, _] = served.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}", "optim.lr=0.1,0.05"]))
        names = {"job": job.id, "sweep": job.sweep_id}
        sign_in(tab, served.url, WEB_TOKEN, landing.format(**names))
        hold_a_press_across_a_poll(tab, f"a[href='{link.format(**names)}']", poll)
        tab.wait_for_url(served.url + link.format(**names), timeout=10_000)


@pytest.mark.parametrize("ends", [False, True], ids=["unchanged", "run-ends"])
def test_a_press_on_the_mlflow_link_held_across_a_metrics_poll_still_opens_it(
    page: Page, tmp_path: Path, tiny_train_root: Path, ends: bool
) -> None:
    """The run's line is swapped when its run ends; a press held meanwhile still opens the link."""
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):
        uri, experiment, [job] = tracked_jobs(served, tmp_path, tiny_train_root)
        client = MlflowClient(uri)
        run_id = client.create_run(experiment, tags={JOB_TAG: job.id}).info.run_id  # the job's run, still running
        sign_in(tab, served.url, WEB_TOKEN, f"/jobs/{job.id}")
        change = (lambda: client.set_terminated(run_id)) if ends else None
        with tab.context.expect_page(timeout=10_000):  # the link opens MLflow in a tab of its own
            hold_a_press_across_a_poll(tab, "#job-metrics a[target=_blank]", "/metrics", change)


def test_a_press_on_register_held_across_a_sweep_poll_still_registers(
    page: Page, tmp_path: Path, tiny_train_root: Path
) -> None:
    """The finished sweep's page polls on for the scheduler's registration, the Register button under it."""
    with unscheduled(page, tmp_path, [tiny_train_root]) as (served, tab):
        uri, experiment, jobs = tracked_jobs(served, tmp_path, tiny_train_root, "optim.lr=0.1,0.05")
        client = MlflowClient(uri)
        for job, accuracy in zip(jobs, (0.75, 0.875), strict=True):
            run_id = client.create_run(experiment, tags={SWEEP_TAG: job.sweep_id, JOB_TAG: job.id}).info.run_id
            client.log_metric(run_id, "eval.accuracy", accuracy)
            model = models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32).eval()
            RunTracker(uri, run_id).model(model, 56, step=1)
            client.set_terminated(run_id)
            served.store.cancel(job.id)  # ended just now: the page polls for the registration a while
        sign_in(tab, served.url, WEB_TOKEN, f"/sweeps/{jobs[0].sweep_id}")
        hold_a_press_across_a_poll(tab, "#register", "/body")
        expect(tab.locator("#champion")).to_contain_text("current champion", timeout=30_000)


def test_cancel_a_running_job(page: Page, site: str, tiny_train_root: Path) -> None:
    fill_tiny_job(page, site, tiny_train_root, steps=100_000, overrides="eval=none mlflow.log_model=false")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/job-\w+$"))
    expect(page.locator("#job-state")).to_have_text("running", timeout=TIMEOUT_MS)
    expect(page.locator("#log")).to_contain_text("faceforge runner", timeout=TIMEOUT_MS)
    page.click("#cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=TIMEOUT_MS)
    expect(page.locator(".timeline")).to_contain_text(re.compile(r"cancelled \d{4}-\d\d-\d\d \d\d:\d\d"))
    expect(page.locator("#cancel")).to_have_count(0)


def test_four_point_sweep_reaches_a_champion(page: Page, site: str, tiny_train_root: Path, tiny_pairs: Path) -> None:
    lfw = shared_data() / "lfw"
    evaluation = f"eval=pairs eval.pairs={tiny_pairs} eval.root={lfw} eval.crop_fraction=0.5"
    fill_tiny_job(page, site, tiny_train_root, steps=4, overrides=evaluation)
    page.fill("input[name=lr]", "")  # the sweep sets it: a field and an override of one key are refused
    page.fill("input[name=sweep]", "optim.lr=0.05,0.02 model.width=0.25,0.5")
    page.fill("input[name=width]", "")
    expect(page.locator("#sweep-count")).to_have_text("4 points")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/sweeps/sweep-\w+$"))
    expect(page.locator("#sweep-points tbody tr")).to_have_count(4)
    expect(page.locator("#sweep-body")).to_contain_text("4 of 4 points finished", timeout=4 * TIMEOUT_MS)
    expect(page.locator("#sweep-points .state.succeeded")).to_have_count(4)
    expect(page.locator("#champion .winner")).to_be_visible(timeout=TIMEOUT_MS)
    # No scheduler-side registration yet: the engineer confirms it here. Checked and clicked in one task of the
    # page, so the 2 s poll cannot swap the scheduler's registration in between and leave nothing to click.
    page.evaluate("() => document.getElementById('register')?.click()")
    expect(page.locator("#champion")).to_contain_text("current champion", timeout=TIMEOUT_MS)
    expect(page.locator("#champion .reason")).to_contain_text("best accuracy")
    expect(page.locator("#sweep-points tr.champion")).to_have_count(1)
    page.goto(f"{site}/models")
    expect(page.locator("#versions tr.champion")).to_contain_text("champion")
    expect(page.locator("#versions tr.champion")).to_contain_text(" M")  # the model card: params and MACs


@pytest.fixture(scope="module")
def shared() -> dict:
    """Ids handed from one step of the story to the next (submit, then clone it)."""
    return {}
