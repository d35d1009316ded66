"""`bench --concurrency` and `--prompt-lens` on a tiny model on CPU: one JSON row per prompt length,
one entry per count of sequences decoded together, and the sequences decoded together give the
tokens each gives alone (greedy, float32), so the aggregate is a rate of the same work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

import tiny_models as tm
from krasis.coordinator.bench import generate_together
from krasis.coordinator.cli import main
from krasis.coordinator.engine import Engine, run
from krasis.coordinator.processes import RuntimeOptions

OPTS = ["--devices", "cpu", "--cpu-workers", "1", "--dtype", "float32", "--runs", "1", "--decode-tokens", "6"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("bench") / "qwen3", "qwen3", seed=5)


def test_bench_rows_per_prompt_length_and_entries_per_concurrency(model, tmp_path, monkeypatch):
    import krasis.coordinator.bench as bench

    seen, real = [], bench.generate_together

    async def recording(engine, prompts, decode_tokens, tag, *args):
        seen.append((tag, [len(p) for p in prompts]))
        return await real(engine, prompts, decode_tokens, tag, *args)

    monkeypatch.setattr(bench, "generate_together", recording)
    out = tmp_path / "bench.json"
    p = CliRunner().invoke(main, ["bench", str(model), *OPTS, "--prompt-lens", "8,20", "--concurrency", "1,3", "--json", str(out),
                                  "--seed", "7"])
    assert p.exit_code == 0, p.output
    # each length warmed up at that length before its timed runs, as llama-bench warms up each test: a
    # prompt of several chunks takes paths a shorter warm-up does not (session 32: the first 10K run
    # after a 4096-token warm-up ran at 42% of the second's speed); then 3 sequences warmed up and run
    assert seen == [("warmup-len8", [8]), ("run8.0", [8]), ("warmup3.", [8, 8, 8]), ("c3.8.0", [8, 8, 8]),
                    ("warmup-len20", [20]), ("run20.0", [20]), ("warmup3.", [16, 16, 16]), ("c3.20.0", [20, 20, 20])], seen
    rows = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in rows] == [8, 20]
    assert all(r["seed"] == 7 and r["temperature"] == 1.0 for r in rows)  # what a row's prompts and decode were
    # sampled at temperature 1 over a 160-token vocabulary: a tiny model's tokens mostly differ
    assert all(0.3 < r["decode_distinct"] <= 1.0 for r in rows), [r["decode_distinct"] for r in rows]
    assert "decode tokens: " in p.output
    for r in rows:
        # the prefill floor is the row's own: a longer prompt has more FLOPs
        assert r["prefill_floor_tok_s"] > 0 and r["prefill_fraction"] == pytest.approx(r["prefill_tok_s"] / r["prefill_floor_tok_s"])
        entries = r["concurrency"]
        assert [e["concurrency"] for e in entries] == [1, 3] and all(e["prompt_tokens"] == r["prompt_tokens"] for e in entries)
        for e in entries:
            assert e["decode_aggregate_tok_s"] >= e["decode_per_seq_tok_s"] > 0
            assert set(e["step_ms"]) == {"worker", "between"} and e["step_ms"]["worker"] > 0
            assert e["cpu_share"] == 1.0  # pure_cpu: the pool ran every choice
            assert e["decode_route"] == [{}]  # one GPU worker; on a CPU device the route decides nothing
        # three sequences share each step: the pool ran 3 tokens per call, against 1 for one sequence
        one, three = (e["pool"][0] for e in entries)
        assert one["tokens"] == one["calls"] and three["tokens"] == 3 * three["calls"]
    assert rows[0]["prefill_floor_tok_s"] != rows[1]["prefill_floor_tok_s"]
    lines = [ln for ln in p.output.splitlines() if ln.startswith("| qwen3 |")]
    assert len(lines) == 2 + 4  # the main table's two rows, then a line per prompt length and count
    assert "| Sequences | Decode aggregate (tok/s) |" in p.output


@pytest.mark.skipif(not any(shutil.which(n) for n in ("cc", "gcc")), reason="no C compiler")
def test_bench_reports_the_pool_kernels_clock(model, tmp_path):
    """INT4 experts run the pool's C kernel: its clock (expert_kernel.c: krasis_clock) times every
    call of the run, per thread of its team pinned one to a core of the pool's, and bench prints it.
    --reserved-cores 1 keeps the last core off the pool."""
    out = tmp_path / "bench.json"
    p = CliRunner().invoke(main, ["bench", str(model), *OPTS, "--cpu-bits", "4", "--gpu-bits", "4", "--group-size", "16",
                                  "--prompt-lens", "8", "--reserved-cores", "1", "--json", str(out)])
    assert p.exit_code == 0, p.output
    pool = json.loads(out.read_text())["pool"][0]  # one prompt length: the row itself
    assert pool["clock_calls"] == pool["calls"] > 0
    assert 0 <= pool["clock_wake_s"] <= pool["clock_p1_first_s"] <= pool["clock_p1_last_s"] <= pool["kernel_s"]
    threads = len(pool["clock_p1_by_thread_s"])
    assert threads >= 1 and len(pool["cpu_by_thread"]) == threads
    assert set(pool["cpu_by_thread"]) <= set(sorted(os.sched_getaffinity(0))[:-1])
    assert "pool kernel us from a call's start" in p.output


def test_route_lines_name_each_workers_choice_per_bucket():
    from krasis.coordinator.bench import route_lines

    e = {"decode_route": [{"32": "13 of 25 streamed layers over PCIe, the rest by the decode strategy"},
                          {"16": "the decode strategy", "32": "streamed as a prefill"}]}
    assert route_lines([{"concurrency": [{"decode_route": [{}]}, e]}]).splitlines() == [
        "decode route, GPU worker 0, steps of up to 32 tokens: 13 of 25 streamed layers over PCIe, the rest by the decode strategy",
        "decode route, GPU worker 1, steps of up to 16 tokens: the decode strategy",
        "decode route, GPU worker 1, steps of up to 32 tokens: streamed as a prefill",
    ]
    assert route_lines([{"concurrency": []}]) == "" and route_lines([{}]) == ""


def test_bench_refuses_a_count_below_one(model):
    bad = CliRunner().invoke(main, ["bench", str(model), *OPTS, "--concurrency", "0,4"])
    assert bad.exit_code == 2 and "--concurrency" in bad.output


def test_sequences_decoded_together_match_each_alone(model):
    prompts = [[(7 * i + 3 * j) % 150 + 1 for j in range(4 + 3 * i)] for i in range(3)]
    opts = RuntimeOptions(devices=["cpu"], cpu_workers=1, dtype="float32", max_batch=3)

    async def go():
        engine = Engine(str(model), opts)
        try:
            await engine.start()
            alone = [(await generate_together(engine, [p], 6, f"alone{i}"))[0] for i, p in enumerate(prompts)]
            together = await generate_together(engine, prompts, 6, "together")
            sampled = [(await generate_together(engine, prompts[:1], 6, "sampled", 1.0))[0] for _ in range(2)]
            return alone, together, sampled, (await engine.stats_reply()).stats
        finally:
            await engine.close()

    alone, together, sampled, stats = run(go())
    assert [t.tokens for t in together] == [t.tokens for t in alone]
    # bench's sampled decode: seeded from the request id, so a run repeats, and not the greedy tokens
    assert sampled[0].tokens == sampled[1].tokens != alone[0].tokens
    assert all(len(t.tokens) == 6 and len(t.times) == 6 for t in together)
    assert stats["cpu_pool"][0]["max_m"] == len(prompts)  # they did share decode steps


def test_decode_floor_counts_only_the_pools_layers(model):
    """Resident decode takes layers off the pool: the DRAM floor is then the pool's layers' bytes
    per token, and with every layer resident there is none (the table says "-")."""
    from types import SimpleNamespace

    import torch

    from krasis.coordinator.bench import floors, table
    from krasis.shared.expert_store import ExpertFormat
    from krasis.shared.weights import load_family

    family = load_family(model)
    moe = sum(1 for i in range(family.num_layers) if family.is_moe(i))
    caches = SimpleNamespace(gpu_fmt=ExpertFormat("int4", torch.float32, 16), cpu_fmt=ExpertFormat("int4", torch.float32, 16))
    res = {"prefill_tok_s": 100.0, "decode_tok_s": 10.0}
    ceil = (50e9, 100e12, 80e9)

    def run(resident):
        return floors(family, caches, 64, res, ceil, [{"role": "gpu", "decode_resident_layers": resident}])

    none, one, every = run(0), run(1), run(moe)
    assert moe > 1 and one["decode_floor_tok_s"] == pytest.approx(none["decode_floor_tok_s"] * moe / (moe - 1))
    assert every["decode_floor_tok_s"] is None and every["decode_fraction"] is None
    row = {"model": "m", "gpus": 1, "bits": "INT4/INT4", "prefill_strategy": "persistent", "decode_strategy": "pure_cpu",
           "ttft_s": 0.1, "ms_per_tok": 100.0, "vram_mb": "1", "ram_gb": 1.0, **res}
    assert table([row | every]).splitlines()[-1].endswith("| - | - |")
