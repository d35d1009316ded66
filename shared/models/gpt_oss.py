"""gpt-oss (gpt-oss-20b, gpt-oss-120b).

Per layer, for hidden states h:
    x  = RMSNorm(h)
    q, k, v = W_q x + b_q, W_k x + b_k, W_v x + b_v;   q, k = RoPE(q), RoPE(k)      (GQA, YaRN)
    p  = softmax([q k^T / sqrt(d) + mask, s_head])[:-1]     one learned sink logit s per head takes
                                                            probability mass but adds no value
    h += W_o (p v) + b_o       mask: causal; on "sliding_attention" layers also key > query - window
    x  = RMSNorm(h)
    l  = W_r x + b_r;  (l_k, e) = top_k(l);  w = softmax(l_k)
    h += sum_j w_j Expert_{e_j}(x),   Expert(x) = W_down act(W_gate x + b_gate, W_up x + b_up) + b_down
    act(g, u) = (clamp(u, -L, L) + 1) * g' * sigmoid(alpha g'),  g' = min(g, L)   (alpha 1.702, L 7)

The checkpoint fuses a layer's experts into 3D tensors: gate_up_proj [E, H, 2I] with gate and up in
alternating columns, down_proj [E, I, H], or, as published, the MXFP4 form of their transposes:
`*_blocks` (two 4-bit E2M1 values per byte, 32 per block) and `*_scales` (a power of two per block,
biased by 127). load_expert turns either into the store's per-expert [gate; up] rows.
"""

from __future__ import annotations

import torch

from ..moe import GPTOSS_ALPHA, GPTOSS_LIMIT
from .family import ConfigError, DecoderLayer, ExpertShape, Getter, ModelFamily
from .layers import Rotary, linear, rope_inv_freq, rope_parameters, stack_rows

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32]: the low nibble of
    byte j is element 2j, the high nibble element 2j + 1, each times 2^(scale - 127)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1).flatten(-2)
    out = torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127)
    return out.flatten(-2)


class GptOss(ModelFamily):
    architectures = ("GptOssForCausalLM",)
    expert_act = "gptoss"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.num_heads = self._req("num_attention_heads", int)
        self.num_kv_heads = int(cfg.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_heads)
        self.attention_bias = bool(cfg.get("attention_bias", True))
        self.num_experts = self._req("num_local_experts", int)
        self.top_k = self._req("num_experts_per_tok", int)
        self.inter = self._req("intermediate_size", int)
        self.sliding_window = cfg.get("sliding_window")
        self.layer_types = list(cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_layers)
        ])
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(f"layer_types must list sliding_attention/full_attention for each of {self.num_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.top_k} must be in 1..num_local_experts ({self.num_experts})")
        for key, want in (("swiglu_alpha", GPTOSS_ALPHA), ("swiglu_limit", GPTOSS_LIMIT)):
            if float(cfg.get(key, want)) != want:
                raise ConfigError(f"{key} = {cfg[key]} is not supported (only {want}, as in gpt-oss)")
        quant = (cfg.get("quantization_config") or {}).get("quant_method")
        if quant not in (None, "mxfp4"):
            raise ConfigError(f"quantization_config quant_method {quant!r} is not supported for gpt-oss (mxfp4 or none)")
        self.mxfp4 = quant == "mxfp4"
        if self.mxfp4 and (self.hidden_size % MXFP4_BLOCK or self.inter % MXFP4_BLOCK):
            raise ConfigError(f"MXFP4 experts need hidden_size and intermediate_size divisible by {MXFP4_BLOCK}")
        inv_freq, attn_factor = rope_inv_freq(rope_parameters(cfg), self.head_dim, self.max_position_embeddings)
        self.rotary = Rotary(inv_freq, attn_factor)
        self._fused: tuple[int, dict[str, torch.Tensor]] | None = None

    def router_names(self, layer: int) -> tuple[str, str | None]:
        p = f"model.layers.{layer}.mlp.router."
        return p + "weight", p + "bias"

    def is_moe(self, layer: int) -> bool:
        return True

    def experts(self, layer: int) -> ExpertShape:
        return ExpertShape(self.num_experts, self.top_k, self.hidden_size, self.inter, act="gptoss", bias=True)

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        p, H, d = f"model.layers.{layer}.", self.hidden_size, self.head_dim
        a, nq, nkv = p + "self_attn.", self.num_heads * d, self.num_kv_heads * d
        t = {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            a + "q_proj.weight": (nq, H),
            a + "k_proj.weight": (nkv, H),
            a + "v_proj.weight": (nkv, H),
            a + "o_proj.weight": (H, nq),
            a + "sinks": (self.num_heads,),
            p + "mlp.router.weight": (self.num_experts, H),
            p + "mlp.router.bias": (self.num_experts,),
        }
        if self.attention_bias:
            t |= {a + "q_proj.bias": (nq,), a + "k_proj.bias": (nkv,), a + "v_proj.bias": (nkv,), a + "o_proj.bias": (H,)}
        return t

    def expert_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        p, E, H, I = f"model.layers.{layer}.mlp.experts.", self.num_experts, self.hidden_size, self.inter
        t = {p + "gate_up_proj_bias": (E, 2 * I), p + "down_proj_bias": (E, H)}
        if self.mxfp4:
            B = MXFP4_BLOCK
            t |= {
                p + "gate_up_proj_blocks": (E, 2 * I, H // B, B // 2),
                p + "gate_up_proj_scales": (E, 2 * I, H // B),
                p + "down_proj_blocks": (E, H, I // B, B // 2),
                p + "down_proj_scales": (E, H, I // B),
            }
        else:
            t |= {p + "gate_up_proj": (E, H, 2 * I), p + "down_proj": (E, I, H)}
        return t

    def load_expert(self, get: Getter, layer: int, e: int) -> dict[str, torch.Tensor]:
        # The fused tensors hold every expert of the layer: read them once per layer, not per expert.
        if self._fused is None or self._fused[0] != layer:
            self._fused = (layer, {n.rsplit(".", 1)[1]: get(n) for n in self.expert_tensors(layer)})
        t = self._fused[1]
        if self.mxfp4:
            gate_up = mxfp4_dequantize(t["gate_up_proj_blocks"][e], t["gate_up_proj_scales"][e])  # [2I, H]
            down = mxfp4_dequantize(t["down_proj_blocks"][e], t["down_proj_scales"][e])  # [H, I]
        else:
            gate_up, down = t["gate_up_proj"][e].T, t["down_proj"][e].T
        bias = t["gate_up_proj_bias"][e]
        return {
            "gate": gate_up[0::2], "up": gate_up[1::2], "down": down,
            "gate_bias": bias[0::2], "up_bias": bias[1::2], "down_bias": t["down_proj_bias"][e],
        }

    def make_layer(self, layer: int, get: Getter) -> DecoderLayer:
        return GptOssLayer(self, layer, get)


class GptOssLayer(DecoderLayer):
    def __init__(self, fam: GptOss, index: int, get: Getter):
        p, a = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
        self.f, self.index, self.is_moe = fam, index, True
        self.ln1, self.ln2 = get(p + "input_layernorm.weight"), get(p + "post_attention_layernorm.weight")
        # q, k and v in one product: W_qkv = [W_q ; W_k ; W_v] (layers.stack_rows)
        self.wqkv = stack_rows(*(get(a + n + "_proj.weight") for n in "qkv"))
        self.bqkv = stack_rows(*(get(a + n + "_proj.bias") for n in "qkv")) if fam.attention_bias else None
        self.wo = get(a + "o_proj.weight")
        self.bo = get(a + "o_proj.bias") if fam.attention_bias else None
        self.sinks = get(a + "sinks")
        self.window = fam.sliding_window if fam.layer_types[index] == "sliding_attention" else None
        self.router, self.router_bias = map(get, fam.router_names(index))
        self.rotary = fam.rotary.to(self.wqkv.device)

    def attention(self, x, slices, positions, kv):
        f, T = self.f, x.shape[0]
        q, k, v = linear(x, self.wqkv, self.bqkv).split([f.num_heads * f.head_dim, *(2 * [f.num_kv_heads * f.head_dim])], -1)
        q = self.rotary.rotate_half(q.view(T, f.num_heads, f.head_dim), positions)
        k = self.rotary.rotate_half(k.view(T, f.num_kv_heads, f.head_dim), positions)
        v = v.view(T, f.num_kv_heads, f.head_dim)
        out = kv.attend(self.index, slices, q, k, v, scale=f.head_dim**-0.5, window=self.window, sinks=self.sinks)
        return linear(out.reshape(T, -1), self.wo, self.bo)

    def route(self, x):
        top, ids = torch.topk(linear(x, self.router, self.router_bias), self.f.top_k, dim=-1)
        return ids, torch.softmax(top.float(), dim=-1)
