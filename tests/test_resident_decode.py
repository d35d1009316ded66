"""Resident decode (gpu_worker/decode_strategies.py: DecodeStrategy.resident): the layers whose
experts the prefill strategy keeps in device memory decode there too, and the CPU pool gets no
request for them. On the CPU device (`--resident-decode on`; auto turns it on only for a GPU),
layer_grouped keeps half the MoE layers resident (with pure_cpu: with hcs_hybrid the spare VRAM holds
hot experts instead) and persistent all of them; the tokens stay transformers' greedy ones with
INT4 experts on both sides (the same groups, so either side computes the same weights)."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
NEW = 12
GROUP = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("resident") / "m", "qwen3", **tm.QWEN3_CONFIGS["qwen3-base"])


def _run(model, prefill: str, decode: str, resident: str):
    """(tokens, their logprobs, the GPU worker's info, pool requests) of one request's decode."""
    with tm.Service(model, "--dtype", "float32", "--devices", "cpu", "--cpu-workers", "1", "--cpu-bits", "4",
                    "--gpu-bits", "4", "--group-size", str(GROUP), "--prefill-strategy", prefill, "--decode-strategy", decode,
                    "--resident-decode", resident) as svc:
        tokens, logprobs, calls, stats = svc.greedy(PROMPT, NEW)
    (gpu,) = [w for w in stats["workers"] if w["role"] == "gpu"]
    return tokens, logprobs, gpu, calls


@pytest.mark.parametrize("prefill,decode", [("layer_grouped_2", "pure_cpu"), ("persistent", "hcs_hybrid")])
def test_resident_layers_decode_on_the_device(model, prefill, decode, tmp_path):
    ref = tm.fake_quant_copy(model, tmp_path / "ref", 4, 16, GROUP)
    want = tm.reference_greedy(ref, PROMPT, NEW)
    # each generated token's log-probability under the reference (a finer check than the tokens)
    logits = tm.reference_logits(ref, PROMPT + want[:-1])[len(PROMPT) - 1:]
    want_lp = torch.log_softmax(logits.float(), -1)[torch.arange(NEW), torch.tensor(want)]
    on, lp_on, gpu_on, calls_on = _run(model, prefill, decode, "on")
    off, lp_off, gpu_off, calls_off = _run(model, prefill, decode, "off")
    assert on == want and off == want
    torch.testing.assert_close(lp_on, want_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(lp_off, want_lp, rtol=0, atol=1e-4)
    moe = ref.config.num_hidden_layers  # every layer of this model is MoE
    resident = gpu_on["prefill_resident_layers"]
    assert 0 < resident == gpu_on["decode_resident_layers"] and resident == (moe if prefill == "persistent" else moe // 2)
    assert gpu_off["decode_resident_layers"] == 0
    # one pool request per decode step and non-resident layer (the first token comes from the prefill)
    assert calls_off == (NEW - 1) * moe
    assert calls_on == (NEW - 1) * (moe - resident)


def test_hcs_hybrid_runs_the_layers_it_holds_whole_as_resident(model, tmp_path):
    """hcs.hottest completes whole layers where that saves more pool time than scattered experts
    (even counts, as a balanced router's over a long text: a whole layer first), and hcs_hybrid then
    never asks the pool for them: the same tokens, a pool request per step for each other layer."""
    import json
    import shutil

    ref = tm.fake_quant_copy(model, tmp_path / "ref", 4, 16, GROUP)
    want = tm.reference_greedy(ref, PROMPT, NEW)
    moe, num = ref.config.num_hidden_layers, ref.config.num_experts
    got = {}
    for resident in ("on", "off"):
        m = shutil.copytree(model, tmp_path / resident)
        # the counts an earlier run saved: the hot set is built from them as the workers start
        (m / ".krasis_cache").mkdir(exist_ok=True)
        (m / ".krasis_cache" / "hcs_counts.json").write_text(json.dumps({"layers": {str(i): [100] * num for i in range(moe)}}))
        got[resident] = _run(m, "layer_grouped_2", "hcs_hybrid", resident)
    (on, _, gpu_on, calls_on), (off, _, gpu_off, calls_off) = got["on"], got["off"]
    assert on == want and off == want
    # the CPU plan holds half the experts hot: one whole layer of three, and half a layer's more
    # (built from the saved counts as the worker starts, so its startup report says so)
    assert gpu_on["prefill_resident_layers"] == 0 and gpu_on["decode_resident_layers"] == 1
    assert gpu_on["hot_experts"] == moe * num // 2
    assert gpu_off["decode_resident_layers"] == 0
    assert calls_off == (NEW - 1) * moe and calls_on == (NEW - 1) * (moe - 1)


def test_a_hot_set_built_while_serving_is_reported(tmp_path):
    """With no counts saved, hcs_hybrid's hot set is built from the first prompt's (at the first
    decode step): the worker reports it then (worker_info), and the stats show it, not the empty
    set of its start-up report."""
    fresh = tm.build(tmp_path / "fresh", "qwen3", **tm.QWEN3_CONFIGS["qwen3-base"])
    with tm.Service(fresh, "--dtype", "float32", "--devices", "cpu", "--cpu-workers", "1", "--cpu-bits", "4",
                    "--gpu-bits", "4", "--group-size", str(GROUP), "--prefill-strategy", "layer_grouped_2",
                    "--decode-strategy", "hcs_hybrid", "--resident-decode", "on") as svc:
        (before,) = [w for w in svc.client.stats().stats["workers"] if w["role"] == "gpu"]
        *_, stats = svc.greedy(PROMPT, NEW)
    (after,) = [w for w in stats["workers"] if w["role"] == "gpu"]
    assert before["hot_experts"] == 0 and before["decode_resident_layers"] == 0
    assert after["hot_experts"] > 0
    assert after["prefill_strategy"] == "layer_grouped_2"  # the rest of the start-up report is kept


def test_the_guess_is_the_next_pool_layers_route_of_this_layers_input(monkeypatch):
    """DecodeStrategy.guess: after a layer's work is posted to the pool, the next MoE layer the pool
    will be asked for (resident ones skipped) routes this layer's x, and its ids are posted as the
    pool's guess; after the stage's last pool layer, or with KRASIS_POOL_GUESS=0, nothing is."""
    from krasis.gpu_worker import decode_strategies

    posted = []

    class Pool:
        def submit(self, layer, x, ids, weights):
            pass

        def guess(self, layer, ids):
            posted.append((layer, ids.tolist()))

    s = decode_strategies.PureCpu(Pool(), None, None, "silu")
    s.routes = {i: (lambda x, i=i: (x.long() + i, None)) for i in (2, 3, 5, 7)}
    s.resident = {5: []}
    x = torch.tensor([[1, 2]])
    for layer in (2, 3, 7):
        s.submit(layer, x, None, None)
    assert posted == [(3, [[4, 5]]), (7, [[8, 9]])]  # 5 is the device's own: 3's guess is for 7
    monkeypatch.setattr(decode_strategies, "POOL_GUESS", False)
    s.submit(2, x, None, None)
    assert len(posted) == 2
