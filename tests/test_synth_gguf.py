"""benchmarks/synth_gguf.py (the peer comparison's GGUF) and benchmarks/peer_llamacpp.py's table:
the GGUF is of synth's Qwen3-30B-A3B shape, krasis reads it as a whole model (config, every tensor's
shape, tokenizer), its expert blocks are valid, and its weights have the spread it promises."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import peer_llamacpp  # noqa: E402
from convert_speed import gguf_shape  # noqa: E402
from synth_gguf import QWEN3_30B_A3B, write_qwen3moe_gguf  # noqa: E402

TINY = dict(QWEN3_30B_A3B, layers=2, hidden=256, ffn=512, moe_inter=128, experts=8, heads=4, kv_heads=2, head_dim=64,
            vocab=320)


def test_shape_is_synths():
    from krasis.coordinator.synth import synth_config

    assert QWEN3_30B_A3B == gguf_shape(synth_config("qwen3-30b-a3b"))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "MXFP4"])
def test_krasis_reads_the_synthetic_gguf(qtype, tmp_path):
    from krasis.coordinator.tokenizer import TextCodec
    from krasis.shared.weights import load_family, open_source

    path = tmp_path / "m.gguf"
    write_qwen3moe_gguf(path, TINY, expert_type=qtype, dense_type="BF16" if qtype == "MXFP4" else "F16")
    fam = load_family(path)
    assert (fam.num_layers, fam.num_experts, fam.hidden_size, fam.experts(0).inter, fam.vocab_size) == (2, 8, 256, 128, 320)
    src = open_source(path)
    src.check(fam.expected_tensors())
    for p, fan_in in (("gate", 256), ("down", 128)):
        data, t = src.routed_experts(1, p)
        assert t == qtype
        w = gguf.quants.dequantize(np.asarray(data), getattr(gguf.GGMLQuantizationType, qtype))
        # within a factor sqrt(2) for MXFP4, whose scales are powers of two
        assert np.isfinite(w).all() and 0.7 < w.std() * math.sqrt(fan_in) < 1.42
        # zero-mean (uniformly random Q4_0 codes have a mean of half a scale step, 0.11 of their
        # spread: a rank-one part that collapsed the routing with depth; synth_gguf._blocks)
        assert abs(w.mean()) < 0.02 * w.std(), (qtype, p, w.mean() / w.std())
    q = src.get("model.layers.0.self_attn.q_proj.weight")
    assert 0.9 < q.std().item() * math.sqrt(256) < 1.1
    codec = TextCodec(path)
    assert codec.decode(codec.encode("the quick brown fox")) == "the quick brown fox"
    assert codec.special["eos_token"] == "<|im_end|>"


def test_peer_table_ratios(tmp_path):
    """The table pairs each of our figures with llama-bench's rows of the same test."""
    def rows(pp512, pp10k, tg):
        return [{"n_prompt": 512, "n_gen": 0, "avg_ts": pp512}, {"n_prompt": 10000, "n_gen": 0, "avg_ts": pp10k},
                {"n_prompt": 0, "n_gen": 64, "avg_ts": tg}]

    for name, result in (("llama_hybrid_ub4096", rows(600, 4000, 45)), ("llama_hybrid_ub16384", rows(500, 4400, 44)),
                         ("llama_vram", rows(9000, 13000, 300)), ("ours_p512", {"prefill_tok_s": 1800, "decode_tok_s": 90}),
                         ("ours_p10000", {"prefill_tok_s": 26400, "decode_tok_s": 80}),
                         ("ours_p65536", {"prefill_tok_s": 20000, "decode_tok_s": 60}),
                         ("ours_pool", {"decode_tok_s": 81, "decode_fraction": 0.79, "decode_floor_tok_s": 102.5})):
        (tmp_path / f"{name}.json").write_text(json.dumps({"date": "d", "device": "dev", "command": name, "result": result}))
    table = peer_llamacpp.table(tmp_path).splitlines()
    assert "| prefill 10000 tokens (tok/s) | hybrid -ub 4096 | 4,000.0 | 26,400.0 | 6.60x |" in table
    assert "| prefill 10000 tokens (tok/s) | hybrid best of 2 (hybrid_ub16384) | 4,400.0 | 26,400.0 | 6.00x |" in table
    assert "| prefill 512 tokens (tok/s) | hybrid best of 2 (hybrid_ub4096) | 600.0 | 1,800.0 | 3.00x |" in table
    assert "| decode 64 tokens (tok/s) | hybrid -ub 4096 | 45.0 | 90.0 | 2.00x |" in table
    assert "| prefill 65536 tokens (tok/s) | — | — | 20,000.0 | — |" in table  # a length llama-bench did not run
    # every layer through the pool against llama.cpp's experts on the CPU (issue 14, item 3)
    assert ("| decode, every layer's experts on the CPU (ours: `--resident-decode off`, 256 tokens, 79% of its run's "
            "DRAM floor of 102.5) | hybrid -ub 4096 | 45.0 | 81.0 | 1.80x |") in table
    assert sum(line.startswith("- `") for line in table) == 7
    # a call that ran llama.cpp at -ub 4096 alone does not call it the best of several
    for name in ("llama_hybrid_ub16384", "llama_vram"):
        (tmp_path / f"{name}.json").unlink()
    table = peer_llamacpp.table(tmp_path).splitlines()
    assert "| prefill 10000 tokens (tok/s) | hybrid best of 1 (hybrid_ub4096) | 4,000.0 | 26,400.0 | 6.60x |" in table
