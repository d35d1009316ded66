"""A pipeline across hosts, as several host agents on one machine (docs/deployment.md), with CURVE
keys, against transformers. Each agent is its own process tree, and where this machine lets the tests
build network namespaces (root, iproute2, tcp passing between them: tried at collection) each runs in
one of its own, so that nothing can pass between hosts through a shared loopback or the abstract ipc
sockets; elsewhere the agents listen on 127.0.0.1. The tests are the same in both modes, and their ids
say which ran ([netns] or [loopback])."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import tiny_models as tm
from krasis.coordinator.hosts import free_agent_port
from krasis.shared import protocol as P
from krasis.shared.client import Client
from krasis.shared.keys import KeysError, add_client, keygen, require_keys

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30)


class Loopback:
    """Every agent on 127.0.0.1, in this process's network namespace."""

    def place(self) -> tuple[str, list[str]]:
        """An address for a new agent, and the prefix of the command that runs it where that address is."""
        return "127.0.0.1", []

    def close(self) -> None:
        pass


class Namespaces:
    """Each agent in a network namespace of its own, with `lo` up, its address .N of a private /24 and a
    veth to a bridge here that has .1: the coordinator and the tests' clients reach the agents through
    the bridge, and the agents reach each other over it (one L2 segment, so no forwarding). Names carry
    this process's id, so concurrent runs do not meet; close() removes what was made, in reverse."""

    def __init__(self):
        self.tag = f"kt{os.getpid()}"  # interface names are at most 15 characters
        self.undo: list[tuple[str, ...]] = []
        self.placed = 0
        try:
            self.subnet = free_subnet()
            self._make(("link", "add", self.tag, "type", "bridge"), ("link", "del", self.tag))
            ip("addr", "add", f"{self.subnet[1]}/{self.subnet.prefixlen}", "dev", self.tag)
            ip("link", "set", self.tag, "up")
        except BaseException:
            self.close()
            raise

    def _make(self, do: tuple[str, ...], undo: tuple[str, ...]) -> None:
        ip(*do)
        self.undo.append(undo)

    def place(self) -> tuple[str, list[str]]:
        self.placed += 1
        n = self.placed + 1  # .1 is the bridge's
        ns, veth, addr = f"krasis-test-{os.getpid()}-{n}", f"{self.tag}v{n}", str(self.subnet[n])
        self._make(("netns", "add", ns), ("netns", "del", ns))
        # deleting our end deletes the pair at once; a namespace's own devices go asynchronously
        self._make(("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns), ("link", "del", veth))
        ip("link", "set", veth, "master", self.tag, "up")
        ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return addr, ["ip", "netns", "exec", ns]

    def close(self) -> None:
        while self.undo:
            subprocess.run(["ip", *self.undo.pop()], capture_output=True, timeout=30)


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.X.0/24 that no route of this namespace overlaps, another run's bridge included."""
    taken = [ipaddress.ip_network(r["dst"]) for r in json.loads(ip("-j", "-4", "route", "show", "table", "all").stdout)
             if r["dst"] != "default"]
    for k in range(256):
        net = ipaddress.ip_network(f"10.231.{(os.getpid() + k) % 256}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise OSError("every 10.231.X.0/24 is routed here")


LISTEN = "import socket, sys; s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)\n" \
         "for _ in range(2): s.accept()"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)"


def network_mode() -> str:
    """"netns" if Namespaces can be built here and tcp reaches one namespace from another and from
    here (a bridge firewall could drop what crosses it), else "loopback"."""
    try:
        net = Namespaces()
    except (OSError, subprocess.SubprocessError):
        return "loopback"
    listener = None
    try:
        (a, in_a), (_, in_b) = net.place(), net.place()
        listener = subprocess.Popen([*in_a, sys.executable, "-c", LISTEN, a], stdout=subprocess.PIPE, text=True)
        port = listener.stdout.readline().strip()
        subprocess.run([*in_b, sys.executable, "-c", CONNECT, a, port], check=True, capture_output=True, timeout=30)
        socket.create_connection((a, int(port)), timeout=5).close()
        listener.wait(5)
        return "netns" if listener.returncode == 0 else "loopback"
    except (OSError, ValueError, subprocess.SubprocessError):
        return "loopback"
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        net.close()


class Agent:
    """`krasis-coord host` in a subprocess, at an address of its own from `net`; `start()` again brings
    it back on the same address and port (and in the same namespace), as systemd would."""

    def __init__(self, net: Loopback | Namespaces, devices: str, keys):
        host, self.prefix = net.place()
        # free here, and every port is free in a new namespace
        self.endpoint = f"tcp://{host}:{free_agent_port()}"
        # without keys, only --insecure lets an agent listen beyond loopback (a namespace's address)
        self.args = ["host", "--listen", self.endpoint, "--devices", devices, "--cpu-workers", "1",
                     *(["--keys", str(keys)] if keys else ["--insecure"])]
        self.proc = None

    def start(self) -> "Agent":
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "krasis.coordinator", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any("listening" in line for line in self.log):
            assert self.proc.poll() is None, f"agent exited: {''.join(self.log)}"
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.1)
        return self

    def zygote(self) -> list[int]:
        """The agent's zygote (coordinator/processes.py: Zygote), its one child of its own."""
        return [p for p in children(self.proc.pid) if tm.comm(p) == "krasis-zygote"]

    def workers(self) -> list[int]:
        """The workers it started: its zygote's children (and any it started itself) that took a spec,
        named for their role and rank (those forked ahead, still waiting for one, are krasis-cpu and
        krasis-gpu: shared/lifecycle.py)."""
        zygote = self.zygote()
        kids = [p for z in zygote for p in children(z)] + [p for p in children(self.proc.pid) if p not in zygote]
        return [p for p in kids if re.fullmatch(r"krasis-(cpu|gpu)\d+", tm.comm(p) or "")]

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = [p for z in self.zygote() for p in [z, *children(z)]] + self.workers() if self.proc.poll() is None else []
        tm.terminate(self.proc, "agent")
        tm.wait_gone(kids)


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def memfds(pid: int) -> set[int]:
    """Inodes of the memfd files (expert store segments, mailboxes) a process holds."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                out.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"qwen3": tm.build(root / "qwen3", "qwen3"), "deepseek": tm.build(root / "deepseek", "deepseek")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys") / "k"
    tm.krasis("keygen", d)
    add_client(d, "alice")
    return d


@pytest.fixture(scope="module", params=[network_mode()])
def net(request):
    n = Namespaces() if request.param == "netns" else Loopback()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def agents(net, keys):
    """Two agents: one stage on the first, two on the second."""
    a, b = Agent(net, "cpu", keys), Agent(net, "cpu,cpu", keys)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


def hosts_arg(agents) -> str:
    return ",".join(a.endpoint for a in agents)


@pytest.mark.parametrize("family", ["qwen3", "deepseek"])
def test_generate_over_three_stages_on_two_hosts_matches_transformers(models, keys, agents, family):
    want = tm.reference_greedy(tm.reference_model(models[family]), PROMPT, 16)
    out = tm.generate_json(models[family], PROMPT, 16, "--hosts", hosts_arg(agents), "--keys", keys)
    assert out["token_ids"] == want


def test_serve_over_hosts_then_an_agent_killed_and_restarted(models, keys, agents, tmp_path):
    """serve --hosts on a CURVE tcp endpoint: exact prompt logits and tokens; every worker is its own
    agent's (forked by the agent's zygote), each pool holds only its stages' layers, no memfd is
    shared between the agents' trees (nor held by the coordinator); health names each host; a client
    without an authorized key gets no answer. Then kill -9 of an agent while a request runs: its workers die with it, the
    coordinator notices within 3 heartbeats, the other host's workers are replaced, and once the agent
    is back (as systemd would bring it) the request completes as if nothing happened (replayed) or
    fails naming the host, and new requests are exact again; the surviving agent's zygote forked its
    new workers, which found its store filled."""
    path = models["qwen3"]
    ref = tm.reference_model(path)
    want = tm.reference_greedy(ref, PROMPT, 16)
    a, b = agents
    endpoint = f"tcp://127.0.0.1:{free_agent_port()}"
    with tm.Service(path, "--dtype", "float32", "--hosts", hosts_arg(agents), "--keys", keys, "--heartbeat-s", "1",
                    "--max-restarts", "3", endpoint=endpoint, keys=keys / "clients" / "alice") as svc:
        got = svc.client.complete(prompt_ids=PROMPT, max_new_tokens=16, prompt_logits=True, ignore_eos=True)
        assert got.token_ids == want
        ref_logits = tm.reference_logits(ref, PROMPT)
        assert float((torch.from_numpy(got.prompt_logits) - ref_logits).norm() / ref_logits.norm()) < 1e-4

        health = svc.client.health()
        assert [h["endpoint"] for h in health.hosts] == [a.endpoint, b.endpoint]
        assert all(h["state"] == "ok" and h["host"] == socket.gethostname() for h in health.hosts)
        by_host = [[w for w in health.workers if w["host"].endswith(x.endpoint)] for x in agents]
        assert [sorted(w["rank"] for w in ws if w["role"] == "gpu") for ws in by_host] == [[0], [1, 2]]
        assert [w["layers"] for w in sorted(health.workers, key=lambda w: w["rank"]) if w["role"] == "gpu"] == \
            [[0, 1], [1, 2], [2, 3]]
        # three MoE layers of equal size: a pool holding every layer would be 3 units on each host
        pool_bytes = [sum(w["bytes"] for w in ws if w["role"] == "cpu") for ws in by_host]
        assert pool_bytes[1] == 2 * pool_bytes[0] > 0
        trees = []
        for x, ws in zip(agents, by_host):
            pids = {w["pid"] for w in ws}
            assert pids == set(x.workers()), "every worker of a host is its agent's (forked by the agent's zygote)"
            trees.append(set().union(*(memfds(p) for p in pids)))
        assert trees[0] and trees[1] and not trees[0] & trees[1]
        assert not memfds(svc.proc.pid) and not children(svc.proc.pid)

        other = tmp_path / "other"
        keygen(other)
        for wrong in (other, None):  # keys the service never authorized, and none at all
            with Client(endpoint, timeout_s=2, keys=wrong) as c:
                with pytest.raises(TimeoutError):
                    c.health()

        first, streamed, result = set(a.workers()), [], {}

        def long_request():
            with Client(endpoint, timeout_s=300, keys=keys) as c:
                try:
                    for ev in c.stream(prompt_ids=PROMPT, max_new_tokens=200, ignore_eos=True):
                        if isinstance(ev, P.Tokens):
                            streamed.extend(ev.token_ids)
                        elif isinstance(ev, P.Done):
                            result["done"] = ev
                        elif isinstance(ev, P.Error):
                            result["error"] = ev.message
                except Exception as e:  # noqa: BLE001 - the request may fail; how is what is checked
                    result["error"] = e

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 120
        while len(streamed) < 5:  # mid-generation
            assert t.is_alive() and time.monotonic() < deadline, result
            time.sleep(0.05)
        victims = b.workers() + b.zygote()
        t_kill = time.monotonic()
        b.proc.kill()
        tm.wait_gone(victims)
        lost = None
        while lost is None and time.monotonic() - t_kill < 10:
            h = svc.client.health()
            lost = next((x for x in h.hosts if x["state"] == "lost"), None) if h.status != "ok" else None
            time.sleep(0.1)
        assert lost is not None and lost["endpoint"] == b.endpoint
        b.start()  # systemd's Restart=
        t.join(300)  # the whole pipeline loads again (minutes on a busy 2-core CI box)
        assert not t.is_alive()
        if "error" in result:  # failed clearly, naming the lost host
            assert b.endpoint in str(result["error"]), result["error"]
        else:  # replayed on the new pipeline: every token once, as an undisturbed run's
            assert result["done"].completion_tokens == 200
            assert streamed == tm.reference_greedy(ref, PROMPT, 200)
        deadline = time.monotonic() + 180
        while svc.client.health().status != "ok":
            assert time.monotonic() < deadline, "the coordinator did not reattach"
            time.sleep(0.2)
        assert not first & set(a.workers()), "the surviving host's workers were replaced"
        assert a.workers() and set(a.workers()) <= set(children(a.zygote()[0])), "forked by its zygote, imports done"
        # the surviving agent kept its stages' store filled across the restart; the restarted one filled its own
        pools = {x.endpoint: w["store"] for x in agents for w in svc.client.stats().stats["workers"]
                 if w["role"] == "cpu" and w["host"].endswith(x.endpoint)}
        assert pools == {a.endpoint: "kept", b.endpoint: "filled"}
        assert svc.client.complete(prompt_ids=PROMPT, max_new_tokens=16, ignore_eos=True).token_ids == want


def test_unauthorized_agent_is_refused(models, keys, net, tmp_path):
    """An agent with keys of its own never hears the coordinator, which gives up at its deadline."""
    other = tmp_path / "other"
    keygen(other)
    rogue = Agent(net, "cpu", other)
    try:
        rogue.start()
        t0 = time.monotonic()
        p = tm.krasis("generate", models["qwen3"], "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                      "--hosts", rogue.endpoint, "--keys", keys, "--heartbeat-s", "0.1", check=False)
        assert p.returncode != 0 and "did not answer within 2 s" in p.stderr
        assert time.monotonic() - t0 < 60
        assert not any("attached" in line for line in rogue.log)
    finally:
        rogue.stop()


def test_agent_that_cannot_start_its_stages_fails_the_run_clearly(models, net, tmp_path):
    """An agent whose model folder is missing reports the fault; the coordinator stops with an error
    naming the host and the cause rather than waiting."""
    bad = Agent(net, "cpu", None)
    bad.args += ["--model-path", str(tmp_path / "missing")]
    try:
        bad.start()
        p = tm.krasis("generate", models["qwen3"], "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                      "--hosts", bad.endpoint, "--insecure", check=False)
        assert p.returncode != 0 and bad.endpoint in p.stderr and "missing" in p.stderr, p.stderr[-2000:]
        assert not bad.workers(), "the agent stopped what it had started"
    finally:
        bad.stop()


def test_refuses_exposed_tcp_without_keys(models):
    p = tm.krasis("serve", models["qwen3"], "--zmq", "tcp://0.0.0.0:5999", check=False)
    assert p.returncode != 0 and "--keys" in p.stderr and "--insecure" in p.stderr
    p = tm.krasis("host", "--listen", "tcp://0.0.0.0:5999", check=False)
    assert p.returncode != 0 and "--keys" in p.stderr
    # what --hosts goes through (coordinator/cli.py host_options)
    with pytest.raises(KeysError, match="--keys"):
        require_keys(["tcp://127.0.0.1:7000", "tcp://10.1.2.3:7000"], None, False)
    require_keys(["tcp://127.0.0.1:7000", "tcp://localhost:7000", "ipc://@x", "tcp://[::1]:7000"], None, False)
    require_keys(["tcp://10.1.2.3:7000"], "keys", False)
    require_keys(["tcp://10.1.2.3:7000"], None, True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    """deploy/'s units load cleanly: systemd-analyze verify reports nothing (an unknown key, a bad
    value, a missing ExecStart binary all print a line)."""
    from pathlib import Path

    deploy = Path(__file__).parent.parent / "deploy"
    for unit in ("krasis.service", "krasis-host.service"):
        p = subprocess.run(["systemd-analyze", "verify", str(deploy / unit)], capture_output=True, text=True)
        assert p.returncode == 0 and not p.stderr.strip(), f"{unit}:\n{p.stderr}"
