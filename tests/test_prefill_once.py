"""A prefill step runs whole prompts layer by layer (gpu_worker/stage.py): every chunk goes through a
layer before the next, so a streamed layer's experts are copied once per step however many chunks
the prompts make, and the result is the one-chunk result. In process, on the CPU device, where the
copy engine does plain copies that can be counted."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from krasis.gpu_worker.dma import CopyEngine
from krasis.gpu_worker.experts import StageExperts
from krasis.gpu_worker.stage import Stage
from krasis.gpu_worker.vram_budget import layer_expert_bytes
from krasis.shared.expert_store import ExpertFormat, ExpertStore, StoreLayout, fill_node, from_source
from krasis.shared.models.layers import split_slices
from krasis.shared.protocol import SeqSlice
from krasis.shared.weights import load_family, open_source

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 2, 71, 82, 81, 7, 44, 19, 5, 60, 33, 21, 8, 90, 11, 4],
           [17, 29, 31, 6, 77, 50, 12, 40, 9]]


def test_split_slices_cuts_every_chunk_rows():
    slices = [SeqSlice(seq=0, start=0, n=7, logits="sample"), SeqSlice(seq=1, start=3, n=4, logits="all"),
              SeqSlice(seq=2, start=0, n=2, logits="last")]
    chunks = split_slices(slices, 5)
    assert [r for _, r in chunks] == [(0, 5), (5, 10), (10, 13)]
    pieces = [(s.seq, s.start, s.n, s.logits) for sub, _ in chunks for s in sub]
    assert pieces == [(0, 0, 5, "none"), (0, 5, 2, "sample"), (1, 3, 3, "all"), (1, 6, 1, "all"), (2, 0, 2, "last")]
    for sub, (a, b) in chunks:
        assert sum(s.n for s in sub) == b - a
    assert split_slices(slices, 100) == [(slices, (0, 13))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # six MoE layers: three resident under layer_grouped, three streamed in more groups than slots
    return tm.build(tmp_path_factory.mktemp("prefill-once") / "m", "qwen3", num_hidden_layers=6)


def _stage(path, prefill: str, chunk: int):
    family = load_family(path)
    layout = StoreLayout(family, 1, ExpertFormat("dense", torch.float32))
    store = ExpertStore(layout, ExpertStore.create_segments(layout))
    source = open_source(path)
    fill_node(store, 0, from_source(layout.fmt, family, source.get))
    spec = {"layers": [0, family.num_layers], "rank": 0, "world": 1, "prefill_strategy": prefill,
            "decode_strategy": "pure_cpu", "prefill_chunk": chunk, "max_context": 64}
    experts = StageExperts(spec, family, store, torch.device("cpu"), torch.float32, None)
    get = lambda name: source.get(name).to(torch.float32)  # noqa: E731
    stage = Stage(family, get, (0, family.num_layers), True, True, torch.device("cpu"), torch.float32, 64, "bf16", chunk)
    stage.attach(experts)
    return family, layout, stage


@pytest.mark.parametrize("prefill", ["layer_grouped_2", "chunked", "active_only"])
def test_each_expert_copied_once_per_step(model, prefill, monkeypatch):
    copied = []
    real = CopyEngine.copy
    monkeypatch.setattr(CopyEngine, "copy", lambda self, pairs, after=None: (
        copied.append(sum(src.numel() * src.element_size() for _, src in pairs)), real(self, pairs, after))[1])
    family, layout, stage = _stage(model, prefill, chunk=4)
    moe = layout.moe_layers
    per_layer = {i: layer_expert_bytes(layout, i) for i in moe}
    grouped = prefill.startswith("layer_grouped")
    resident = stage.experts.prefill.kept if grouped else {}
    # with no VRAM limit (a CPU device) layer_grouped keeps half the layers resident, copied at start
    assert len(resident) == (len(moe) // 2 if grouped else 0) == stage.experts.prefill.resident_layers()
    assert sum(copied) == sum(per_layer[i] for i in resident)
    ref = tm.reference_model(model)
    for step in range(2):
        copied.clear()
        slices = [SeqSlice(seq=2 * step + i, start=0, n=len(p), logits="all") for i, p in enumerate(PROMPTS)]
        tokens = torch.tensor([t for p in PROMPTS for t in p])
        logits = stage.launch(tokens, slices, decode=False).out["logits"]
        # 32 tokens in chunks of 4 (one prompt split across chunks): each streamed layer copied once,
        # and in a later step not even that where a staging slot still holds its group
        streamed = sum(b for i, b in per_layer.items() if i not in resident)
        if prefill == "active_only":  # the experts the step chose, each once: at most the whole layer
            assert 0 < sum(copied) <= streamed
            assert len(copied) == len(moe)
        else:
            assert streamed == stage.experts.prefill.streamed_bytes()
            assert sum(copied) == streamed if step == 0 else 0 < sum(copied) <= streamed
        # the same logits as transformers on each prompt alone
        want = torch.cat([tm.reference_logits(ref, p) for p in PROMPTS])
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
