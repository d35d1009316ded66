"""GGUF blocks into our layout (coordinator/gguf_blocks.py) against the float path: gguf's own
dequantization, then shared/quant.py's quantize. Where a block is taken as it is, the result is
checked against gguf's dequantization directly (exact up to the scale's bf16 rounding, which the
reference applies to the block's own scale), and byte for byte against the float path on the
blocks where that path keeps the block (max |v| = qmax). Every other combination must match the
float path byte for byte. Then the converter, threaded, on a GGUF holding each type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from krasis.coordinator.gguf_blocks import convert, native  # noqa: E402
from krasis.shared.quant import dequantize_q, pack_int4, quantize, unpack_int4  # noqa: E402

T = gguf.GGMLQuantizationType
BYTES = {"Q4_0": 18, "Q8_0": 34, "MXFP4": 17}
N, ROWS, COLS = 3, 8, 256


def random_blocks(qtype: str, rng, n=N, rows=ROWS, cols=COLS) -> np.ndarray:
    """Valid blocks of every value the type has, fp16 scales spread over three octaves (and some
    subnormal), E8M0 exponents over the range real files use and the extremes."""
    nb = cols // 32
    blocks = rng.integers(0, 256, (n, rows, nb, BYTES[qtype]), dtype=np.uint8)
    if qtype == "MXFP4":
        e = rng.integers(100, 135, (n, rows, nb)).astype(np.uint8)
        e.flat[:3] = (0, 1, 250)
        blocks[..., 0] = e
    else:
        d = (rng.uniform(1, 8, (n, rows, nb)) * 2.0 ** -10).astype(np.float16)
        d.flat[:2] = (np.float16(3 * 2**-24), 0)
        blocks[..., :2] = d[..., None].view(np.uint8)
    return blocks.reshape(n, rows, nb * BYTES[qtype])


def float_path(raw: np.ndarray, qtype: str, bits: int, group: int):
    w = torch.from_numpy(gguf.quants.dequantize(raw, getattr(T, qtype)).reshape(N, ROWS, COLS).astype(np.float32))
    q, s = quantize(w, bits, group)
    return (pack_int4(q) if bits == 4 else q), s


def stored_values(q, s, bits):
    return dequantize_q(unpack_int4(q) if bits == 4 else q, s)


def with_bf16_scales(raw: np.ndarray, qtype: str) -> np.ndarray:
    """The blocks with each fp16 scale replaced by its bf16 rounding (what our scale holds)."""
    if qtype == "MXFP4":
        return raw
    blocks = raw.reshape(*raw.shape[:-1], -1, BYTES[qtype]).copy()
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32))
    blocks[..., :2] = d.to(torch.bfloat16).float().numpy().astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(raw.shape)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "MXFP4"])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (4, 128), (8, 64)])
def test_blocks_match_the_float_path(qtype, bits, group):
    raw = random_blocks(qtype, np.random.default_rng(bits * group))
    q, s = convert(raw, qtype, bits, group, ROWS, COLS)
    ref_q, ref_s = float_path(raw, qtype, bits, group)
    assert q.dtype == ref_q.dtype and s.dtype == ref_s.dtype == torch.bfloat16
    assert q.shape == ref_q.shape and s.shape == ref_s.shape
    if not native(qtype, bits, group):
        assert torch.equal(q, ref_q) and torch.equal(s.view(torch.int16), ref_s.view(torch.int16))
        return
    # taken as it is: exactly gguf's weights with the scale in bf16 ...
    exact = gguf.quants.dequantize(with_bf16_scales(raw, qtype), getattr(T, qtype)).reshape(N, ROWS, COLS)
    assert torch.equal(stored_values(q, s, bits), torch.from_numpy(exact.astype(np.float32)))
    # ... and the float path's bytes on the groups that path keeps (max |v| = qmax)
    qmax = 7 if bits == 4 else 127
    v = stored_values(q, torch.ones_like(s), bits).reshape(N, ROWS, -1, 32)
    keep = v.abs().amax(-1) == qmax
    # Q4_0 into INT8 and MXFP4 have no such groups: their v stop at 8 and 12, far below 127
    assert keep.any() == ((qtype, bits) in {("Q4_0", 4), ("Q8_0", 8)})
    ref_v = stored_values(ref_q, torch.ones_like(ref_s), bits).reshape(N, ROWS, -1, 32)
    assert torch.equal(v[keep], ref_v[keep]) and torch.equal(s[keep], ref_s[keep])
    if qtype == "Q4_0":  # and the float path loses what native keeps where the block holds -8
        held = (v == -8).any(-1)
        assert held.any() and not torch.equal(v[held], ref_v[held])


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 128)])
def test_float_tensors_match_the_float_path(qtype, bits, group):
    """GGUF's unquantized types take quant_kernel.py's one pass: the float path's bytes exactly."""
    w = (np.random.default_rng(bits + group).standard_normal((N, ROWS, COLS)) * 0.02).astype(np.float32)
    w[0, 0, :group] = 0
    raw = gguf.quants.quantize(w, getattr(T, qtype))
    q, s = convert(raw, qtype, bits, group, ROWS, COLS)
    ref_q, ref_s = float_path(raw, qtype, bits, group)
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and s.shape == ref_s.shape
    assert torch.equal(q, ref_q) and torch.equal(s.view(torch.int16), ref_s.view(torch.int16))


def test_q8_0_from_llama_cpp_quantizer_is_the_float_path():
    """Q8_0 as llama.cpp writes it puts +-127 in every block, so taking its blocks as they are gives
    the float path's bytes exactly."""
    w = np.random.default_rng(0).standard_normal((N, ROWS, COLS)).astype(np.float32)
    raw = gguf.quants.quantize(w, T.Q8_0)
    q, s = convert(raw, "Q8_0", 8, 32, ROWS, COLS)
    ref_q, ref_s = float_path(raw, "Q8_0", 8, 32)
    assert torch.equal(q, ref_q) and torch.equal(s.view(torch.int16), ref_s.view(torch.int16))


def test_q4_0_kernel_matches_its_reference():
    from krasis.coordinator.gguf_blocks import _fp16_to_bf16, _q4_0_split, _q4_0_split_reference

    blocks = random_blocks("Q4_0", np.random.default_rng(5)).reshape(-1, 18)
    got = np.empty((len(blocks), 16), np.uint8), np.empty(len(blocks), np.uint16)
    ref = np.empty((len(blocks), 16), np.uint8), np.empty(len(blocks), np.uint16)
    _q4_0_split(blocks, _fp16_to_bf16(), *got)
    _q4_0_split_reference(blocks, _fp16_to_bf16(), *ref)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_mxfp4_int4_table_is_the_float_path():
    """MXFP4 into INT4 at group 32 by table against the float path (_requantized), block for block:
    every exponent, every largest magnitude with either sign, zero groups (+0 and -0 codes). The
    table alone holds exactly on _MXFP4_TABLE_E (outside it amax / 7 is subnormal or 12 * d
    overflows, and it does not), and _mxfp4_int4 with its float fallback holds everywhere."""
    from krasis.coordinator.gguf_blocks import _MXFP4_TABLE_E, _mxfp4_int4, _mxfp4_int4_kernel, _mxfp4_int4_tables, _requantized

    rng = np.random.default_rng(7)
    per = 24  # blocks for each (exponent, largest magnitude)
    e = np.repeat(np.arange(256), 8 * per)
    m = np.tile(np.repeat(np.arange(8), per), 256)[:, None]
    codes = rng.integers(0, 16, (len(e), 32))
    codes = codes % 8 % (m + 1) + codes // 8 * 8  # magnitudes up to m, either sign
    codes[np.arange(len(e)), rng.integers(0, 32, len(e))] = m[:, 0] + 8 * rng.integers(0, 2, len(e))  # m itself, once at least
    blocks = np.empty((len(e), 17), np.uint8)
    blocks[:, 0], blocks[:, 1:] = e, codes[:, :16] | (codes[:, 16:] << 4)

    ref_q, ref_s = _requantized(blocks, "MXFP4", 32, 32, 4)  # packed as pack_int4 does (tests/test_quant.py)
    ref_s = ref_s[:, 0]
    q, s = np.empty((len(e), 16), np.uint8), np.empty(len(e), np.uint16)
    _mxfp4_int4_kernel(blocks, *_mxfp4_int4_tables(), q, s)
    same = (q == ref_q).all(1) & (s == ref_s)
    lo, hi = _MXFP4_TABLE_E
    assert sorted(set(e[~same].tolist())) == [*range(lo), *range(hi + 1, 256)]
    _mxfp4_int4(blocks, q, s)
    assert np.array_equal(q, ref_q) and np.array_equal(s, ref_s)


# --- the converter ---------------------------------------------------------------------------------

MIXED = {"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q8_0", "ffn_down_exps": "MXFP4", "ffn_gate_inp": "F32", "": "F16"}


def _gguf(tmp_path, family: str, over: dict, plan: dict):
    import test_gguf as tg
    import tiny_models as tm

    model = tm.random_model(family, **over)
    path = tmp_path / f"{family}.gguf"
    tg.WRITERS[family](path, model.config, tg.numpy_state(model), plan)
    return path


def _caches(path, tmp_path, group: int, threads: int, monkeypatch):
    """The INT4 and INT8 expert caches `prepare` builds from `path` on `threads` threads."""
    from krasis.coordinator import convert as cv
    from krasis.coordinator.processes import RuntimeOptions
    from krasis.shared.weight_cache import WeightCache
    from krasis.shared.weights import load_family

    monkeypatch.setattr(cv, "conversion_threads", lambda: threads)
    fam = load_family(path)
    caches = cv.prepare(path, fam, RuntimeOptions(cpu_bits=4, gpu_bits=8, group_size=group, cache_dir=str(tmp_path / f"c{group}"),
                                                 dtype="float32"), log=lambda m: None)
    return fam, {bits: WeightCache(p) for bits, p in ((4, caches.cpu), (8, caches.gpu))}


@pytest.mark.parametrize("family,over", [("qwen3", {}), ("gpt_oss", {})])
def test_threaded_conversion_is_the_float_path_where_blocks_are_requantized(family, over, tmp_path, monkeypatch):
    """Group 64: every block is re-quantized, so each expert in both caches (built on three threads,
    finishing in any order) is exactly format_expert's from the checkpoint, biases included (gpt-oss):
    the stacked tensors are read in the orientation the families read them."""
    import test_gguf as tg

    from krasis.coordinator.convert import expert_format
    from krasis.shared.expert_store import format_expert
    from krasis.shared.weights import open_source

    over = {"qwen3": tg.QWEN3, "gpt_oss": tg.GPT_OSS}[family] | over
    path = _gguf(tmp_path, family, over, MIXED)
    fam, caches = _caches(path, tmp_path, 64, 3, monkeypatch)
    src = open_source(path)
    for bits, cache in caches.items():
        fmt = expert_format(bits, torch.float32, 64)
        for layer in range(fam.num_layers):
            for e in range(fam.experts(layer).num):
                for name, t in format_expert(fmt, fam, src.get, layer, e).items():
                    assert torch.equal(cache.tensor(f"{layer}.{e}.{name}").view(torch.uint8), t.view(torch.uint8)), (bits, layer, e, name)


def test_converted_blocks_are_gguf_weights_at_group_32(tmp_path, monkeypatch):
    """Group 32: INT8 takes all three types as they are, INT4 takes Q4_0's and re-quantizes the
    others: the cache's weights are gguf's with bf16 scales where taken, else format_expert's bytes."""
    import test_gguf as tg

    from krasis.coordinator.convert import expert_format
    from krasis.shared.expert_store import format_expert
    from krasis.shared.quant import dequantize
    from krasis.shared.weights import open_source

    path = _gguf(tmp_path, "qwen3", tg.QWEN3, MIXED)
    fam, caches = _caches(path, tmp_path, 32, 2, monkeypatch)
    src = open_source(path)
    es = fam.experts(0)
    for bits, cache in caches.items():
        fmt = expert_format(bits, torch.float32, 32)
        for layer in range(fam.num_layers):
            for e in range(es.num):
                got = {n: cache.tensor(f"{layer}.{e}.{n}")[None] for n in ("w13.q", "w13.s", "w2.q", "w2.s")}
                ref = {n: t[None] for n, t in format_expert(fmt, fam, src.get, layer, e).items()}
                w13, w2 = dequantize(fmt, got, "w13", 0), dequantize(fmt, got, "w2", 0)
                for p, w, rows in (("gate", w13[:es.inter], slice(0, es.inter)), ("up", w13[es.inter:], slice(es.inter, None)),
                                   ("down", w2, slice(None))):
                    data, qtype = src.routed_experts(layer, p)
                    if native(qtype, bits, 32):
                        raw = np.asarray(data[e])
                        n_rows = raw.shape[0]
                        exact = gguf.quants.dequantize(with_bf16_scales(raw, qtype), getattr(T, qtype)).reshape(n_rows, -1)
                        assert torch.equal(w, torch.from_numpy(exact.astype(np.float32))), (bits, layer, e, p)
                    else:
                        name = "w2" if p == "down" else "w13"
                        assert torch.equal(got[f"{name}.q"][0][rows], ref[f"{name}.q"][0][rows]), (bits, layer, e, p)
                        assert torch.equal(got[f"{name}.s"][0][rows], ref[f"{name}.s"][0][rows]), (bits, layer, e, p)

