"""A random-weight GGUF of a Qwen3-MoE shape, as llama.cpp's converter lays one out (qwen3moe tensor
names and metadata, a byte-level BPE tokenizer), written tensor by tensor so memory stays at one
tensor whatever the size. Needs only numpy and the gguf package (the GPU machine has no registry).

    python benchmarks/qwen3_gguf.py OUT.gguf [--layers N] [--experts N] [--expert-type Q4_0] [--seed 0]

Used by peer_llamacpp.py (one file for llama.cpp and for us) and convert_speed.py. SHAPE is
coordinator/synth.py's qwen3-30b-a3b (tests/test_gguf.py checks that they agree).

Weights: routed experts as random valid blocks of --expert-type (random codes; scales drawn so the
weights have a standard deviation near 0.02, as trained ones do), attention in F16, norms, routers
and everything 1-D in F32, embeddings and the output head in F16. Routers are Gaussian, so the
routing is what random weights give (coordinator/synth.py's realistic routers need torch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

SHAPE = dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, rope_theta=1000000.0,
             max_position_embeddings=40960, rms_norm_eps=1e-6)
T = gguf.GGMLQuantizationType
STD = 0.02
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: the 256 single-character tokens every byte-level BPE starts from."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def add_tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    """A minimal valid byte-level BPE: the 256 byte tokens, merges of 'Ġ' with each letter, the
    Qwen specials (CONTROL), and unused padding up to the vocabulary size."""
    alphabet = byte_alphabet()
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz"]
    merges = [f"Ġ {c}" for c in letters]
    tokens = alphabet + ["Ġ" + c for c in letters]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += SPECIALS
    types += [gguf.TokenType.CONTROL] * len(SPECIALS)
    if vocab < len(tokens):
        raise SystemExit(f"--vocab must be at least {len(tokens)}")
    pad = vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def random_blocks(rng, qtype: T, rows: tuple[int, ...], cols: int) -> np.ndarray:
    """Random valid blocks of `qtype` for [*rows, cols] weights: random code bytes, scales set."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(rows)) * (cols // block)
    raw = np.frombuffer(rng.bytes(n * size), np.uint8).reshape(n, size).copy()
    if qtype == T.MXFP4:  # E8M0 exponent: 2^(e - 128) times codes up to 12; 2^-9 * ~4.6 rms
        raw[:, 0] = rng.integers(118, 121, n)
    elif qtype in (T.Q4_0, T.Q8_0):  # fp16 d: codes' rms is 4.6 (Q4_0), 73 (Q8_0)
        rms = 4.6 if qtype == T.Q4_0 else 73.0
        raw[:, :2] = (rng.uniform(0.5, 1.5, n) * STD / rms).astype(np.float16).view(np.uint8).reshape(n, 2)
    else:
        raise SystemExit(f"expert type {qtype.name} is not one this writer makes (Q4_0, Q8_0, MXFP4)")
    return raw.reshape(*rows, cols // block * size)


def plan(shape: dict, expert_type: T) -> list[tuple[str, tuple[int, ...], T]]:
    """(name, numpy-order shape, type) of every tensor, in file order."""
    H, I, E = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"]
    q, kv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    out = [("token_embd.weight", (shape["vocab_size"], H), T.F16), ("output_norm.weight", (H,), T.F32),
           ("output.weight", (shape["vocab_size"], H), T.F16)]
    for i in range(shape["num_hidden_layers"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (H,), T.F32), (b + "ffn_norm.weight", (H,), T.F32),
                (b + "attn_q.weight", (q * d, H), T.F16), (b + "attn_k.weight", (kv * d, H), T.F16),
                (b + "attn_v.weight", (kv * d, H), T.F16), (b + "attn_output.weight", (H, q * d), T.F16),
                (b + "attn_q_norm.weight", (d,), T.F32), (b + "attn_k_norm.weight", (d,), T.F32),
                (b + "ffn_gate_inp.weight", (E, H), T.F32),
                (b + "ffn_gate_exps.weight", (E, I, H), expert_type), (b + "ffn_up_exps.weight", (E, I, H), expert_type),
                (b + "ffn_down_exps.weight", (E, H, I), expert_type)]
    return out


def tensor_data(rng, name: str, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    if qtype not in (T.F16, T.F32):
        return random_blocks(rng, qtype, shape[:-1], shape[-1])
    if len(shape) == 1:  # norms: near 1, as trained ones are
        return (1 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    std = 1.0 / np.sqrt(shape[-1]) if "ffn_gate_inp" in name else STD
    a = rng.standard_normal(shape, np.float32)
    a *= std
    return a if qtype == T.F32 else a.astype(np.float16)


def raw_layout(shape: tuple[int, ...], qtype: T) -> tuple[tuple[int, ...], np.dtype, int]:
    """The array a tensor is written as: (its shape, dtype, bytes); blocks are bytes per row."""
    if qtype in (T.F16, T.F32):
        dtype = np.dtype(np.float16 if qtype == T.F16 else np.float32)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = (*shape[:-1], shape[-1] // block * size)
    return raw, np.dtype(np.uint8), int(np.prod(raw))


def write(path: str | Path, shape: dict, expert_type: str = "Q4_0", seed: int = 0, log=None) -> dict:
    """Write the file; returns {'bytes': file size, 'expert_bytes': routed experts' bytes, 'seconds'}."""
    t0 = time.perf_counter()
    etype = getattr(T, expert_type)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("random Qwen3-MoE")
    w.add_block_count(shape["num_hidden_layers"])
    w.add_context_length(shape["max_position_embeddings"])
    w.add_embedding_length(shape["hidden_size"])
    w.add_feed_forward_length(shape["moe_intermediate_size"] * 8)
    w.add_head_count(shape["num_attention_heads"])
    w.add_head_count_kv(shape["num_key_value_heads"])
    w.add_rope_freq_base(shape["rope_theta"])
    w.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    w.add_expert_count(shape["num_experts"])
    w.add_expert_used_count(shape["num_experts_per_tok"])
    w.add_expert_feed_forward_length(shape["moe_intermediate_size"])
    w.add_key_length(shape["head_dim"])
    w.add_value_length(shape["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if etype == T.Q4_0 else gguf.LlamaFileType.MOSTLY_F16)
    add_tokenizer(w, shape["vocab_size"])
    tensors = plan(shape, etype)
    for name, shp, qtype in tensors:
        raw, dtype, n = raw_layout(shp, qtype)
        w.add_tensor_info(name, raw, dtype, n, raw_dtype=None if dtype != np.uint8 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    experts = 0
    for i, (name, shp, qtype) in enumerate(tensors):
        data = tensor_data(rng, name, shp, qtype)
        w.write_tensor_data(data)
        if "_exps" in name:
            experts += data.nbytes
        if log is not None and (i + 1) % 12 == 3:
            log(f"  {i + 1}/{len(tensors)} tensors, {time.perf_counter() - t0:.0f} s")
    w.close()
    return {"bytes": Path(path).stat().st_size, "expert_bytes": experts, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--experts", type=int, default=SHAPE["num_experts"])
    p.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    p.add_argument("--expert-type", default="Q4_0", choices=["Q4_0", "Q8_0", "MXFP4"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    shape = SHAPE | {"num_hidden_layers": a.layers, "num_experts": a.experts, "vocab_size": a.vocab,
                     "num_experts_per_tok": min(a.experts, SHAPE["num_experts_per_tok"])}
    r = write(a.out, shape, a.expert_type, a.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{a.out}: {r['bytes'] / 1e9:.2f} GB ({r['expert_bytes'] / 1e9:.2f} GB routed experts) in {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
