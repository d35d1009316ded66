"""A prefill step runs whole prompts layer by layer (gpu_worker/stage.py): every chunk goes through a
layer before the next, so a streamed layer's experts are copied once per step however many chunks
the prompts make, and the result is the one-chunk result. In process, on the CPU device, where the
copy engine does plain copies that can be counted."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from torch.utils._python_dispatch import TorchDispatchMode

from krasis.gpu_worker import moe_gpu
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


def _stage(path, prefill: str, chunk: int, dtype=torch.float32, fmt: ExpertFormat | None = None):
    family = load_family(path)
    layout = StoreLayout(family, 1, fmt or ExpertFormat("dense", dtype))
    store = ExpertStore(layout, ExpertStore.create_segments(layout))
    source = open_source(path)
    fill_node(store, 0, from_source(layout.fmt, family, source.get))
    spec = {"layers": [0, family.num_layers], "rank": 0, "world": 1, "prefill_strategy": prefill,
            "decode_strategy": "pure_cpu", "prefill_chunk": chunk, "max_context": 64}
    experts = StageExperts(spec, family, store, torch.device("cpu"), dtype, None)
    get = lambda name: source.get(name).to(dtype)  # noqa: E731
    stage = Stage(family, get, (0, family.num_layers), True, True, torch.device("cpu"), dtype, 64, "bf16", chunk)
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


# Operators that make the host wait for a CUDA device (they read a device value back): one in the
# prefill loop stalls the GPU at every layer and chunk while the host catches up.
SYNCING = {"bincount", "_local_scalar_dense", "nonzero", "nonzero_numpy", "_unique2", "unique_consecutive",
           "unique_dim", "masked_select", "equal", "is_nonzero", "repeat_interleave"}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            name = "index with a boolean mask"  # a nonzero inside
        self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_prefill_moe_never_waits_for_the_device(model, monkeypatch):
    """A prefill step's routing and routed experts (what the stage asks of the strategy per layer and
    chunk) dispatch no operator that reads a device value back. Recorded on the CPU device in
    bfloat16, through the grouped GEMM that CUDA takes (torch._grouped_mm runs on CPU too)."""
    monkeypatch.setattr(moe_gpu, "_grouped_ok", lambda x: x.dtype == torch.bfloat16)
    family, layout, stage = _stage(model, "layer_grouped_2", chunk=8, dtype=torch.bfloat16)
    rec = _Record()

    def recorded(f):
        def call(*a, **k):
            with rec:
                return f(*a, **k)
        return call

    runner = stage.experts.prefill
    for name in ("layer_begin", "run", "layer_end"):
        monkeypatch.setattr(runner, name, recorded(getattr(runner, name)))
    for layer in stage.layers:
        if layer.is_moe:
            monkeypatch.setattr(layer, "route", recorded(layer.route))
    # chunks of 8 tokens choose 16 (token, slot) pairs of 8 experts: the every-pair path of a prompt chunk
    tokens = torch.tensor(PROMPTS[0][:16] + PROMPTS[1][:8])
    slices = [SeqSlice(seq=0, start=0, n=16, logits="last"), SeqSlice(seq=1, start=0, n=8, logits="last")]
    stage.launch(tokens, slices, decode=False)
    assert "_grouped_mm" in rec.seen and "sort" in rec.seen  # the recorder saw the grouped path
    assert not SYNCING & set(rec.seen), sorted(SYNCING & set(rec.seen))


@pytest.mark.parametrize("prefill", ["layer_grouped_2", "persistent", "active_only"])
def test_quantized_experts_dequantized_once_per_layer_and_step(model, prefill, monkeypatch):
    """INT4 experts: a step of several chunks dequantizes each layer's experts once, for all its
    chunks (strategies whose blocks hold whole layers), and gives the logits of one chunk."""
    from krasis.gpu_worker import prefill_strategies

    calls = []
    real = prefill_strategies.dequantized
    monkeypatch.setattr(prefill_strategies, "dequantized", lambda *a: (calls.append(1), real(*a))[1])
    fmt = ExpertFormat("int4", torch.float32, 16)
    tokens = torch.tensor([t for p in PROMPTS for t in p])
    slices = lambda: [SeqSlice(seq=i, start=0, n=len(p), logits="all") for i, p in enumerate(PROMPTS)]  # noqa: E731
    family, layout, one = _stage(model, prefill, chunk=64, fmt=fmt)
    want = one.launch(tokens, slices(), decode=False).out["logits"]
    assert not calls  # one chunk: nothing to keep
    _, _, chunked = _stage(model, prefill, chunk=4, fmt=fmt)
    got = chunked.launch(tokens, slices(), decode=False).out["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # once per MoE layer (one block each), and never for a strategy whose blocks hold some experts only
    assert len(calls) == (0 if prefill == "active_only" else len(layout.moe_layers))
    # where the VRAM plan has no room for it, per chunk as before: the same logits
    chunked.experts.prefill.dequant_once = False
    calls.clear()
    torch.testing.assert_close(chunked.launch(tokens, [SeqSlice(seq=i + 9, start=0, n=len(p), logits="all")
                                                       for i, p in enumerate(PROMPTS)], decode=False).out["logits"],
                               want, rtol=1e-4, atol=1e-4)
    assert not calls
