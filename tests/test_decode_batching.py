"""Decode batching and NUMA dispatch in the CPU pool, through `serve` and the asyncio client.

One service (INT4 CPU experts, float32, --numa-nodes 2) answers 8 requests one at a time, then the
same 8 at once. Greedy tokens must not change when requests share decode steps, the pool must have
run those steps as batches (largest M seen by a pool process > 1, while solo runs never exceed 1),
and each of the two pool processes must be pinned to its own simulated node's cores and get work.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import tiny_models as tm
from krasis.coordinator.processes import numa_cpus
from krasis.shared.client import AsyncClient

N_REQUESTS, NEW_TOKENS = 8, 12


def _cpus_allowed(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("Cpus_allowed_list:"))
    out = []
    for part in line.split(":", 1)[1].strip().split(","):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("batching") / "qwen3", "qwen3", seed=3)


def test_concurrent_decode_is_batched_and_exact_with_two_numa_nodes(model, tmp_path):
    prompts = [[(11 * i + 5 * j) % 150 + 1 for j in range(3 + i)] for i in range(N_REQUESTS)]
    sampling = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with tm.Service(model, "--dtype", "float32", "--cpu-bits", "4", "--cache-dir", tmp_path / "cache",
                    "--numa-nodes", "2", "--max-batch", str(N_REQUESTS)) as svc:
        solo = [svc.client.complete(prompt_ids=p, **sampling).token_ids for p in prompts]
        after_solo = svc.client.stats().stats["cpu_pool"]

        async def together():
            async with AsyncClient(svc.endpoint) as c:
                return await asyncio.gather(*(c.complete(prompt_ids=p, **sampling) for p in prompts))

        both = asyncio.run(together())
        pools = svc.client.stats().stats["cpu_pool"]
        allowed = {p["pid"]: _cpus_allowed(p["pid"]) for p in pools}

    assert all(len(t) == NEW_TOKENS for t in solo)
    assert [r.token_ids for r in both] == solo

    # batching: one request at a time never gives the pool more than one token per call; together they share calls
    assert len(pools) == 2
    assert [p["max_m"] for p in after_solo] == [1, 1]
    for p in pools:
        assert p["max_m"] >= N_REQUESTS // 2, p
        assert p["calls"] > 0 and p["tokens"] > p["calls"]

    # NUMA: each process pinned (as the kernel sees it and as the OS reports it) to its node's cores
    nodes = numa_cpus(2)
    assert [p["node"] for p in pools] == [0, 1]
    for p in pools:
        assert p["cores"] == allowed[p["pid"]] == nodes[p["node"]]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(pools[0]["cores"]) & set(pools[1]["cores"])


def test_fed_back_tokens_follow_their_sequences_across_steps():
    """A decode step sent before the last one's reply carries -1 for a sequence's token: the stage
    takes the one it sampled for that sequence (gpu_worker/stage.py: Stage._feed), wherever that
    sequence's row was in the step that sampled it: in order (one copy), or not, as when a sequence
    between others finished or the rows come from two steps."""
    from types import SimpleNamespace

    import torch

    from krasis.gpu_worker.stage import Stage
    from krasis.shared.protocol import SeqSlice

    step1 = torch.tensor([11, 12, 13, 14])  # sampled for sequences 1-4, in that order
    step2 = torch.tensor([25, 26])  # sampled later for sequences 5 and 6
    stage = SimpleNamespace(last=True, device=torch.device("cpu"),
                            sampled={1: (step1, 0), 2: (step1, 1), 3: (step1, 2), 4: (step1, 3), 5: (step2, 0), 6: (step2, 1)})

    def feed(seqs, tokens):
        slices = [SeqSlice(seq=s, start=9, n=1, logits="sample") for s in seqs]
        return Stage._feed(stage, torch.tensor(tokens), slices).tolist()

    assert feed([1, 2, 3, 4], [-1, -1, -1, -1]) == [11, 12, 13, 14]
    assert feed([1, 3, 4], [-1, -1, -1]) == [11, 13, 14]  # sequence 2 finished
    assert feed([6, 2, 5, 7], [-1, -1, -1, 99]) == [26, 12, 25, 99]  # two steps, out of order, one given
    with pytest.raises(ValueError, match="no sampled token"):
        feed([8], [-1])
