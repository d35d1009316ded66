"""GGUF as a weight source: tiny models written with the gguf package's writer in llama.cpp's naming
and layout, read back through GGUFSource with HF names, and run by transformers against the same
model holding the weights the test itself dequantized from what it wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
K_BLOCK = {"Q4_K": (144, 0, 2), "Q5_K": (176, 0, 2), "Q6_K": (210, 208, 1)}  # bytes per block, offset and count of its f16 scales (d, dmin)


def encode(arr: np.ndarray, qtype: str, rng) -> np.ndarray:
    """Raw GGUF data of `arr` in `qtype`: quantized with gguf.quants where it can, else (K-quants)
    random valid blocks with small scales (the test dequantizes them itself for the reference)."""
    t = getattr(T, qtype)
    if qtype == "F32":
        return arr.astype(np.float32)
    if qtype not in K_BLOCK:
        return gguf.quants.quantize(arr.astype(np.float32), t)
    size, off, _ = K_BLOCK[qtype]
    rows, cols = int(np.prod(arr.shape[:-1])), arr.shape[-1]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scale = np.full((rows, cols // 256, 2 if qtype != "Q6_K" else 1), 2e-4 if qtype != "Q6_K" else 2e-3, np.float16)
    blocks[..., off:off + 2 * scale.shape[-1]] = scale.view(np.uint8)
    return blocks.reshape(*arr.shape[:-1], cols // 256 * size)


def write_qwen3(path, model, qtype: str, seed=0):
    """llama.cpp's qwen3moe layout: blk.N.*, experts stacked as ffn_*_exps [E, rows, cols]. The
    quantized type applies to the 2D/3D weights whose rows suit its block size; norms stay F32.
    Returns the HF state dict the file means (dequantized by the test)."""
    rng = np.random.default_rng(seed)
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    a = "qwen3moe."
    for k, v in {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
                 "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
                 "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
                 "expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
                 "expert_feed_forward_length": cfg.moe_intermediate_size, "attention.key_length": cfg.head_dim,
                 "attention.value_length": cfg.head_dim}.items():
        w.add_uint32(a + k, int(v))
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(a + "rope.freq_base", cfg.rope_parameters["rope_theta"])
    meant = {}
    block = gguf.GGML_QUANT_SIZES[getattr(T, qtype)][0]

    def put(gname, arr, hf_names):
        t = qtype if arr.ndim >= 2 and arr.shape[-1] % block == 0 else "F32"
        raw = encode(arr, t, rng)
        w.add_tensor(gname, raw, raw_dtype=None if t == "F32" else getattr(T, t))
        deq = gguf.quants.dequantize(raw, getattr(T, t)).reshape(arr.shape) if t != "F32" else arr
        for hf, part in hf_names(deq):
            meant[hf] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"], lambda d: [("model.embed_tokens.weight", d)])
    put("output_norm.weight", sd["model.norm.weight"], lambda d: [("model.norm.weight", d)])
    put("output.weight", sd["lm_head.weight"], lambda d: [("lm_head.weight", d)])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, g in [("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
                      ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
                      ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
                      ("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
                      ("mlp.gate.weight", "ffn_gate_inp.weight")]:
            put(b + g, sd[p + hf], lambda d, hf=hf: [(p + hf, d)])
        I, gate_up = cfg.moe_intermediate_size, sd[p + "mlp.experts.gate_up_proj"]  # transformers 5: [E, 2I, H]
        for part, stacked in (("gate", gate_up[:, :I]), ("up", gate_up[:, I:]), ("down", sd[p + "mlp.experts.down_proj"])):
            put(b + f"ffn_{part}_exps.weight", stacked, lambda d, part=part: [(f"{p}mlp.experts.{part}", d)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return meant


def load_meant(model, meant):
    """Put the test's dequantized weights into the transformers model (fused experts in transformers 5)."""
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in meant.items():
            if name.endswith((".experts.gate", ".experts.up")):
                continue
            if name.endswith(".experts.down"):
                p = name.removesuffix("down")
                sd[p + "gate_up_proj"].copy_(torch.cat([meant[p + "gate"], meant[p + "up"]], dim=1))
                sd[p + "down_proj"].copy_(t)
            else:
                sd[name].copy_(t)
    return model


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("q3gguf")
    return tm.build(path, "qwen3", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=2,
                    num_experts=4, norm_topk_prob=True, head_dim=32)


@pytest.mark.parametrize("qtype", TYPES)
def test_qwen3_gguf_matches_transformers(hf_qwen3, tmp_path, qtype):
    from krasis.shared.models.family import family_for
    from krasis.shared.weights import load_config, open_source

    model = tm.reference_model(hf_qwen3)
    meant = write_qwen3(tmp_path / "m.gguf", model, qtype)
    cfg = load_config(tmp_path / "m.gguf")
    fam = family_for(cfg)
    src = open_source(tmp_path / "m.gguf")
    src.check(fam.expected_tensors())  # every HF name with its HF shape
    assert (fam.num_layers, fam.num_experts, fam.head_dim, fam.norm_topk_prob) == (2, 4, 32, True)
    # transformers on the GGUF source's tensors vs transformers on the test's own dequantization
    ours = tm.reference_model(hf_qwen3)
    with torch.no_grad():
        sd = ours.state_dict()
        for name in fam.expected_tensors():
            if ".experts." in name:
                continue
            sd[name].copy_(src.get(name))
        for layer in range(fam.num_layers):
            w = [fam.load_expert(src.get, layer, e) for e in range(fam.num_experts)]
            p = f"model.layers.{layer}.mlp.experts."
            sd[p + "gate_up_proj"].copy_(torch.stack([torch.cat([x["gate"], x["up"]]) for x in w]))
            sd[p + "down_proj"].copy_(torch.stack([x["down"] for x in w]))
    ref = load_meant(model, meant)
    ids = [3, 14, 15, 92, 65, 35, 89, 79]
    assert tm.reference_greedy(ours, ids, 32) == tm.reference_greedy(ref, ids, 32)
    torch.testing.assert_close(tm.reference_logits(ours, ids), tm.reference_logits(ref, ids), rtol=0, atol=0)


def test_gguf_tokenizer_matches_source_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from krasis.coordinator.tokenizer import TextCodec

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog, übergrößen ✓ café.", "def main():\n    print('hi')\n"] * 30
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    import json

    spec = json.loads(tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|im_end|>" else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    codec = TextCodec(tmp_path / "t.gguf")
    for text in corpus[:2] + ["unseen wörds ✓✓ 123"]:
        assert codec.encode(text) == tok.encode(text).ids
        assert codec.decode(codec.encode(text)) == text
    assert codec.special["eos_token"] == "<|im_end|>"
    assert codec.encode_chat([{"role": "user", "content": "fox"}]) == tok.encode("fox<|im_end|>").ids


def _write(path, arch, tensors: dict):
    w = gguf.GGUFWriter(str(path), arch)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_get_clear_errors(hf_qwen3, tmp_path):
    from krasis.shared.gguf_source import GGUFError, GGUFSource

    _write(tmp_path / "llama.gguf", "llama", {"x.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        GGUFSource(tmp_path / "llama.gguf")
    q2k = np.zeros((4, 84), np.uint8)  # one Q2_K block per row
    _write(tmp_path / "q2k.gguf", "qwen3moe", {"x.weight": (q2k, T.Q2_K)})
    with pytest.raises(GGUFError, match="type Q2_K, which is not supported"):
        GGUFSource(tmp_path / "q2k.gguf")
    write_qwen3(tmp_path / "good.gguf", tm.reference_model(hf_qwen3), "Q8_0")
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        GGUFSource(tmp_path / "cut.gguf")
    for bad in ("llama.gguf", "cut.gguf"):
        p = tm.krasis("generate", tmp_path / bad, "--prompt-ids", "1,2", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
