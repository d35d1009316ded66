"""Qwen3-Next (Qwen3-Next-80B-A3B, Qwen3-Coder-Next): a hybrid stack of Gated DeltaNet linear
attention and gated full attention, each followed by a Qwen3-style MoE with a gated shared expert.

Norms are "(1 + w)" RMSNorms: y = (x / rms(x)) * (1 + w), computed in float32.

Full-attention layer ("full_attention" in layer_types), for x = Norm(h):
    [q | gate] = W_q x  (per head),  q = RoPE_partial(Norm_head(q)),  k = RoPE_partial(Norm_head(W_k x)),  v = W_v x
    out = W_o ( softmax(q k^T / sqrt(d) + causal) v  *  sigmoid(gate) )
RoPE_partial rotates the first partial_rotary_factor * head_dim dims of each head (GPT-NeoX layout).

Linear-attention layer (Gated DeltaNet), per sequence, for x = Norm(h):
    [q k v z] = W_qkvz x,   [b a] = W_ba x           (grouped per key head, see _split)
    [q k v] = silu(causal_conv1d([q k v]))           depthwise, kernel K, state = last K-1 inputs
    q, k = l2norm(q), l2norm(k);  q /= sqrt(d_k);  beta = sigmoid(b);  g = -exp(A_log) softplus(a + dt_bias)
    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t     (S: [d_k, d_v] per value head)
    out = W_out ( GatedNorm(o, z) ),   GatedNorm(o, z) = w * o / rms(o) * silu(z)
The state (conv inputs and S) lives in the worker's cache and is freed with the sequence. Prompts use
the chunked form of the recurrence (gated_delta_chunked), single tokens the step form
(gated_delta_recurrent, the plain reference the chunked form is tested against).

MoE: p = softmax(W_router x);  (w, e) = top_k(p);  w /= sum(w) if norm_topk_prob;
    y = sum_j w_j Expert_{e_j}(x) + sigmoid(w_sg . x) * SharedExpert(x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .family import ConfigError, DecoderLayer, Getter
from .layers import Rotary, linear, rms_norm, rope_inv_freq, rope_parameters, rows_for_slices, stack_rows, swiglu
from .qwen3_moe import Qwen3Moe, Qwen3MoeLayer


def rms_norm_1p(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """(x / rms(x)) * (1 + w), all in float32, then back to x's dtype."""
    return rms_norm(x.float(), 1.0 + w.float(), eps).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_recurrent(q, k, v, g, beta, state):
    """The gated delta rule one token at a time. q, k [T, H, dk] (already l2-normalised and scaled),
    v [T, H, dv], g, beta [T, H], state [H, dk, dv] float32 -> (out [T, H, dv] float32, new state)."""
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    S = state
    for t in range(q.shape[0]):
        S = S * g[t].exp()[:, None, None]
        kv_mem = (S * k[t, :, :, None]).sum(dim=-2)
        delta = (v[t] - kv_mem) * beta[t, :, None]
        S = S + k[t, :, :, None] * delta[:, None, :]
        out[t] = (S * q[t, :, :, None]).sum(dim=-2)
    return out, S


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The same recurrence in chunks of `chunk` tokens: within a chunk the delta-rule updates are
    condensed by a unit-lower-triangular solve (the UT transform), so the sequential part is one
    step per chunk. Arguments and result as gated_delta_recurrent."""
    T = q.shape[0]
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q, k, v))  # [H, T', d]
    beta, g = (F.pad(x.transpose(0, 1), (0, pad)) for x in (beta, g))  # [H, T']
    H, n = q.shape[0], q.shape[1] // chunk
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(H, n, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    cum = g.reshape(H, n, chunk).cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    S, out = state, torch.empty_like(new_v)
    for i in range(n):
        v_i = new_v[:, i] - k_cum[:, i] @ S
        out[:, i] = q[:, i] @ S + intra[:, i] @ v_i
        S = S * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_i
    return out.reshape(H, -1, out.shape[-1])[:, :T].transpose(0, 1), S


class Qwen3Next(Qwen3Moe):
    architectures = ("Qwen3NextForCausalLM",)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        n = self.num_layers
        interval = int(cfg.get("full_attention_interval") or 4)
        self.layer_types = list(cfg.get("layer_types") or [
            "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)
        ])
        if len(self.layer_types) != n or set(self.layer_types) - {"linear_attention", "full_attention"}:
            raise ConfigError(f"layer_types must list linear_attention/full_attention for each of {n} layers")
        self.lin_k_heads = self._req("linear_num_key_heads", int)
        self.lin_v_heads = self._req("linear_num_value_heads", int)
        self.lin_dk = self._req("linear_key_head_dim", int)
        self.lin_dv = self._req("linear_value_head_dim", int)
        self.conv_kernel = int(cfg.get("linear_conv_kernel_dim") or 4)
        if self.lin_v_heads % self.lin_k_heads:
            raise ConfigError(f"linear_num_value_heads {self.lin_v_heads} is not a multiple of linear_num_key_heads {self.lin_k_heads}")
        self.shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
        params = rope_parameters(cfg)
        params.setdefault("partial_rotary_factor", 0.25)  # transformers' default for this family
        self.rotary_dim = int(self.head_dim * float(params["partial_rotary_factor"]))
        inv_freq, attn_factor = rope_inv_freq(params, self.rotary_dim, self.max_position_embeddings)
        self.rotary = Rotary(inv_freq, attn_factor)

    @property
    def conv_dim(self) -> int:
        return 2 * self.lin_k_heads * self.lin_dk + self.lin_v_heads * self.lin_dv

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        p, H, d = f"model.layers.{layer}.", self.hidden_size, self.head_dim
        t = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        if self.layer_types[layer] == "full_attention":
            a = p + "self_attn."
            t |= {
                a + "q_proj.weight": (2 * self.num_heads * d, H),
                a + "k_proj.weight": (self.num_kv_heads * d, H),
                a + "v_proj.weight": (self.num_kv_heads * d, H),
                a + "o_proj.weight": (H, self.num_heads * d),
                a + "q_norm.weight": (d,),
                a + "k_norm.weight": (d,),
            }
            if self.attention_bias:
                t |= {a + "q_proj.bias": (2 * self.num_heads * d,), a + "k_proj.bias": (self.num_kv_heads * d,),
                      a + "v_proj.bias": (self.num_kv_heads * d,), a + "o_proj.bias": (H,)}
        else:
            a, kd, vd = p + "linear_attn.", self.lin_k_heads * self.lin_dk, self.lin_v_heads * self.lin_dv
            t |= {
                a + "in_proj_qkvz.weight": (2 * kd + 2 * vd, H),
                a + "in_proj_ba.weight": (2 * self.lin_v_heads, H),
                a + "conv1d.weight": (self.conv_dim, 1, self.conv_kernel),
                a + "dt_bias": (self.lin_v_heads,),
                a + "A_log": (self.lin_v_heads,),
                a + "norm.weight": (self.lin_dv,),
                a + "out_proj.weight": (H, vd),
            }
        if self.is_moe(layer):
            S = self.shared_inter
            t |= {
                p + "mlp.gate.weight": (self.num_experts, H),
                p + "mlp.shared_expert.gate_proj.weight": (S, H),
                p + "mlp.shared_expert.up_proj.weight": (S, H),
                p + "mlp.shared_expert.down_proj.weight": (H, S),
                p + "mlp.shared_expert_gate.weight": (1, H),
            }
        else:
            I = self.intermediate_size
            t |= {p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)}
        return t

    def final_norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm_1p(h, weight, self.rms_norm_eps)

    def make_layer(self, layer: int, get: Getter) -> DecoderLayer:
        return Qwen3NextLayer(self, layer, get)


class Qwen3NextLayer(DecoderLayer):
    route = Qwen3MoeLayer.route  # same softmax / top-k / norm_topk_prob router

    def __init__(self, fam: Qwen3Next, index: int, get: Getter):
        p = f"model.layers.{index}."
        self.f, self.index, self.is_moe = fam, index, fam.is_moe(index)
        self.linear_attn = fam.layer_types[index] == "linear_attention"
        self.graphable = not self.linear_attn  # its recurrent state is per sequence, updated in place
        self.ln1, self.ln2 = get(p + "input_layernorm.weight"), get(p + "post_attention_layernorm.weight")
        if self.linear_attn:
            a = p + "linear_attn."
            self.w_qkvz, self.w_ba = get(a + "in_proj_qkvz.weight"), get(a + "in_proj_ba.weight")
            self.conv_w = get(a + "conv1d.weight")  # [C, 1, K]
            self.dt_bias, self.A_log = get(a + "dt_bias"), get(a + "A_log")
            self.norm_w, self.w_out = get(a + "norm.weight"), get(a + "out_proj.weight")
        else:
            a = p + "self_attn."
            # q (with its gate), k and v in one product: W_qkv = [W_q ; W_k ; W_v] (layers.stack_rows)
            self.wqkv = stack_rows(*(get(a + n + "_proj.weight") for n in "qkv"))
            self.bqkv = stack_rows(*(get(a + n + "_proj.bias") for n in "qkv")) if fam.attention_bias else None
            self.wo = get(a + "o_proj.weight")
            self.bo = get(a + "o_proj.bias") if fam.attention_bias else None
            self.q_norm, self.k_norm = get(a + "q_norm.weight"), get(a + "k_norm.weight")
            self.rotary = fam.rotary.to(self.wqkv.device)
        if self.is_moe:
            self.router = get(fam.router_names(index)[0])
            self.shared_mlp = tuple(get(p + f"mlp.shared_expert.{n}_proj.weight") for n in ("gate", "up", "down"))
            self.shared_gate = get(p + "mlp.shared_expert_gate.weight")
        else:
            self.mlp = tuple(get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))

    def input_norm(self, h):
        return rms_norm_1p(h, self.ln1, self.f.rms_norm_eps)

    def post_norm(self, h):
        return rms_norm_1p(h, self.ln2, self.f.rms_norm_eps)

    def add_post_norm(self, h, a):
        h = h + a
        return h, self.post_norm(h)

    def attention(self, x, slices, positions, kv):
        return self._delta_net(x, slices, kv) if self.linear_attn else self._gated_attention(x, slices, positions, kv)

    def _rope(self, x, positions):
        r = self.f.rotary_dim
        return torch.cat([self.rotary.rotate_half(x[..., :r], positions), x[..., r:]], dim=-1)

    def _gated_attention(self, x, slices, positions, kv):
        f, T, d = self.f, x.shape[0], self.f.head_dim
        qg, k, v = linear(x, self.wqkv, self.bqkv).split([f.num_heads * 2 * d, *(2 * [f.num_kv_heads * d])], -1)
        q, gate = qg.reshape(T, f.num_heads, 2 * d).chunk(2, dim=-1)
        q = self._rope(rms_norm_1p(q, self.q_norm, f.rms_norm_eps), positions)
        k = self._rope(rms_norm_1p(k.reshape(T, f.num_kv_heads, d), self.k_norm, f.rms_norm_eps), positions)
        v = v.reshape(T, f.num_kv_heads, d)
        o = kv.attend(self.index, slices, q, k, v, scale=d**-0.5).reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1))
        return linear(o, self.wo, self.bo)

    def _split(self, x):
        """The projections grouped per key head, as the checkpoint lays them out:
        W_qkvz rows = [q (dk), k (dk), v (r dv), z (r dv)] per key head, W_ba rows = [b (r), a (r)] per
        key head, with r = value heads per key head."""
        f, T = self.f, x.shape[0]
        r = f.lin_v_heads // f.lin_k_heads
        qkvz = linear(x, self.w_qkvz).view(T, f.lin_k_heads, 2 * f.lin_dk + 2 * r * f.lin_dv)
        q, k, v, z = qkvz.split([f.lin_dk, f.lin_dk, r * f.lin_dv, r * f.lin_dv], dim=-1)
        b, a = linear(x, self.w_ba).view(T, f.lin_k_heads, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
        return mixed, z.reshape(T, f.lin_v_heads, f.lin_dv), b.reshape(T, -1), a.reshape(T, -1)

    def _delta_net(self, x, slices, kv):
        f, T = self.f, x.shape[0]
        mixed, z, b, a = self._split(x)
        beta = torch.sigmoid(b)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        kd, r = f.lin_k_heads * f.lin_dk, f.lin_v_heads // f.lin_k_heads
        out = []
        for (r0, r1), s in zip(rows_for_slices(slices), slices):
            conv_state, ssm = kv.state(self.index, s, lambda: [
                torch.zeros(f.conv_kernel - 1, f.conv_dim, dtype=x.dtype, device=x.device),
                torch.zeros(f.lin_v_heads, f.lin_dk, f.lin_dv, dtype=torch.float32, device=x.device),
            ])
            full = torch.cat([conv_state, mixed[r0:r1]])
            conv_state.copy_(full[-(f.conv_kernel - 1):])
            y = F.silu(F.conv1d(full.T[None].to(self.conv_w.dtype), self.conv_w, groups=f.conv_dim)[0].T).to(x.dtype)
            q, k, v = y.split([kd, kd, f.lin_v_heads * f.lin_dv], dim=-1)
            n = r1 - r0
            q, k = (l2norm(t.reshape(n, f.lin_k_heads, f.lin_dk).float()).repeat_interleave(r, dim=1) for t in (q, k))
            q = q * f.lin_dk**-0.5
            v = v.reshape(n, f.lin_v_heads, f.lin_dv).float()
            rule = gated_delta_recurrent if n == 1 else gated_delta_chunked
            o, new = rule(q, k, v, g[r0:r1], beta[r0:r1].float(), ssm)
            ssm.copy_(new)
            out.append(o.to(x.dtype))
        return linear(self._gated_norm(torch.cat(out), z).reshape(T, -1), self.w_out)

    def _gated_norm(self, o, z):
        """w * o / rms(o) * silu(z): the norm in float32, the weight applied in o's dtype."""
        n = rms_norm(o, self.norm_w, self.f.rms_norm_eps)
        return (n * F.silu(z.float())).to(o.dtype)

    def shared(self, x):
        return torch.sigmoid(linear(x, self.shared_gate)) * swiglu(x, *self.shared_mlp)

    def dense(self, x):
        return swiglu(x, *self.mlp)
