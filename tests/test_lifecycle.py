"""No orphans: whatever way the coordinator ends, every process it started ends too, and no
shared-memory segment is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models as tm
from krasis.shared.client import Client


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("m") / "dsv2", "deepseek")


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def workers_of(model: Path) -> list[int]:
    """Worker processes (anywhere in the system) started for this model folder."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = b" ".join((d / "cmdline").read_bytes().split(b"\0"))
            name = (d / "comm").read_bytes()
        except OSError:
            continue
        # a forked worker is named for its role, and the zygote that forks them for what it is (the
        # zygote's command line names the model); a worker started afresh says its module on its command line
        ours = name.startswith((b"krasis-gpu", b"krasis-cpu", b"krasis-zygote")) \
            or b"krasis.gpu_worker" in text or b"krasis.cpu_worker" in text
        if ours and str(model).encode() in text:
            if tm.alive(int(d.name)):
                pids.append(int(d.name))
    return pids


def start(model: Path, *extra: str):
    endpoint = f"ipc://@krasis-life-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "krasis.coordinator", "serve", str(model), "--zmq", endpoint, "--devices", "cpu,cpu",
         "--cpu-workers", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    c = Client(endpoint, timeout_s=120)
    h = c.health()  # blocks until start-up is done
    assert h.status == "ok" and len(h.workers) == 4
    return proc, c, [w["pid"] for w in h.workers]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything(model, sig):
    before = shm_entries()
    proc, c, pids = start(model)
    assert c.complete(prompt_ids=[1, 2, 3], max_new_tokens=3).done is not None
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    c.close()
    tm.wait_gone(pids)
    assert shm_entries() <= before


def test_sigkill_of_coordinator_takes_workers_down(model):
    proc, c, pids = start(model)
    proc.kill()
    proc.wait(10)
    c.close()
    tm.wait_gone(pids)
    assert workers_of(model) == []


def test_worker_crash_without_restarts_stops_the_service(model):
    proc, c, pids = start(model, "--max-restarts", "0")  # restarts: tests/test_recovery.py
    os.kill(pids[-1], signal.SIGKILL)  # a GPU worker
    rc = proc.wait(30)
    err = proc.stderr.read()
    c.close()
    assert rc != 0
    assert "exited with code -9 (killed by SIGKILL)" in err and str(pids[-1]) in err
    tm.wait_gone(pids)
    assert workers_of(model) == []


def test_generate_leaves_nothing_behind(model):
    out = tm.generate_json(model, [1, 2, 3], 4, "--devices", "cpu,cpu", "--cpu-workers", "2")
    assert len(out["token_ids"]) == 4
    assert workers_of(model) == []
