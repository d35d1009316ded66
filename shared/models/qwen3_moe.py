"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Per layer, for hidden states h:
    x  = RMSNorm(h)
    q  = RoPE(RMSNorm_head(W_q x)),  k = RoPE(RMSNorm_head(W_k x)),  v = W_v x      (GQA)
    h += W_o softmax(q k^T / sqrt(d) + causal) v
    x  = RMSNorm(h)
    p  = softmax(W_router x);  (w, e) = top_k(p);  w /= sum(w) if norm_topk_prob
    h += sum_j w_j * Expert_{e_j}(x),   Expert(x) = W_down (silu(W_gate x) * W_up x)
Layers in `mlp_only_layers`, or not a multiple of `decoder_sparse_step`, use one dense SwiGLU MLP.
"""

from __future__ import annotations

from .family import ConfigError, DecoderLayer, ExpertShape, Getter, ModelFamily
from .layers import Rotary, add_rms_norm_router_topk, linear, norm_linear, qk_norm_rope, rope_inv_freq, rope_parameters, router_topk, stack_rows, swiglu


class Qwen3Moe(ModelFamily):
    architectures = ("Qwen3MoeForCausalLM",)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.num_heads = self._req("num_attention_heads", int)
        self.num_kv_heads = int(cfg.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_heads)
        self.attention_bias = bool(cfg.get("attention_bias", False))
        self.intermediate_size = self._req("intermediate_size", int)
        n = cfg.get("num_experts", cfg.get("num_local_experts"))
        self.num_experts = int(n or 0)
        self.top_k = int(cfg.get("num_experts_per_tok") or 0)
        self.moe_intermediate_size = int(cfg.get("moe_intermediate_size") or 0)
        self.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
        self.mlp_only_layers = set(cfg.get("mlp_only_layers") or [])
        self.decoder_sparse_step = int(cfg.get("decoder_sparse_step") or 1)
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise ConfigError("Qwen3-MoE with use_sliding_window is not supported")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {self.cfg.get('hidden_act')!r} is not supported (silu only)")
        inv_freq, attn_factor = rope_inv_freq(rope_parameters(cfg), self.head_dim, self.max_position_embeddings)
        self.rotary = Rotary(inv_freq, attn_factor)

    def is_moe(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def experts(self, layer: int) -> ExpertShape:
        return ExpertShape(self.num_experts, self.top_k, self.hidden_size, self.moe_intermediate_size)

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        p, H, d = f"model.layers.{layer}.", self.hidden_size, self.head_dim
        t = {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (self.num_heads * d, H),
            p + "self_attn.k_proj.weight": (self.num_kv_heads * d, H),
            p + "self_attn.v_proj.weight": (self.num_kv_heads * d, H),
            p + "self_attn.o_proj.weight": (H, self.num_heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
        }
        if self.attention_bias:
            t[p + "self_attn.q_proj.bias"] = (self.num_heads * d,)
            t[p + "self_attn.k_proj.bias"] = (self.num_kv_heads * d,)
            t[p + "self_attn.v_proj.bias"] = (self.num_kv_heads * d,)
            t[p + "self_attn.o_proj.bias"] = (H,)
        if self.is_moe(layer):
            t[p + "mlp.gate.weight"] = (self.num_experts, H)
        else:
            I = self.intermediate_size
            t[p + "mlp.gate_proj.weight"] = (I, H)
            t[p + "mlp.up_proj.weight"] = (I, H)
            t[p + "mlp.down_proj.weight"] = (H, I)
        return t

    def make_layer(self, layer: int, get: Getter) -> DecoderLayer:
        return Qwen3MoeLayer(self, layer, get)


class Qwen3MoeLayer(DecoderLayer):
    def __init__(self, fam: Qwen3Moe, index: int, get: Getter):
        p = f"model.layers.{index}."
        self.f, self.index, self.is_moe = fam, index, fam.is_moe(index)
        self.ln1 = get(p + "input_layernorm.weight")
        self.ln2 = get(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        # q, k and v in one product: W_qkv = [W_q ; W_k ; W_v] (layers.stack_rows)
        self.wqkv = stack_rows(*(get(a + n + "_proj.weight") for n in "qkv"))
        self.bqkv = stack_rows(*(get(a + n + "_proj.bias") for n in "qkv")) if fam.attention_bias else None
        self.wo = get(a + "o_proj.weight")
        self.bo = get(a + "o_proj.bias") if fam.attention_bias else None
        self.q_norm, self.k_norm = get(a + "q_norm.weight"), get(a + "k_norm.weight")
        self.rotary = fam.rotary.to(self.wqkv.device)
        if self.is_moe:
            self.router = get(fam.router_names(index)[0])
        else:
            self.mlp = tuple(get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))

    def attention(self, x, slices, positions, kv):
        return self._attend(linear(x, self.wqkv, self.bqkv), slices, positions, kv)

    def norm_attention(self, h, slices, positions, kv):
        return self._attend(norm_linear(h, self.ln1, self.f.rms_norm_eps, self.wqkv, self.bqkv), slices, positions, kv)

    def _attend(self, qkv, slices, positions, kv):
        f, T = self.f, qkv.shape[0]
        qk, v = qkv.split([(f.num_heads + f.num_kv_heads) * f.head_dim, f.num_kv_heads * f.head_dim], -1)
        q, k = qk_norm_rope(qk.view(T, -1, f.head_dim), f.num_heads, self.q_norm, self.k_norm, f.rms_norm_eps, self.rotary, positions)
        v = v.view(T, f.num_kv_heads, f.head_dim)
        out = kv.attend(self.index, slices, q, k, v, scale=f.head_dim**-0.5)
        return linear(out.reshape(T, -1), self.wo, self.bo)

    def route(self, x):
        return router_topk(x, self.router, self.f.top_k, self.f.norm_topk_prob)

    def add_post_norm_route(self, h, a):
        return add_rms_norm_router_topk(h, a, self.ln2, self.f.rms_norm_eps, self.router, self.f.top_k, self.f.norm_topk_prob)

    def dense(self, x):
        return swiglu(x, *self.mlp)
