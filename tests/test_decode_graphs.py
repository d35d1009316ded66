"""Decode steps replayed as CUDA graphs (gpu_worker/decode_graphs.py) against the same steps run
eagerly (KRASIS_CUDA_GRAPHS=0): greedy tokens identical for one request and for several decoding
together (batch sizes 1..4, each captured once), Qwen3 and DeepSeek-V2 (MLA, shared experts), two
pipeline stages on one GPU, fp8 and unquantized KV caches. Needs CUDA: runs on the lent GPU machine
(benchmarks/device_check.py runs it), skipped elsewhere."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import torch

import tiny_models as tm
from krasis.shared.client import AsyncClient

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

NEW_TOKENS = 20


@pytest.fixture(scope="module", params=["qwen3", "deepseek"])
def model(request, tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("graphs") / request.param, request.param, seed=5)


def _serve(model, graphs: bool, extra):
    prompts = [[(7 * i + 3 * j) % 150 + 1 for j in range(5 + 2 * i)] for i in range(4)]
    sampling = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    os.environ["KRASIS_CUDA_GRAPHS"] = "1" if graphs else "0"
    try:
        # float32: which requests share a step depends on timing, and only in float32 is a token's
        # result the same whatever batch it shares (bf16 graphs: benchmarks/device_check.py's exactness)
        with tm.Service(model, "--dtype", "float32", "--cpu-bits", "4", "--max-batch", "4", *extra) as svc:
            solo = [svc.client.complete(prompt_ids=p, **sampling).token_ids for p in prompts]

            async def together(ps):
                async with AsyncClient(svc.endpoint) as c:
                    return [r.token_ids for r in await asyncio.gather(*(c.complete(prompt_ids=p, **sampling) for p in ps))]

            batched = [asyncio.run(together(prompts[:n])) for n in (2, 4)]
    finally:
        del os.environ["KRASIS_CUDA_GRAPHS"]
    return solo, batched, svc.stderr


@pytest.mark.parametrize("extra", [
    ("--devices", "cuda:0", "--kv-dtype", "fp8"),
    ("--devices", "cuda:0,cuda:0", "--kv-dtype", "bf16"),
], ids=["pp1-fp8", "pp2-bf16"])
def test_graphs_replay_the_eager_steps(model, extra):
    solo, batched, log = _serve(model, True, extra)
    eager_solo, eager_batched, eager_log = _serve(model, False, extra)
    assert solo == eager_solo and batched == eager_batched
    assert all(len(t) == NEW_TOKENS for t in solo)
    # the graphs were used: every stage captured batch size 1 once (and nothing failed), none without them
    stages = 2 if "cuda:0,cuda:0" in extra else 1
    captured = re.findall(r"decode graphs for batch size (\d+)", log)
    assert captured.count("1") == stages and "capture" not in eager_log and "failed" not in log, log[-3000:]
