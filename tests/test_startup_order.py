"""Start-up order (issue 14, item 6): serve and generate start their workers before the coordinator
imports torch, and hand each its spec once the engine has it (coordinator/processes.py: Prestarted)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models as tm
from krasis.coordinator.engine import Engine
from krasis.coordinator.processes import Prestarted, RuntimeOptions
from krasis.shared import protocol as P


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("m") / "qwen", "qwen3")


def _proc(pid: int) -> tuple[str, int]:
    """A process's name and its parent's pid."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return tm.comm(pid), int(stat.rsplit(")", 1)[1].split()[1])


def test_the_cli_imports_no_torch():
    code = "import sys, krasis.coordinator.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_prestarted_workers_take_their_specs(model):
    opts = RuntimeOptions(devices=["cpu", "cpu"], cpu_workers=2, dtype="float32")
    with Prestarted.for_run(str(model), opts) as pre:
        started = sorted(p.pid for ws in pre.waiting.values() for p, _ in ws)
        zygote = pre.zygote.pid
        assert len(started) == 4

        async def go():
            engine = Engine(model, opts, prestarted=pre)
            try:
                await engine.start()
                gen = P.Generate(id="a", prompt_ids=[1, 2, 3], sampling=P.SamplingParams(max_new_tokens=3))
                toks = [t for m in [m async for m in engine.generate(gen)] if isinstance(m, P.Tokens) for t in m.token_ids]
                return engine.workers, toks, {w["pid"]: _proc(w["pid"]) for w in engine.workers}
            finally:
                await engine.close()

        workers, toks, procs = asyncio.run(go())
        assert not any(pre.waiting.values())  # every one was taken
        # a group started again (as after a fault) has its workers forked then, by the same zygote,
        # and its pool finds the store the first group filled (the command's, kept by `pre`)
        again, toks_again, procs_again = asyncio.run(go())
        assert [w["store"] for w in workers + again if w["role"] == "cpu"] == ["filled"] * 2 + ["kept"] * 2
        assert _proc(zygote) == ("krasis-zygote", os.getpid())
    assert sorted(w["pid"] for w in workers) == started and not {w["pid"] for w in again} & set(started)
    for ws, ps in ((workers, procs), (again, procs_again)):
        # forked by the zygote, each named for its role and rank (the command line is the zygote's)
        assert {ps[w["pid"]] for w in ws} == {(f"krasis-{w['role']}{w['rank']}", zygote) for w in ws}
        assert all([m[0] for m in w["startup"][:3]] == ["exec", "preload", "spec"] for w in ws)
    want = tm.generate_json(model, [1, 2, 3], 3, "--devices", "cpu,cpu", "--cpu-workers", "2")["token_ids"]
    assert toks == toks_again == want
    tm.wait_gone(started + [w["pid"] for w in again] + [zygote])


def test_the_zygote_ends_quietly_when_the_coordinator_closes_its_end_first(capfd):
    """A command that fails early closes the zygote's socket while a request's reply is still to be
    sent (CI saw a traceback of that on stderr, where a clean error was the command's one line): the
    zygote's loop ends as when the socket closes between requests."""
    from krasis.coordinator.processes import _zygote_loop

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(b'{"reap": true}')
    ours.close()
    with theirs:
        _zygote_loop(theirs)  # returns: no BrokenPipeError
    assert capfd.readouterr().err == ""


def test_unused_prestarted_workers_are_killed(model):
    pre = Prestarted.for_run(str(model), RuntimeOptions(devices=["cpu"], cpu_workers=1))
    procs = [p for ws in pre.waiting.values() for p, _ in ws]
    pre.close()
    assert all(p.returncode is not None for p in procs)
