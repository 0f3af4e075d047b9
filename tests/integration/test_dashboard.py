"""`realm serve` with real requests against a real server process, on a realm whose real daemon is
training: the JSON endpoints, the running job's progress advancing, a governor rollback visible
while it runs, the token rules, cancel and retry from the page, and the TensorBoard event files
the same jobs wrote (two jobs of one campaign on one step axis, a cancelled job's steps purged).

The daemon trains three jobs of one campaign: A (6 steps, completes), B (long; a NaN at global
step 9 makes the governor roll back; cancelled through the dashboard), C (low priority, 5 steps
from A's head, the same NaN at step 9)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from core.training_queue import TrainingQueue
from tests.integration.test_daemon import FAST_DAEMON, env, wait_for
from tests.trainer.test_training import make_realm
from trainer.data.synthetic import write_dataset

TOKEN = "test-token-0123456789abcdef"
NAN_STEP = 9
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy


def start_serve(base: Path, *args, token_file: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A real `realm serve` on a free port; (process, base URL) once it listens."""
    extra = ["--token-file", str(token_file)] if token_file else []
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(base), "serve",
                             "--port", "0", "--interval", "0.2", *extra, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    line = proc.stdout.readline()
    found = re.search(r"(http://\S+?)/ ", line)
    assert found, f"no URL in {line!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc, found[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def call(url: str, *, method: str = "GET", token: str | None = None, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with OPENER.open(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def get(url: str, **kw) -> dict:
    status, data = call(url, **kw)
    assert status == 200, (url, status, data)
    return data


def events(url: str, count: int) -> list[dict]:
    """The first ``count`` server-sent status events."""
    got = []
    with OPENER.open(url, timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                assert kind == "status"
                got.append(json.loads(line[6:]))
                if len(got) == count:
                    return got
    return got


@pytest.fixture
def training(tmp_path):
    """A realm, its daemon training A, B and C in turn, and a dashboard with a token."""
    tmp = tmp_path
    paths = make_realm(tmp / "r", {"training": {"micro_batch_size": 4, "warmup_steps": 2},
                                   "data": {"max_length": 128, "val_fraction": 0.1},
                                   "checkpoint": {"save_steps": 3, "keep_last": 10},
                                   "governor": {"snapshot_steps": 2}})
    (paths.base / "config.json").write_text(json.dumps(
        {**FAST_DAEMON, "logging": {"status_every_seconds": 0.1}}))
    queue = TrainingQueue(paths.base)
    jobs = {}
    for name, priority, sets in (("a", "normal", {"training.max_steps": 6}),
                                 ("b", "normal", {"training.max_steps": 5000,
                                                  "training.epochs": 500}),
                                 ("c", "low", {"training.max_steps": 5})):
        src = write_dataset(tmp / f"{name}.jsonl", 60, seed=ord(name))
        jobs[name] = queue.add(src, priority=priority, overrides=sets).id
    (tmp / "token").write_text(TOKEN + "\n")
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                               "daemon"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**env(), "REALM_TEST_NAN_AT": f"0:{NAN_STEP}"})
    serve, url = start_serve(paths.base, token_file=tmp / "token")
    try:
        yield paths, jobs, url
    finally:
        stop(serve)
        stop(daemon)


def running(url: str, job_id: str) -> dict | None:
    for row in get(f"{url}/api/status")["in_progress"]:
        if row["id"] == job_id and (row.get("progress") or {}).get("metrics"):
            return row["progress"]
    return None


@pytest.mark.slow(seconds=40)
def test_dashboard_follows_the_training_daemon_and_cancels_and_retries_with_the_token(training):
    paths, jobs, url = training
    # the running job's progress advances, and its rollback shows while it trains
    first = wait_for(lambda: running(url, jobs["b"]), what="job b training")
    later = wait_for(lambda: (p := running(url, jobs["b"])) and p["job_step"] > first["job_step"]
                     and p.get("rollbacks") and p, what="b advancing past its rollback")
    rollback = later["rollbacks"][0]
    assert (rollback["reason"], rollback["step"]) == ("nan", NAN_STEP)
    assert rollback["loss"] is None and 0 < rollback["new_lr"] < 1e-3, rollback
    steps = [s for s, _ in later["curve"]]
    assert steps == sorted(steps) and steps[-1] <= later["step"] and len(steps) >= 3
    assert NAN_STEP not in steps, "a NaN step is not a point of the curve"
    assert later["total_steps"] == 5000 and later["eta_seconds"] > 0
    assert later["metrics"]["tokens_per_sec"] > 0

    # the status endpoint is `queue status --json`, with what the daemon is doing
    status = get(f"{url}/api/status")
    assert status["schema"] == 1 and status["counts"]["completed"] == 1
    assert status["queued_by_priority"]["low"] == 1
    assert [d["state"] for d in status["daemons"]] == ["training"]
    listing = get(f"{url}/api/queue?state=all")
    assert [j["id"] for j in listing["jobs"]] == [jobs["c"], jobs["b"], jobs["a"]] or \
        {j["id"] for j in listing["jobs"]} == set(jobs.values())
    assert call(f"{url}/api/queue?state=bogus")[0] == 400

    # the event stream pushes the same status, fresh each time
    pushed = events(f"{url}/api/events", 2)
    assert [e["schema"] for e in pushed] == [1, 1]
    assert all(e["in_progress"][0]["id"] == jobs["b"] for e in pushed)

    # a finished job's page: its record, history, config provenance and log
    page = get(f"{url}/api/jobs/{jobs['a']}")
    assert page["job"]["status"] == "completed" and page["job"]["final_step"] == 6
    assert [h["to"] for h in page["job"]["history"]][-2:] == ["processing", "completed"]
    rows = {r["key"]: r for r in page["config"]["rows"]}
    assert page["config"]["recorded"] is True
    assert (rows["training.max_steps"]["value"], rows["training.max_steps"]["layer"]) == (6, "job")
    assert rows["training.micro_batch_size"]["layer"] == "campaign"
    assert rows["logging.report_to"]["value"] == "tensorboard"
    assert any("train.progress" in line for line in page["log_tail"])
    assert page["campaign"] == "tiny-qwen3/c1"
    assert call(f"{url}/api/jobs/no-such-job")[0] == 404
    queued = get(f"{url}/api/jobs/{jobs['c']}")
    assert queued["config"]["recorded"] is False and \
        {r["key"]: r["value"] for r in queued["config"]["rows"]}["training.max_steps"] == 5

    # campaigns and lineage
    listed = get(f"{url}/api/campaigns")
    assert [c["ref"] for c in listed["campaigns"]] == ["tiny-qwen3/c1"]
    assert listed["campaigns"][0]["active"] and listed["campaigns"][0]["head_step"] >= 6

    # the token rules for actions
    cancel = f"{url}/api/jobs/{jobs['b']}/cancel"
    assert call(cancel, method="POST")[0] == 401
    assert call(cancel, method="POST", token="wrong-token-0123456789")[0] == 401
    assert call(f"{cancel}?token={TOKEN}", method="POST")[0] == 401, "never from the URL"
    assert running(url, jobs["b"]), "refused requests changed nothing"
    status, said = call(cancel, method="POST", token=TOKEN, body={"reason": "from the test"})
    assert status == 200 and said["ok"] and "cancel requested" in said["message"], said
    wait_for(lambda: get(f"{url}/api/jobs/{jobs['b']}")["job"]["status"] == "cancelled",
             what="b cancelled")
    b = get(f"{url}/api/jobs/{jobs['b']}")["job"]
    assert "from the test" in b["history"][-1]["reason"]
    assert "dashboard (127.0.0.1)" in b["history"][-1]["reason"]

    # the daemon took the next job; C trains from A's head and rolls back at the same step
    c = wait_for(lambda: (j := get(f"{url}/api/jobs/{jobs['c']}")["job"])["status"] ==
                 "completed" and j, timeout=180, what="c completed")
    assert (c["start_step"], c["final_step"]) == (6, 11)
    assert [e["step"] for e in c["governor"]["events"]] == [NAN_STEP]

    lineage = get(f"{url}/api/campaigns/tiny-qwen3/c1")
    assert [j["id"] for j in lineage["jobs"]] == [jobs["a"], jobs["c"], jobs["b"]] or \
        [j["id"] for j in lineage["jobs"]][:2] == [jobs["a"], jobs["c"]]
    assert lineage["boundaries"] == [0, 6]
    assert lineage["curve"][0][0] > 0 and lineage["curve"][-1][0] == 11
    assert [r["step"] for r in lineage["rollbacks"] if r["job_id"] == jobs["c"]] == [NAN_STEP]
    assert [c["step"] for c in lineage["checkpoints"]][-1] == 11
    assert lineage["checkpoints"][-1]["job_id"] == jobs["c"]

    # retry needs the token too, and runs the CLI's checks
    retry = f"{url}/api/jobs/{jobs['b']}/retry"
    assert call(retry, method="POST")[0] == 401
    assert call(f"{url}/api/jobs/{jobs['a']}/retry", method="POST", token=TOKEN)[0] == 409, \
        "a completed job cannot be retried"
    status, said = call(retry, method="POST", token=TOKEN)
    assert status == 200 and said["ok"], said
    assert get(f"{url}/api/jobs/{jobs['b']}")["job"]["status"] in ("queued", "processing")

    check_tensorboard(paths, jobs)


def check_tensorboard(paths, jobs) -> None:
    """Event files read back with tensorboard's own reader: A's steps 1-6 and C's 7-11 on one
    axis from two files, B's cancelled steps purged, C's rollback and evaluation recorded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = paths.logs / "tensorboard" / "tiny-qwen3" / "c1"
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) >= 3, files  # a, b, c (and b's retry once it started)
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    c_steps = [s for s in range(7, 12) if s != NAN_STEP]
    assert set(range(1, 7)) | set(c_steps) <= set(loss), sorted(loss)
    assert not {s for s in loss if 11 < s}, "b's steps past A's head were purged by C"
    assert all(v == v for s, v in loss.items() if s != NAN_STEP)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/loss_ewma"):
        assert {e.step for e in acc.Scalars(tag)} >= set(range(1, 7)) | set(c_steps), tag
    assert [(e.step, e.value) for e in acc.Scalars("governor/rollbacks")] == [(NAN_STEP, 1.0)]
    after = acc.Scalars("governor/lr_after_rollback")[0].value
    assert 0 < after < acc.Scalars("train/lr")[0].value * 2
    evals = {e.step for e in acc.Scalars("eval/loss")}
    assert {6, 11} <= evals, evals


def test_the_dashboard_reads_and_never_writes(tmp_path):
    """Every GET endpoint, the event stream and the page on a quiet realm with finished, failed
    and queued jobs: not one byte, name or mtime of the realm changes."""
    paths = make_realm(tmp_path / "r")
    queue = TrainingQueue(paths.base)
    done = queue.add(write_dataset(tmp_path / "done.jsonl", 20, seed=1), priority="high")
    broken = queue.add(write_dataset(tmp_path / "broken.jsonl", 20, seed=3), priority="high")
    queue.add(write_dataset(tmp_path / "waiting.jsonl", 20, seed=2))
    queue.complete(queue.claim_next(), final_step=3, final_loss=1.5)
    queue.fail(queue.claim_next(), "boom: a failure reason")
    (paths.state_dir("low") / "dropped-in.jsonl").write_text('{"text": "not adopted yet"}\n')
    before = snapshot(paths.base)
    serve, url = start_serve(paths.base)
    try:
        for path in ("/api/status", "/api/queue", "/api/queue?state=all", "/api/campaigns",
                     "/api/campaigns/tiny-qwen3/c1", f"/api/jobs/{done.id}",
                     f"/api/jobs/{broken.id}", "/api/jobs/waiting", "/", "/static/app.js"):
            status, _ = call(url + path)
            assert status == 200, path
        for path, what in (("/api/jobs/nosuchjob", "no job matches"),
                           ("/api/campaigns/tiny-qwen3/nosuch", "no campaign"),
                           ("/api/campaigns/nohero/c1", "no campaign")):
            status, said = call(url + path)
            assert status == 404 and what in said["error"], (path, status, said)
        assert len(events(f"{url}/api/events", 2)) == 2
        assert call(f"{url}/api/jobs/{done.id}/cancel", method="POST")[0] == 403, \
            "no token: actions are off"
    finally:
        stop(serve)
    assert snapshot(paths.base) == before


def snapshot(base: Path) -> dict[str, tuple]:
    out = {}
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            out[str(path.relative_to(base))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_off_loopback_needs_a_token_and_every_request_but_the_pages_assets_carries_it(tmp_path):
    paths = make_realm(tmp_path / "r")
    refused = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(paths.base),
                              "serve", "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, env=env(), timeout=60)
    assert refused.returncode == 2 and "not loopback" in refused.stderr and \
        "--token-file" in refused.stderr, refused.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    weak = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(paths.base), "serve",
                           "--host", "0.0.0.0", "--port", "0", "--token-file", str(short)],
                          capture_output=True, text=True, env=env(), timeout=60)
    assert weak.returncode == 2 and "at least 16 characters" in weak.stderr, weak.stderr

    (tmp_path / "token").write_text(TOKEN)
    serve, url = start_serve(paths.base, "--host", "0.0.0.0", token_file=tmp_path / "token")
    url = url.replace("0.0.0.0", "127.0.0.1")
    try:
        assert call(f"{url}/api/status")[0] == 401
        assert call(f"{url}/api/status", token="not-the-token-at-all")[0] == 401
        assert get(f"{url}/api/status", token=TOKEN)["schema"] == 1
        assert get(f"{url}/api/status?token={TOKEN}")["schema"] == 1, "the browser's way"
        assert call(f"{url}/", headers={"Host": "realm.example.org"})[0] == 401
        # what a browser fetches for /?token=TOKEN: the page, then its script and styles
        # without the token (index.html names them as plain static/ URLs)
        status, page = call(f"{url}/?token={TOKEN}")
        assert status == 200
        for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page):
            assert call(f"{url}/{asset}")[0] == 200, asset
        assert "static/app.js" in page
    finally:
        stop(serve)


def test_serve_refuses_a_port_out_of_range_and_a_missing_token_file(tmp_path):
    paths = make_realm(tmp_path / "r")
    for args, said in ((["--port", "70000"], "--port 70000: give a port from 1 to 65535"),
                       (["--port", "-1"], "--port -1: give a port"),
                       (["--token-file", str(tmp_path / "nope")], "nope does not exist; write")):
        run = subprocess.run([sys.executable, "-m", "cli", "--base-dir", str(paths.base), "serve",
                              *args], capture_output=True, text=True, env=env(), timeout=60)
        assert run.returncode == 2 and said in run.stderr and "Traceback" not in run.stderr, \
            (args, run.stderr)


def test_loopback_refuses_other_host_names_and_keeps_actions_off_without_a_token(tmp_path):
    """A page elsewhere cannot reach a loopback dashboard through a DNS name that resolves to
    127.0.0.1 (DNS rebinding), and without a token nothing can be changed."""
    paths = make_realm(tmp_path / "r")
    job = TrainingQueue(paths.base).add(write_dataset(tmp_path / "x.jsonl", 10, seed=1))
    serve, url = start_serve(paths.base)
    try:
        assert get(f"{url}/api/status")["counts"]["queued"] == 1
        assert call(f"{url}/api/status", headers={"Host": "attacker.example"})[0] == 400
        status, said = call(f"{url}/api/jobs/{job.id}/cancel", method="POST", token=TOKEN)
        assert status == 403 and "without a token" in said["error"]
        assert TrainingQueue(paths.base).find(job.id).status.value == "queued"
    finally:
        stop(serve)
    # another loopback address answers by its own name (the browser's Host header)
    serve, url = start_serve(paths.base, "--host", "127.0.0.2")
    try:
        assert url.startswith("http://127.0.0.2:")
        assert get(f"{url}/api/status")["counts"]["queued"] == 1
        assert call(f"{url}/api/status", headers={"Host": "attacker.example"})[0] == 400
    finally:
        stop(serve)


def test_the_page_fetches_nothing_from_the_internet():
    static = Path(__file__).resolve().parents[2] / "cli" / "dashboard" / "static"
    files = sorted(static.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css"}
    for f in files:
        text = f.read_text()
        assert not re.search(r"""(src|href|url\(|import|fetch\()\s*=?\s*["']?(https?:)?//""",
                             text), f"{f.name} loads something from outside the server"


def test_a_failed_jobs_rollbacks_and_campaign_show_in_the_lineage_and_the_status(tmp_path):
    """A job the governor failed never reached a final step: it draws no curve, but its
    rollbacks are on the campaign's chart and its campaign (known only from the config it
    resolved) is named in the status' recent failures."""
    from cli.dashboard.views import campaign_view
    from cli.status import build_status

    paths = make_realm(tmp_path / "r")
    queue = TrainingQueue(paths.base)
    queue.add(write_dataset(tmp_path / "bad.jsonl", 10, seed=1))
    events = [{"reason": "spike", "step": s, "loss": 9.0, "threshold": 6.0, "consecutive": 2,
               "snapshot_step": s - 2, "batches_skipped": 2, "new_lr": 5e-4,
               "rollback_number": i + 1} for i, s in enumerate((4, 7, 9))]
    failed = queue.fail(queue.claim_next(), "governor gave up after 3 rollbacks", results={
        "governor": {"rollbacks": 3, "events": events},
        "resolved_config": {"campaign": "tiny-qwen3/c1", "explain": []}})
    lineage = campaign_view(paths, queue, "tiny-qwen3", "c1")
    assert [j["id"] for j in lineage["jobs"]] == [failed.id]
    assert lineage["jobs"][0]["rollbacks"] == 3 and lineage["curve"] == []
    assert [(r["job_id"], r["step"]) for r in lineage["rollbacks"]] == \
        [(failed.id, 4), (failed.id, 7), (failed.id, 9)]
    assert build_status(queue)["recent_failed"][0]["campaign"] == "tiny-qwen3/c1"
