"""Fault recovery: a worker that dies costs the requests it was running, not the service."""

from __future__ import annotations

import os
import signal

import pytest

import tiny_models as tm
from krasis.shared import protocol as P
from test_lifecycle import workers_of


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("m") / "dsv2", "deepseek")


def test_pool_crash_restarts_the_workers(model):
    with tm.Service(model, "--devices", "cpu", "--cpu-workers", "2", "--dtype", "float32",
                    "--max-context", "512") as svc:
        c = svc.client
        before = c.complete(prompt_ids=[1, 2, 3], max_new_tokens=8).token_ids
        victim = next(w["pid"] for w in c.health().workers if w["role"] == "cpu")
        events = c.stream(prompt_ids=[4, 5, 6], max_new_tokens=500, ignore_eos=True)
        assert isinstance(next(events), P.Tokens)  # it is decoding
        os.kill(victim, signal.SIGKILL)
        last = list(events)[-1]
        assert isinstance(last, P.Error), last
        assert "cpu_worker" in last.message and str(victim) in last.message and "SIGKILL" in last.message

        assert c.health().status == "restarting"  # the new group takes seconds to load
        # Sent while the workers restart: queued, then served by the new group.
        assert c.complete(prompt_ids=[1, 2, 3], max_new_tokens=8).token_ids == before
        h = c.health()
        assert h.status == "ok"
        new_pids = [w["pid"] for w in h.workers]
        assert len(new_pids) == 3 and not set(new_pids) & set(svc.worker_pids)
        tm.wait_gone(svc.worker_pids)  # the whole old group, not just the killed process
        assert c.stats().stats["restarts"] == 1
    assert "restart 1 of 3" in svc.stderr and str(victim) in svc.stderr
    tm.wait_gone(new_pids)
    assert workers_of(model) == []
