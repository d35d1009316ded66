"""Decode attention on the cache as stored (gpu_worker/decode_attention.py): the Triton kernel
against its torch reference under Triton's interpreter (TRITON_INTERPRET, set before triton is
first imported: the check runs in a fresh interpreter, as tests/test_dequant.py does), the reference
against layers.attend on the dequantized rows that KVCache.update returns, KVCache.attend's two
paths against each other, and DeepSeek's absorbed MLA decode against the up-projected form."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm

from krasis.gpu_worker.cache_rows import Rows
from krasis.gpu_worker.decode_attention import decode_attention_reference
from krasis.gpu_worker.kv_cache import KVCache, decode_shaped, fp8_quantize
from krasis.shared.models.layers import attend
from krasis.shared.protocol import SeqSlice

CHECK = r"""
import torch
import triton.language as tl
from triton.runtime import interpreter

# The interpreter multiplies bfloat16 dot operands as their raw uint16 bits; the product of two
# bfloat16 values is exact in float32, which CUDA's tensor cores accumulate in.
_dot = interpreter.InterpreterBuilder.create_dot
def _create_dot(self, a, b, *rest):
    a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
    return _dot(self, a, b, *rest)
interpreter.InterpreterBuilder.create_dot = _create_dot

from krasis.gpu_worker.cache_rows import Rows
from krasis.gpu_worker.decode_attention import decode_attention_reference
from krasis.gpu_worker.decode_attention_kernel import decode_attention_batch
from krasis.gpu_worker.kv_cache import fp8_quantize

g = torch.Generator().manual_seed(0)

def rows(x, fp8, dtype):
    return Rows(*fp8_quantize(x)) if fp8 else Rows(x.to(dtype))

def check(name, q, k, v, start, window=None, sinks=None, splits=None, tiles=None):
    want = decode_attention_reference(q, k, v, start, 0.3, window, sinks)
    got = decode_attention_batch(q, [k], [v], [start], 0.3, window, sinks, splits=splits, tiles=tiles)
    assert got.dtype == q.dtype and got.shape == want.shape, (name, got.shape, want.shape)
    # bfloat16: p and the dequantized values enter the products in bfloat16 (the interpreter's
    # float32 -> bfloat16 cast truncates), and the output is rounded once more
    tol = 1e-5 if q.dtype == torch.float32 else 3e-2
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert err < tol, (name, err)

# GQA: key head dim 32 (blocks of 64 keys), T = 150 (not a multiple of the block), 2 key heads
for dtype in (torch.bfloat16, torch.float32):
    for fp8 in (False, True):
        for rep, t, window, sink, splits in ((1, 1, None, False, None), (4, 1, 7, True, 2), (8, 3, None, True, 3),
                                             (4, 3, 127, False, 3), (8, 1, None, False, 2)):
            T, Hkv, d = 150, 2, 32
            q = torch.randn(t, Hkv * rep, d, generator=g).to(dtype)
            k, v = (rows(torch.randn(T, Hkv, d, generator=g), fp8, dtype) for _ in range(2))
            sinks = torch.randn(Hkv * rep, generator=g).to(dtype) if sink else None
            check((dtype, fp8, rep, t, window, sink, splits), q, [k], v, T - t, window, sinks, splits)

# other tiles than _tiles' (device_check times them): keys per block and warps
for tiles in ((16, 2, None), (128, 8, None)):
    q = torch.randn(3, 8, 32, generator=g)
    k, v = (rows(torch.randn(150, 2, 32, generator=g), True, torch.float32) for _ in range(2))
    check(("tiles", tiles), q, [k], v, 147, 60, None, 3, tiles)

# more splits than the combine takes per load (32 for dv = 128), the last one partly past the end
for dtype in (torch.bfloat16, torch.float32):
    T, d = 2200, 128
    q = torch.randn(1, 2, d, generator=g).to(dtype)
    k, v = (rows(torch.randn(T, 1, d, generator=g), True, dtype) for _ in range(2))
    check(("many splits", dtype), q, [k], v, T - 1, None, torch.randn(2, generator=g).to(dtype), splits=35)

# MLA: K = [latent (40) ; rope key (8)], V the latent itself, one key head; 3 queries of 8 heads
# are 24 rows, two head blocks. Each part has its own fp8 scales.
for dtype in (torch.bfloat16, torch.float32):
    for fp8 in (False, True):
        T, t = 70, 3
        c, kr = rows(torch.randn(T, 1, 40, generator=g), fp8, dtype), rows(torch.randn(T, 1, 8, generator=g), fp8, dtype)
        q = torch.randn(t, 8, 48, generator=g).to(dtype)
        check(("mla", dtype, fp8), q, [c, kr], c, T - t, splits=2)

# V a view of the first columns of K's rows (dv < dk), shared scales
for fp8 in (False, True):
    k = rows(torch.randn(40, 2, 32, generator=g), fp8, torch.bfloat16)
    v = Rows(k.values[..., :16], k.scales)
    check(("prefix", fp8), torch.randn(1, 4, 32, generator=g).to(torch.bfloat16), [k], v, 39)
# A batch of sequences in one launch, each with its own cache (lengths 1, below one key block, and
# several blocks), against the reference per sequence: GQA with windows and sinks, MLA, fp8 and not.
def check_batch(name, q, ks, vs, starts, window=None, sinks=None, splits=None):
    t = q.shape[0] // len(ks)
    want = torch.cat([decode_attention_reference(q[b * t : (b + 1) * t], k, v, st, 0.3, window, sinks)
                      for b, (k, v, st) in enumerate(zip(ks, vs, starts))])
    got = decode_attention_batch(q, ks, vs, starts, 0.3, window, sinks, splits)
    tol = 1e-5 if q.dtype == torch.float32 else 3e-2
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert got.shape == want.shape and err < tol, (name, err)

for dtype in (torch.bfloat16, torch.float32):
    for fp8 in (False, True):
        for t, window, sink, splits in ((1, None, False, None), (1, 9, True, 3), (2, None, True, 2)):
            lengths = [1 + t - 1, 40, 150, 7]
            q = torch.randn(len(lengths) * t, 8, 32, generator=g).to(dtype)
            ks, vs = [], []
            for T in lengths:
                # caches of different capacities, each its own allocation, viewed up to its length
                k, v = (rows(torch.randn(T + 13, 2, 32, generator=g), fp8, dtype) for _ in range(2))
                ks.append([Rows(k.values[:T], None if k.scales is None else k.scales[:T])])
                vs.append(Rows(v.values[:T], None if v.scales is None else v.scales[:T]))
            check_batch(("batch", dtype, fp8, t, window, sink, splits), q, ks, vs, [T - t for T in lengths], window,
                        torch.randn(8, generator=g).to(dtype) if sink else None, splits)
        cs = [(rows(torch.randn(T, 1, 40, generator=g), fp8, dtype), rows(torch.randn(T, 1, 8, generator=g), fp8, dtype))
              for T in (5, 70, 33)]
        check_batch(("mla batch", dtype, fp8), torch.randn(3, 8, 48, generator=g).to(dtype), [[c, kr] for c, kr in cs],
                    [c for c, _ in cs], [4, 69, 32])
print("ok")
"""


def test_triton_decode_attention_matches_reference():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)


def _cached(x: torch.Tensor, fp8: bool) -> tuple[Rows, torch.Tensor]:
    """Rows as KVCache stores x, and the bfloat16 rows KVCache.update would return."""
    r = Rows(*fp8_quantize(x)) if fp8 else Rows(x.to(torch.bfloat16))
    return r, r.dense(torch.bfloat16)


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_attend_on_dequantized_rows(fp8):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 16, generator=g).to(torch.bfloat16)
    (k, K), (v, V) = (_cached(torch.randn(30, 2, 16, generator=g), fp8) for _ in range(2))
    sinks = torch.randn(8, generator=g)
    for window, s in ((None, None), (5, sinks)):
        got = decode_attention_reference(q, [k], v, 28, 0.25, window, s)
        want = attend(q, K, V, 28, 0.25, window, s)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # MLA: two key parts, values the first
    (c, C), (kr, KR) = _cached(torch.randn(30, 1, 24, generator=g), fp8), _cached(torch.randn(30, 1, 8, generator=g), fp8)
    q = torch.randn(1, 4, 32, generator=g).to(torch.bfloat16)
    got = decode_attention_reference(q, [c, kr], c, 29, 0.2)
    torch.testing.assert_close(got, attend(q, torch.cat([C, KR], dim=-1), C, 29, 0.2), atol=2e-2, rtol=2e-2)


def _decode_everywhere(monkeypatch):
    """KVCache.attend takes its decode path (decode_attention: the reference, on CPU) for steps whose
    slices have the same few new tokens."""
    monkeypatch.setattr(KVCache, "decode_kernel", lambda self, slices: decode_shaped(slices))


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_cache_attend_paths_agree(monkeypatch, kv_dtype):
    """The same steps through both of KVCache.attend's paths: a prompt chunk, then single tokens."""
    g = torch.Generator().manual_seed(2)
    steps = [(0, 9), (9, 1), (10, 1), (11, 3)]
    gqa = [(torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g))
           for _, n in steps]
    mla = [(torch.randn(n, 4, 24, generator=g), torch.randn(n, 1, 16, generator=g), torch.randn(n, 1, 8, generator=g))
           for _, n in steps]

    def run():
        """Two sequences: the second joins at the second step, so a step also holds two slices
        (their rows one after another)."""
        kv, out = KVCache(torch.device("cpu"), torch.float32, 64, kv_dtype), []
        for i, ((start, n), (q, k, v), (ql, c, kr)) in enumerate(zip(steps, gqa, mla)):
            slices = [SeqSlice(seq=0, start=start, n=n)]
            if i > 0:  # sequence 1 replays sequence 0's steps one step behind
                (start1, n1), (q1, k1, v1), (ql1, c1, kr1) = steps[i - 1], gqa[i - 1], mla[i - 1]
                slices.append(SeqSlice(seq=1, start=start1, n=n1))
                q, k, v = torch.cat([q, q1]), torch.cat([k, k1]), torch.cat([v, v1])
                ql, c, kr = torch.cat([ql, ql1]), torch.cat([c, c1]), torch.cat([kr, kr1])
            out.append(kv.attend(0, slices, q, k, v, scale=0.25, window=6, sinks=torch.ones(4)))
            out.append(kv.attend(1, slices, ql, c, kr, scale=0.2, keys=(0, 1), values=0))
        return out

    prompt_path = run()
    _decode_everywhere(monkeypatch)
    for got, want in zip(run(), prompt_path):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CACHE_CHECK = tm.E4M3_RNE + r"""
import torch

from krasis.gpu_worker import cache_rows
from krasis.gpu_worker.kv_cache import KVCache
from krasis.shared.protocol import SeqSlice

def run(kernels, kv_dtype, prepared=False):
    # Three sequences (9, 5 and 70 prompt tokens: 70 is more than a key block) in one prompt step,
    # then three decode steps of all three: with the kernels, each layer's appends and attention
    # are one launch each for the three (`prepared`: from the table begin_step copied for the whole
    # step, as the stage runs them; else one per layer); without, layers.attend per sequence.
    cache_rows.kernels_on = lambda device: kernels
    g = torch.Generator().manual_seed(4)
    kv, out = KVCache(torch.device("cpu"), torch.float32, 128, kv_dtype), []
    lengths = [9, 5, 70]
    for step in range(4):
        slices = [SeqSlice(seq=i, start=0 if step == 0 else n + step - 1, n=n if step == 0 else 1) for i, n in enumerate(lengths)]
        m = sum(s.n for s in slices)
        if prepared:
            kv.begin_step(slices if step else None)
        q, k, v = torch.randn(m, 4, 16, generator=g), torch.randn(m, 2, 16, generator=g), torch.randn(m, 2, 16, generator=g)
        ql, c, kr = torch.randn(m, 4, 24, generator=g), torch.randn(m, 1, 16, generator=g), torch.randn(m, 1, 8, generator=g)
        out.append(kv.attend(0, slices, q, k, v, scale=0.25, window=6, sinks=torch.ones(4)))
        out.append(kv.attend(1, slices, ql, c, kr, scale=0.2, keys=(0, 1), values=0))
    return out

for kv_dtype in (None, "fp8"):
    want = run(False, kv_dtype)
    for prepared in (False, True):
        for got, w in zip(run(True, kv_dtype, prepared), want):
            torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_cache_decode_kernels_match_the_prompt_path():
    """KVCache.attend's decode path as CUDA runs it (a step's appends, then its attention, one Triton
    launch each for every sequence), under Triton's interpreter, against its prompt path."""
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CACHE_CHECK)


LAYER_CHECK = tm.E4M3_RNE + r"""
import torch

from krasis.gpu_worker import cache_rows
from krasis.gpu_worker.kv_cache import KVCache
from krasis.shared.protocol import SeqSlice
from krasis.shared.weights import load_family, open_source

def run(path, kernels, kv_dtype):
    # Every attention layer of the model, as a stage runs it: a prompt step of three sequences,
    # then decode steps of all three, each prepared by begin_step (as Stage.launch does).
    cache_rows.kernels_on = lambda device: kernels
    fam, src = load_family(path), open_source(path)
    layers = [fam.make_layer(i, lambda n: src.get(n).float()) for i in range(fam.num_layers)]
    g = torch.Generator().manual_seed(5)
    kv, out, lengths = KVCache(torch.device("cpu"), torch.float32, 96, kv_dtype), [], [11, 3, 70]
    for step in range(4):
        slices = [SeqSlice(seq=i, start=0 if step == 0 else n + step - 1, n=n if step == 0 else 1) for i, n in enumerate(lengths)]
        kv.begin_step(slices if step else None)
        positions = torch.cat([torch.arange(s.start, s.start + s.n) for s in slices])
        x = torch.randn(sum(s.n for s in slices), fam.hidden_size, generator=g)
        out += [layer.attention(x, slices, positions, kv) for layer in layers]
    return out

for path in PATHS:
    for kv_dtype in (None, "fp8"):
        for got, want in zip(run(path, True, kv_dtype), run(path, False, kv_dtype)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_models_decode_through_the_kernels(tmp_path):
    """Qwen3's GQA, GPT-OSS's windows and sinks and DeepSeek's absorbed MLA: every attention layer's
    decode steps through the Triton kernels (under Triton's interpreter) against the prompt path."""
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    paths = [str(tm.build(tmp_path / fam, fam, seed=6)) for fam in ("qwen3", "gpt_oss", "deepseek")]
    tm.run_interpreted(f"PATHS = {paths!r}\n" + LAYER_CHECK)


def _deepseek_layer(kv_b_int8: bool):
    from krasis.shared.models.deepseek_v2 import DeepseekV2
    from krasis.shared.quant import QuantLinear

    cfg = dict(hidden_size=64, vocab_size=160, num_hidden_layers=1, num_attention_heads=4, kv_lora_rank=32,
               q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96,
               first_k_dense_replace=1)
    fam = DeepseekV2(cfg)
    g = torch.Generator().manual_seed(3)
    weights = {n: torch.randn(shape, generator=g) * 0.2 for n, shape in fam.layer_tensors(0).items()}

    def get(name):
        if kv_b_int8 and name.endswith("kv_b_proj.weight"):
            return QuantLinear.quantize(weights[name])
        return weights[name]

    return fam.make_layer(0, get)


@pytest.mark.parametrize("kv_b_int8", [False, True])
def test_absorbed_mla_decode_matches_expanded(monkeypatch, kv_b_int8):
    """DeepSeek decode in the latent space equals the up-projected form: a step holding one
    sequence's prompt and another's decode token, then decode steps of both."""
    layer = _deepseek_layer(kv_b_int8)
    g = torch.Generator().manual_seed(4)
    steps = [[SeqSlice(0, 0, 7)], [SeqSlice(0, 7, 1), SeqSlice(1, 0, 20)], [SeqSlice(0, 8, 1), SeqSlice(1, 20, 1)]]
    xs = [torch.randn(sum(s.n for s in sl), 64, generator=g) for sl in steps]

    def run():
        kv = KVCache(torch.device("cpu"), torch.float32, 64)
        out = []
        for slices, x in zip(steps, xs):
            positions = torch.cat([torch.arange(s.start, s.start + s.n) for s in slices])
            out.append(layer.attention(x, slices, positions, kv))
        return out

    expanded = run()
    _decode_everywhere(monkeypatch)
    for got, want in zip(run(), expanded):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
