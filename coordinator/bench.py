"""`krasis-coord bench MODEL`: prefill and decode speed in the reference's table columns, beside this
machine's floor measured in the same run (DESIGN.md, Ceilings):

    prefill floor = max(expert bytes a step streams / pinned host-to-device bandwidth, FLOPs / matrix rate)
                    (and the one-pass floor: every expert streamed once, the peer comparisons' yardstick)
    decode floor  = expert bytes one token reads from RAM / DRAM read bandwidth

Each figure is also given as the fraction of its floor reached. Each prompt length is run once untimed
before its timed runs (as llama-bench warms up each test). The prompt is random token ids
(seeded), so no data set is needed; decode ignores EOS so every run decodes the same count. The seed
is new for each bench unless given: the hot-expert counts a run saves (gpu_worker/hcs.py) would
otherwise come from the very prompts the next run measures, and a hot set made from them served
every choice of their decode (an H100 run, 2026-12-05: 35% of the experts, 100.0% of the choices).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
import zlib
from dataclasses import dataclass
from itertools import zip_longest

import torch

from ..shared import protocol as P
from .engine import DECODE_PARTS, Engine, run as _run
from .metrics import cpu_share
from .processes import RuntimeOptions


# --- ceilings ------------------------------------------------------------------------------------


def _median_time(fn, reps: int) -> float:
    return sorted(_times(fn, reps))[reps // 2]


def _times(fn, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def measure_h2d(device: str, nbytes: int = 1 << 30) -> float | None:
    """Pinned host-to-device bytes/s (None on a CPU device, which copies nothing)."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    src.random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def go():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)

    go()
    return nbytes / _median_time(go, 5)


def measure_matmul(device: str, dtype: torch.dtype) -> float:
    """Matrix FLOP/s of one large product on `device` (random data, never zeros)."""
    # A CPU without bf16/fp16 matrix instructions multiplies those types at under 1 GFLOP/s (2.5 s a
    # 1024^3 product on CI's 2 cores, 15 s a measure): a 256^3 product there, its rate within 2x.
    n = 8192 if device.startswith("cuda") else 1024 if dtype == torch.float32 else 256
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def go():
        (a @ b).sum().item() if device == "cpu" else (a @ b, torch.cuda.synchronize(device))

    go()
    return 2 * n**3 / _median_time(go, 5)


def measure_dram(nbytes: int = 1 << 30, reps: int = 15) -> float:
    """Host DRAM read bytes/s with all of this process's threads (a float32 sum over 1 GiB): the
    fastest of `reps` passes. A ceiling is what the machine can do, and on the lent hosts a pass now
    and then runs at half speed (other tenants, frequency): the median of 5 read 39 and 83 GB/s in
    two processes minutes apart on one H100 host (2026-12-05) whose pool kernel ran the same in both.
    The drift is the host's in time, not where a buffer lies: fresh buffers and a memfd like the
    store's read alike at a moment, and all moved 88-128 GB/s seconds apart (benchmarks/dram_read.py,
    session 39)."""
    # ones, not rand: the read costs the same, and rand took 2.8 s to fill 1 GiB on 2 cores
    return read_rate(torch.ones(nbytes // 4), reps)


def read_rate(x: torch.Tensor, reps: int = 15) -> float:
    """Bytes/s of a float32 sum over x with this process's threads, the fastest of `reps` passes
    after one that faults its pages in."""
    x.sum()
    return x.numel() * x.element_size() / min(_times(lambda: x.sum(), reps))


# --- model arithmetic ----------------------------------------------------------------------------


def model_costs(family, gpu_fmt, cpu_fmt, prompt: int) -> dict:
    """FLOPs of a prompt, expert bytes of the whole model (GPU format), expert bytes one decode
    token reads (CPU format)."""
    from ..shared.expert_store import StoreLayout
    from ..gpu_worker.vram_budget import layer_expert_bytes

    flops, token_bytes = 0.0, 0
    gpu_layout, cpu_layout = StoreLayout(family, 1, gpu_fmt), StoreLayout(family, 1, cpu_fmt)
    for i in range(family.num_layers):
        params = sum(math.prod(s) for s in family.layer_tensors(i).values() if len(s) == 2)
        if family.is_moe(i):
            es = family.experts(i)
            params += es.top_k * 3 * es.hidden * es.inter
            token_bytes += es.top_k * layer_expert_bytes(cpu_layout, i) // es.num
        flops += 2 * prompt * params
        heads = getattr(family, "num_heads", 1)
        qk = getattr(family, "qk_head_dim", getattr(family, "head_dim", 0))
        vd = getattr(family, "v_head_dim", getattr(family, "head_dim", 0))
        flops += 2 * prompt * prompt / 2 * (qk + vd) * heads  # causal scores and values
    expert_bytes = sum(layer_expert_bytes(gpu_layout, i) for i in gpu_layout.moe_layers)
    return {"flops": flops, "expert_bytes": expert_bytes, "token_bytes": token_bytes}


# --- the run -------------------------------------------------------------------------------------


def _rss_gb(pids: list[int]) -> float:
    """Private resident memory of the processes, plus the shared expert store once."""
    import psutil

    total = 0
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_info()
            total += m.rss - getattr(m, "shared", 0)
        except psutil.Error:
            pass
    return total / 1e9


POOL_COUNTERS = ("calls", "tokens", "pairs", "kernel_s", "serve_s", "gap_s", "gaps", "step_gap_s", "step_gaps", "step_kernel_s", "after_s",
                 "lookahead_calls", "lookahead_bytes", "lookahead_skipped", "guessed", "chosen", "posted")


@dataclass
class Trace:
    """One request followed to its end: its tokens and when each reached the bench."""

    done: P.Done
    tokens: list[int]
    times: list[float]


async def generate_together(engine: Engine, prompts: list[list[int]], new_tokens: int, tag: str,
                            temperature: float = 0.0, seed: int = 0) -> list[Trace]:
    """Submit every prompt at once (EOS ignored; sampled at `temperature`, each request seeded from
    `seed` and its id, or greedy at 0) and follow each to its end. The engine prefills them one after
    another, then decodes them in shared steps."""

    async def follow(i, ids):
        rid = f"{tag}.{i}"
        sampling = P.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=temperature,
                                    seed=zlib.crc32(f"{seed}:{rid}".encode()) if temperature > 0 else None)
        gen = P.Generate(id=rid, prompt_ids=ids, sampling=sampling)
        tokens, times = [], []
        async for ev in engine.generate(gen):
            if isinstance(ev, P.Error):
                raise RuntimeError(ev.message)
            if isinstance(ev, P.Tokens):
                tokens += ev.token_ids
                times += [time.perf_counter()] * len(ev.token_ids)
            elif isinstance(ev, P.Done):
                return Trace(ev, tokens, times)

    return list(await asyncio.gather(*(follow(i, ids) for i, ids in enumerate(prompts))))


def decode_rates(traces: list[Trace]) -> tuple[float, list[float]]:
    """(aggregate tok/s, each sequence's tok/s) of the decode the sequences ran together: from the
    moment the last of them had its first token (every prompt prefilled) to each one's last token."""
    t0 = max(t.times[0] for t in traces)
    counts = [sum(x > t0 for x in t.times) for t in traces]
    end = max(t.times[-1] for t in traces)
    per_seq = [c / (t.times[-1] - t0) if t.times[-1] > t0 else 0.0 for c, t in zip(counts, traces)]
    return (sum(counts) / (end - t0) if end > t0 else 0.0), per_seq


def _step_ms(before: dict, after: dict) -> dict:
    """A decode step's time, by part (engine.DECODE_PARTS), over the steps between two stats."""
    steps = max(after["decode_steps"] - before["decode_steps"], 1)
    return {k: 1000 * (after[f"decode_{k}_s"] - before[f"decode_{k}_s"]) / steps for k in DECODE_PARTS}


def _pool_delta(before: dict, after: dict) -> list[dict]:
    """Each pool process's share of what ran between two stats (cpu_worker/main.py: its counters, and
    the C kernel's clock where it ran)."""
    def less(x, y):
        return [u - v for u, v in zip_longest(x, y, fillvalue=0.0)] if isinstance(x, list) else x - y

    return [{**{k: less(b[k], a.get(k, 0.0 if not isinstance(b[k], list) else []))
                for k in (*POOL_COUNTERS, *(k for k in b if k.startswith("clock_") and k != "clock_cpu_by_thread"))},
             "experts_asked": b["experts_asked"], "cpu_by_thread": b.get("clock_cpu_by_thread", [])}
            for a, b in zip(before["cpu_pool"], after["cpu_pool"])]


async def _bench(model: str, opts: RuntimeOptions, prompt_lens: list[int], decode_tokens: int, runs: int,
                 concurrency: list[int], temperature: float, seed: int, prestarted=None) -> dict:
    engine = Engine(model, opts, prestarted=prestarted)
    try:
        await engine.start()
        vocab = engine.family.vocab_size
        g = torch.Generator().manual_seed(seed)

        def prompts(n, length):
            return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]

        async def measured(n, length, tag):
            """`runs` groups of n sequences, with the engine's and the pool's counters around them."""
            before = (await engine.stats_reply()).stats
            groups = [await generate_together(engine, prompts(n, length), decode_tokens, f"{tag}{i}", temperature, seed)
                      for i in range(runs)]
            after = (await engine.stats_reply()).stats
            return groups, _step_ms(before, after), _pool_delta(before, after)

        rows = []
        for length in prompt_lens:
            # a warm-up at each length, as llama-bench runs one of each test: kernels compiled for its
            # shapes, hot-expert counts gathered, allocator settled. A prompt of several chunks takes
            # paths that a one-chunk warm-up does not (a layer dequantized once for its chunks,
            # attention over earlier chunks' keys): warmed up with 4096 tokens, the first 10K run on
            # a fresh H100 host ran 11,895 tok/s and the second 28,382 (session 32)
            await generate_together(engine, prompts(1, length), min(decode_tokens, 4), f"warmup-len{length}", temperature, seed)
            groups, step_ms, pool = await measured(1, length, f"run{length}.")
            # the sampled tokens each run decoded: all distinct is the norm at temperature 1; few
            # means decode repeats itself, and its routing (the hot set's share, the lookahead's
            # guesses) is not what a served request's would be
            decoded = [grp[0].tokens[1:] for grp in groups]
            row = {"runs": [{"ttft_s": d.ttft_s, "prefill_tok_s": d.prefill_tok_s, "decode_tok_s": d.decode_tok_s}
                            for d in (grp[0].done for grp in groups)],
                   "pool": pool, "step_ms": step_ms, "concurrency": [],
                   "decode_distinct": sum(len(set(t)) for t in decoded) / max(1, sum(len(t) for t in decoded))}
            for n in concurrency:
                if n == 1:
                    entry_groups = groups
                else:
                    # a first group of this size with short prompts: decode graphs for n sequences captured
                    await generate_together(engine, prompts(n, min(length, 16)), min(decode_tokens, 4), f"warmup{n}.",
                                            temperature, seed)
                    entry_groups, step_ms, pool = await measured(n, length, f"c{n}.{length}.")
                rates = [decode_rates(grp) for grp in entry_groups]
                row["concurrency"].append({
                    "concurrency": n, "prompt_tokens": length,
                    "decode_aggregate_tok_s": sum(a for a, _ in rates) / len(rates),
                    "decode_per_seq_tok_s": sum(sum(p) / len(p) for _, p in rates) / len(rates),
                    "step_ms": step_ms, "pool": pool,
                    # each GPU worker's decode route by then (batch-size bucket -> its runner)
                    "decode_route": [w.get("decode_route", {}) for w in engine.workers if w["role"] == "gpu"],
                })
            rows.append(row)
        # this machine's processes (with --hosts, the workers that report a host run elsewhere)
        pids = [w["pid"] for w in engine.workers if "host" not in w] + [os.getpid()]
        store = sum(w.get("bytes", 0) for w in engine.workers if w["role"] == "cpu")
        gpus = [w for w in engine.workers if w["role"] == "gpu"]  # in pipeline order (Engine.start)
        vram = "+".join(
            f"{w.get('vram_mb', w.get('vram_plan_mb', {}).get('total', 0)):,.0f}" for w in gpus
        )
        return {"rows": rows, "vram_mb": vram, "ram_gb": _rss_gb(pids) + store / 1e9, "workers": engine.workers,
                "caches": engine.caches}
    finally:
        await engine.close()


# Sampled, as a chat service decodes: greedy decode of a random-weight model (synth, the peer GGUF)
# soon repeats one token, and then every step routes to the same experts, which flatters the pool's
# read-ahead and the hot set (a hcs_hybrid run on the H100 had its hot half serve 100.0% of the
# choices, 2026-12-05).
DECODE_TEMPERATURE = 1.0


def run_bench(model: str, opts: RuntimeOptions, prompt_tokens: int, decode_tokens: int, runs: int,
              measure_floor: bool = True, temperature: float = DECODE_TEMPERATURE, seed: int | None = None,
              prestarted=None) -> dict:
    """One prompt length, one sequence at a time: run_benches' row."""
    return run_benches(model, opts, [prompt_tokens], decode_tokens, runs, measure_floor=measure_floor,
                       temperature=temperature, seed=seed, prestarted=prestarted)[0]


def run_benches(model: str, opts: RuntimeOptions, prompt_lens: list[int], decode_tokens: int, runs: int,
                concurrency: list[int] = (), measure_floor: bool = True,
                temperature: float = DECODE_TEMPERATURE, seed: int | None = None, prestarted=None) -> list[dict]:
    """One row per prompt length, all from one start of the processes. With `concurrency`, each row
    also holds an entry per count of sequences decoded together (each with that prompt length).
    Decode samples at `temperature` (0: greedy). `seed` draws the prompts (None: a new one, which
    the rows record). `prestarted`: the command's (coordinator/processes.py: Prestarted), whose
    zygote forks the workers; None: each worker is a fresh process."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    from ..shared.weights import load_family

    need = max(prompt_lens) + decode_tokens + 1
    opts = RuntimeOptions(**{**vars(opts), "max_context": max(opts.max_context, need),
                             "max_batch": max(opts.max_batch, *concurrency, 1)})
    measure_floor = measure_floor and not opts.hosts  # the floors are this machine's; --hosts runs the stages elsewhere
    # before the workers start: the DRAM read is then this process's threads alone, on every core,
    # not sharing the machine with a pool process
    ceil = ceilings(opts) if measure_floor else None
    out = _run(_bench(model, opts, list(prompt_lens), decode_tokens, runs, list(concurrency), temperature, seed,
                      prestarted))
    dram = {}
    if ceil is not None:
        # the DRAM read again once the workers are gone, the faster of the two the ceiling: on a lent
        # host the read before the workers start varied 115-158 GB/s between bench processes minutes
        # apart whose decode ran within 4% (session 28), so one measure made the floor a lottery
        dram = {"dram_gb_s_before_after": [ceil[2] / 1e9, measure_dram() / 1e9]}
        ceil = (*ceil[:2], 1e9 * max(dram["dram_gb_s_before_after"]))
    family = load_family(model)
    return [_row(model, opts, family, out, r, length, decode_tokens, ceil) | dram | {"seed": seed, "temperature": temperature}
            for r, length in zip(out["rows"], prompt_lens)]


def _row(model, opts, family, out, r, prompt_tokens, decode_tokens, ceil) -> dict:
    mean = lambda k: sum(x[k] for x in r["runs"]) / len(r["runs"])  # noqa: E731
    res = {
        "model": os.path.basename(os.path.normpath(model)), "gpus": len(opts.devices), "devices": opts.devices,
        # routed experts GPU/CPU, and the dense weights where --attn-bits quantizes them (a table's
        # two rows must not read alike when one ran INT8 attention)
        "bits": f"{_bits(opts.gpu_bits)}/{_bits(opts.cpu_bits)}" + (f", attn {_bits(opts.attn_bits)}" if opts.attn_bits != 16 else ""),
        "prefill_strategy": out["workers"][-1].get("prefill_strategy", ""),
        "decode_strategy": out["workers"][-1].get("decode_strategy", ""),
        "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "prefill_tok_s": mean("prefill_tok_s"), "ttft_s": mean("ttft_s"), "decode_tok_s": mean("decode_tok_s"),
        "vram_mb": out["vram_mb"], "ram_gb": out["ram_gb"], "runs": r["runs"], "pool": r["pool"],
        "decode_distinct": r["decode_distinct"],
    }
    gpus = [w for w in out["workers"] if w["role"] == "gpu"]
    # the hot set (hcs_hybrid) as the VRAM plan sized it: what "N GB of hot experts" means in a result
    res["hot_experts"] = sum(w.get("hot_experts", 0) for w in gpus)
    res["hot_gb"] = sum((w.get("vram_plan_mb") or {}).get("hot") or 0 for w in gpus) * 2**20 / 1e9
    res["ms_per_tok"] = 1000 / res["decode_tok_s"] if res["decode_tok_s"] else None
    res["cpu_share"] = cpu_share(family, r["pool"])
    # per GPU worker, batch-size bucket -> the share of the pool's experts it took (gpu_worker/host_share.py)
    res["host_share"] = [w.get("host_share") for w in gpus]
    if res["ms_per_tok"]:
        res["decode_split_ms"] = r["step_ms"]  # where a decode token's time goes
    if ceil is not None:
        res.update(floors(family, out["caches"], prompt_tokens, res, ceil, out["workers"]))
    if r["concurrency"]:
        for e in r["concurrency"]:
            e["cpu_share"] = cpu_share(family, e["pool"])
        res["concurrency"] = r["concurrency"]
    return res


def _bits(b: int) -> str:
    return "BF16" if b == 16 else f"INT{b}"


def ceilings(opts: RuntimeOptions) -> tuple[float | None, float, float]:
    """(pinned H2D bytes/s, matrix FLOP/s, DRAM read bytes/s) of this machine for the run."""
    dev = opts.devices[0]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts.dtype]
    out = measure_h2d(dev), measure_matmul(dev, dtype), measure_dram()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()  # the coordinator keeps no GPU memory from the measurement
    return out


def streamed_bytes(workers: list[dict], expert_bytes: int) -> int:
    """Expert bytes a prefill step copies to the GPUs, as each stage reported it (gpu_worker/
    experts.py: 0 for persistent, the non-resident layers for layer_grouped); every expert once
    where a stage's copies depend on the routing (active_only, hcs_prefill)."""
    per_stage = [w.get("prefill_streamed_bytes") for w in workers if w["role"] == "gpu"]
    return expert_bytes if not per_stage or None in per_stage else sum(per_stage)


def floors(family, caches, prompt_tokens: int, res: dict, ceil: tuple, workers: list[dict]) -> dict:
    """The floors of this run: prefill from the bytes its steps stream (a step streams each expert
    at most once, however the prompt is chunked), and, as the peer comparisons use it, the one-pass
    floor of streaming every expert once; decode from the bytes a token reads from DRAM, which are
    the pool's layers' only: resident layers decode on the GPU (none: no DRAM floor)."""
    h2d, mm, dram = ceil
    c = model_costs(family, caches.gpu_fmt, caches.cpu_fmt, prompt_tokens)
    streamed = streamed_bytes(workers, c["expert_bytes"]) if h2d else 0
    t_prefill = max(streamed / h2d if h2d else 0.0, c["flops"] / mm)
    t_one_pass = max(c["expert_bytes"] / h2d if h2d else 0.0, c["flops"] / mm)
    moe = sum(1 for i in range(family.num_layers) if family.is_moe(i))
    on_gpu = sum(w.get("decode_resident_layers") or 0 for w in workers if w["role"] == "gpu")
    t_decode = c["token_bytes"] * (moe - on_gpu) / max(moe, 1) / dram
    pf, df = prompt_tokens / t_prefill, (1 / t_decode if t_decode else None)
    return {
        "h2d_gb_s": h2d / 1e9 if h2d else None, "matmul_tflop_s": mm / 1e12, "dram_gb_s": dram / 1e9,
        "prefill_floor_tok_s": pf, "prefill_fraction": res["prefill_tok_s"] / pf,
        "prefill_streamed_gb": streamed / 1e9, "prefill_one_pass_floor_tok_s": prompt_tokens / t_one_pass,
        "prefill_one_pass_fraction": res["prefill_tok_s"] * t_one_pass / prompt_tokens,
        "decode_floor_tok_s": df, "decode_fraction": res["decode_tok_s"] / df if df else None,
        "decode_resident_layers": on_gpu, "moe_layers": moe,
        "expert_gb": c["expert_bytes"] / 1e9, "prompt_tflop": c["flops"] / 1e12, "token_expert_mb": c["token_bytes"] / 1e6,
    }


def table(rows: list[dict]) -> str:
    head = ("| Model | GPUs | GPU/CPU bits | LGS | HCS | Prefill (tok/s) | TTFT (s) | Decode (tok/s) | ms/tok "
            "| VRAM (MB) | RAM (GB) | Prefill floor (tok/s) | of floor | Decode floor (tok/s) | of floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ps, ds = r["prefill_strategy"], r["decode_strategy"]
        lgs = ps.rsplit("_", 1)[1] if ps.startswith("layer_grouped_") else ("1" if ps == "chunked" else "-")
        hcs = "ON" if "hcs" in ps or ds == "hcs_hybrid" else "OFF"
        pf = r.get("prefill_floor_tok_s")
        df = r.get("decode_floor_tok_s")
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['bits']} | {lgs} | {hcs} | {r['prefill_tok_s']:,.1f} | {r['ttft_s']:.2f} "
            f"| {r['decode_tok_s']:.2f} | {r['ms_per_tok'] or 0:.1f} | {r['vram_mb']} | {r['ram_gb']:.1f} "
            f"| {pf:,.0f} | {r['prefill_fraction']:.0%} | " + (f"{df:,.1f} | {r['decode_fraction']:.0%} |" if df else "- | - |")
            if pf else
            f"| {r['model']} | {r['gpus']} | {r['bits']} | {lgs} | {hcs} | {r['prefill_tok_s']:,.1f} | {r['ttft_s']:.2f} "
            f"| {r['decode_tok_s']:.2f} | {r['ms_per_tok'] or 0:.1f} | {r['vram_mb']} | {r['ram_gb']:.1f} | - | - | - | - |"
        )
    return "\n".join(lines)


def concurrency_table(rows: list[dict]) -> str:
    """One line per prompt length and count of sequences decoded together; the last column is the
    aggregate against one sequence's (the row's own one-sequence runs)."""
    head = ("| Model | Prompt tokens | Sequences | Decode aggregate (tok/s) | per sequence (tok/s) | x one sequence "
            "| step ms: worker | between | CPU share |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        one = r["decode_tok_s"]
        for e in r.get("concurrency", []):
            share = "-" if e["cpu_share"] is None else f"{e['cpu_share']:.1%}"
            lines.append(
                f"| {r['model']} | {e['prompt_tokens']} | {e['concurrency']} | {e['decode_aggregate_tok_s']:.2f} "
                f"| {e['decode_per_seq_tok_s']:.2f} | {e['decode_aggregate_tok_s'] / one if one else 0:.2f} "
                f"| {e['step_ms']['worker']:.2f} | {e['step_ms']['between']:.2f} | {share} |"
            )
    return "\n".join(lines)


def route_lines(rows: list[dict]) -> str:
    """What each GPU worker's decode route chose per batch-size bucket, by the end of the bench."""
    lines = []
    for e in (rows[-1].get("concurrency") or [])[-1:]:
        for rank, route in enumerate(e.get("decode_route", [])):
            lines += [f"decode route, GPU worker {rank}, steps of up to {b} tokens: {runner}" for b, runner in route.items()]
    return "\n".join(lines)


def decode_split(r: dict) -> str:
    """Where a decode token's time went (engine.DECODE_PARTS), and a layer's hop as the first pool
    process saw it: its kernel, its own work around the kernel, and its wait for the GPU worker's
    next layer (that layer's GPU work and both crossings of the hop)."""
    split = r.get("decode_split_ms")
    if not split:
        return ""
    line = "decode ms per token: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
    pool = (r.get("pool") or [{}])[0]
    if pool.get("calls") and pool.get("gaps"):
        us = lambda s, n: 1e6 * s / max(1, n)  # noqa: E731
        line += (f"\npool us per layer: kernel {us(pool['kernel_s'], pool['calls']):.1f}, "
                 f"around it {us(pool['serve_s'] - pool['kernel_s'], pool['calls']):.1f}, "
                 f"waiting for the next layer {us(pool['gap_s'], pool['gaps']):.1f}, "
                 f"of which its own work after answering {us(pool['after_s'], pool['calls']):.1f}; a step's first: waiting "
                 f"{us(pool['step_gap_s'], pool['step_gaps']):.1f}, kernel {us(pool['step_kernel_s'], pool['step_gaps']):.1f}")
    if pool.get("clock_calls"):
        per = lambda k, n="calls": 1e6 * pool[f"clock_{k}"] / max(1, pool[f"clock_{n}"])  # noqa: E731
        line += (f"\npool kernel us from a call's start: its last thread in {per('wake_s'):.1f}, phase 1's first and last "
                 f"thread done {per('p1_first_s'):.1f} / {per('p1_last_s'):.1f}, phase 2 after that {per('p2_s'):.1f}")
        by = pool.get("clock_p1_by_thread_s") or []
        if by:
            cpus = pool.get("cpu_by_thread") or ["?"] * len(by)
            line += "; phase 1 by thread (us@CPU last run on): " + " ".join(
                f"{1e6 * t / pool['clock_calls']:.0f}@{c}" for t, c in zip(by, cpus))
        if pool.get("clock_ahead_calls"):
            line += (f"; lookahead: its last thread in {per('ahead_wake_s', 'ahead_calls'):.1f}, "
                     f"its guess made {per('ahead_guess_s', 'ahead_calls'):.1f}")
    if pool.get("lookahead_calls") or pool.get("lookahead_skipped"):
        line += (f"\npool lookahead: {pool['lookahead_bytes'] / max(1, pool['lookahead_calls']) / 1e6:.2f} MB read ahead per layer, "
                 f"its guesses named {pool['guessed'] / max(1, pool['chosen']):.0%} of the experts chosen "
                 f"({pool.get('posted', 0) / max(1, pool['lookahead_calls']):.0%} of them the GPU's); "
                 f"its requests have named {pool['experts_asked']:.1f} experts a layer since it started; skipped after "
                 f"{pool['lookahead_skipped']} of {pool['lookahead_skipped'] + pool['lookahead_calls']} answers (it read nothing)")
    line += f"\ndecode tokens: {r['decode_distinct']:.0%} of each run's distinct (sampled at temperature {r['temperature']})"
    if r.get("decode_resident_layers"):
        line += (f"\ndecode: {r['decode_resident_layers']} of {r['moe_layers']} MoE layers on the GPU (resident "
                 f"decode); the decode floor counts the pool's {r['moe_layers'] - r['decode_resident_layers']}")
    if r.get("hot_experts"):
        line += f"\nhot set: {r['hot_experts']} experts in {r['hot_gb']:.2f} GB of VRAM"
    if r.get("cpu_share") is not None:
        line += f"\nrouted choices run by the CPU pool: {r['cpu_share']:.1%} (the rest by the GPU: its hot experts, its host share)"
    for rank, shares in enumerate(r.get("host_share") or []):
        if shares:
            line += f"\nGPU worker {rank}'s host share of the pool's experts, by steps of up to N tokens: " + ", ".join(
                f"{b}: {s:.1%}" for b, s in shares.items())
    return line
