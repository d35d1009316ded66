"""A decode step split between the stream and the CPU pool (gpu_worker/decode_split.py): some of
the layers the prefill strategy streams run on the device from their staging slot, the rest
through the pool, and the tokens stay transformers' greedy ones with the same INT4 experts."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from krasis.gpu_worker.decode_split import parts

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
NEW = 12
GROUP = 16


def test_parts_spread_the_streamed_layers_over_the_groups():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [9, 10], [12, 13, 14, 15]]
    for n in range(15):
        p = parts(groups, n)
        assert sum(p.values()) == n
        assert all(0 <= p[g] <= len(grp) for g, grp in enumerate(groups))
        # in proportion to each group's size, to within a layer
        assert all(abs(p[g] - n * len(grp) / 14) < 1 for g, grp in enumerate(groups))
    assert parts(groups, 0) == {0: 0, 1: 0, 2: 0, 3: 0} and parts(groups, 14) == {0: 4, 1: 4, 2: 2, 3: 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # six layers: with three, layer_grouped_2 always keeps a layer resident (its bytes and the two
    # one-layer slots left take less than two slots of two), and no group would have two layers
    return tm.build(tmp_path_factory.mktemp("split") / "m", "qwen3", **tm.QWEN3_CONFIGS["qwen3-base"], num_hidden_layers=6)


def _no_resident_budget(model, prefill: str) -> str:
    """A --vram-budget (GB) with room for everything but a resident layer: layer_grouped_N then
    streams every MoE layer in groups of N (on a CPU device with no budget it keeps half of them)."""
    from krasis.shared.weights import load_family
    from krasis.shared.strategy_names import parse_prefill
    from krasis.gpu_worker.vram_budget import layer_expert_bytes, plan
    from krasis.shared.expert_store import ExpertFormat, StoreLayout

    fam = load_family(model)
    layout = StoreLayout(fam, 1, ExpertFormat("int4", torch.float32, GROUP))
    p = plan(fam, layout, (0, fam.num_layers), True, True, 4, "bf16", 4096, 4096, prefill, "pure_cpu", None, None)
    layer, n = layer_expert_bytes(layout, 0), parse_prefill(prefill)[1]
    return repr((p.total() - p.resident - p.staging + 2 * n * layer + layer / 2) / 1e9)


# Six MoE layers, none resident. layer_grouped_2: groups [0, 1] [2, 3] [4, 5]; streaming 1 copies
# the first layer of group 1 only. layer_grouped_1 streaming 4: groups 0, 2, 3 and 5 (1 and 4 left to
# the pool), 0 then 2 being two in a row that a slot per group number would have put in one slot, the
# second overwriting the first before its layer ran.
@pytest.mark.parametrize("prefill,mode,pooled", [("layer_grouped_2", "1", 5), ("layer_grouped_1", "4", 2),
                                                 ("layer_grouped_2", "always", 0)])
def test_split_decode_is_exact_and_leaves_the_pool_the_rest(model, prefill, mode, pooled, tmp_path):
    ref = tm.fake_quant_copy(model, tmp_path / "ref", 4, 16, GROUP)
    want = tm.reference_greedy(ref, PROMPT, NEW)
    logits = tm.reference_logits(ref, PROMPT + want[:-1])[len(PROMPT) - 1:]
    want_lp = torch.log_softmax(logits.float(), -1)[torch.arange(NEW), torch.tensor(want)]
    with tm.Service(model, "--dtype", "float32", "--devices", "cpu", "--cpu-workers", "1", "--cpu-bits", "4",
                    "--gpu-bits", "4", "--group-size", str(GROUP), "--kv-dtype", "bf16", "--prefill-strategy", prefill,
                    "--vram-budget", _no_resident_budget(model, prefill), "--stream-decode", mode) as svc:
        tokens, logprobs, calls, stats = svc.greedy(PROMPT, NEW)
    (gpu,) = [w for w in stats["workers"] if w["role"] == "gpu"]
    assert gpu["prefill_resident_layers"] == 0 and gpu["stream_decode"] == mode
    assert tokens == want
    torch.testing.assert_close(logprobs, want_lp, rtol=0, atol=1e-4)
    # one pool request per decode step and layer the step does not stream (the first token: prefill)
    assert calls == (NEW - 1) * pooled
