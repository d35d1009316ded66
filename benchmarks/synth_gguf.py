"""A seeded random GGUF of a Qwen3-MoE shape, as llama.cpp's converter lays one out (tensor names,
shapes, metadata, a minimal byte-level BPE tokenizer that llama.cpp and krasis both load), written
tensor by tensor so memory stays near two tensors whatever the model's size (the next one is drawn
while this one is written, each expert tensor on every core). Needs gguf, numpy and krasis's synth
(torch), all of which the GPU machine has or carries. Used by peer_llamacpp.py and convert_speed.py.
Single-threaded it took 170-200 s of a GPU call for the 48-layer file.

Routed experts are random valid blocks (Q4_0, Q8_0 or MXFP4) with scales that give each weight a
spread of about 1/sqrt(fan-in); F16/BF16/F32 tensors are normal with the same spread; norms are
ones. Routing is made to behave like a trained model's as coordinator/synth.py does it (docs/
routing.md), so that llama.cpp sees the same routing as krasis on synth's model: the routers are
synth's router_weight (orthonormal rows), and synth's Recency sets the tensors that make attention
look at the last few tokens (the embedding's constant channels, the query and key columns that read
them, the q/k norms, the post-attention norms, the values' and the output projections' scale).
The shape has no dense MLP or shared expert, so synth's MLP_GAIN has nothing to apply to here.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# coordinator/synth.py's "qwen3-30b-a3b" (tests/test_synth_gguf.py keeps the two equal)
QWEN3_30B_A3B = dict(layers=48, hidden=2048, ffn=6144, moe_inter=768, experts=128, top_k=8, heads=32, kv_heads=4,
                     head_dim=128, vocab=151936, rope_theta=1e6, context=40960, rms_eps=1e-6)
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34, "MXFP4": 17}
# a value's spread in units of its block scale, for the block contents _blocks draws (zero-mean)
_SPREAD = {"Q4_0": 4.18, "Q8_0": 73.5, "MXFP4": 5.85}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: each byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def add_tokenizer(w, vocab: int) -> None:
    """A valid byte-level BPE of `vocab` tokens: the 256 bytes, two merges, Qwen's control tokens,
    then unused padding, as the converter pads a vocabulary to the embedding's rows."""
    import gguf

    tokens = _byte_tokens() + ["Ġt", "he"] + SPECIALS
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    if vocab < len(tokens):
        raise ValueError(f"vocabulary {vocab} is smaller than the tokenizer's {len(tokens)} tokens")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [gguf.TokenType.UNUSED] * (vocab - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)


def _blocks(rng, qtype: str, n: int, rows: int, cols: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """n x rows x cols weights as random valid blocks, raw bytes [n, rows, cols / 32 * block bytes],
    each of the n experts from its own child of rng (so they are drawn on every core of `pool`, and
    the bytes do not depend on how many).

    The values are zero-mean: uniformly random Q4_0 nibbles are q - 8 in [-8, 7], mean -1/2 of the
    scale (Q8_0's int8 likewise), and a matrix with a mean is a random one plus a rank-one part that
    writes the same direction (all ones) for every token. Through 48 layers of experts that shared
    direction outgrew what tells tokens apart, and the routers collapsed onto a few experts: by the
    8th layer of the peer GGUF 43 of 128 were ever chosen (our runtime on the CPU, 256 tokens; synth's
    own model: all 128), so hcs_hybrid's hot set served every decode choice on two GPU hosts. The
    one code outside a symmetric range (Q4_0's 0, Q8_0's -128) is read as the middle one (0) instead;
    MXFP4's sign bit makes it symmetric as it is."""
    nb = cols // 32
    out = np.empty((n, rows, nb, BLOCK_BYTES[qtype]), np.uint8)
    d = 1 / (_SPREAD[qtype] * math.sqrt(cols))

    def expert(e, g):
        raw = out[e]
        raw.reshape(-1)[:] = np.frombuffer(g.bytes(raw.size), np.uint8)
        codes = raw[..., 2:]  # Q4_0 and Q8_0: after the fp16 scale
        # elementwise only (no boolean indexing), so that numpy lets the pool's threads run at once
        if qtype == "Q4_0":
            lo, hi = codes & 0x0F, codes & 0xF0
            lo |= (lo == 0).view(np.uint8) << 3  # 0 -> 8
            hi |= (hi == 0).view(np.uint8) << 7  # 0 -> 0x80
            np.bitwise_or(lo, hi, out=codes)
        elif qtype == "Q8_0":
            np.bitwise_xor(codes, (codes == 0x80).view(np.uint8) << 7, out=codes)  # -128 -> 0
        if qtype == "MXFP4":  # E8M0: 2^(e - 128) per unit of the doubled E2M1 values
            raw[..., 0] = int(round(math.log2(d))) + 128
        else:
            scale = (d * g.uniform(0.8, 1.2, (rows, nb))).astype(np.float16)
            raw[..., :2] = scale[..., None].view(np.uint8)

    list(pool.map(expert, range(n), rng.spawn(n)))
    return out.reshape(n, rows, nb * BLOCK_BYTES[qtype])


def _dense(rng, shape: tuple[int, ...], qtype: str, std: float, adjust) -> np.ndarray:
    import torch

    # torch's normal draws ran ~2x numpy's; the embedding and the output (311M values each) were
    # most of the file's non-expert time
    g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    out = torch.randn(shape, generator=g).mul_(std).numpy()
    adjust(out)
    if qtype == "BF16":
        import gguf

        return gguf.quants.quantize(out, gguf.GGMLQuantizationType.BF16)
    return out.astype(np.float16) if qtype == "F16" else out


def _plan(s: dict, expert_type: str, dense_type: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape [.., rows, cols], type) of every tensor, in file order."""
    h, q, kv, hd, E, I = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["experts"], s["moe_inter"]
    t = [("token_embd.weight", (s["vocab"], h), dense_type)]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        t += [(b + "attn_norm.weight", (h,), "F32"), (b + "ffn_norm.weight", (h,), "F32"),
              (b + "attn_q.weight", (q * hd, h), dense_type), (b + "attn_k.weight", (kv * hd, h), dense_type),
              (b + "attn_v.weight", (kv * hd, h), dense_type), (b + "attn_output.weight", (h, q * hd), dense_type),
              (b + "attn_q_norm.weight", (hd,), "F32"), (b + "attn_k_norm.weight", (hd,), "F32"),
              (b + "ffn_gate_inp.weight", (E, h), "F32"),
              (b + "ffn_gate_exps.weight", (E, I, h), expert_type), (b + "ffn_up_exps.weight", (E, I, h), expert_type),
              (b + "ffn_down_exps.weight", (E, h, I), expert_type)]
    return t + [("output_norm.weight", (h,), "F32"), ("output.weight", (s["vocab"], h), dense_type)]


# transformers' names of the tensors that synth's Recency sets
_HF_NAMES = {"token_embd": "model.embed_tokens", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "ffn_norm": "post_attention_layernorm"}


def _recency(s: dict, seed: int):
    """synth's Recency for the shape's transformers config."""
    import torch

    from krasis.coordinator.synth import Recency, synth_config
    from krasis.shared.models.registry import family_for

    cfg = synth_config("qwen3-30b-a3b", layers=s["layers"], experts=s["experts"], config=dict(
        hidden_size=s["hidden"], intermediate_size=s["ffn"], moe_intermediate_size=s["moe_inter"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], vocab_size=s["vocab"],
        rope_theta=s["rope_theta"], max_position_embeddings=s["context"], rms_norm_eps=s["rms_eps"]))
    return Recency(family_for(cfg), torch.Generator().manual_seed(seed))


def _data(rng, recency, pool: ThreadPoolExecutor, name: str, shape: tuple[int, ...], qtype: str) -> np.ndarray:
    import torch

    from krasis.coordinator.synth import DENSE_STD, router_weight

    stem = name.rsplit(".", 1)[0].split(".")[-1]

    def adjust(a):
        recency(_HF_NAMES.get(stem, stem) + ".weight", torch.from_numpy(a))  # in place

    if len(shape) == 1:
        out = np.ones(shape, np.float32)
        adjust(out)
        return out
    if qtype in BLOCK_BYTES:
        return _blocks(rng, qtype, shape[0], shape[1], shape[2], pool)
    if name.endswith("ffn_gate_inp.weight"):
        return router_weight(*shape, seed=int(rng.integers(1 << 62))).numpy()
    std = 1 / math.sqrt(shape[-1])
    return _dense(rng, shape, qtype, std * recency.out_std(int(name.split(".")[1])) / DENSE_STD if stem == "attn_output" else std,
                  adjust)


# the metadata llama.cpp's converter writes for qwen3moe: GGUFWriter method, shape key
_METADATA = (("add_block_count", "layers"), ("add_context_length", "context"), ("add_embedding_length", "hidden"),
             ("add_feed_forward_length", "ffn"), ("add_head_count", "heads"), ("add_head_count_kv", "kv_heads"),
             ("add_rope_freq_base", "rope_theta"), ("add_layer_norm_rms_eps", "rms_eps"), ("add_expert_count", "experts"),
             ("add_expert_used_count", "top_k"), ("add_expert_feed_forward_length", "moe_inter"),
             ("add_key_length", "head_dim"), ("add_value_length", "head_dim"))


def write_qwen3moe_gguf(path, shape: dict, expert_type: str = "Q4_0", dense_type: str = "F16", seed: int = 0) -> int:
    """Write the GGUF; its size in bytes."""
    import gguf

    T = gguf.GGMLQuantizationType
    s = shape
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("krasis synthetic qwen3moe")
    for method, key in _METADATA:
        getattr(w, method)(s[key])
    add_tokenizer(w, s["vocab"])
    plan = _plan(s, expert_type, dense_type)
    for name, shp, qtype in plan:
        if qtype in BLOCK_BYTES:
            raw = (*shp[:-1], shp[-1] // 32 * BLOCK_BYTES[qtype])
            w.add_tensor_info(name, raw, np.dtype(np.uint8), math.prod(raw), raw_dtype=T[qtype])
        elif qtype == "BF16":
            w.add_tensor_info(name, (*shp[:-1], shp[-1] * 2), np.dtype(np.uint8), math.prod(shp) * 2, raw_dtype=T.BF16)
        else:
            dt = np.dtype(np.float16 if qtype == "F16" else np.float32)
            w.add_tensor_info(name, shp, dt, math.prod(shp) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    recency = _recency(s, seed)
    # the next tensor is drawn (in order: the draws stay seeded) while this one is written
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(_data, rng, recency, pool, *plan[0])
        for item in plan[1:]:
            data = pending.result()
            pending = ahead.submit(_data, rng, recency, pool, *item)
            w.write_tensor_data(data)
        w.write_tensor_data(pending.result())
    w.close()
    return Path(path).stat().st_size
