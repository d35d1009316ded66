"""The peer comparison's pieces that run off the GPU machine: benchmarks/qwen3_gguf.py writes the
shape `synth` copies, in a file our GGUF reader serves (config, tokenizer, experts converted from
their blocks), and peer_llamacpp.py's table divides the right figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_llamacpp  # noqa: E402
import qwen3_gguf  # noqa: E402


def test_shape_is_synths_qwen3_30b_a3b():
    from krasis.coordinator.synth import synth_config

    cfg = synth_config("qwen3-30b-a3b")
    assert {k: cfg[k] for k in qwen3_gguf.SHAPE} == qwen3_gguf.SHAPE


def test_written_file_is_served_from_its_blocks(tmp_path):
    from krasis.coordinator.convert import expert_format
    from krasis.shared.expert_store import format_expert
    from krasis.shared.gguf_source import gguf_tokenizer
    from krasis.shared.quant import dequantize_q, unpack_int4
    from krasis.shared.weights import load_config, load_family, open_source

    shape = qwen3_gguf.SHAPE | dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, vocab_size=400, hidden_size=256,
                                    moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = tmp_path / "m.gguf"
    written = qwen3_gguf.write(path, shape, "Q4_0")
    assert written["bytes"] == path.stat().st_size
    cfg = load_config(path)
    assert {k: cfg[k] for k in shape if k in cfg} == pytest.approx({k: v for k, v in shape.items() if k in cfg})  # eps is f32
    fam, src = load_family(path), open_source(path)
    src.check(fam.expected_tensors())
    experts = sum(src._tensors[f"blk.{i}.ffn_{p}_exps.weight"].n_bytes for i in range(2) for p in ("gate", "up", "down"))
    assert written["expert_bytes"] == experts
    tok, special, template = gguf_tokenizer(path)
    assert tok.decode(tok.encode("the quick brown fox").ids) == "the quick brown fox"
    assert special["eos_token"] == "<|im_end|>" and "<|im_start|>" in template
    w = src.get("model.layers.1.mlp.experts.3.down_proj.weight")
    assert 0.015 < w.std() < 0.025  # the scales aim at trained weights' spread
    fast = src.quantized_experts(1, expert_format(4, torch.bfloat16, 32))  # Q4_0 blocks kept
    assert torch.allclose(dequantize_q(unpack_int4(fast["w2.q"][3]), fast["w2.s"][3]), w, rtol=2**-8, atol=0)
    fmt = expert_format(4, torch.bfloat16, 64)  # re-quantized: the float path's bytes
    fast = src.quantized_experts(1, fmt)
    for name, t in format_expert(fmt, fam, src.get, 1, 3).items():
        assert torch.equal(fast[name][3].view(torch.uint8), t.view(torch.uint8))


def test_report_divides_ours_by_llamas(tmp_path):
    def llama(kind, pp10k, tg):
        rows = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 600.0}, {"n_prompt": 10000, "n_gen": 0, "avg_ts": pp10k},
                {"n_prompt": 0, "n_gen": 64, "avg_ts": tg}]
        (tmp_path / f"llama_{kind}.json").write_text(json.dumps({"command": f"llama-bench {kind}", "results": rows}))

    llama("hybrid_ub4096", 4000.0, 40.0)
    llama("hybrid_best", 5000.0, 50.0)
    for p, pf in ((512, 1800.0), (10000, 30000.0)):
        res = {"prefill_tok_s": pf, "decode_tok_s": 75.0, "prefill_strategy": "persistent", "decode_strategy": "pure_cpu"}
        (tmp_path / f"ours_p{p}.json").write_text(json.dumps({"command": f"bench {p}", "wall_s": 1.0, "result": res}))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in peer_llamacpp.report(tmp_path).splitlines() if line.startswith("| ") and "tok" in line}
    assert rows["prefill, 10,000 tokens (tok/s)"] == ["4,000.0", "5,000.0", "—", "30,000.0", "7.50x", "6.00x"]
    assert rows["prefill, 512 tokens (tok/s)"][-2:] == ["3.00x", "3.00x"]
    assert next(v for k, v in rows.items() if k.startswith("decode"))[-3:] == ["75.0", "1.88x", "1.50x"]
