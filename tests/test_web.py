"""The web UI over HTTP: a real uvicorn server on 127.0.0.1 in a thread, driven with requests."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from functools import partial
from html import unescape
from pathlib import Path

import pytest
import requests
import uvicorn
from markupsafe import escape
from mlflow.tracking import MlflowClient

from faceforge import models
from faceforge.data import pack_folder
from faceforge.data.record_dataset import INTERRUPTED_PACK_MARKER
from faceforge.data_pipeline.autolabel_state import StateDB
from faceforge.data_pipeline.versions import FaceRecord, write_version
from faceforge.export import ExportSource, export_artifact, log_export, open_calibration_images, resolve_source
from faceforge.jobs import CANCELLED, QUEUED, JobStore, compose_config, make_jobs, quoted_path
from faceforge.jobs.logs import LOG_CHUNK
from faceforge.registry import prepare_tracking, select_and_register
from faceforge.registry.selection import SWEEP_TAG
from faceforge.train.tracking import RunTracker
from faceforge.web import app as web_app
from faceforge.web import confine, create_app
from faceforge.web.datasets import DEMO, describe, describe_or_error, list_datasets
from faceforge.web.plots import line_chart
from faceforge.web.security import resolve_token, session_value

from conftest import shared_data, waiting_behind

TOKEN = "test-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """The app served on a socket this process bound itself, so no other process can take its port."""

    def __init__(self, home: Path, roots: list[Path]) -> None:
        self.home, self.store = home, JobStore(home / "jobs.db")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(home, TOKEN, roots), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def count(self) -> int:
        return len(self.store.list(limit=100_000))

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return requests.post(self.url + path, timeout=60, allow_redirects=False, **kwargs)

    def login(self) -> requests.Session:
        """A browser-like session: CSRF cookie from a page, then the token through the login form."""
        session = requests.Session()
        session.get(self.url + "/login", timeout=30)
        csrf = session.cookies["ff_csrf"]
        reply = session.post(
            self.url + "/login", data={"token": TOKEN, "csrf": csrf, "next": "/queue"}, allow_redirects=False
        )
        assert reply.status_code == 303, reply.text
        return session


@pytest.fixture(scope="module")
def roots(tiny_train_root: Path, tiny_pairs: Path) -> list[Path]:
    return [tiny_train_root, tiny_pairs.parent, shared_data() / "lfw"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, roots: list[Path]) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("FACEFORGE_HOME")
    os.environ["FACEFORGE_HOME"] = str(home)
    served = Server(home, roots)
    yield served
    served.stop()
    if old is None:
        del os.environ["FACEFORGE_HOME"]
    else:
        os.environ["FACEFORGE_HOME"] = old


def job_form(train_root: Path, **fields: str) -> dict[str, str]:
    """A tiny, valid job as the form posts it."""
    values = {
        "dataset": str(train_root),
        "model": "mobilefacenet",
        "head": "arcface",
        "lr": "0.05",
        "steps": "3",
        "batch_size": "8",
        "width": "0.25",
        "input_size": "56",
        "overrides": "model.embedding_dim=32 trainer.nproc=1 data.num_workers=0 eval=none mlflow.log_model=false",
        "sweep": "",
        "priority": "0",
        "executor": "local",
    }
    return values | fields


def test_token_file_is_private_and_printed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FACEFORGE_TOKEN", raising=False)
    token = resolve_token(tmp_path)
    assert token in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "web_token").stat().st_mode) == 0o600
    assert resolve_token(tmp_path) == token
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("FACEFORGE_TOKEN", "from-env")
    assert resolve_token(tmp_path) == "from-env"


@pytest.mark.parametrize("left", ["", " \n"])
def test_a_blank_token_file_gets_a_new_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], left: str
) -> None:
    """What a first start killed before writing, or `touch web_token`, leaves: a blank token is public, never used."""
    monkeypatch.delenv("FACEFORGE_TOKEN", raising=False)
    (tmp_path / "web_token").write_text(left)
    token = resolve_token(tmp_path)
    assert token.strip() and token in capsys.readouterr().out
    assert (tmp_path / "web_token").read_text() == f"{token}\n"
    assert stat.S_IMODE((tmp_path / "web_token").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".web_token.lock", "web_token"]  # no temporary file
    monkeypatch.setenv("FACEFORGE_TOKEN", " ")
    assert resolve_token(tmp_path) == token


def test_servers_starting_together_share_one_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each would make and print its own, and the file keep the last: the first server's token opened nothing."""
    monkeypatch.delenv("FACEFORGE_TOKEN", raising=False)
    tokens: list[str] = []
    with waiting_behind(tmp_path / ".web_token.lock", lambda: tokens.append(resolve_token(tmp_path))) as second:
        (tmp_path / "web_token").write_text("the-first-servers\n")  # what the first start writes while it holds it
    assert second.error is None and tokens == ["the-first-servers"]


def test_a_blank_app_token_lets_nobody_in(tmp_path: Path, roots: list[Path], tiny_train_root: Path) -> None:
    """A session cookie keyed with an empty token is computable by anyone: with no token, nothing authenticates."""
    served = Server(tmp_path, roots)
    served.server.config.app.state.token = ""
    try:
        session = requests.Session()
        session.get(served.url + "/queue", timeout=30)
        session.cookies.set("ff_session", session_value(""))
        csrf = session.cookies["ff_csrf"]
        reply = session.post(served.url + "/jobs", data=job_form(tiny_train_root, csrf=csrf), allow_redirects=False)
        assert reply.status_code == 503 and "no access token" in reply.text
        assert "Submitting needs the access token" in session.get(served.url + "/jobs/new", timeout=30).text
        login = session.post(served.url + "/login", data={"token": "", "csrf": csrf}, allow_redirects=False)
        assert login.status_code == 401
        assert served.count() == 0
    finally:
        served.stop()


def test_mutations_need_the_token(server: Server, tiny_train_root: Path) -> None:
    before = server.count()
    assert server.post("/jobs", data=job_form(tiny_train_root)).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert server.post("/jobs", data=job_form(tiny_train_root), headers=wrong).status_code == 401
    assert server.count() == before
    reply = server.post("/jobs", data=job_form(tiny_train_root, name="by-token"), headers=BEARER)
    assert reply.status_code == 303, reply.text
    job = server.store.get(reply.headers["location"].removeprefix("/jobs/"))
    assert job.name == "by-token" and job.state == QUEUED
    assert f"data.root={quoted_path(tiny_train_root.resolve())}" in job.overrides and "optim.lr=0.05" in job.overrides


def test_cross_site_posts_are_refused(server: Server, tiny_train_root: Path) -> None:
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"]))
    session = server.login()
    csrf = session.cookies["ff_csrf"]
    cancel = f"{server.url}/jobs/{job.id}/cancel"
    assert session.post(cancel, data={}, allow_redirects=False).status_code == 403
    assert session.post(cancel, data={"csrf": "forged"}, allow_redirects=False).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert session.post(cancel, data={"csrf": csrf}, headers=evil, allow_redirects=False).status_code == 403
    assert server.store.get(job.id).state == QUEUED
    reply = session.post(cancel, data={"csrf": csrf}, headers={"Origin": server.url}, allow_redirects=False)
    assert reply.status_code == 303
    assert server.store.get(job.id).state == CANCELLED


def test_a_cancel_for_a_job_that_has_ended_changes_nothing(server: Server, tiny_train_root: Path) -> None:
    """A page left open: the job succeeded since; there is nothing to cancel, and its record must not say there was."""
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"], priority=99))
    assert server.store.claim("local", "test-owner", capacity=1000, lease_seconds=60).id == job.id
    server.store.finish(job.id, "test-owner", "succeeded", exit_code=0)
    reply = server.post(f"/jobs/{job.id}/cancel", headers=BEARER)
    assert reply.status_code == 409 and f"{job.id} had already ended (succeeded)" in reply.text
    ended = server.store.get(job.id)
    assert server.store.cancel(job.id) == ended  # what a cancel racing the end gets: the job as it ended
    assert ended.state == "succeeded" and not ended.cancel_requested and ended.cancelled_at is None
    with pytest.raises(KeyError):
        server.store.cancel("job-missing")


def test_bad_form_shows_the_message_and_enqueues_nothing(server: Server, tiny_train_root: Path) -> None:
    before = server.count()
    for fields, message in [
        ({"lr": "-1"}, "optim.lr must be positive"),
        ({"steps": "many"}, "trainer.steps must be int"),
        ({"model": "resnet9000"}, "resnet9000"),
        ({"lr": "", "width": "", "sweep": "optim.lr=0.1,0.05 model.width=0.25,oops"}, "model.width must be float"),
        ({"steps": "abc", "overrides": "trainer.steps=3"}, "steps is also set in the overrides (trainer.steps=3)"),
        ({"priority": "high"}, "priority must be a whole number"),
        ({"priority": "\u0663"}, "priority must be a whole number"),  # an Arabic-Indic three
        ({"slots": "1_0"}, "slots must be a whole number"),
        ({"priority": str(2**63)}, "priority, slots and nodes must be within"),
        ({"slots": "99999999999999999999"}, "priority, slots and nodes must be within"),
        ({"lr": "", "sweep": "optim.lr=interval(0,1)"}, "not a sweep the queue can run"),
        ({"lr": "", "sweep": "optim.lr=glob(*)"}, "not a sweep the queue can run"),
        ({"executor": "slurm"}, "unknown executor"),
        ({"overrides": "trainer.nproc=1 data.root='/open"}, "overrides: a quote is not closed"),
        ({"sweep": "'\\" * 40_000}, "sweep: 80000 characters, more than the 65536 allowed"),
    ]:
        reply = server.post("/jobs", data=job_form(tiny_train_root, **fields), headers=BEARER)
        assert reply.status_code == 400, fields
        error = re.search(r'id="form-error"[^>]*>(.*?)</p>', reply.text, re.S)
        assert error and message in error.group(1), (fields, error and error.group(1))
        assert 'name="lr"' in reply.text  # the form is shown again to be fixed
    assert server.count() == before


def test_a_locked_job_store_gets_a_retry_page_and_loses_nothing(
    tmp_path: Path, roots: list[Path], tiny_train_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the write lock: a 503 page to retry (or the form, as typed), no half-done change."""
    monkeypatch.setattr(web_app, "JobStore", partial(JobStore, busy_seconds=0.2))
    served = Server(tmp_path, roots)
    try:
        [job] = served.store.submit(make_jobs([f"data.root={quoted_path(tiny_train_root)}"]))
        holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            reply = served.post(f"/jobs/{job.id}/cancel", headers=BEARER)
            assert reply.status_code == 503
            assert "stayed locked" in reply.text and "try again" in reply.text
            reply = served.post("/jobs", data=job_form(tiny_train_root, name="kept"), headers=BEARER)
            assert reply.status_code == 400 and "stayed locked" in reply.text
            assert 'value="kept"' in reply.text  # the form comes back as typed
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        [unchanged] = served.store.list()
        assert unchanged.state == QUEUED and not unchanged.cancel_requested
        assert served.post(f"/jobs/{job.id}/cancel", headers=BEARER).status_code == 303  # the retry works
    finally:
        served.stop()


def test_sweep_preview_counts_points_and_submits_them(server: Server, tiny_train_root: Path) -> None:
    params = {"sweep": "optim.lr=0.1,0.05 model.width=0.25,0.5", "overrides": "trainer.steps=2,3"}
    assert server.get("/jobs/preview", params=params).text == "8 points"
    assert server.get("/jobs/preview", params={"steps": "3,4", "input_size": "56,64"}).text == "4 points"  # fields
    assert server.get("/jobs/preview", params={"sweep": "optim.lr=0.1"}).text == "1 point"
    assert "error" in server.get("/jobs/preview", params={"sweep": "optim.lr=0.1,,"}).text
    assert "not a sweep the queue can run" in server.get("/jobs/preview", params={"sweep": "optim.lr=glob(*)"}).text
    too_many = {"sweep": "optim.lr=range(0,40) trainer.steps=range(1,31)"}
    assert "more than 1000 points" in server.get("/jobs/preview", params=too_many).text
    twice = server.post("/jobs", data=job_form(tiny_train_root, sweep="optim.lr=0.1,0.05"), headers=BEARER)
    assert twice.status_code == 400 and "lr is also set in the overrides (optim.lr=0.1,0.05)" in twice.text
    form = job_form(tiny_train_root, lr="", sweep="optim.lr=0.1,0.05")
    reply = server.post("/jobs", data=form, headers=BEARER)
    assert reply.status_code == 303 and reply.headers["location"].startswith("/sweeps/sweep-")
    sweep_id = reply.headers["location"].removeprefix("/sweeps/")
    jobs = server.store.list(sweep_id=sweep_id)
    assert sorted(next(o for o in j.overrides if o.startswith("optim.lr=")) for j in jobs) == [
        "optim.lr=0.05",
        "optim.lr=0.1",
    ]
    page = server.get(f"/sweeps/{sweep_id}").text
    assert all(job.id in page for job in jobs) and "<th>optim.lr</th>" in page


def test_a_dataset_the_datasets_page_shows_broken_is_refused_until_fixed(
    server: Server, roots: list[Path], tiny_train_root: Path
) -> None:
    """The form refuses it in the datasets page's own words, before a job fails at its start; fixed, it is taken."""
    packed, cut = roots[1] / "packed", roots[1] / "cut-short"
    pack_folder(tiny_train_root, packed)
    shutil.copytree(tiny_train_root, cut)
    first = sorted(cut.glob("*/*.jpg"))[0]  # the image the description decodes
    try:
        (packed / INTERRUPTED_PACK_MARKER).touch()  # a pack killed between its renames
        first.write_bytes(b"")  # a copy cut short
        page = server.get("/datasets").text
        before = server.count()
        for dataset in (packed, cut):
            shown = re.search(rf'<td>{dataset.name}</td>\s*<td colspan="3" class="error">(.*?)</td>', page, re.S)
            assert shown, page
            reply = server.post("/jobs", data=job_form(dataset), headers=BEARER)
            error = re.search(r'id="form-error"[^>]*>(.*?)</p>', reply.text, re.S)
            assert reply.status_code == 400 and error, (dataset, reply.status_code)
            assert shown.group(1) in error.group(1) and dataset.name in error.group(1), error.group(1)
        assert server.count() == before
        (packed / INTERRUPTED_PACK_MARKER).unlink()  # what a finished re-pack leaves
        first.unlink()
        for dataset in (packed, cut):
            reply = server.post("/jobs", data=job_form(dataset), headers=BEARER)
            assert reply.status_code == 303, reply.text
    finally:
        shutil.rmtree(packed)
        shutil.rmtree(cut)


def test_a_dangling_link_beside_the_images_does_not_make_a_dataset_broken(
    server: Server, roots: list[Path], tiny_train_root: Path
) -> None:
    """An editor's lock file (`.#notes.txt`, a link to nowhere) is not an image; the trainer never reads it."""
    people = roots[1] / "with-lock-file"
    shutil.copytree(tiny_train_root, people)
    (sorted(people.iterdir())[0] / ".#notes.txt").symlink_to("user@host.1234")
    try:
        reply = server.post("/jobs", data=job_form(people), headers=BEARER)
        assert reply.status_code == 303, reply.text
        assert re.search(rf"<td>{people.name}</td>\s*<td>6</td>", server.get("/datasets").text)
    finally:
        shutil.rmtree(people)


def test_a_dataset_slow_to_describe_does_not_hold_the_form(
    server: Server, roots: list[Path], tiny_train_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the wait the form takes the dataset undescribed; the description goes on, and the next submission has it."""
    packed = roots[1] / "packed-slowly"
    pack_folder(tiny_train_root, packed)
    (packed / INTERRUPTED_PACK_MARKER).touch()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(web_app, "DESCRIBE_WAIT_SECONDS", 0.0)  # no description arrives in no time
            reply = server.post("/jobs", data=job_form(packed), headers=BEARER)
            assert reply.status_code == 303, reply.text
        reply = server.post("/jobs", data=job_form(packed), headers=BEARER)
        assert reply.status_code == 400 and "a pack into it was interrupted" in reply.text
    finally:
        shutil.rmtree(packed)


def test_a_folder_named_in_another_encoding_is_shown_and_not_offered(tmp_path: Path, tiny_train_root: Path) -> None:
    """A name that is not UTF-8 (Latin-1 `caf\\xe9` from an old disk) cannot go in a page as it is, nor in a job."""
    root = tmp_path / "root"
    shutil.copytree(tiny_train_root, root / "good")
    shutil.copytree(tiny_train_root, os.fsdecode(os.fsencode(root) + b"/caf\xe9"))
    served = Server(tmp_path / "home", [root])
    try:
        page = served.get("/datasets")
        assert page.status_code == 200 and "<td>caf\ufffd</td>" in page.text
        form = served.get("/jobs/new")
        assert form.status_code == 200
        assert re.search(r"<option [^>]*disabled[^>]*>caf\ufffd \(.*\) is not named in UTF-8: rename it", form.text)
        assert f'<option value="{(root / "good").resolve()}"' in form.text
    finally:
        served.stop()


def test_a_file_named_in_another_encoding_leaves_its_dataset_readable(tmp_path: Path, tiny_train_root: Path) -> None:
    """The trainer reads such an image; the version fingerprint must hash the name's bytes, not fail on them."""
    shutil.copytree(tiny_train_root, tmp_path / "faces")
    person = sorted((tmp_path / "faces").iterdir())[0]
    shutil.copy(next(person.glob("*.jpg")), os.fsdecode(os.fsencode(person) + b"/photo_caf\xe9.jpg"))
    (faces,) = [d for d in list_datasets([tmp_path]) if d.name != DEMO]
    assert describe_or_error(faces)[1] is None


def test_a_folder_named_demo_is_offered_beside_the_demo_set(tmp_path: Path, tiny_train_root: Path) -> None:
    """The form's values tell them apart by what they are, not by name: the folder trains on itself."""
    folder = tmp_path / "root" / "demo"
    shutil.copytree(tiny_train_root, folder)
    served = Server(tmp_path / "home", [folder.parent])
    try:
        options = re.findall(r'<option value="([^"]*)"[^>]*>demo \(', served.get("/jobs/new").text)
        assert options == [DEMO, str(folder.resolve())], options
        reply = served.post("/jobs", data=job_form(folder), headers=BEARER)
        assert reply.status_code == 303, reply.text
        job = served.store.get(reply.headers["location"].removeprefix("/jobs/"))
        assert "data=folder" in job.overrides and compose_config(job.overrides).data.root == str(folder.resolve())
    finally:
        served.stop()


def test_paths_outside_the_data_roots_are_refused(server: Server, roots: list[Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "person").mkdir(parents=True)
    link = roots[1] / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        before = server.count()
        for fields in [
            {"dataset": str(roots[0] / ".." / ".." / "etc")},
            {"dataset": "../../../../etc"},
            {"dataset": str(link)},
            {"overrides": "data.root=/etc"},
            {"overrides": f"eval=pairs eval.pairs={roots[1]}/../../../etc/passwd eval.root={roots[2]}"},
            {"overrides": "trainer.init_from=/etc"},  # refused before the web process opens anything there
            {"overrides": "distill=embedding distill.teacher=/etc"},
            {"overrides": f"distill=embedding distill.teacher={outside} distill.cache_dir=/tmp/elsewhere"},
        ]:
            reply = server.post("/jobs", data=job_form(roots[0], **fields), headers=BEARER)
            assert reply.status_code == 400, fields
            assert "outside the configured data roots" in reply.text, fields
        for fields, message in [
            ({"overrides": "mlflow.tracking_uri=sqlite:////etc/passwd"}, "mlflow.tracking_uri cannot be set"),
            # A whole node, a package or an interpolation would set those keys past the checks above.
            ({"overrides": f"data={{root:{outside}}}"}, "only a config of configs/data/ may be chosen"),
            ({"sweep": f"eval=pairs,{{pairs:{outside}}}"}, "only a config of configs/eval/ may be chosen"),
            ({"overrides": "mlflow={tracking_uri:'sqlite:////tmp/x.db'}"}, "only a config of configs/mlflow/"),
            ({"overrides": "data@eval=folder"}, "package overrides (@) cannot be used"),
            ({"overrides": "mlflow.run_name=${oc.env:FACEFORGE_TOKEN}"}, "overrides: interpolations"),
            ({"lr": "${oc.env:PATH}"}, "lr: interpolations"),
            # Past `..`, MLflow loads (unpickles) any model folder on the server.
            ({"overrides": f"distill=embedding distill.teacher=runs:/{'0' * 32}/../../../tmp/evil"}, "give models:/"),
            ({"overrides": "distill=embedding distill.teacher=mlflow-artifacts:/x/model"}, "give models:/"),
        ]:
            reply = server.post("/jobs", data=job_form(roots[0], **fields), headers=BEARER)
            assert reply.status_code == 400 and message in reply.text, (fields, reply.text[-2000:])
        assert server.count() == before
    finally:
        link.unlink()
    assert confine(roots[0] / ".." / roots[0].name, [roots[0]]) == confine(".", [roots[0]]) == roots[0].resolve()


def test_a_path_longer_than_the_file_system_allows_is_refused(server: Server, roots: list[Path]) -> None:
    """Looking such a path up fails (ENAMETOOLONG) rather than answering no: the form says so, as for a missing one."""
    long, before = "x" * 300, server.count()
    for fields in [
        {"dataset": long},
        {"overrides": f"eval=pairs eval.pairs={long} eval.root={roots[2]}"},
        {"overrides": f"trainer.init_from={long}"},
    ]:
        reply = server.post("/jobs", data=job_form(roots[0], **fields), headers=BEARER)
        error = re.search(r'id="form-error"[^>]*>(.*?)</p>', reply.text, re.S)
        assert reply.status_code == 400 and error and "File name too long" in error.group(1), (fields, reply.text[:200])
        assert 'name="lr"' in reply.text
    assert server.count() == before


def test_an_override_that_drops_a_select_choice_is_refused(server: Server, roots: list[Path]) -> None:
    """The Backbone, Head and Dataset selects, like the fields, are not silently replaced by an override of their key;
    a sweep that keeps the choice among its values loses nothing (test_a_path_with_commas...) and is taken."""
    before = server.count()
    for fields, message in [
        ({"overrides": "eval=none model=squeezenet"}, "model is also set in the overrides (model=squeezenet)"),
        ({"sweep": "head=cosface,softmax"}, "head is also set in the overrides (head=cosface,softmax)"),
        (
            {"overrides": f"eval=none data.root={roots[2]}"},
            f"dataset is also set in the overrides (data.root={roots[2]})",
        ),
        ({"overrides": "data=demo"}, "dataset is also set in the overrides (data=demo)"),
        ({"dataset": DEMO, "overrides": "data=folder"}, "dataset is also set in the overrides (data=folder)"),
        ({"overrides": "eval=none data.root="}, "data.root= names no dataset"),
        ({"dataset": DEMO, "overrides": "data.root=''"}, "data.root='' names no dataset"),
    ]:
        reply = server.post("/jobs", data=job_form(roots[0], **fields), headers=BEARER)
        error = re.search(r'id="form-error"[^>]*>(.*?)</p>', reply.text, re.S)
        assert reply.status_code == 400 and error and message in unescape(error.group(1)), (fields, error)
    assert server.count() == before
    reply = server.post(
        "/jobs", data=job_form(roots[0], lr="", sweep="model=mobilefacenet,mobilefacenet_micro"), headers=BEARER
    )
    assert reply.status_code == 303, reply.text


def test_a_relative_path_is_stored_as_the_absolute_path_it_was_checked_as(server: Server, roots: list[Path]) -> None:
    """The trainer takes a relative path from the scheduler's working directory, not from the data root."""
    overrides = job_form(roots[0])["overrides"]
    for fields in [{"overrides": f"{overrides} data.root=."}, {"sweep": f"data.root=.,{roots[0]}"}]:
        reply = server.post("/jobs", data=job_form(roots[0], **fields), headers=BEARER)
        assert reply.status_code == 303, reply.text
        kind, _, found = reply.headers["location"].strip("/").partition("/")
        jobs = server.store.list(sweep_id=found) if kind == "sweeps" else [server.store.get(found)]
        assert len(jobs) == (2 if kind == "sweeps" else 1)
        for job in jobs:
            assert [o for o in job.overrides if o.startswith("data.root=")] == [
                f"data.root={quoted_path(roots[0].resolve())}"
            ]


def test_a_path_with_commas_spaces_and_quotes_is_one_path_not_a_sweep(server: Server, roots: list[Path]) -> None:
    """Hydra reads an unquoted `a,b` as a sweep of two values; the form quotes the paths it checked."""
    odd, spaced = roots[1] / "faces, it's ${not} [a list]", roots[1] / "faces, take 2"
    shutil.copytree(roots[0], odd)
    shutil.copytree(roots[0], spaced)
    try:
        reply = server.post("/jobs", data=job_form(odd), headers=BEARER)
        assert reply.status_code == 303, reply.text
        job = server.store.get(reply.headers["location"].removeprefix("/jobs/"))
        assert compose_config(job.overrides).data.root == str(odd.resolve())
        clone = server.get("/jobs/new", params={"clone": job.id}).text
        assert f'<option value="{escape(str(odd.resolve()))}" selected>' in clone
        assert f'href="/login?next=/jobs/new%3Fclone%3D{job.id}"' in clone  # logging in keeps the clone

        typed = {"sweep": f"data.root='{spaced}',{roots[0]}"}
        reply = server.post("/jobs", data=job_form(roots[0], **typed), headers=BEARER)
        assert reply.status_code == 303, reply.text
        jobs = server.store.list(sweep_id=reply.headers["location"].removeprefix("/sweeps/"))
        trained = sorted(compose_config(job.overrides).data.root for job in jobs)
        assert trained == sorted([str(spaced.resolve()), str(roots[0].resolve())])
    finally:
        shutil.rmtree(odd)
        shutil.rmtree(spaced)


def test_queue_page_paginates_a_thousand_jobs(server: Server, tiny_train_root: Path) -> None:
    [template] = make_jobs(["data=folder", f"data.root={tiny_train_root}"], name="bulk")
    server.store.submit([replace(template, id=f"job-bulk{i:05d}") for i in range(1000)])
    page = server.get("/queue")
    assert page.status_code == 200
    assert page.text.count('<span class="state ') == 50
    assert "job-bulk00999" in page.text and "job-bulk00950" in page.text and "job-bulk00949" not in page.text
    assert "older" in page.text and re.search(r"\b10\d\d queued in all", page.text)
    assert "job-bulk00000" in server.get("/queue/table", params={"page": 20}).text
    queued = server.get("/queue/table", params={"page": 2, "state": "queued"}).text
    assert queued.count('<span class="state queued">') == 50 and "job-bulk00949" in queued
    assert server.get("/queue", params={"state": "bogus"}).status_code == 400
    assert server.get("/queue", params={"page": 10**18}).status_code == 400
    malformed = server.get("/queue/table", params={"page": "x"})  # the error page, not FastAPI's JSON
    assert malformed.status_code == 400 and malformed.headers["content-type"].startswith("text/html")
    assert "page: Input should be a valid integer" in malformed.text


def test_a_poll_leaves_an_unchanged_table_in_place(server: Server, tiny_train_root: Path) -> None:
    """204 (htmx swaps nothing) while the table shown is current: a click held across the poll lands."""
    shown = re.search(r'hx-get="/queue/table\?page=1&v=(\w+)"', server.get("/queue").text)
    assert shown
    assert server.get("/queue/table", params={"page": 1, "v": shown.group(1)}).status_code == 204
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"], name="newer"))
    changed = server.get("/queue/table", params={"page": 1, "v": shown.group(1)})
    assert changed.status_code == 200 and job.id in changed.text and shown.group(1) not in changed.text


def test_log_stream_resumes_from_the_last_event_id(server: Server, tiny_train_root: Path, tmp_path: Path) -> None:
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"], priority=99))
    log = tmp_path / "job.log"
    log.write_bytes(b"first line\nsecond line\nhalf")
    owner = "test-owner"
    assert server.store.claim("local", owner, capacity=1000, lease_seconds=60).id == job.id
    server.store.update(job.id, log_path=str(log))

    def events(headers: dict[str, str], until_end: bool) -> list[tuple[str, str, str]]:
        found: list[tuple[str, str, str]] = []
        with requests.get(f"{server.url}/jobs/{job.id}/logs", headers=headers, stream=True, timeout=30) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            event = {"id": "", "event": "message", "data": []}
            for line in reply.iter_lines(decode_unicode=True):
                if line:
                    key, _, value = line.partition(": ")
                    event[key] = event[key] + [value] if key == "data" else value
                    continue
                if event["data"]:
                    found.append((event["id"], event["event"], "\n".join(event["data"])))
                    if event["event"] == "end" or not until_end:
                        break
                event = {"id": "", "event": "message", "data": []}
        return found

    [(first_id, _, text)] = events({}, until_end=False)
    assert text == "first line\nsecond line" and int(first_id) == len(b"first line\nsecond line\n")
    assert events({"Last-Event-ID": "\u00b2"}, until_end=False) == [(first_id, "message", text)]  # a digit, not ASCII
    # An id past the file's end (the log was replaced or truncated since, or made up) starts the log again.
    assert events({"Last-Event-ID": "9" * 20}, until_end=False) == [(first_id, "message", text)]
    assert events({"Last-Event-ID": "9" * 5000}, until_end=False) == [(first_id, "message", text)]  # past int()
    resume = len(b"first line\n")
    [(_, _, text)] = events({"Last-Event-ID": str(resume)}, until_end=False)
    assert text == "second line"
    with log.open("ab") as file:
        file.write(b" done\r12%|##\rlast\n")
    server.store.finish(job.id, owner, "succeeded", exit_code=0)
    rest = events({"Last-Event-ID": first_id}, until_end=True)
    assert rest[0][2] == "half done\n12%|##\nlast" and int(rest[0][0]) == log.stat().st_size
    assert rest[-1][1:] == ("end", "succeeded")


def test_log_stream_follows_a_new_log_file_from_its_start(
    server: Server, tiny_train_root: Path, tmp_path: Path
) -> None:
    """A retried Ray job logs to a new file: the stream must start that one at byte 0, not at the old offset."""
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"], priority=99))
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    first.write_bytes(b"attempt one wrote this long line\n")
    assert server.store.claim("local", "test-owner", capacity=1000, lease_seconds=60).id == job.id
    server.store.update(job.id, log_path=str(first))
    with requests.get(f"{server.url}/jobs/{job.id}/logs", stream=True, timeout=30) as reply:
        lines = reply.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: ")) == "data: attempt one wrote this long line"
        second.write_bytes(b"attempt two\n")
        server.store.update(job.id, log_path=str(second))
        server.store.finish(job.id, "test-owner", "succeeded", exit_code=0)
        rest = []
        for line in lines:
            rest.append(line)
            if line == "event: end":
                break
    assert "data: attempt two" in rest, rest


def test_log_stream_keeps_a_character_whole_across_chunks(
    server: Server, tiny_train_root: Path, tmp_path: Path
) -> None:
    [job] = server.store.submit(make_jobs(["data=folder", f"data.root={tiny_train_root}"], priority=99))
    log = tmp_path / "job.log"
    log.write_bytes(b"a" * (LOG_CHUNK - 1) + "é\n".encode())  # é's two bytes straddle the first chunk's end
    assert server.store.claim("local", "test-owner", capacity=1000, lease_seconds=60).id == job.id
    server.store.update(job.id, log_path=str(log))
    server.store.finish(job.id, "test-owner", "succeeded", exit_code=0)
    stream = server.get(f"/jobs/{job.id}/logs").text
    text = "".join(line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: "))
    assert "a" * (LOG_CHUNK - 1) + "é" in text and "\ufffd" not in text


def test_job_page_plots_metrics_links_mlflow_and_diffs(server: Server, tiny_train_root: Path) -> None:
    uri = f"sqlite:///{server.home}/mlflow.db"
    prepare_tracking(uri)
    base = ["data=folder", f"data.root={tiny_train_root}", f"mlflow.tracking_uri={uri}", "model.width=0.25"]
    [first] = server.store.submit(make_jobs([*base, "trainer.steps=5"], name="plotted"))
    [second] = server.store.submit(make_jobs([*base, "trainer.steps=7"], name="other"))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("faceforge").experiment_id
    run = client.create_run(experiment, tags={"faceforge.job_id": first.id})
    for step in range(1, 6):
        client.log_metric(run.info.run_id, "loss", 10.0 / step, step=step)
        client.log_metric(run.info.run_id, "lr", 0.1 * (1 - step / 5), step=step)
    client.log_metric(run.info.run_id, "eval.accuracy", 0.625, step=5)

    metrics = server.get(f"/jobs/{first.id}/metrics").text
    assert 'aria-label="loss"' in metrics and 'aria-label="lr"' in metrics and "<polyline" in metrics
    assert "eval.accuracy" in metrics and "0.625" in metrics
    assert f"/#/experiments/{experiment}/runs/{run.info.run_id}" in metrics
    assert "No MLflow run yet" in server.get(f"/jobs/{second.id}/metrics").text
    polled = server.get(f"/jobs/{first.id}/metrics", params={"run": f"{run.info.run_id} RUNNING"}).text
    assert "<polyline" in polled and 'id="job-run"' not in polled  # the link shown stays in place
    run_appeared = server.get(f"/jobs/{first.id}/metrics", params={"run": ""}).text
    assert re.search(r'id="job-run" hx-swap-oob="true">.*/runs/', run_appeared, re.S)

    page = server.get(f"/jobs/{second.id}", params={"diff": first.id}).text
    assert '<span class="del">-  steps: 5</span>' in page and '<span class="add">+  steps: 7</span>' in page
    assert "created" in page and 'id="cancel"' in page
    clone = server.get("/jobs/new", params={"clone": second.id}).text
    assert 'name="steps" value="7"' in clone and 'name="width" value="0.25"' in clone
    assert f'<option value="{tiny_train_root.resolve()}" selected>' in clone
    assert f"mlflow.tracking_uri={uri}" in clone
    assert server.get("/jobs/job-missing").status_code == 404
    deleted = client.create_run(experiment, tags={"faceforge.job_id": second.id}).info.run_id
    server.store.update(second.id, mlflow_run_id=deleted)
    client.delete_run(deleted)  # MLflow's get_run still returns it, marked deleted
    assert "No MLflow run yet" in server.get(f"/jobs/{second.id}/metrics").text

    # A clone keeps what the form's lists do not offer: a nested dataset, and data=demo with its own root.
    nested = ["data=folder", f"data.root={tiny_train_root / 'nested'}", "model=mobilefacenet_micro"]
    (tiny_train_root / "nested").symlink_to(tiny_train_root, target_is_directory=True)
    try:
        [third] = server.store.submit(make_jobs(nested, name="nested"))
        clone = server.get("/jobs/new", params={"clone": third.id}).text
    finally:
        (tiny_train_root / "nested").unlink()
    assert f'<option value="{tiny_train_root / "nested"}" selected>' in clone
    assert "<option selected>mobilefacenet_micro</option>" in clone
    [fourth] = server.store.submit(make_jobs(["data=demo", f"data.root={tiny_train_root}"], name="demo-root"))
    clone = server.get("/jobs/new", params={"clone": fourth.id}).text
    assert '<option value="demo" selected>' in clone and f"data.root={tiny_train_root}" in clone


def test_models_and_datasets_pages(server: Server, tiny_train_root: Path) -> None:
    models = server.get("/models")
    assert models.status_code == 200 and 'id="versions"' in models.text
    datasets = server.get("/datasets").text
    row = re.search(rf"<td>{tiny_train_root.name}</td>\s*<td>(\d+)</td><td>(\d+)</td><td><code>(\w+)</code>", datasets)
    assert row and row.groups()[:2] == ("6", "24")
    assert "demo" in datasets


def test_an_out_of_date_mlflow_database_is_named_on_the_pages(tmp_path: Path, roots: list[Path]) -> None:
    """A database an older MLflow made: each page says how to upgrade it, beside what it can show without it."""
    made, home = tmp_path / "made.db", tmp_path / "home"
    prepare_tracking(f"sqlite:///{made}")  # under another name: MLflow checks a database once per URI and process
    home.mkdir()
    shutil.copy(made, home / "mlflow.db")
    with closing(sqlite3.connect(home / "mlflow.db")) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")
    uri = f"sqlite:///{home}/mlflow.db"
    base = ["data=folder", f"data.root={roots[0]}", f"mlflow.tracking_uri={uri}"]
    served = Server(home, roots)
    try:
        [job] = served.store.submit(make_jobs(base, name="old-schema"))
        [point, _] = served.store.submit(make_jobs([*base, "optim.lr=0.1,0.05"]))
        for path, shown in [
            ("/models", 'id="versions"'),
            (f"/jobs/{job.id}/metrics", "No MLflow run yet"),
            (f"/sweeps/{point.sweep_id}", point.id),
        ]:
            reply = served.get(path)
            assert reply.status_code == 200 and shown in reply.text, (path, reply.status_code)
            assert f"mlflow db upgrade {uri}" in unescape(reply.text), path
    finally:
        served.stop()


def test_models_page_lists_the_exports_of_each_version(server: Server, tiny_train_root: Path) -> None:
    uri = f"sqlite:///{server.home}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(prepare_tracking(uri), tags={SWEEP_TAG: "sweep-exported"}).info.run_id
    client.log_metric(run_id, "eval.accuracy", 0.8125)
    model = models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32).eval()
    RunTracker(uri, run_id).model(model, 56, step=1)
    client.set_terminated(run_id)
    _, version = select_and_register(uri, "sweep-exported")
    source = resolve_source(uri, "models:/faceforge@champion")
    out = server.home / "exports" / "int8"
    calibration = open_calibration_images(tiny_train_root)
    card = export_artifact(
        model, "onnx-int8", out, calibration=calibration, calibration_count=8, latency_runs=5, accuracy=source.accuracy
    )
    export_run = log_export(uri, source, out, card)
    checkpoint_run = log_export(uri, ExportSource("/checkpoints/step_00000003"), out, card)

    page = server.get("/models").text
    versioned = page[page.index('id="version-exports"') : page.index('id="other-exports"')]
    row = re.search(
        rf'<tr class="champion">\s*<td>faceforge</td>\s*<td>{version.version} \(champion\)</td>(.*?)</tr>',
        versioned,
        re.S,
    )
    assert row, versioned
    cells = row.group(1)
    assert "<td>onnx-int8</td>" in cells and checkpoint_run not in versioned
    assert f'href="/exports/{export_run}/model_int8.onnx"' in cells and f"{card.int8_bytes / 1024:.1f} KiB" in cells
    assert f"{card.fp32_latency_ms:.2f} ms" in cells and f"{card.int8_latency_ms:.2f} ms" in cells
    assert f"{card.largest_activation.bytes / 1024:.1f} KiB" in cells and "0.8125" in cells
    other = page[page.index('id="other-exports"') :]
    assert "/checkpoints/step_00000003" in other and f"/exports/{checkpoint_run}/model.onnx" in other

    download = server.get(f"/exports/{export_run}/model_int8.onnx")
    assert download.status_code == 200 and download.content == (out / "model_int8.onnx").read_bytes()
    assert "attachment" in download.headers["content-disposition"]
    for path in (f"{export_run}/..%2F..%2F..%2F..%2Fmlflow.db", f"{export_run}/..", f"{run_id}/MLmodel", "x/card.json"):
        assert server.get(f"/exports/{path}").status_code == 404, path


def test_datasets_page_shows_the_autolabeller_and_trains_on_its_versions(server: Server, tiny_train_root: Path) -> None:
    workdir = server.home / "autolabel"
    assert server.get("/healthz").text == "ok"  # the compose healthcheck, no token needed
    assert "No rounds yet" in server.get("/datasets").text
    state = StateDB(workdir / "state.db")
    state.register([("album0", "a.jpg"), ("album0", "b.jpg"), ("album1", "c.jpg")])
    current = state.start_round("sha256:model", "ckpt")
    state.record_batch([(file, "0" * 64, "labelled", None, []) for file in state.pending_files(current.number)])
    state.register([("album1", "late.jpg")])  # arrived after the round opened: pending
    faces = []
    for identity in sorted(tiny_train_root.iterdir())[:2]:
        for photo in sorted(identity.glob("*.jpg"))[:2]:
            face = f"{photo.stem}_0"
            (workdir / "crops").mkdir(exist_ok=True)
            shutil.copy(photo, workdir / "crops" / f"{face}.jpg")
            faces.append(FaceRecord(face, face, f"album0/{photo.name}", "album0", [], [], {}, 0, identity.name, 1))
    write_version(workdir / "versions", current.number, faces, workdir / "crops", [], {"round": 1})
    state.finish_round(current.number, "v0001", "pending:3")  # the job store could not take its retraining

    page = server.get("/datasets").text
    assert "Daemon <strong>not running</strong>" in page and "Last round 1 wrote <code>v0001</code>" in page
    assert re.search(r'id="autolabel-retraining" class="error">Retraining pending for\s+3 new identities', page)
    assert re.search(r'id="autolabel-pending">1<', page)
    assert re.search(r"<td><code>v0001</code></td><td>1</td><td>2</td><td>4</td>", page)
    images = (workdir / "versions" / "v0001" / "images").resolve()
    assert f"<code>{images}</code>" in page  # listed with the training sets
    reply = server.post("/jobs", data=job_form(images), headers=BEARER)
    assert reply.status_code == 303, reply.text
    (job,) = [j for j in server.store.list() if f"data.root={quoted_path(images)}" in j.overrides]
    assert job.state == QUEUED
    (workdir / "versions" / "v0009").mkdir()  # named like a version, no stats yet: a copy in progress
    page = server.get("/datasets")
    assert page.status_code == 200 and "v0009" not in page.text and "<code>v0001</code>" in page.text


def test_a_diverged_curve_plots_its_finite_part() -> None:
    inf_as_mlflow_stores_it = 1.7976931348623157e308
    chart = line_chart("loss", [(1, 2.0), (2, 1.0), (3, inf_as_mlflow_stores_it), (4, math.nan)])
    assert "nan" not in chart and "loss (2 not finite, the first at step 3)" in chart
    assert re.findall(r'text-anchor="end">([^<]*)</text>', chart)[:2] == ["2", "1"]  # the real values' range
    nothing = line_chart("loss", [(1, math.nan), (2, math.nan)])
    assert 'points=""' in nothing and "loss (2 not finite, the first at step 1)" in nothing


def test_datasets_are_described_afresh_and_only_inside_the_roots(tiny_train_root: Path, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(tiny_train_root, root / "faces")
    shutil.copytree(tiny_train_root, outside)
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    (faces,) = [d for d in list_datasets([root]) if d.name != DEMO]  # the link out is neither read nor offered
    before = describe(faces)
    person = next(p for p in (root / "faces").iterdir() if p.is_dir())
    shutil.copy(next(person.glob("*.jpg")), person / "added.jpg")  # the identity folder changes, not the root
    after = describe(faces)
    assert after["images"] == before["images"] + 1 and after["version"] != before["version"]
