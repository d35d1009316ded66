"""How long a start takes, by phase, from `serve`'s exec to ready and to the first token (issue 14,
item 6: Qwen3-30B-A3B ready within 20 s of start with warm caches).

    python benchmarks/startup.py MODEL --cpu-bits 4 --gpu-bits 4 --attn-bits 8 --group-size 32 \\
        --devices cuda:0 --runs 5

takes the runtime options of `krasis-coord generate`. Each run is a fresh process (imports are part
of a start) that starts as `serve` does: the zygote first, which imports the workers' modules and
forks the workers (coordinator/processes.py: Prestarted), then the coordinator's imports and engine,
whose spec each worker then takes; it generates one token from --prompt-ids, and lays out on its
own clock, from its exec: the coordinator's imports and engine (config, tokenizer, cache headers),
then each worker's phases from the times it reports in its Ready message
(shared/lifecycle.py:StartupMarks: "exec", when the zygote forked it, "preload", none since, and
"spec", its wait for the engine, when it was started ahead), and when the coordinator saw each
Ready. A run that built a cache (one was missing or stale) is no warm start: the summary, each
phase's least and median, leaves such runs out. Warm runs read the caches from the page cache where RAM holds them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import click

from krasis.shared.lifecycle import started_at

T0 = started_at()  # before the imports, which the figures include

from krasis.coordinator.cli import _int_list, runtime_options  # noqa: E402
from krasis.coordinator.processes import Prestarted  # noqa: E402


def _phases(worker: dict) -> list[tuple[str, float, float]]:
    """(phase, duration, end from T0) of a worker's StartupMarks, then its wait to be seen ready."""
    marks = worker["startup"]
    out = [(f"spawn (exec at {marks[0][1] - T0:.2f} s)", 0.0, marks[0][1] - T0)]
    out += [(name, t - prev, t - T0) for (_, prev), (name, t) in zip(marks, marks[1:])]
    out.append(("sockets, Ready seen", worker["ready_at"] - marks[-1][1], worker["ready_at"] - T0))
    return out


async def _one(model: str, opts, prompt_ids: list[int], prestarted: Prestarted) -> list[tuple[str, float, float]]:
    from krasis.coordinator.engine import Engine
    from krasis.shared import protocol as P

    rows = [("coordinator: imports", time.time() - T0, time.time() - T0)]
    engine = Engine(model, opts, prestarted=prestarted)
    t = time.time() - T0
    rows.append(("coordinator: engine (config, tokenizer, cache headers)", t - rows[-1][2], t))
    try:
        await engine.start()
        ready = time.time() - T0
        for w in engine.workers:  # the pools, then the stages in order
            rows += [(f"{w['role']} {w['rank']}: {name}", d, end) for name, d, end in _phases(w)]
        rows.append(("ready", ready - t, ready))
        gen = P.Generate(id="startup", prompt_ids=prompt_ids, sampling=P.SamplingParams(max_new_tokens=1))
        async for _ in engine.generate(gen):
            pass
        first = time.time() - T0
        rows.append(("first token", first - ready, first))
    finally:
        await engine.close()
    return rows


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--runs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-ids", callback=_int_list, default="1,2,3", show_default=True)
@click.option("--one", is_flag=True, hidden=True, help="One run in this process, printed as JSON.")
@runtime_options
def main(model, runs, prompt_ids, one, opts):
    if one:
        with Prestarted.for_run(model, opts) as prestarted:  # before the engine, as serve does
            from krasis.coordinator.engine import run

            print(json.dumps(run(_one(model, opts, prompt_ids, prestarted))))
        return
    args = sys.argv[1:]
    if "--runs" in args:
        i = args.index("--runs")
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--runs=")]
    warm = []
    for k in range(runs):
        r = subprocess.run([sys.executable, __file__, *args, "--one"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"run {k + 1} failed:\n{r.stderr[-4000:]}")
        rows = json.loads(r.stdout.strip().splitlines()[-1])
        built = "cache: building" in r.stderr
        if not built:
            warm.append(rows)
        print(f"run {k + 1}{' (built a cache: not warm)' if built else ''}:")
        for name, d, end in rows:
            print(f"  {name:<58} {d:7.2f} s   (at {end:6.2f} s)")
    if not warm:
        return
    print(f"\nsummary over {len(warm)} warm run(s): phase, least / median seconds")
    for i, (name, *_) in enumerate(warm[0]):
        ds = [rows[i][1] for rows in warm]
        ends = [rows[i][2] for rows in warm]
        print(f"  {name.split(' (exec')[0]:<58} {min(ds):7.2f} / {statistics.median(ds):7.2f}   "
              f"(at {min(ends):6.2f} / {statistics.median(ends):6.2f})")


if __name__ == "__main__":
    main()
