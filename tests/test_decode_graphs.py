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
from krasis.coordinator.metrics import cpu_share
from krasis.shared.client import AsyncClient
from krasis.shared.weights import load_family

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
        # result the same whatever batch it shares (bf16 graphs: benchmarks/device_check.py's exactness).
        # The decode route off: its choice of runner follows step times, which differ between graphs
        # and eager, and a streamed step computes with the GPU's float32 experts, not the pool's INT4
        # ones (benchmarks/graph_divergence.py found the DeepSeek case failing on exactly that)
        with tm.Service(model, "--dtype", "float32", "--cpu-bits", "4", "--max-batch", "4", "--stream-decode", "off",
                        *extra) as svc:
            solo = [svc.client.complete(prompt_ids=p, **sampling).token_ids for p in prompts]

            async def together(ps):
                async with AsyncClient(svc.endpoint) as c:
                    return [r.token_ids for r in await asyncio.gather(*(c.complete(prompt_ids=p, **sampling) for p in ps))]

            batched = [asyncio.run(together(prompts[:n])) for n in (2, 4)]
            stats = svc.client.stats().stats
            hot = [w["hot_experts"] for w in stats["workers"] if w["role"] == "gpu"]
            # the pool's share of decode's routed choices (coordinator/metrics.py, as bench reads it)
            share = cpu_share(load_family(model), stats["cpu_pool"])
    finally:
        del os.environ["KRASIS_CUDA_GRAPHS"]
    return solo, batched, svc.stderr, hot, share


def _half_hot_budget(model) -> str:
    """A --vram-budget (GB) that leaves room for about half the experts in the hot set: what the
    plan gives the stage beside its fixed parts when it has no limit and no device size."""
    from krasis.gpu_worker.vram_budget import plan
    from krasis.shared.expert_store import ExpertFormat, StoreLayout

    fam = load_family(model)
    layout = StoreLayout(fam, 1, ExpertFormat("dense", torch.float32))  # _serve's float32, --gpu-bits 16
    p = plan(fam, layout, (0, fam.num_layers), True, True, 4, "fp8", 4096, 4096, "layer_grouped_1", "hcs_hybrid", None, None)
    return repr(p.total() / 1e9)


# pure_cpu through the pool's doorbells (resident decode off: with no budget every expert is resident);
# the same with half the pool's experts read by the device from host memory (the host share); two
# stages whose resident layers decode on the GPU; hcs_hybrid's hot and cold experts together. The host
# share is fixed or off: auto's level follows step times, which the two runs need not share.
@pytest.mark.parametrize("extra", [
    ("--devices", "cuda:0", "--kv-dtype", "fp8", "--resident-decode", "off", "--pcie-share", "0"),
    ("--devices", "cuda:0", "--kv-dtype", "fp8", "--resident-decode", "off", "--pcie-share", "0.5"),
    ("--devices", "cuda:0,cuda:0", "--kv-dtype", "bf16", "--pcie-share", "0"),
    ("--devices", "cuda:0", "--kv-dtype", "fp8", "--prefill-strategy", "layer_grouped_1", "--decode-strategy", "hcs_hybrid",
     "--pcie-share", "0"),
], ids=["pp1-fp8", "pp1-fp8-host-share", "pp2-bf16-resident", "pp1-hcs_hybrid"])
def test_graphs_replay_the_eager_steps(model, extra, tmp_path):
    import shutil

    hcs = "hcs_hybrid" in extra
    base = shutil.copytree(model, tmp_path / "base")
    if hcs:
        # hot and cold experts in every step: the GPU's share and the pool's, in one graph. The
        # counts of a first run make the hot set, which the workers then build as they start.
        extra = (*extra, "--vram-budget", _half_hot_budget(model))
        tm.generate_json(base, [5, 9, 2, 7, 11, 3, 8], 2, "--devices", "cuda:0")
    # both runs from the same state (the counts one run saves would change the next one's hot set)
    solo, batched, log, hot, share = _serve(shutil.copytree(base, tmp_path / "graphs"), True, extra)
    eager_solo, eager_batched, eager_log, eager_hot, eager_share = _serve(shutil.copytree(base, tmp_path / "eager"), False, extra)
    assert solo == eager_solo and batched == eager_batched
    if hcs:
        fam = load_family(model)
        experts = sum(fam.experts(i).num for i in range(fam.num_layers) if fam.is_moe(i))
        assert hot == eager_hot and 0 < hot[0] < experts, (hot, experts)
        # about half the experts hot: the pool ran a real share of decode's choices, in the graphs
        # as eagerly (the 48-layer GGUF's hot set served 100.0% on two GPU hosts, never on a CPU)
        assert 0.1 < share < 0.9 and 0.1 < eager_share < 0.9, (share, eager_share)
    elif "0.5" in extra:  # half the pool's distinct experts (rounded) through the device's host share
        assert 0.3 < share == eager_share < 0.7, (share, eager_share)
    elif "off" in extra:  # every choice through the pool's doorbells
        assert share == eager_share == 1.0, (share, eager_share)
    assert all(len(t) == NEW_TOKENS for t in solo)
    # the graphs were used: every stage captured batch size 1 once (and nothing failed), none without them
    stages = 2 if "cuda:0,cuda:0" in extra else 1
    captured = re.findall(r"decode graphs for batch size (\d+)", log)
    assert captured.count("1") == stages and "capture" not in eager_log and "failed" not in log, log[-3000:]
