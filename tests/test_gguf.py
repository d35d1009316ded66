"""GGUF as a weight source. The tests write GGUF files of tiny models with the gguf package's writer,
in llama.cpp's tensor names, layouts and metadata (as its convert_hf_to_gguf.py writes them), and keep
the HF state dict each file means, dequantized by the test itself: transformers running that state
dict in float32 is the reference for our runs through the real CLI, with a .gguf alone (tokenizer and
chat template from its metadata) and with `--gguf` beside a Hugging Face folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_models as tm

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
# Types gguf.quants cannot quantize are written as random valid blocks: the offset of the block's
# scale(s) and their value, small so that the weights stay in the range of the rest.
RANDOM_BLOCKS = {
    "Q4_K": (0, np.array([2e-4, 2e-4], np.float16)),  # d, dmin
    "Q5_K": (0, np.array([2e-4, 2e-4], np.float16)),
    "Q6_K": (208, np.array([2e-4], np.float16)),
    "MXFP4": (0, np.array([122], np.uint8)),  # E8M0 exponent: 2^-5
}
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
# Sizes that every block size divides (K-quants: 256), and each family's switches GGUF can express.
DSV2 = dict(vocab_size=320, hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2,
            n_routed_experts=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=2.0,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707})
GPT_OSS = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_local_experts=4, sliding_window=5)
QWEN3 = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=2, num_experts=4,
             norm_topk_prob=True, head_dim=32)
# Tensor types by GGUF name (first matching key; routers and norms in F32 as in llama.cpp's mixes).
# The DeepSeek-V2 and gpt-oss files together cover every type in TYPES (and MXFP4, what gpt-oss GGUFs
# hold) through the CLI; the Qwen3-MoE one covers them all through the weight source.
PLANS = {
    ("qwen3", "alone"): {"ffn_gate_inp": "F32", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "Q6_K",
                         "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "F16", "attn_output": "BF16", "": "Q8_0"},
    ("deepseek", "alone"): {"ffn_gate_inp": "F32", "ffn_down_exps": "Q6_K", "_exps": "Q4_K", "attn_": "Q8_0",
                            "ffn_": "Q5_K", "token_embd": "F16", "output": "BF16"},
    ("deepseek", "experts"): {"_exps": "Q4_0", "": "Q8_0"},
    ("gpt_oss", "alone"): {"ffn_gate_inp": "F32", "_exps": "MXFP4", "attn_": "BF16", "token_embd": "Q4_0",
                           "output": "Q6_K"},
    ("gpt_oss", "experts"): {"ffn_down_exps": "Q8_0", "_exps": "Q5_K"},
}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def encode(arr: np.ndarray, qtype: str, rng) -> np.ndarray:
    """Raw GGUF data of `arr` in `qtype`."""
    t = getattr(T, qtype)
    if qtype == "F32":
        return arr.astype(np.float32)
    if qtype not in RANDOM_BLOCKS:
        return gguf.quants.quantize(arr.astype(np.float32), t)
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows, cols = int(np.prod(arr.shape[:-1])), arr.shape[-1]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    off, scale = RANDOM_BLOCKS[qtype]
    blocks[..., off:off + scale.nbytes] = scale.view(np.uint8)
    return blocks.reshape(*arr.shape[:-1], cols // block * size)


class GGUFOut:
    """A GGUF file being written, the HF state dict it means (`meant`) and the types it used."""

    def __init__(self, path, arch: str, plan: dict[str, str], seed=0):
        self.w = gguf.GGUFWriter(str(path), arch)
        self.plan, self.rng, self.meant, self.used = plan, np.random.default_rng(seed), {}, set()

    def qtype(self, gname: str, arr: np.ndarray) -> str:
        if arr.ndim < 2 or gname.endswith(".bias"):
            return "F32"
        t = next((t for key, t in self.plan.items() if key in gname), "F32")
        return t if arr.shape[-1] % gguf.GGML_QUANT_SIZES[getattr(T, t)][0] == 0 else "F32"

    def put(self, gname: str, arr: np.ndarray, hf: str | None = None) -> torch.Tensor:
        """Write `arr` ([..., rows, cols]) as tensor `gname`; its dequantized value, recorded as HF
        tensor `hf` when given."""
        arr, t = np.ascontiguousarray(arr), self.qtype(gname, arr)
        raw = encode(arr, t, self.rng)
        self.w.add_tensor(gname, raw, raw_dtype=None if t == "F32" else getattr(T, t))
        self.used.add(t)
        deq = arr if t == "F32" else gguf.quants.dequantize(raw, getattr(T, t)).reshape(arr.shape)
        deq = torch.from_numpy(np.array(deq, dtype=np.float32))
        if hf is not None:
            self.meant[hf] = deq
        return deq

    def close(self) -> "GGUFOut":
        finish(self.w)
        return self


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def base_metadata(w, cfg, n_experts: int, n_kv_heads: int) -> None:
    """What the converter's TextModel.set_gguf_parameters writes for every architecture."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def put_globals(out: GGUFOut, sd) -> None:
    for g, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
                  ("output.weight", "lm_head.weight")):
        out.put(g, sd[hf], hf)


def put_layer(out: GGUFOut, sd, i: int, names: list[tuple[str, str]]) -> None:
    for hf, g in names:
        out.put(f"blk.{i}.{g}", sd[f"model.layers.{i}.{hf}"], f"model.layers.{i}.{hf}")


def put_stacked_experts(out: GGUFOut, sd, i: int) -> None:
    """Qwen3-MoE and DeepSeek-V2: transformers' gate_up_proj [E, 2I, H] (gate rows first) and
    down_proj [E, H, I] as llama.cpp's ffn_{gate,up,down}_exps."""
    p, b = f"model.layers.{i}.mlp.experts.", f"blk.{i}."
    gate_up = sd[p + "gate_up_proj"]
    inter = gate_up.shape[1] // 2
    gate = out.put(b + "ffn_gate_exps.weight", gate_up[:, :inter])
    up = out.put(b + "ffn_up_exps.weight", gate_up[:, inter:])
    out.meant[p + "gate_up_proj"] = torch.cat([gate, up], dim=1)
    out.put(b + "ffn_down_exps.weight", sd[p + "down_proj"], p + "down_proj")


def write_qwen3(path, cfg, sd, plan) -> GGUFOut:
    out = GGUFOut(path, "qwen3moe", plan)
    w = out.w
    base_metadata(w, cfg, cfg.num_experts, cfg.num_key_value_heads)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    put_globals(out, sd)
    for i in range(cfg.num_hidden_layers):
        put_layer(out, sd, i, [
            ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
            ("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
            ("mlp.gate.weight", "ffn_gate_inp.weight")])
        put_stacked_experts(out, sd, i)
    return out.close()


def write_deepseek(path, cfg, sd, plan, split_kv_b=True, tokenizer=None) -> GGUFOut:
    """The converter's DeepSeek-V2: MLA as MQA (one KV head) with the latent's sizes as key/value
    length and the per-head ones as *_mla, kv_b_proj split per head into attn_k_b (transposed) and
    attn_v_b; older files (`split_kv_b` False) have attn_kv_b and the per-head sizes only."""
    out = GGUFOut(path, "deepseek2", plan)
    w, rank, nope, rope, v = out.w, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    base_metadata(w, cfg, cfg.n_routed_experts, 1 if split_kv_b else cfg.num_key_value_heads)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(rank)
    if split_kv_b:
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_rope_dimension_count(rope)
    w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_parameters["mscale_all_dim"])
    if tokenizer is not None:
        add_tokenizer(w, tokenizer, cfg.vocab_size)
    put_globals(out, sd)
    for i in range(cfg.num_hidden_layers):
        q = ([("self_attn.q_a_proj.weight", "attn_q_a.weight"), ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
              ("self_attn.q_b_proj.weight", "attn_q_b.weight")] if cfg.q_lora_rank else [("self_attn.q_proj.weight", "attn_q.weight")])
        put_layer(out, sd, i, q + [
            ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"),
            ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"), ("self_attn.o_proj.weight", "attn_output.weight")])
        kv_b = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        if split_kv_b:
            per_head = sd[kv_b].reshape(cfg.num_attention_heads, nope + v, rank)
            k_b = out.put(f"blk.{i}.attn_k_b.weight", per_head[:, :nope].transpose(0, 2, 1))
            v_b = out.put(f"blk.{i}.attn_v_b.weight", per_head[:, nope:])
            out.meant[kv_b] = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, rank)
        else:
            out.put(f"blk.{i}.attn_kv_b.weight", sd[kv_b], kv_b)
        if i < cfg.first_k_dense_replace:
            put_layer(out, sd, i, [(f"mlp.{p}_proj.weight", f"ffn_{p}.weight") for p in ("gate", "up", "down")])
        else:
            put_layer(out, sd, i, [("mlp.gate.weight", "ffn_gate_inp.weight")] + [
                (f"mlp.shared_experts.{p}_proj.weight", f"ffn_{p}_shexp.weight") for p in ("gate", "up", "down")])
            put_stacked_experts(out, sd, i)
    return out.close()


def write_gpt_oss(path, cfg, sd, plan) -> GGUFOut:
    """The converter's gpt-oss: gate_up_proj [E, H, 2I] (gate in the even columns) split into
    ffn_gate_exps / ffn_up_exps [E, I, H], down_proj [E, I, H] as ffn_down_exps [E, H, I], sinks as
    attn_sinks.weight."""
    out = GGUFOut(path, "gpt-oss", plan)
    w = out.w
    base_metadata(w, cfg, cfg.num_local_experts, cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    put_globals(out, sd)
    for i in range(cfg.num_hidden_layers):
        put_layer(out, sd, i, [
            ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "post_attention_norm.weight"),
            ("self_attn.sinks", "attn_sinks.weight"), ("mlp.router.weight", "ffn_gate_inp.weight"),
            ("mlp.router.bias", "ffn_gate_inp.bias")] + [
            (f"self_attn.{p}_proj.{k}", f"attn_{g}.{k}") for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
            for k in ("weight", "bias")])
        p, b = f"model.layers.{i}.mlp.experts.", f"blk.{i}."
        gate_up, bias = sd[p + "gate_up_proj"], sd[p + "gate_up_proj_bias"]
        gate = out.put(b + "ffn_gate_exps.weight", gate_up[..., 0::2].transpose(0, 2, 1))
        up = out.put(b + "ffn_up_exps.weight", gate_up[..., 1::2].transpose(0, 2, 1))
        out.meant[p + "gate_up_proj"] = torch.stack([gate, up], dim=2).flatten(1, 2).transpose(1, 2).contiguous()
        gate_b, up_b = out.put(b + "ffn_gate_exps.bias", bias[:, 0::2]), out.put(b + "ffn_up_exps.bias", bias[:, 1::2])
        out.meant[p + "gate_up_proj_bias"] = torch.stack([gate_b, up_b], dim=-1).flatten(-2)
        down = out.put(b + "ffn_down_exps.weight", sd[p + "down_proj"].transpose(0, 2, 1))
        out.meant[p + "down_proj"] = down.transpose(1, 2).contiguous()
        out.put(b + "ffn_down_exps.bias", sd[p + "down_proj_bias"], p + "down_proj_bias")
    return out.close()


WRITERS = {"qwen3": write_qwen3, "deepseek": write_deepseek, "gpt_oss": write_gpt_oss}


def train_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog, übergrößen ✓ café.", "def main():\n    print('hi')\n"] * 30
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, corpus


def add_tokenizer(w, tok, n_vocab: int, eos: str | None = None) -> None:
    """As the converter's _set_vocab_gpt2: byte-level BPE, control tokens typed CONTROL, the list
    padded to the model's vocabulary with unused [PADn] tokens."""
    spec = json.loads(tok.to_str())
    vocab = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in spec["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab + [f"[PAD{i}]" for i in range(len(vocab), n_vocab)])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in vocab]
                      + [gguf.TokenType.UNUSED] * (n_vocab - len(vocab)))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    if eos is not None:
        w.add_eos_token_id(tok.token_to_id(eos))
    w.add_chat_template(CHAT_TEMPLATE)


def reference(family: str, over: dict, state: dict[str, torch.Tensor]):
    """transformers' model of `family` holding exactly `state`."""
    model = tm.random_model(family, **over)
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("q3gguf"), "qwen3", **QWEN3)


def test_qwen3_gguf_matches_transformers(hf_qwen3, tmp_path):
    """Every type through GGUFSource: under HF names, in HF shapes, exactly the test's own dequantization."""
    from krasis.shared.models.registry import family_for
    from krasis.shared.weights import load_config, open_source

    model = tm.reference_model(hf_qwen3)
    out = write_qwen3(tmp_path / "m.gguf", model.config, numpy_state(model), PLANS["qwen3", "alone"])
    assert out.used == set(TYPES)
    fam = family_for(load_config(tmp_path / "m.gguf"))
    src = open_source(tmp_path / "m.gguf")
    src.check(fam.expected_tensors())
    assert (fam.num_layers, fam.num_experts, fam.head_dim, fam.norm_topk_prob) == (2, 4, 32, True)
    state = {n: src.get(n) for n in fam.expected_tensors() if ".experts." not in n}
    for layer in range(fam.num_layers):
        w = [fam.load_expert(src.get, layer, e) for e in range(fam.num_experts)]
        p = f"model.layers.{layer}.mlp.experts."
        state[p + "gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in w])
        state[p + "down_proj"] = torch.stack([x["down"] for x in w])
    assert state.keys() == out.meant.keys() == model.state_dict().keys()
    assert all(torch.equal(state[n], out.meant[n]) for n in state)


def _files(root, family: str, over: dict, tokenizer=None) -> dict:
    """An HF folder of `family`; a GGUF of the same model (with `tokenizer`); and a GGUF of another
    model, which beside the folder must supply exactly the routed experts (reading the wrong one of
    either part changes everything). With the states each combination means."""
    hf = tm.build(root / "hf", family, **over)
    model, other = tm.reference_model(hf), tm.random_model(family, seed=1, **over)
    sd = numpy_state(model)
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    alone = WRITERS[family](root / "alone.gguf", model.config, sd, PLANS[family, "alone"], **extra)
    experts = WRITERS[family](root / "experts.gguf", model.config, numpy_state(other), PLANS[family, "experts"])
    assert set(alone.meant) == set(sd) and set(PLANS[family, "alone"].values()) <= alone.used
    assert set(PLANS[family, "experts"].values()) <= experts.used
    with_hf = {k: (experts.meant[k] if ".experts." in k else torch.from_numpy(v)) for k, v in sd.items()}
    return {"hf": hf, "alone": root / "alone.gguf", "experts": root / "experts.gguf", "alone_state": alone.meant,
            "with_hf_state": with_hf}


@pytest.fixture(scope="module")
def dsv2(tmp_path_factory):
    tok, _ = train_tokenizer(["<|user|>", "<|assistant|>"])
    return _files(tmp_path_factory.mktemp("dsv2gguf"), "deepseek", DSV2, tok) | {"tokenizer": tok}


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("gptossgguf"), "gpt_oss", GPT_OSS)


def test_deepseek_gguf_alone_with_its_tokenizer_and_template(dsv2):
    """Everything from the .gguf: config, weights of seven types, tokenizer and chat template."""
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ids = dsv2["tokenizer"].encode("<|user|>the quick brown fox<|assistant|>").ids
    p = tm.krasis("generate", dsv2["alone"], "--messages", json.dumps(messages), "--max-new-tokens", 32,
                  "--dtype", "float32", "--json", "--devices", "cpu,cpu")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    want = tm.reference_greedy(reference("deepseek", DSV2, dsv2["alone_state"]), ids, 32)
    assert got["prompt_tokens"] == len(ids) and got["token_ids"] == want
    assert got["text"] == dsv2["tokenizer"].decode(want)
    assert "Traceback" not in p.stderr  # the workers keep their state beside the file, not inside it


def test_gpt_oss_gguf_alone(gpt_oss):
    got = tm.generate_json(gpt_oss["alone"], PROMPT, 32, "--cpu-workers", "2")
    assert got["token_ids"] == tm.reference_greedy(reference("gpt_oss", GPT_OSS, gpt_oss["alone_state"]), PROMPT, 32)


def test_gguf_experts_beside_hf_folder_into_int8_cache(gpt_oss):
    """--gguf: the routed experts from the GGUF, everything else from the folder; decode's experts
    converted from the GGUF into the INT8 CPU cache, prefill's read unquantized."""
    state = gpt_oss["with_hf_state"]
    prefill_ref = reference("gpt_oss", GPT_OSS, state)
    decode_ref = reference("gpt_oss", GPT_OSS, tm.fake_quantized(state, 8, 16, 32))
    assert not torch.allclose(tm.reference_logits(decode_ref, PROMPT), tm.reference_logits(prefill_ref, PROMPT))
    p = tm.krasis("generate", gpt_oss["hf"], "--gguf", gpt_oss["experts"], "--prompt-ids", ",".join(map(str, PROMPT)),
                  "--max-new-tokens", 32, "--dtype", "float32", "--json", "--cpu-bits", 8, "--group-size", 32,
                  "--devices", "cpu,cpu")
    assert json.loads(p.stdout.strip().splitlines()[-1])["token_ids"] == tm.greedy_two_phase(prefill_ref, decode_ref, PROMPT, 32)
    assert f"cache: building {gpt_oss['hf'] / '.krasis_cache' / 'experts-int8-g32.kc'} (missing)" in p.stderr


def test_legacy_deepseek_layout_and_shapes_without_reading(tmp_path):
    """Older DeepSeek files (attn_kv_b, per-head key/value lengths) read as the split ones do, and
    every shape the checks use comes from the file's header without dequantizing anything."""
    from krasis.shared.gguf_source import GGUFSource
    from krasis.shared.weights import load_family

    model = tm.random_model("deepseek", **DSV2)
    for split in (True, False):
        path = tmp_path / f"split{split}.gguf"
        out = write_deepseek(path, model.config, numpy_state(model), {"": "Q8_0"}, split_kv_b=split)
        src = GGUFSource(path)
        fam = load_family(path)
        assert (fam.qk_nope, fam.v_head_dim, fam.kv_lora_rank, fam.topk_method) == (32, 32, 32, "group_limited_greedy")
        kv_b = "model.layers.1.self_attn.kv_b_proj.weight"
        assert torch.equal(src.get(kv_b), out.meant[kv_b])
        shapes = {n: src.shape(n) for n in src.names()}
        src._dequant = None  # a shape that needs tensor data fails from here
        src.check(fam.expected_tensors())
        assert shapes == {n: tuple(fam.expected_tensors()[n]) for n in src.names()}


def test_changed_gguf_rebuilds_the_cache(dsv2, tmp_path):
    from krasis.coordinator.convert import prepare
    from krasis.coordinator.processes import RuntimeOptions
    from krasis.shared.weights import load_family

    fam = load_family(dsv2["hf"])
    gguf_file = tmp_path / "experts.gguf"
    gguf_file.write_bytes(dsv2["experts"].read_bytes())
    logs = []

    def run(**o):
        prepare(dsv2["hf"], fam, RuntimeOptions(cpu_bits=8, group_size=32, cache_dir=str(tmp_path / "c"), **o),
                log=logs.append)
        return logs[-1]

    assert "(missing)" in run(gguf=str(gguf_file))
    assert run(gguf=str(gguf_file)).startswith("cache: reusing")
    model = tm.random_model("deepseek", seed=2, **DSV2)
    write_deepseek(gguf_file, model.config, numpy_state(model), PLANS["deepseek", "experts"])
    assert "source experts.gguf changed" in run(gguf=str(gguf_file))
    assert "changed" in run()  # the folder's own experts: another source


def test_gguf_tokenizer_matches_source_tokenizer(tmp_path):
    from krasis.coordinator.tokenizer import TextCodec

    tok, corpus = train_tokenizer(["<|im_end|>"])
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen3moe")
    add_tokenizer(w, tok, tok.get_vocab_size() + 4, eos="<|im_end|>")
    finish(w)
    codec = TextCodec(tmp_path / "t.gguf")
    for text in corpus[:2] + ["unseen wörds ✓✓ 123"]:
        assert codec.encode(text) == tok.encode(text).ids
        assert codec.decode(codec.encode(text)) == text
    assert codec.special["eos_token"] == "<|im_end|>"
    assert codec.encode_chat([{"role": "user", "content": "fox"}]) == tok.encode("<|user|>fox<|assistant|>").ids


def _write(path, arch, tensors: dict):
    w = gguf.GGUFWriter(str(path), arch)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    finish(w)


def test_bad_gguf_files_get_clear_errors(hf_qwen3, dsv2, gpt_oss, tmp_path):
    import shutil

    from krasis.shared.gguf_source import GGUFError, GGUFSource
    from krasis.shared.weights import load_family, open_source

    _write(tmp_path / "llama.gguf", "llama", {"x.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        GGUFSource(tmp_path / "llama.gguf")
    q2k = np.zeros((4, 84), np.uint8)  # one Q2_K block per row
    _write(tmp_path / "q2k.gguf", "qwen3moe", {"x.weight": (q2k, T.Q2_K)})
    with pytest.raises(GGUFError, match="type Q2_K, which is not supported"):
        GGUFSource(tmp_path / "q2k.gguf")
    model = tm.reference_model(hf_qwen3)
    write_qwen3(tmp_path / "good.gguf", model.config, numpy_state(model), {"": "Q8_0"})
    data = (tmp_path / "good.gguf").read_bytes()
    for name, size in (("cut.gguf", len(data) // 2), ("cut-data.gguf", len(data) - 1000)):
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(GGUFError, match="not a readable GGUF file"):
            GGUFSource(tmp_path / name)
    with pytest.raises(GGUFError, match="holds a qwen3moe model"):
        open_source(dsv2["hf"], tmp_path / "good.gguf")
    # a folder whose experts are MXFP4 blocks would silently keep its own experts
    mx = shutil.copytree(gpt_oss["hf"], tmp_path / "mx")
    cfg = json.loads((mx / "config.json").read_text())
    (mx / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(GGUFError, match="experts.gate_up_proj is not one the model has"):
        open_source(mx, gpt_oss["experts"]).check(load_family(mx).expected_tensors())
    for args in ((tmp_path / "cut.gguf",), (dsv2["hf"], "--gguf", tmp_path / "q2k.gguf")):
        p = tm.krasis("generate", *args, "--prompt-ids", "1,2", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_q4_0_experts_kept_decode_as_the_files(hf_qwen3, tmp_path):
    """Q4_0 experts into --cpu-bits 4 --group-size 32: decode computes with the file's weights up to
    bf16's rounding of each block's d (blocks taken as they are, coordinator/gguf_blocks.py; the
    quantizer's d is negative in about half of them, so are those scales), through the real CLI
    and the pool's kernel. The reference is transformers with
    the cache's weights for decode and the file's for the prompt; the cache's weights are checked
    against the file's first."""
    from krasis.shared.quant import dequantize_q, unpack_int4
    from krasis.shared.weight_cache import WeightCache, expert_key

    model = tm.reference_model(hf_qwen3)
    out = write_qwen3(tmp_path / "q.gguf", model.config, numpy_state(model), {"_exps": "Q4_0", "": "F32"})
    got = tm.generate_json(tmp_path / "q.gguf", PROMPT, 24, "--cpu-bits", "4", "--group-size", "32", "--devices", "cpu")
    decode_state = dict(out.meant)
    negative = False
    with WeightCache(tmp_path / ".krasis_cache" / "q.gguf" / "experts-int4-g32.kc") as cache:
        for layer in range(model.config.num_hidden_layers):
            p = f"model.layers.{layer}.mlp.experts."
            w = {n: torch.stack([dequantize_q(unpack_int4(cache.tensor(expert_key(layer, e, n + ".q"))),
                                              cache.tensor(expert_key(layer, e, n + ".s")))
                                 for e in range(model.config.num_experts)]) for n in ("w13", "w2")}
            negative |= any(bool((cache.tensor(expert_key(layer, e, "w13.s")).float() < 0).any())
                            for e in range(model.config.num_experts))
            for n, hf in (("w13", "gate_up_proj"), ("w2", "down_proj")):
                assert torch.allclose(w[n], out.meant[p + hf], rtol=2**-8, atol=0)
                decode_state[p + hf] = w[n]
    assert negative
    prefill_ref, decode_ref = reference("qwen3", QWEN3, out.meant), reference("qwen3", QWEN3, decode_state)
    assert got["token_ids"] == tm.greedy_two_phase(prefill_ref, decode_ref, PROMPT, 24)


def test_float_tensors_keep_their_dtype_and_values(dsv2, gpt_oss):
    """F32, F16 and BF16 tensors come out in their own dtype (the caller casts once), with exactly the
    values gguf's own dequantization gives; the quantized types in float32."""
    from gguf.quants import dequantize

    from krasis.shared.gguf_source import GGUFSource

    native = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    seen = set()
    for path in (dsv2["alone"], gpt_oss["alone"]):
        src = GGUFSource(path)
        for gname, t in src._tensors.items():
            got = src._dequant(gname)
            want = dequantize(np.asarray(t.data), t.tensor_type)
            assert got.dtype == native.get(t.tensor_type.name, torch.float32), gname
            assert torch.equal(got.float(), torch.from_numpy(np.array(want, dtype=np.float32)).reshape(got.shape)), gname
            seen.add(t.tensor_type.name)
    assert set(native) <= seen


def test_a_gguf_is_parsed_once_per_process_until_it_changes(gpt_oss, tmp_path):
    import os
    import shutil

    from krasis.shared.gguf_source import GGUFSource, gguf_config

    path = tmp_path / "m.gguf"
    shutil.copy(gpt_oss["alone"], path)
    first = GGUFSource(path)._reader
    assert GGUFSource(path)._reader is first
    gguf_config(path)
    assert GGUFSource(path)._reader is first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a rewritten file: parsed again
    assert GGUFSource(path)._reader is not first
