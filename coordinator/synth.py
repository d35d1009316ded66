"""`krasis-coord synth --shape NAME [--layers N] OUT`: a random-weight model of a real model's shape,
in Hugging Face layout (config.json, safetensors shards with an index, a byte-level tokenizer and a
chat template), so benchmarks of the real shapes need no download.

Weights are written one layer at a time (bounded RAM). Dense tensors are drawn from N(0, 0.02)
(norms are 1). Routed experts, which are almost all of the bytes, are windows of one shared random
block at pseudo-random offsets: their values are as random as the rest to the kernels and the
routing, and writing them runs at memory speed rather than at random-number speed.

Three kinds of tensor are not drawn like the rest, so that routing behaves like a trained model's
(docs/routing.md has the measurements). With every weight from N(0, 0.02), attention is near uniform,
so its output is the running mean of the context's values, which is much larger than a token's own
embedding: every token's hidden state is then mostly the same vector, and the routers send nearly
every token to the same few experts. The attention output projections are therefore drawn 40x
smaller (ATTN_OUT_STD), which leaves each token's own state in charge of its routing; and the
routers are orthonormal directions (router_weight), so that no expert is favoured by construction.
Where a family's attention layout is known (Recency), attention is made to look at the last few
tokens, so that consecutive tokens' experts overlap as a trained model's do, and the output
projections are scaled to that window's average instead. The dense MLPs' and shared experts'
matrices are scaled to their fan-in (MLP_GAIN), so that the residual does not outgrow the constant
that Recency's attention reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

SHAPES = {
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, hidden_act="silu",
    ),
    "qwen3-235b-a22b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=4096,
        intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, hidden_act="silu",
    ),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False,
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
        rope_theta=10000.0, hidden_act="silu",
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # Qwen3-Coder-Next's published config.json: 12 x (3 Gated DeltaNet + 1 gated attention layers),
    # every one MoE, rope_theta 5e6 on a quarter of each head, 262,144-token context.
    "qwen3-coder-next": dict(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=151936, hidden_size=2048,
        intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
        norm_topk_prob=True, full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.25},
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
        mlp_only_layers=[], attention_bias=False, hidden_act="silu",
    ),
    # transformers' GptOssConfig defaults are gpt-oss-120b's: sliding (128) and full attention alternating.
    "gpt-oss-120b": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
        intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        num_local_experts=128, num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True,
        hidden_act="silu",
    ),
}
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
POOL = 1 << 24  # elements of the shared random block the experts are windows of
DENSE_STD = 0.02
ATTN_OUT_STD = 0.0005  # the attention output projections (see above)
ATTN_OUT = re.compile(r"\.(self_attn\.o_proj|linear_attn\.out_proj)\.weight$")
LAYER = re.compile(r"layers\.(\d+)\.")
ROUTER = re.compile(r"\.mlp\.(gate|router)\.weight$")
MLP = re.compile(r"\.mlp\.(shared_experts?\.)?(gate|up|down)_proj\.weight$")
# The dense MLPs' and shared experts' matrices are drawn at MLP_GAIN / sqrt(fan-in), not DENSE_STD,
# so that what such a block writes into the residual does not grow with its width. At DENSE_STD,
# DeepSeek-V2-Lite's dense first layer (intermediate 10,944) and unweighted shared experts wrote more
# than a token's embedding, their normed inputs grew with the residual and so did their outputs: the
# residual's RMS went from 0.10 to 0.65 in four layers, attention's window became a shrinking share of
# it, and locality fell below 1.2. At 0.5 the residual stays at 0.103 (as in Qwen3-30B-A3B, which has
# no such blocks); at 0.8 it still grew by a fifth in four layers (docs/routing.md).
MLP_GAIN = 0.5
CONST_SHARE = 16  # 1 hidden channel in CONST_SHARE carries the shared constant (Recency)
CONST_RMS = 0.1  # its RMS over the hidden state, against 0.02 for a token's own embedding
RECENT_GAIN = 30.0  # the attention score between two tokens at distance 0 from that constant
RECENT_BAND = (1 / 4096, 1 / 8)  # the rotary frequencies (radians per token) that carry it
ATTN_MIX = 1.5  # a window's attention output over a token's own embedding, before averaging


class SynthError(ValueError):
    pass


# Where each family reads its queries and keys: (tensor, heads, rows per head, the rotary rows'
# offset in a head, adjacent pairs (else halves) rotate together); the rows that read values; a value's
# RMS (Qwen3's values read the normed token channels, DeepSeek's its normed latent) and the output
# projection's inputs.
_QK_LAYOUT = {
    "qwen3_moe": lambda f: dict(
        q=("self_attn.q_proj.weight", f.num_heads, f.head_dim, 0, False),
        k=("self_attn.k_proj.weight", f.num_kv_heads, f.head_dim, 0, False),
        v=("self_attn.v_proj.weight", slice(None)), norms=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        scale=f.head_dim**-0.5, value_rms=DENSE_STD * f.hidden_size**0.5 * DENSE_STD / CONST_RMS, o_in=f.num_heads * f.head_dim),
    "deepseek_v2": lambda f: dict(
        q=("self_attn.q_proj.weight", f.num_heads, f.qk_head_dim, f.qk_nope, True),
        k=("self_attn.kv_a_proj_with_mqa.weight", 1, f.kv_lora_rank + f.qk_rope, f.kv_lora_rank, True),
        v=("self_attn.kv_a_proj_with_mqa.weight", slice(0, f.kv_lora_rank)), norms=(), scale=f.softmax_scale,
        value_rms=DENSE_STD * f.kv_lora_rank**0.5, o_in=f.num_heads * f.v_head_dim),
}


class Recency:
    """Attention that looks at the last few tokens, so that consecutive tokens' states, and so their
    experts, overlap as in trained models (docs/routing.md, locality). A random-weight model has
    nothing that ties a token to its neighbours: scores of random queries and keys do not depend on
    distance. Here every token's embedding carries one constant in a block of channels (the last
    hidden / CONST_SHARE), and each KV head's query and key projections read it into the same random
    vector beta, with its energy only on rotary frequencies in RECENT_BAND. Under RoPE the score of
    two positions is then sum_i |beta_i|^2 cos(theta_i * distance): RECENT_GAIN at distance 0, near
    it within ~1 / RECENT_BAND[1] tokens, and incoherent (small) beyond, so softmax averages a short
    window rather than the whole context (whose running mean skews the routing). The constant's
    channels are zeroed where values are read and in the post-attention norms, so that neither values
    nor routers nor experts see it: a constant there would favour the same experts for every token.
    Families without a layout here (gpt-oss, Qwen3-Next) keep plain random attention."""

    def __init__(self, fam, g: torch.Generator):
        layout = _QK_LAYOUT.get(fam.cfg.get("model_type"))
        self.on = layout is not None
        if not self.on:
            return
        self.lay = layout(fam)
        H = fam.hidden_size
        self.block = slice(H - H // CONST_SHARE, H)
        n = H // CONST_SHARE
        self.const = CONST_RMS * (H / n) ** 0.5
        theta = fam.rotary.inv_freq.double()
        band = ((theta >= RECENT_BAND[0]) & (theta <= RECENT_BAND[1])).float()
        _, heads, rows, rope_at, adjacent = self.lay["k"]
        dr = 2 * len(theta)
        pair = torch.arange(dr) // 2 if adjacent else torch.arange(dr) % len(theta)
        # q.k carries attention_factor^2 (YaRN) and the softmax scale
        norm2 = RECENT_GAIN / (self.lay["scale"] * fam.rotary.attention_factor**2)
        beta = torch.randn(heads, dr, generator=g) * band[pair]
        self.beta = beta / beta.norm(dim=1, keepdim=True) * norm2**0.5
        # the normed constant channels are sqrt(H / n) each while the constant dominates the RMS
        self.column = self.beta / (n * H) ** 0.5
        self.rms = (norm2 / rows) ** 0.5
        self.mix_std = ATTN_MIX * DENSE_STD / (self.lay["value_rms"] * self.lay["o_in"] ** 0.5)

    def out_std(self, layer: int) -> float:
        """The attention output projection's standard deviation in `layer`. Each layer writes its
        window's average into the residual in a direction of its own (its own projection), and the
        residual keeps them all: at one mix for every layer the neighbours' shared part of a token's
        state grew layer after layer, and locality with it (Qwen3-30B-A3B: 1.6 at layer 0, 8.5 at
        layer 7). Amplitudes falling as 1 / (layer + 1) sum the shared variance to at most pi^2 / 6
        of layer 0's, so locality levels off."""
        return self.mix_std / (layer + 1) if self.on else ATTN_OUT_STD

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return t
        lay = self.lay
        if name == "model.embed_tokens.weight":
            t[:, self.block] = self.const
        elif name.endswith("post_attention_layernorm.weight"):
            t[self.block] = 0
        elif name.endswith(lay["norms"]):
            t.fill_(self.rms)
        if name.endswith(lay["v"][0]):
            t[lay["v"][1], self.block] = 0
        for key in "qk":
            tensor, heads, rows, rope_at, _ = lay[key]
            if name.endswith(tensor):
                group = heads // self.beta.shape[0]
                for h in range(heads):
                    r = h * rows + rope_at
                    t[r : r + self.beta.shape[1], self.block] = self.column[h // group, :, None].to(t.dtype)
        return t


def synth_config(shape: str, layers: int | None = None, experts: int | None = None, vocab: int | None = None,
                 config: dict | None = None) -> dict:
    """The shape's config.json; `config` overrides any of its values (tests shrink the dimensions)."""
    if shape not in SHAPES:
        raise SynthError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    cfg = dict(SHAPES[shape], torch_dtype="bfloat16", eos_token_id=None, bos_token_id=None, **(config or {}))
    if layers is not None:
        if layers < 1:
            raise SynthError("--layers must be at least 1")
        cfg["num_hidden_layers"] = layers
    if experts is not None:
        key = next(k for k in EXPERT_COUNT_KEYS if k in cfg)
        if not 0 < cfg["num_experts_per_tok"] <= experts:
            raise SynthError(f"--experts must be at least num_experts_per_tok ({cfg['num_experts_per_tok']})")
        cfg[key] = experts
    if vocab is not None:
        if vocab < 256:
            raise SynthError("--vocab must be at least 256 (the byte tokens)")
        cfg["vocab_size"] = vocab
    return cfg


def write_tokenizer(out: Path) -> None:
    """A byte-level tokenizer: 256 byte tokens (any text encodes, every id decodes), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20}))


def router_weight(num_experts: int, hidden: int, seed: int, logit_std: float = 1.0) -> torch.Tensor:
    """A router weight [num_experts, hidden] (float32): orthonormal random directions (normalized
    Gaussian rows where there are more experts than dimensions), scaled so that over unit-RMS
    inputs each expert's logit has standard deviation `logit_std`. Unlike Gaussian rows, no expert
    has a longer row than another, which would favour it for every input."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_experts, hidden, generator=g)
    rows = torch.linalg.qr(rows.T).Q.T if num_experts <= hidden else rows / rows.norm(dim=1, keepdim=True)
    return rows * logit_std


def synth_weights(cfg: dict, seed: int = 0, expert_std: float = 0.02):
    """synth's tensors for config `cfg`, without writing them: (family, shards, dense, window), with
    shards [(shard name, {dense tensor name: shape}, {routed expert tensor name: shape})] in file
    order. dense(name, shape) and window(shape) draw a tensor from the seeded streams, so calling
    them in the shards' order (dense tensors, then a shard's experts) gives synth's model exactly
    (benchmarks/synth_routing.py runs it layer by layer in memory)."""
    from ..shared.models.registry import family_for

    fam = family_for(cfg)
    g = torch.Generator().manual_seed(seed)
    # the experts' own stream: the same experts whether they go to the shards or to the cache
    g_experts = torch.Generator().manual_seed(seed + 1)
    pool = (torch.randn(POOL, generator=g) * expert_std).to(torch.bfloat16)

    recency = Recency(fam, torch.Generator().manual_seed(seed + 2))

    def draw(name, shape_):
        if len(shape_) == 1:
            return torch.ones(shape_)
        if ROUTER.search(name):
            return router_weight(*shape_, seed=int(torch.randint(0, 1 << 62, (1,), generator=g)))
        if ATTN_OUT.search(name):
            std = recency.out_std(int(LAYER.search(name)[1]))
        else:
            std = MLP_GAIN / shape_[-1] ** 0.5 if MLP.search(name) else DENSE_STD
        return torch.randn(shape_, generator=g) * std

    def dense(name, shape_):
        return recency(name, draw(name, shape_)).to(torch.bfloat16)

    def window(shape_, copy: bool = True):
        """The next expert tensor: a window of the pool, wrapping around its end. copy=False may
        return a view of the pool (for readers that only read it; a shard must own its tensors)."""
        n = 1
        for s in shape_:
            n *= s
        start = int(torch.randint(0, POOL, (1,), generator=g_experts))
        if start + n <= POOL:
            flat = pool[start : start + n]
            return flat.reshape(shape_).clone() if copy else flat.reshape(shape_)
        if n <= POOL:  # one wrap: the two pieces, not the whole pool repeated
            return torch.cat([pool[start:], pool[: start + n - POOL]]).reshape(shape_)
        return pool.repeat(-(-(start + n) // POOL))[start : start + n].reshape(shape_)

    shards = [("globals", fam.global_tensors(), {})] + [
        (f"layer{i:03d}", fam.layer_tensors(i), fam.expert_tensors(i) if fam.is_moe(i) else {}) for i in range(fam.num_layers)
    ]
    return fam, shards, dense, window


def synth(shape: str, out, layers: int | None = None, experts: int | None = None, vocab: int | None = None,
          seed: int = 0, expert_std: float = 0.02, expert_bits: int | None = None, group_size: int = 128,
          config: dict | None = None) -> Path:
    """With `expert_bits` (4 or 8) the routed experts are not written to the safetensors shards but
    straight into the expert cache of that precision (coordinator/convert.py), current for the
    shards written: runs with --cpu-bits/--gpu-bits of that precision and that group size use it
    as they would a converted cache. Qwen3-30B-A3B's experts are 58 GB in BF16 and 15 GB in INT4,
    which is what decides whether a benchmark machine's disk can hold the model."""
    from safetensors.torch import save_file

    cfg = synth_config(shape, layers, experts, vocab, config)
    fam, shards, dense, window = synth_weights(cfg, seed, expert_std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    if expert_bits not in (None, 4, 8):
        raise SynthError("--expert-bits must be 4 or 8")
    for name, plain, routed in tqdm(shards, desc="synth", unit="shard", disable=None):
        tensors = {k: dense(k, s) for k, s in plain.items()}
        if expert_bits is None:
            tensors.update({k: window(s) for k, s in routed.items()})
        fname = f"model-{name}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        index.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(out)
    if expert_bits is not None:
        _experts_to_cache(fam, out, expert_bits, group_size, window)
    return out


def _experts_to_cache(fam, out: Path, bits: int, group_size: int, window) -> None:
    """Quantized on every core as `convert` does (a thread per expert), each layer's bf16 experts drawn
    in order on this thread, so the cache does not depend on the core count."""
    import copy
    import functools

    from ..shared.weight_cache import CacheWriter, fingerprint
    from ..shared.weights import open_source
    from .convert import cache_dir, expert_cache, expert_format, expert_task, reserve_experts, run_expert_tasks

    fmt = expert_format(bits, torch.bfloat16, group_size)
    path, options = expert_cache(cache_dir(out), fmt)
    layers = [i for i in range(fam.num_layers) if fam.is_moe(i)]
    for i in layers:
        fmt.tensors(fam.experts(i), 1)  # the group size must divide K

    def tasks(w):
        for layer in layers:
            routed = {k: window(s, copy=False) for k, s in fam.expert_tensors(layer).items()}
            one = copy.copy(fam)  # load_expert may keep a layer's tensors on the family (gpt-oss): one per layer
            for e in range(fam.experts(layer).num):
                yield functools.partial(expert_task, w, one, routed.__getitem__, fmt, layer, e)

    with CacheWriter(path, "experts", options, fingerprint(open_source(out).source_files())) as w:
        reserve_experts(w, fam, fmt, layers)
        run_expert_tasks(tasks(w), sum(fam.experts(i).num for i in layers), f"synth experts ({fmt.describe()})")
