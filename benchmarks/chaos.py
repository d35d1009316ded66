"""Chaos: load on a `krasis-coord serve` while a random worker is killed (SIGKILL) every N seconds.

    python benchmarks/chaos.py MODEL --minutes 2 --kill-every 20 --clients 8 -- --devices cpu,cpu --dtype float32

A fixed list of requests (greedy, and seeded at temperature 0.8) first runs once without faults: the
reference tokens and the undisturbed time to first token. Then the same list runs round and round
for --minutes without faults (the control), and as long again while the killer works: a kill
--kill-every seconds after the service was last healthy. Every request that completes is compared
token by token with its reference. Printed: requests completed, replayed (the service's count) and
failed (target 0), tokens that differ from the reference without and with faults, p50/p99 time to
first token, kills, restarts, and each restart as a client sees it: from the kill until health says
"ok" again.

Tokens that differ: on a CPU in float32 a request's tokens do not depend on what else is batched
with it (target 0 in both storms, with --gpu-bits equal to --cpu-bits: a replay prefills the tokens
so far with the GPU workers' experts, other numbers than the pool's with other bits). On a GPU its bf16 products take kernels chosen by the batch's
size, whose sums round differently, so once a near-tie between two tokens falls the other way the
rest differ; a random model's logits are full of near-ties (session 34: 32-48% of the tokens
differed in storms without faults on H100 hosts). There, the control says what the batching alone
does, and a replay (its prompt and tokens so far prefilled again) adds the prefill's rounding to it.
Arguments after `--` go to `serve` (--max-restarts is raised so that the killer cannot exhaust it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import click

from krasis.shared import protocol as P
from krasis.shared.client import AsyncClient


def requests(n: int, new_tokens: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        kw = dict(prompt_ids=[r.randrange(1, 150) for _ in range(r.randint(1, 24))], max_new_tokens=new_tokens,
                  ignore_eos=True)
        if i % 4 == 3:
            kw.update(temperature=0.8, seed=i)
        out.append(kw)
    return out


async def one(c: AsyncClient, kw: dict) -> tuple[list[int], float | None, str | None]:
    """(tokens, time to first token, error message or None)."""
    t0, ttft, ids = time.perf_counter(), None, []
    async for ev in c.stream(**kw):
        if isinstance(ev, P.Tokens):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids += ev.token_ids
        elif isinstance(ev, P.Error):
            return ids, ttft, ev.message
    return ids, ttft, None


async def load(endpoint: str, reqs: list[dict], clients: int, until: float | None):
    """Run reqs with `clients` at a time: once through (until None) or round and round until `until`."""
    results, nxt = [], itertools.count()
    async with AsyncClient(endpoint) as c:

        async def worker():
            while True:
                i = next(nxt)
                if (until is None and i >= len(reqs)) or (until is not None and time.monotonic() >= until):
                    return
                results.append((i % len(reqs), *await one(c, reqs[i % len(reqs)])))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


async def killer(endpoint: str, every: float, until: float, rng: random.Random) -> list[float | None]:
    """Kill a random worker `every` seconds after the service was last healthy, until `until`; per
    kill, the seconds from it until health said "ok" again (None: the service never said otherwise)."""
    outages = []
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        h = await ask(endpoint, P.Health())
        if h.status != "ok":
            continue
        w = rng.choice(h.workers)
        t0 = time.monotonic()
        os.kill(w["pid"], signal.SIGKILL)
        print(f"chaos: killed {w['role']} worker {w['rank']} (pid {w['pid']})", file=sys.stderr, flush=True)
        outages.append(await outage(endpoint, t0))
    return outages


async def outage(endpoint: str, t0: float, notice_s: float = 10.0, poll_s: float = 0.05) -> float | None:
    """Seconds from t0 (a kill) until health is "ok" after having been anything else; None when it
    stayed "ok" for notice_s (the coordinator notices a death within its 0.25 s poll)."""
    down = False
    while True:
        try:
            status = (await ask(endpoint, P.Health(), 2.0)).status
        except asyncio.TimeoutError:
            status = "no answer"
        if status != "ok":
            down = True
        elif down:
            return time.monotonic() - t0
        elif time.monotonic() - t0 > notice_s:
            return None
        await asyncio.sleep(poll_s)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("model", type=click.Path(exists=True))
@click.option("--minutes", type=float, default=2.0, show_default=True,
              help="How long each storm (without faults, then with) goes on.")
@click.option("--kill-every", type=float, default=20.0, show_default=True,
              help="Seconds from the service being healthy to the next kill.")
@click.option("--clients", type=int, default=8, show_default=True, help="Requests in flight at once.")
@click.option("--requests", "n_requests", type=int, default=32, show_default=True, help="Distinct requests in the list.")
@click.option("--new-tokens", type=int, default=48, show_default=True, help="Tokens generated per request.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def main(model, minutes, kill_every, clients, n_requests, new_tokens, seed, serve_args):
    endpoint = f"ipc://@krasis-chaos-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-m", "krasis.coordinator", "serve", model, "--zmq", endpoint,
                             *serve_args, "--max-restarts", "100000"])
    try:
        asyncio.run(run(endpoint, proc, minutes, kill_every, clients, requests(n_requests, new_tokens, seed), seed))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def ask(endpoint: str, msg: P.Message, timeout_s: float = 30.0) -> P.Message:
    """One single-reply request on a socket of its own, so a reply that comes late reaches no one."""
    async with AsyncClient(endpoint) as c:
        return await asyncio.wait_for(c.request(msg), timeout_s)


async def run(endpoint, proc, minutes, kill_every, clients, reqs, seed):
    while True:  # the first health reply comes once every worker is up
        if proc.poll() is not None:
            raise click.ClickException("serve exited during start-up")
        try:
            if (await ask(endpoint, P.Health(), 2.0)).status == "ok":
                break
        except asyncio.TimeoutError:
            pass
    before = (await ask(endpoint, P.Stats())).stats

    calm = await load(endpoint, reqs, clients, None)
    want = {i: ids for i, ids, _, err in calm if err is None}
    if len(want) != len(reqs):
        raise click.ClickException(f"{len(reqs) - len(want)} requests failed without any fault")
    control = await load(endpoint, reqs, clients, time.monotonic() + 60 * minutes)
    between = (await ask(endpoint, P.Stats())).stats
    until = time.monotonic() + 60 * minutes
    stormy, outages = await asyncio.gather(load(endpoint, reqs, clients, until),
                                           killer(endpoint, kill_every, until, random.Random(seed)))
    after = (await ask(endpoint, P.Stats())).stats

    def differ(results) -> str:
        done = [(i, ids) for i, ids, _, err in results if err is None]
        n = sum(sum(a != b for a, b in zip(ids, want[i])) + abs(len(ids) - len(want[i])) for i, ids in done)
        return f"{n} of {sum(len(ids) for _, ids in done)}"

    def ttft(results) -> str:
        ts = [t for _, _, t, _ in results if t is not None]
        return f"{pct(ts, .5):.0f} / {pct(ts, .99):.0f} ms"

    failed = [err for *_, err in stormy if err is not None]
    seen = [s for s in outages if s is not None]
    print(f"chaos: {minutes:g} min without faults, then {minutes:g} min with a kill {kill_every:g} s after each "
          f"recovery ({len(outages)} kills, {after['restarts'] - between['restarts']} restarts), {clients} clients, "
          f"{reqs[0]['max_new_tokens']} tokens each")
    print(f"requests completed {sum(err is None for *_, err in stormy)}, replayed {after['replays'] - between['replays']}, "
          f"failed {len(failed)} (without faults: {sum(err is not None for *_, err in control)} failed, "
          f"{between['replays'] - before['replays']} replayed)")
    print(f"tokens that differ from the undisturbed run: without faults {differ(control)}, with faults {differ(stormy)}")
    print(f"time to first token p50 / p99: undisturbed {ttft(calm)}; without faults {ttft(control)}; with faults {ttft(stormy)}")
    if seen:
        print(f"restart, kill to healthy again (s): mean {sum(seen) / len(seen):.2f}, least {min(seen):.2f}, "
              f"most {max(seen):.2f} over {len(seen)}" + (f" ({len(outages) - len(seen)} kills never noticed)"
                                                           if len(seen) < len(outages) else ""))
    for err in sorted(set(failed))[:5]:
        print(f"  failed: {err}")


if __name__ == "__main__":
    main()
