"""Jobs spanning hosts (``daemon.nodes``, ``realm daemon --join``): real daemons, each with its
own host name (``REALM_HOST``), sharing one realm as hosts share it over a network file system;
torchrun's c10d rendezvous among them on the loopback address, gloo ranks on CPU, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from core.training_queue import TrainingQueue
from daemon.lock import device_label
from tests.integration.test_daemon import env, realm_cmd, wait_for
from tests.integration.test_distributed import (events, only_job, ranks_of, realm,
                                                status_step, step_losses)
from tests.integration.test_fsdp import logits_of
from tests.trainer.test_training import ckpt_root

FSDP = {"parallelism": "fsdp", "precision": "fp32"}
HOST_DEVICES = os.environ.get("REALM_MULTINODE_DEVICES", "cpu/cpu").split("/")
"""Each "host"'s device set: the claiming daemon's, then the members'. ``0/1`` runs the 2-host
job on NCCL, one GPU per host (scripts/check_fsdp_nccl.sh, on a machine with two GPUs)."""
CLAIMER, MEMBER = HOST_DEVICES


def two_host_realm(base: Path, **training):
    paths = realm(base, micro_batch_size=2, epochs=3, **training)
    config = json.loads((paths.base / "config.json").read_text())
    config["daemon"]["address"] = "127.0.0.1"  # every "host" here is this machine
    (paths.base / "config.json").write_text(json.dumps(config))
    return paths


def daemon_status(paths, host: str) -> dict:
    try:
        return json.loads(next(paths.status.glob(f"daemon-{host}-*.json")).read_text())
    except (StopIteration, OSError, ValueError):
        return {}


def stop(*daemons: subprocess.Popen) -> list[str]:
    outs = []
    for d in daemons:
        if d.poll() is None:
            d.send_signal(signal.SIGTERM)
    for d in daemons:
        try:
            out, err = d.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            d.kill()
            out, err = d.communicate()
        outs.append(out + err)
    return outs


def start_on(host: str, base: Path, *args, extra_env=None) -> subprocess.Popen:
    """A daemon as host ``host`` would run it."""
    return subprocess.Popen([sys.executable, "-m", "cli", "--base-dir", str(base), "daemon",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(), "REALM_HOST": host, **(extra_env or {})})


def last_per_step(paths, job) -> list[float]:
    """The job's loss at each step, as its last attempt trained it (a retry trains some steps
    again; rank 0 appends to the job log wherever it runs)."""
    by_step = {}
    for e in events(paths.logs / "jobs" / f"{job.id}.log", "train.step"):
        by_step[e["step"]] = e["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow(seconds=60)
def test_a_job_on_two_hosts_matches_one_process_through_a_killed_and_a_leaving_node(tmp_path):
    """One job on two "hosts" (daemons with their own REALM_HOST, one realm): a member's rank is
    SIGKILLed (the group dies; the job is retried and the member joins the retry), then the
    member leaves with SIGTERM (a warm stop of the whole job: requeued with its resume point);
    the claiming daemon waits for a member, a third host joins, and the job ends with every
    step's loss equal to one process's within 1e-5 and a folder that gives the live sharded
    model's logits."""
    one = realm(tmp_path / "one", micro_batch_size=4, max_steps=20, epochs=3, precision="fp32")
    assert realm_cmd(one.base, "daemon", "--once", "--devices", CLAIMER).returncode == 0
    a = only_job(one)

    faulty = two_host_realm(tmp_path / "faulty", max_steps=20, **FSDP)
    live = tmp_path / "live-logits.pt"
    hooks = {"REALM_TEST_LOGITS": str(live)}
    member = start_on("beta", faulty.base, "--join", "--devices", MEMBER, extra_env=hooks)
    wait_for(lambda: daemon_status(faulty, "beta").get("state") == "idle", what="member")
    leader = start_on("alpha", faulty.base, "--nodes", "2", "--devices", CLAIMER,
                      extra_env=hooks)
    gamma = None
    try:
        wait_for(lambda: list(ckpt_root(faulty).glob("step-*/COMPLETE")), timeout=180,
                 what="a checkpoint")
        victim = wait_for(lambda: list(ranks_of(psutil.Process(member.pid)).values()),
                          what="the member's rank")
        victim[0].send_signal(signal.SIGKILL)
        wait_for(lambda: _history_has(faulty, "attempt"), timeout=120, what="a retry")
        wait_for(lambda: daemon_status(faulty, "beta").get("state") == "joined", what="rejoin")
        wait_for(lambda: status_step(faulty) >= 8, timeout=180, what="step 8 of the retry")
        member_out = stop(member)[0]
        assert "joining " in member_out and "as node 2 of 2" in member_out, member_out
        assert "left " in member_out, member_out
        waiting = wait_for(lambda: daemon_status(faulty, "alpha").get("state") == "waiting" and
                           daemon_status(faulty, "alpha"), what="the claimer waiting")
        assert "0 of 1 member daemon(s) idle" in waiting["reason"], waiting
        assert f"realm daemon --join --devices {CLAIMER}" in waiting["reason"]
        assert daemon_status(faulty, "alpha")["nodes"] == 2
        job = TrainingQueue(faulty.base).jobs_in("normal")[0]
        assert job.resume, "the warm stop left a resume point"
        gamma = start_on("gamma", faulty.base, "--join", "--devices", MEMBER, extra_env=hooks)
        wait_for(lambda: TrainingQueue(faulty.base).jobs_in("completed"), timeout=180,
                 what="the job to complete")
    finally:
        outs = stop(leader, member, *([gamma] if gamma else []))
    c = only_job(faulty)
    reasons = [h.get("reason", "") for h in c.history]
    assert any("retryable failure, attempt 1/3" in r for r in reasons), reasons
    assert any("stopped at a step boundary" in r for r in reasons), reasons
    ranks = c.metadata["data"]["ranks"]
    assert ranks["nodes"] == 2 and ranks["world"] == 2 and ranks["parallelism"] == "fsdp"
    assert sorted(ranks["hosts"]) == ["alpha", "gamma"], outs
    # every step as one process with the same global batch computes it, through both faults
    la, lc = step_losses(one, a), last_per_step(faulty, c)
    assert len(la) == len(lc) == 20
    assert max(abs(x - y) for x, y in zip(la, lc)) <= 1e-5, (la, lc)
    # each host's launcher has its own log; rank 0 wrote the job log wherever it ran
    logs = faulty.logs / "jobs"
    assert {p.name.split(".node-")[1] for p in logs.glob(f"{c.id}.node-*.log")} == \
        {f"alpha-{device_label(CLAIMER)}.log", f"beta-{device_label(MEMBER)}.log",
         f"gamma-{device_label(MEMBER)}.log"}
    assert not list((faulty.status / "jobs").glob("*.rdzv*")), "rendezvous withdrawn"
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    folder = logits_of(c.metadata["checkpoint"], ids)
    assert torch.allclose(folder, torch.load(live), atol=1e-5), "folder == live sharded model"
    assert torch.allclose(folder, logits_of(a.metadata["checkpoint"], ids), atol=1e-4)


def _history_has(paths, word: str) -> bool:
    jobs = [j for state in ("normal", "processing", "failed")
            for j in TrainingQueue(paths.base).jobs_in(state)]
    return any(word in (h.get("reason") or "") for j in jobs for h in j.history)


def fake_member(paths, host: str, **fields) -> Path:
    """An idle member's status file as a daemon on ``host`` writes it (no process behind it:
    from another host, only its heartbeat stamp says it lives)."""
    path = paths.status / f"daemon-{host}-cpu.json"
    path.write_text(json.dumps({"schema": 1, "state": "idle", "pid": 1, "host": host,
                                "started": 0.0, "devices": "cpu", "role": "member", "ranks": 1,
                                "kind": "cpu", "nodes": 1, "updated_at": "2026-12-04T00:00:00Z",
                                **fields}))
    return path


@pytest.mark.slow(seconds=12)
def test_without_members_nothing_is_claimed_and_a_rendezvous_that_never_fills_says_why(tmp_path):
    paths = two_host_realm(tmp_path / "r", max_steps=3)
    # no member at all: the claimer waits and says how to start one; --once leaves the job
    out = realm_cmd(paths.base, "daemon", "--once", "--nodes", "2", "--devices", "cpu")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "0 of 1 member daemon(s) idle for daemon.nodes 2" in out.stdout, out.stdout
    assert "realm daemon --join --devices cpu" in out.stdout
    assert (paths.state_dir("normal") / "job.jsonl").is_file()
    assert not any(TrainingQueue(paths.base).jobs_in(s) for s in ("processing", "failed")), \
        "never claimed"
    # members with another device set are not counted; one that looks idle but never comes
    # (a host that died after its last heartbeat): the claim's rendezvous times out, the job is
    # requeued with the reason, and once the member's stamp stops moving nothing is claimed
    fake_member(paths, "delta", ranks=2, devices="cpu:2")
    fake_member(paths, "ghost")
    config = json.loads((paths.base / "config.json").read_text())
    config["daemon"]["rendezvous_timeout"] = 2
    (paths.base / "config.json").write_text(json.dumps(config))
    out = realm_cmd(paths.base, "daemon", "--once", "--nodes", "2", "--devices", "cpu")
    assert out.returncode == 3, out.stdout + out.stderr
    job = TrainingQueue(paths.base).jobs_in("normal")[0]
    assert job.attempts >= 1
    assert "nodes never met: 0 of 1 member node(s) joined the rendezvous at 127.0.0.1:" in \
        job.last_error, job.last_error
    assert "realm daemon --join" in job.last_error
    assert f"logs/jobs/{job.id}.node-<host>-<devices>.log" in job.last_error
    assert "0 of 1 member daemon(s) idle" in out.stdout
    assert not list((paths.status / "jobs").glob("*.rdzv*")), "rendezvous withdrawn"


def test_the_command_line_the_plan_and_status_show_nodes(tmp_path):
    from cli.status import _daemon_line, _progress_line

    paths = two_host_realm(tmp_path / "r", max_steps=3)
    out = realm_cmd(paths.base, "daemon", "--plan", "--nodes", "2", "--devices", "cpu:2")
    assert out.returncode == 0, out.stderr
    assert "devices cpu:2 on each of 2 nodes, 4 process(es) per job" in out.stdout, out.stdout
    plan = json.loads(realm_cmd(paths.base, "daemon", "--plan", "--json", "--nodes", "2").stdout)
    assert plan["nodes"] == 2 and plan["ranks_per_job"] == 2
    assert plan["jobs"][0]["global_batch"] == 2 * 2 * 2, "micro batch x grad accum x world"
    for args, says in ((["--join", "--once"], "--join with --once"),
                       (["--join", "--nodes", "2"], "--join with --nodes"),
                       (["--nodes", "0"], "not a node count"),
                       (["--set", "daemon.nodes=0"], "daemon.nodes"),
                       (["--set", "daemon.address=a b;rm"], "daemon.address"),
                       # a member by config is a member: the flags' refusals hold (a member
                       # with --once never ends while jobs are queued)
                       (["--set", "daemon.join=true", "--once"], "daemon.join with --once"),
                       (["--set", "daemon.join=true", "--nodes", "2"],
                        "daemon.join with --nodes"),
                       # the endpoint would be host:29500:PORT, which no node can reach
                       (["--nodes", "2", "--set", "daemon.address=head:29500"],
                        "daemon.address: 'head:29500' is not a host name or an IP address")):
        out = realm_cmd(paths.base, "daemon", *args, timeout=30)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
    out = realm_cmd(paths.base, "daemon", "--plan", "--set", "daemon.address=10.0.0.1:80")
    assert "problem: " in out.stdout and "daemon.address: '10.0.0.1:80' is not" in out.stdout
    member = {"host": "beta", "pid": 7, "devices": "cpu", "state": "joined", "role": "member",
              "node": 1, "job_id": "j1", "updated_at": None}
    assert "member node 2 of job j1" in _daemon_line(member)
    assert "member (joins jobs spanning hosts)" in _daemon_line({**member, "state": "idle",
                                                                 "node": None, "job_id": None})
    assert "jobs span 2 nodes" in _daemon_line({"host": "a", "pid": 1, "devices": "cpu",
                                                "state": "idle", "nodes": 2})
    row = {"id": "j", "dataset": "d.jsonl", "priority": "normal", "started_at": None,
           "worker": {}, "progress": {"job_step": 3, "total_steps": 9, "eta_seconds": 4.0,
                                      "world_size": 4, "parallelism": "fsdp", "nodes": 2,
                                      "metrics": {"loss": 1.0, "tokens_per_sec": 10.0}}}
    assert "fsdp x4 on 2 nodes" in _progress_line(row)


def test_node_slots_are_exclusive_and_a_member_refuses_a_forged_rendezvous(tmp_path):
    from daemon.nodes import Rendezvous, withdraw

    paths = two_host_realm(tmp_path / "r", max_steps=3)
    job = TrainingQueue(paths.base, settle_seconds=0).claim_next({"host": "alpha", "pid": 1,
                                                                  "started": 0.0})
    assert job is not None
    sidecar = paths.relative(paths.base / job.dataset_path) + ".job.json"
    rdzv = Rendezvous.for_claim(job, sidecar, nodes=3, nproc=1, kind="cpu",
                                address="127.0.0.1", flags=["--max-steps=3"],
                                leader={"host": "alpha", "pid": 1}, timeout=5)
    rdzv.publish(paths.status)
    assert Rendezvous.published(paths.status) == [rdzv]
    assert rdzv.still_claimed(paths.base)
    assert [rdzv.take_slot(paths.status, {"host": h}) for h in "bcd"] == [1, 2, None]
    assert [m["host"] for m in rdzv.joined(paths.status)] == ["b", "c"]
    again = Rendezvous.for_claim(job, sidecar, nodes=2, nproc=1, kind="cpu",
                                 address="127.0.0.1", flags=[], leader={"host": "alpha",
                                                                        "pid": 2}, timeout=5)
    again.publish(paths.status)  # a new claim clears the old one's slots
    assert again.run_id != rdzv.run_id and again.joined(paths.status) == []
    six = Rendezvous.for_claim(job, sidecar, nodes=2, nproc=1, kind="cpu", address="fd00::1",
                               flags=[], leader={"host": "alpha", "pid": 3}, timeout=5)
    assert six.endpoint.startswith("[fd00::1]:"), "an IPv6 endpoint takes brackets"
    assert six.problem(paths) is None
    cmd = again.launcher(paths.base, hosts_store=False, address="10.0.0.2")
    assert cmd[cmd.index("--rdzv-conf") + 1].startswith("is_host=false,join_timeout=5")
    assert cmd[cmd.index("--local-addr") + 1] == "10.0.0.2"
    assert cmd[cmd.index("--job") + 1] == str(paths.base / sidecar)

    assert again.problem(paths) is None
    forged = [(dict(sidecar="../../etc/passwd"), "not in processing/"),
              (dict(sidecar="queue/normal/x.jsonl.job.json"), "not in processing/"),
              (dict(flags=["--base-dir=/elsewhere"]), "not training flags"),
              (dict(flags=["--set=a=1", "-x"]), "not training flags"),
              (dict(nodes=1), "node count"),
              (dict(endpoint="--rdzv-backend=static"), "malformed"),
              (dict(run_id="../x"), "malformed"),
              (dict(timeout=float("nan")), "timeout")]
    for change, says in forged:
        bad = Rendezvous(**{**vars(again), **change})
        assert says in (bad.problem(paths) or ""), change
    withdraw(paths.status, job.id)
    assert not list((paths.status / "jobs").glob("*.rdzv*"))


def _claimed(paths, nodes=2, **fields):
    """A job claimed by "alpha" and its published rendezvous."""
    from daemon.nodes import Rendezvous

    job = TrainingQueue(paths.base, settle_seconds=0).claim_next({"host": "alpha", "pid": 1,
                                                                  "started": 0.0})
    sidecar = paths.relative(paths.base / job.dataset_path) + ".job.json"
    rdzv = Rendezvous.for_claim(job, sidecar, nodes=nodes, nproc=1, kind="cpu",
                                address="127.0.0.1", flags=["--max-steps=3"],
                                leader={"host": "alpha", "pid": 1}, timeout=5)
    rdzv.publish(paths.status)
    return job, rdzv


def _within(seconds, step):
    """``step()`` in a thread: what it returned, or a failure when it hangs (a FIFO read)."""
    import threading

    box = []
    t = threading.Thread(target=lambda: box.append(step()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{step} hung"
    return box[0]


def test_damaged_rendezvous_files_never_hang_a_member_nor_hide_a_good_one(tmp_path):
    """Garbage, wrong types, a FIFO, a device, a file whose job id is not its own, in front of a
    good rendezvous: the member joins the good one, says once what is wrong with each other
    file, and a damaged file alone leaves it idle (no round fails, nothing hangs)."""
    from config.schema import DaemonConfig
    from daemon.training_daemon import Daemon

    paths = two_host_realm(tmp_path / "r", max_steps=3)
    job, rdzv = _claimed(paths)
    jobs = paths.status / "jobs"
    good = json.loads(rdzv.path(paths.status, job.id).read_text())
    (jobs / "a-str.rdzv.json").write_text('"hello"')
    (jobs / "b-deep.rdzv.json").write_text("[" * 20000 + "]" * 20000)
    (jobs / "c-leader.rdzv.json").write_text(json.dumps({**good, "job_id": "c-leader",
                                                          "leader": []}))
    (jobs / "d-flags.rdzv.json").write_text(json.dumps({**good, "job_id": "d-flags",
                                                         "flags": 5}))
    (jobs / "e-other.rdzv.json").write_text(json.dumps(good))  # another job's rendezvous
    os.mkfifo(jobs / "f-fifo.rdzv.json")
    os.symlink("/dev/zero", jobs / "g-zero.rdzv.json")
    said, served = [], []
    member = Daemon(paths, DaemonConfig(), join=True, say=said.append)
    member._serve_node = lambda r, node: served.append((r.job_id, node))
    assert _within(20, member._one_round) is True and not member._round_failed, said
    assert served == [(job.id, 1)], said
    for name, why in (("a-str", "not a JSON object"), ("b-deep", "nested"),
                      ("c-leader", "['leader'] of the wrong type"),
                      ("d-flags", "['flags'] of the wrong type"),
                      ("e-other", "is not the file's"), ("f-fifo", "FIFO"),
                      ("g-zero", "symlink")):
        assert any(f"{name}.rdzv.json" in s and why in s for s in said), (name, said)
    # alone, the damaged files leave the member idle, said once (not every round)
    rdzv.path(paths.status, job.id).unlink()
    (jobs / f"{job.id}.rdzv.node-1").unlink()
    said.clear()
    for _ in range(2):
        assert _within(20, member._one_round) is False and not member._round_failed
    assert len(said) == 0, "nothing new to say"
    assert daemon_status(paths, host_of(member)).get("state") == "idle"


def host_of(daemon) -> str:
    return daemon.worker["host"]


def test_a_claimer_records_past_damaged_slots_and_a_stale_member_takes_no_slot(tmp_path):
    """A slot file that is a FIFO or not an object does not hang or break the claimer's end of
    the job; a member that read a rendezvous just before the job was claimed again does not
    take a slot of the new claim (it would block the new claim's member)."""
    from daemon.nodes import MemberWatch

    paths = two_host_realm(tmp_path / "r", max_steps=3)
    job, rdzv = _claimed(paths, nodes=3)
    jobs = paths.status / "jobs"
    os.mkfifo(jobs / f"{job.id}.rdzv.node-1")
    (jobs / f"{job.id}.rdzv.node-2").write_text("[1, 2]")
    assert _within(10, lambda: rdzv.joined(paths.status)) == []
    os.mkfifo(paths.status / "daemon-fifo-cpu.json")
    fake_member(paths, "beta")
    watch = MemberWatch(60, lambda: 0.0)
    assert [m["host"] for m in _within(10, lambda: watch.idle(paths.status, 1, "cpu"))] == \
        ["beta"]
    # the claim ends and the job is claimed again: a member still holding the old rendezvous
    stale = rdzv
    again = type(rdzv).for_claim(job, stale.sidecar, nodes=2, nproc=1, kind="cpu",
                                 address="127.0.0.1", flags=[], timeout=5,
                                 leader={"host": "alpha", "pid": 2})
    again.publish(paths.status)
    assert stale.take_slot(paths.status, {"host": "late"}) is None
    assert again.take_slot(paths.status, {"host": "beta"}) == 1, "the new claim's slot is free"
    assert [m["host"] for m in again.joined(paths.status)] == ["beta"]


def test_queue_status_lists_members_past_damaged_daemon_status_files(tmp_path):
    """``realm queue status`` (text and --json) with a member joined and daemon status files
    that are damaged: not an object, a node or node count of the wrong type, a stamp that is
    not one, a FIFO. The good member is listed; nothing crashes or hangs."""
    paths = two_host_realm(tmp_path / "r", max_steps=3)
    fake_member(paths, "beta", state="joined", node=1, job_id="j1")
    (paths.status / "daemon-list-cpu.json").write_text("[1]")
    (paths.status / "daemon-node-cpu.json").write_text(json.dumps(
        {"host": "nodex", "state": "joined", "role": "member", "node": "x", "job_id": "j2"}))
    (paths.status / "daemon-nodes-cpu.json").write_text(json.dumps(
        {"host": "nodesx", "state": "idle", "nodes": "2", "updated_at": "yesterday"}))
    os.mkfifo(paths.status / "daemon-fifo-cpu.json")
    out = realm_cmd(paths.base, "queue", "status", timeout=30)
    assert out.returncode == 0, out.stderr
    assert "beta:1 [cpu] joined: member node 2 of job j1" in out.stdout, out.stdout
    assert "nodex:None" in out.stdout and "nodesx:None" in out.stdout, out.stdout
    out = realm_cmd(paths.base, "queue", "status", "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(d["host"] for d in json.loads(out.stdout)["daemons"]) == \
        ["beta", "nodesx", "nodex"]


def test_a_member_another_claim_waits_for_is_not_counted_free(tmp_path):
    """Two claiming daemons and one idle member: once one has claimed and waits for the member,
    the other claims nothing (before, both claimed; one waited out daemon.rendezvous_timeout
    and spent an attempt of its job), and says why; a member that took a slot is not free even
    while its status file still says idle."""
    from daemon.nodes import withdraw
    from daemon.training_daemon import Daemon
    from guild.selection import resolve_for

    paths = two_host_realm(tmp_path / "r", max_steps=3)
    job, rdzv = _claimed(paths)  # "alpha" claimed and waits for one member
    fake_member(paths, "beta", pid=7)
    said = []
    other = Daemon(paths, resolve_for(paths).config.daemon, nodes=2, say=said.append)
    assert not other.resources_ok()
    assert "0 of 1 member daemon(s) idle" in said[-1], said
    assert f"1 of the 1 idle are wanted by job(s) other daemons claimed and wait for " \
           f"members ({job.id})" in said[-1], said
    assert rdzv.take_slot(paths.status, {"host": "beta", "pid": 7}) == 1
    assert not other.resources_ok(), "beta took alpha's slot: not free for another claim"
    withdraw(paths.status, job.id)  # alpha's job ended: beta is free again
    assert other.resources_ok(), said


def test_doctor_checks_the_address_and_the_members_of_jobs_spanning_hosts(tmp_path):
    paths = two_host_realm(tmp_path / "r", max_steps=3)
    config = json.loads((paths.base / "config.json").read_text())
    config["daemon"]["nodes"] = 2  # address 127.0.0.1: only this machine reaches it
    (paths.base / "config.json").write_text(json.dumps(config))
    fake_member(paths, "delta", ranks=2, devices="cpu:2")  # another device set: not counted

    def rows():
        out = realm_cmd(paths.base, "doctor", "--json")
        return {r["name"]: r for r in json.loads(out.stdout)["checks"]}

    got = rows()
    assert got["nodes"]["status"] == "warn" and "loopback" in got["nodes"]["detail"]
    assert "daemon.address" in got["nodes"]["fix"]
    assert got["members"]["status"] == "warn"
    assert got["members"]["detail"].startswith("0 of 1 member daemon(s) idle")
    assert "realm daemon --join --devices cpu" in got["members"]["fix"]
    fake_member(paths, "ghost")
    got = rows()
    assert got["members"]["status"] == "ok" and "ghost" in got["members"]["detail"]
