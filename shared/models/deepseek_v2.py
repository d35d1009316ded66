"""DeepSeek-V2 (DeepSeek-V2, DeepSeek-V2-Lite): multi-head latent attention and fine-grained MoE.

Attention (MLA), for x = RMSNorm(h):
    q          = W_q x                   or  W_qb RMSNorm(W_qa x)       (q_lora_rank set)
    q          = [q_nope ; q_rope]       per head, q_rope = RoPE(q_rope)
    [c ; k_r]  = W_kva x                 c: the kv latent (kv_lora_rank), k_r: one shared rope key
    c          = RMSNorm(c),  k_r = RoPE(k_r)       -- c and k_r are what the cache keeps
    [k_nope ; v] = W_kvb c               per head
    h         += W_o softmax([q_nope;q_rope] [k_nope;k_r]^T * s + causal) v
RoPE is the interleaved (complex pair) form; with YaRN, cos/sin carry YaRN's attention factor and
s = mscale(factor, mscale_all_dim)^2 / sqrt(qk_nope + qk_rope).
Decode attends in the latent space instead ("absorbed"; W_kvb = [W_UK ; W_UV] per head):
    h         += W_o W_UV softmax([W_UK^T q_nope;q_rope] [c;k_r]^T * s + causal) c

MoE, for x = RMSNorm(h):
    p = softmax(W_router x) in float32
    greedy:               (w, e) = top_k(p)
    group_limited_greedy: keep the topk_group groups (of n_group) with the largest max p, then top_k
    w = w / sum(w) if norm_topk_prob (and k > 1), else w * routed_scaling_factor
    h += sum_j w_j Expert_{e_j}(x) + SharedExperts(x)
Layers below first_k_dense_replace use one dense SwiGLU MLP.

Note: transformers 5 drops `norm_topk_prob` for this family; we follow DeepSeek's own modeling code.
"""

from __future__ import annotations

import torch

from .family import ConfigError, DecoderLayer, ExpertShape, Getter, ModelFamily
from .layers import Rotary, _yarn_mscale, attend, linear, rms_norm, rope_inv_freq, rope_parameters, rows_for_slices, swiglu

# DeepSeek's own code builds the latent norms with the RMSNorm default, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class DeepseekV2(ModelFamily):
    architectures = ("DeepseekV2ForCausalLM",)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.num_heads = self._req("num_attention_heads", int)
        self.q_lora_rank = cfg.get("q_lora_rank")
        self.kv_lora_rank = self._req("kv_lora_rank", int)
        self.qk_nope = self._req("qk_nope_head_dim", int)
        self.qk_rope = self._req("qk_rope_head_dim", int)
        self.v_head_dim = self._req("v_head_dim", int)
        self.qk_head_dim = self.qk_nope + self.qk_rope
        self.attention_bias = bool(cfg.get("attention_bias", False))
        self.mlp_bias = bool(cfg.get("mlp_bias", False))
        self.intermediate_size = self._req("intermediate_size", int)
        self.num_experts = int(cfg.get("n_routed_experts") or 0)
        self.top_k = int(cfg.get("num_experts_per_tok") or 0)
        self.moe_intermediate_size = int(cfg.get("moe_intermediate_size") or 0)
        self.n_shared = int(cfg.get("n_shared_experts") or 0)
        self.first_k_dense = int(cfg.get("first_k_dense_replace") or 0)
        self.routed_scaling_factor = float(cfg.get("routed_scaling_factor") or 1.0)
        self.topk_method = cfg.get("topk_method") or "greedy"
        self.n_group = cfg.get("n_group")
        self.topk_group = cfg.get("topk_group")
        self.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported (greedy, group_limited_greedy)")
        if self.topk_method == "group_limited_greedy":
            if not self.n_group or not self.topk_group or self.num_experts % self.n_group:
                raise ConfigError("group_limited_greedy needs n_group dividing n_routed_experts and topk_group")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.top_k} must be in 1..n_routed_experts ({self.num_experts})")
        rope = rope_parameters(cfg)
        inv_freq, attn_factor = rope_inv_freq(rope, self.qk_rope, self.max_position_embeddings)
        self.rotary = Rotary(inv_freq, attn_factor)
        self.softmax_scale = self.qk_head_dim**-0.5
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            m = _yarn_mscale(rope["factor"], rope["mscale_all_dim"])
            self.softmax_scale *= m * m

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense

    def experts(self, layer: int) -> ExpertShape:
        return ExpertShape(self.num_experts, self.top_k, self.hidden_size, self.moe_intermediate_size)

    def _mlp_tensors(self, prefix: str, inter: int) -> dict:
        H, t = self.hidden_size, {}
        for n, shape in (("gate", (inter, H)), ("up", (inter, H)), ("down", (H, inter))):
            t[f"{prefix}{n}_proj.weight"] = shape
            if self.mlp_bias:
                t[f"{prefix}{n}_proj.bias"] = (shape[0],)
        return t

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        p, H, nh = f"model.layers.{layer}.", self.hidden_size, self.num_heads
        a = p + "self_attn."
        t = {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            a + "kv_a_proj_with_mqa.weight": (self.kv_lora_rank + self.qk_rope, H),
            a + "kv_a_layernorm.weight": (self.kv_lora_rank,),
            a + "kv_b_proj.weight": (nh * (self.qk_nope + self.v_head_dim), self.kv_lora_rank),
            a + "o_proj.weight": (H, nh * self.v_head_dim),
        }
        if self.q_lora_rank is None:
            t[a + "q_proj.weight"] = (nh * self.qk_head_dim, H)
        else:
            t[a + "q_a_proj.weight"] = (self.q_lora_rank, H)
            t[a + "q_a_layernorm.weight"] = (self.q_lora_rank,)
            t[a + "q_b_proj.weight"] = (nh * self.qk_head_dim, self.q_lora_rank)
        if self.attention_bias:
            t[a + "kv_a_proj_with_mqa.bias"] = (self.kv_lora_rank + self.qk_rope,)
            t[a + "o_proj.bias"] = (H,)
            if self.q_lora_rank is not None:
                t[a + "q_a_proj.bias"] = (self.q_lora_rank,)
        if self.is_moe(layer):
            t[p + "mlp.gate.weight"] = (self.num_experts, H)
            if self.n_shared:
                t.update(self._mlp_tensors(p + "mlp.shared_experts.", self.moe_intermediate_size * self.n_shared))
        else:
            t.update(self._mlp_tensors(p + "mlp.", self.intermediate_size))
        return t

    def make_layer(self, layer: int, get: Getter) -> DecoderLayer:
        return DeepseekV2Layer(self, layer, get)


class DeepseekV2Layer(DecoderLayer):
    def __init__(self, fam: DeepseekV2, index: int, get: Getter):
        p, a = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
        self.f, self.index, self.is_moe = fam, index, fam.is_moe(index)

        def opt(name):
            return get(name) if name in fam.layer_tensors(index) else None

        self.ln1, self.ln2 = get(p + "input_layernorm.weight"), get(p + "post_attention_layernorm.weight")
        if fam.q_lora_rank is None:
            self.wq = get(a + "q_proj.weight")
        else:
            self.wqa, self.bqa = get(a + "q_a_proj.weight"), opt(a + "q_a_proj.bias")
            self.q_a_norm, self.wqb = get(a + "q_a_layernorm.weight"), get(a + "q_b_proj.weight")
        self.wkva, self.bkva = get(a + "kv_a_proj_with_mqa.weight"), opt(a + "kv_a_proj_with_mqa.bias")
        self.kv_a_norm, wkvb = get(a + "kv_a_layernorm.weight"), get(a + "kv_b_proj.weight")
        # dense in the compute dtype even under --attn-bits 8: decode multiplies by its per-head
        # slices every step, and linear() would dequantize the INT8 form per call anyway (to this
        # same matrix, so prompts compute exactly what they did)
        self.wkvb = wkvb if isinstance(wkvb, torch.Tensor) else wkvb.dequantize(self.ln1.dtype)
        w = self.wkvb.view(fam.num_heads, fam.qk_nope + fam.v_head_dim, fam.kv_lora_rank)
        self.w_uk, self.w_uv = w[:, : fam.qk_nope], w[:, fam.qk_nope :]
        self.wo, self.bo = get(a + "o_proj.weight"), opt(a + "o_proj.bias")
        self.rotary = fam.rotary.to(self.wo.device)

        def mlp(prefix):
            return [(get(f"{prefix}{n}_proj.weight"), opt(f"{prefix}{n}_proj.bias")) for n in ("gate", "up", "down")]

        if self.is_moe:
            self.router = get(fam.router_names(index)[0])
            self.shared_mlp = mlp(p + "mlp.shared_experts.") if fam.n_shared else None
        else:
            self.mlp = mlp(p + "mlp.")

    def attention(self, x, slices, positions, kv):
        f, T = self.f, x.shape[0]
        if f.q_lora_rank is None:
            q = linear(x, self.wq)
        else:
            q = linear(rms_norm(linear(x, self.wqa, self.bqa), self.q_a_norm, LATENT_NORM_EPS), self.wqb)
        q = q.view(T, f.num_heads, f.qk_head_dim)
        q_nope, q_rope = q.split([f.qk_nope, f.qk_rope], dim=-1)
        c, k_rope = linear(x, self.wkva, self.bkva).split([f.kv_lora_rank, f.qk_rope], dim=-1)
        c = rms_norm(c, self.kv_a_norm, LATENT_NORM_EPS).view(T, 1, f.kv_lora_rank)  # one head, shared by all
        q_rope = self.rotary.interleaved(q_rope, positions)
        k_rope = self.rotary.interleaved(k_rope.reshape(T, 1, f.qk_rope), positions)
        if kv.decode_kernel(slices):
            out = self._absorbed(kv, slices, q_nope, q_rope, c, k_rope)
        else:
            out = torch.cat([self._expanded(kv, s, q_nope[a:b], q_rope[a:b], c[a:b], k_rope[a:b])
                             for (a, b), s in zip(rows_for_slices(slices), slices)])
        return linear(out.reshape(T, -1), self.wo, self.bo)

    def _expanded(self, kv, s, q_nope, q_rope, c, k_rope):
        """Prompt chunks: [k_nope ; v] = W_kvb c for every cached token, then multi-head attention."""
        f = self.f
        C, KR = kv.update(self.index, s, c, k_rope)
        k_nope, v = linear(C, self.wkvb).view(-1, f.num_heads, f.qk_nope + f.v_head_dim).split(
            [f.qk_nope, f.v_head_dim], dim=-1
        )
        k = torch.cat([k_nope, KR.expand(-1, f.num_heads, -1)], dim=-1)
        return attend(torch.cat([q_nope, q_rope], dim=-1), k, v, s.start, f.softmax_scale)

    def _absorbed(self, kv, slices, q_nope, q_rope, c, k_rope):
        """Decode: q_nope . (W_UK c) = (W_UK^T q_nope) . c, so attention runs over the cached latent
        itself (keys [c ; k_r], values c, one head for all), and W_UV maps its output back per head;
        the cache is never up-projected."""
        q_lat = torch.einsum("thn,hnr->thr", q_nope, self.w_uk)
        o_lat = kv.attend(self.index, slices, torch.cat([q_lat, q_rope], dim=-1), c, k_rope,
                          scale=self.f.softmax_scale, keys=(0, 1), values=0)
        return torch.einsum("thr,hvr->thv", o_lat, self.w_uv)

    def route(self, x):
        f = self.f
        probs = torch.softmax(torch.nn.functional.linear(x.float(), self.router.float()), dim=-1)
        if f.topk_method == "group_limited_greedy":
            T = probs.shape[0]
            group_max = probs.view(T, f.n_group, -1).max(dim=-1).values
            keep = torch.topk(group_max, f.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_max).scatter_(1, keep, 1.0).bool()
            probs = probs.masked_fill(~group_mask.repeat_interleave(f.num_experts // f.n_group, dim=1), 0.0)
        weights, ids = torch.topk(probs, f.top_k, dim=-1, sorted=False)
        if f.top_k > 1 and f.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * f.routed_scaling_factor
        return ids, weights

    def shared(self, x):
        return None if self.shared_mlp is None else _swiglu_bias(x, self.shared_mlp)

    def dense(self, x):
        return _swiglu_bias(x, self.mlp)


def _swiglu_bias(x, mlp):
    (g, bg), (u, bu), (d, bd) = mlp
    if bg is None:
        return swiglu(x, g, u, d)
    return linear(torch.nn.functional.silu(linear(x, g, bg)) * linear(x, u, bu), d, bd)
