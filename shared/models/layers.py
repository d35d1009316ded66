"""Building blocks shared by the model families: RMSNorm, SwiGLU, rotary embeddings (default and
YaRN, matching transformers' initialisation), and attention of a batch of variable-length sequence
slices against their caches.

Tokens of every sequence in a step are concatenated along dim 0 ("varlen"); `slices` says which
rows belong to which sequence and at what position they start.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..protocol import SeqSlice
from ..quant import QuantLinear


def _use_kernel(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether rms_norm, rotate_half, softmax_topk and a prompt chunk's attention run their Triton
    kernels (shared/kernels/): half-precision CUDA tensors outside autograd (the kernels
    have no backward). The modules are imported only then: CPU workers never load Triton."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)))
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), the statistics in float32 whatever x's dtype: one Triton
    kernel on CUDA (see _use_kernel), else rms_norm_reference."""
    if _use_kernel(x, weight) and weight.shape == x.shape[-1:]:
        from ..kernels.norm_rope_kernel import RMS_MAX_D, rms_norm_triton

        if x.shape[-1] <= RMS_MAX_D:
            return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + a, rms_norm(h + a, weight, eps)): a layer's residual add and the norm after it, one
    Triton kernel on CUDA (a decode layer is bound by its launches), else the two."""
    if _use_kernel(h, a, weight) and weight.shape == h.shape[-1:] and a.shape == h.shape and a.dtype == h.dtype:
        from ..kernels.norm_rope_kernel import RMS_MAX_D, rms_norm_triton

        if h.shape[-1] <= RMS_MAX_D:
            return rms_norm_triton(h, weight, eps, add=a)
    s = h + a
    return s, rms_norm(s, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm as Hugging Face transformers computes it: the normalized value is rounded to x's
    dtype before it is multiplied by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def softmax_topk(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's choice: (ids int64 [M, k], weights float32 [M, k]), the k largest of
    p = softmax(logits) in float32, renormalised to sum 1 when `renorm`. One Triton kernel on CUDA
    (shared/kernels/router_kernel.py; see _use_kernel) for up to 1024 experts, else softmax_topk_reference."""
    if _use_kernel(logits) and logits.shape[-1] <= 1024:
        from ..kernels.router_kernel import softmax_topk_triton

        return softmax_topk_triton(logits, k, renorm)
    return softmax_topk_reference(logits, k, renorm)


def _fused_router(x: torch.Tensor, router, norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """Whether router_kernel.router_topk_triton takes x [M, H] and the router in one kernel (with
    norm = (a, weight): the residual add of a [M, H] and the norm's weight before it)."""
    extra = () if norm is None else norm
    if not (isinstance(router, torch.Tensor) and _use_kernel(x, router, *extra) and x.dim() == 2):
        return False
    if norm is not None and (norm[0].shape != x.shape or norm[0].dtype != x.dtype):
        return False
    from ..kernels.router_kernel import fits

    return fits(x, router, None if norm is None else norm[1])


def router_topk(x: torch.Tensor, router: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_topk(linear(x, router), k, renorm): on CUDA, for a decode step's few tokens, the
    router's product and the top-k in one Triton kernel (shared/kernels/router_kernel.py), two
    launches of a decode layer's turn made one."""
    if _fused_router(x, router):
        from ..kernels.router_kernel import router_topk_triton

        return router_topk_triton(x, router, k, renorm)
    return softmax_topk(linear(x, router), k, renorm)


def add_rms_norm_router_topk(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, router: torch.Tensor,
                             k: int, renorm: bool):
    """(s, x, (ids, weights)) with s, x = add_rms_norm(h, a, weight, eps) and the route
    router_topk(x, router, k, renorm): a MoE layer's residual add, post-attention norm and router,
    one Triton kernel on CUDA for a decode step's few tokens (three launches of its turn before)."""
    if _fused_router(h, router, (a, weight)):
        from ..kernels.router_kernel import router_topk_triton

        s, x, ids, w = router_topk_triton(h, router, k, renorm, norm=(a, weight, eps))
        return s, x, (ids, w)
    s, x = add_rms_norm(h, a, weight, eps)
    return s, x, router_topk(x, router, k, renorm)


def softmax_topk_reference(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def _gemv_operands(x: torch.Tensor, w, b: torch.Tensor | None = None, norm: torch.Tensor | None = None):
    """(rows, scales) as gemv_kernel.gemv takes x W^T + b (with the input norm's weight `norm`
    before it), from a plain weight (scales None) or an INT8 QuantLinear; None where it does not."""
    if isinstance(w, torch.Tensor):
        rows, scales = w, None
    elif isinstance(w, QuantLinear):
        rows, scales = w.q, w.scale
    else:
        return None
    extra = () if norm is None else (norm,)
    if b is not None or not _use_kernel(x, rows, *extra) or x.dim() != 2:
        return None
    from ..kernels.gemv_kernel import fits

    return (rows, scales) if fits(x, rows, norm, scales) else None


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, for a plain weight tensor or a quantized weight (any object with matmul_t). On CUDA,
    a decode step's few tokens without a bias take a Triton GEMV (shared/kernels/gemv_kernel.py):
    INT8 weights up to 4 tokens, 16-bit ones at one token unless KRASIS_GEMV=0."""
    operands = _gemv_operands(x, w, b)
    if operands:
        from ..kernels.gemv_kernel import gemv

        return gemv(x, operands[0], scale=operands[1])
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    y = w.matmul_t(x)
    return y if b is None else y + b


def norm_linear(h: torch.Tensor, weight: torch.Tensor, eps: float, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """linear(rms_norm(h, weight, eps), w, b): a layer's input norm and its first product, the norm
    inside the GEMV's kernel where `linear` takes the GEMV (one launch of the turn fewer)."""
    operands = _gemv_operands(h, w, b, weight)
    if operands:
        from ..kernels.gemv_kernel import gemv

        return gemv(h, operands[0], norm=(weight, eps), scale=operands[1])
    return linear(rms_norm(h, weight, eps), w, b)


def stack_rows(*ws):
    """Weights [O_i, K] (or biases [O_i]) as one [sum O_i, K], for one product where the model reads
    several from the same input (q, k and v): in decode each product is a GEMV that reads its weight
    once and costs a launch, and small ones (k and v) run far below the device's bandwidth. None
    when there are none (no biases). Quantized weights stack their rows and scales."""
    if ws[0] is None:
        return None
    if isinstance(ws[0], torch.Tensor):
        return torch.cat(ws)
    return type(ws[0])(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]))


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down( silu(gate x) * up x )."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


# --- rotary embeddings ---------------------------------------------------------------------------


def rope_parameters(cfg: dict) -> dict:
    """The rope settings of an HF config, whichever generation of config.json wrote them
    (transformers 5 `rope_parameters`, or the older top-level `rope_theta` + `rope_scaling`)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if "partial_rotary_factor" in cfg and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for a rotary dimension `dim`, and the factor YaRN applies to cos/sin."""
    base = float(params["rope_theta"])
    rtype = params["rope_type"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rtype == "default":
        return 1.0 / (base**exponents), 1.0
    if rtype == "linear":
        return 1.0 / (base**exponents) / float(params["factor"]), 1.0
    if rtype != "yarn":
        raise ValueError(f"unsupported rope type {rtype!r} (supported: default, linear, yarn)")
    orig_max = params.get("original_max_position_embeddings", max_position_embeddings)
    factor = params.get("factor") or max_position_embeddings / orig_max
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables for positions, computed on demand in float32 (as transformers does).

    Every layer of a stage gets the same Rotary per device (`to`), and the tables of the last
    positions tensor are kept: a step computes them once for all its layers and for q and k, not
    twice per layer (a decode step is bound by such small launches)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float = 1.0):
        self.inv_freq = inv_freq
        self.attention_factor = attention_factor
        self._on: dict[str, Rotary] = {}
        self._last: tuple | None = None  # (positions, dtype, tables)

    def to(self, device) -> "Rotary":
        key = str(device)
        if key not in self._on:
            self._on[key] = Rotary(self.inv_freq.to(device), self.attention_factor)
        return self._on[key]

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]

    def _tables(self, positions: torch.Tensor, kind, make):
        if self._last is not None and self._last[0] is positions and self._last[1] == kind:
            return self._last[2]
        tables = make(self.angles(positions))
        self._last = (positions, kind, tables)
        return tables

    def rotate_half(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """GPT-NeoX layout: the two halves of the head dim are the real and imaginary parts.
        x: [T, heads, dim]. One Triton kernel on CUDA (see _use_kernel), cos/sin computed in it from
        the positions (no tables, nothing kept between calls), else rotate_half_reference."""
        if _use_kernel(x):
            from ..kernels.norm_rope_kernel import rotate_half_triton

            return rotate_half_triton(x, positions, self.inv_freq.to(x.device), self.attention_factor)
        return self.rotate_half_reference(x, positions)

    def rotate_half_reference(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """rotate_half as transformers computes it: cos/sin rounded to x's dtype, then x.dtype ops."""

        def make(freqs):
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * self.attention_factor).to(x.dtype)[:, None, :]
            sin = (emb.sin() * self.attention_factor).to(x.dtype)[:, None, :]
            return cos, sin

        cos, sin = self._tables(positions, x.dtype, make)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def interleaved(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """GPT-J / DeepSeek layout: adjacent pairs (x0, x1) are complex numbers. x: [T, heads, dim]."""
        cis = self._tables(positions, "cis", lambda f: torch.polar(torch.ones_like(f), f) * self.attention_factor)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[:, None, :]).flatten(-2).to(x.dtype)


def qk_norm_rope(qk: torch.Tensor, num_q: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = RoPE(RMSNorm_head(q)), k = RoPE(RMSNorm_head(k)) for qk [T, Hq + Hkv, d], q's heads first
    (Qwen3's per-head norms, each with its own weight): one Triton kernel on CUDA where the weights
    have qk's dtype (see _use_kernel), else rms_norm and Rotary.rotate_half one after the other."""
    if _use_kernel(qk, q_weight, k_weight) and q_weight.dtype == k_weight.dtype == qk.dtype:
        from ..kernels.norm_rope_kernel import qk_norm_rope_triton

        return qk_norm_rope_triton(qk, num_q, q_weight, k_weight, eps, positions, rotary.inv_freq.to(qk.device),
                                   rotary.attention_factor)
    q, k = rms_norm(qk[:, :num_q], q_weight, eps), rms_norm(qk[:, num_q:], k_weight, eps)
    return rotary.rotate_half(q, positions), rotary.rotate_half(k, positions)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: a copy from pageable memory to a CUDA
    device first waits for all the work queued on the stream, which would stall a worker that
    launches its next decode step while the device still runs the last one. Pinned, it is queued."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def slice_positions(slices: list[SeqSlice], device) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.start + s.n, device=device) for s in slices])


# --- attention -----------------------------------------------------------------------------------


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of t new queries (at positions start..start+t-1) over all T = start + t keys
    of one sequence. q [t, Hq, d], k [T, Hkv, d], v [T, Hkv, dv] -> [t, Hq, dv]. GQA when Hq > Hkv.
    `sinks` (gpt-oss): one learned logit per head that joins the softmax and takes probability mass
    but contributes no value."""
    t, T = q.shape[0], k.shape[0]
    d = q.shape[-1]
    if _use_kernel(q, k, v) and t > 1 and T == start + t and k.shape[-1] == v.shape[-1] == d and d in (64, 128):
        # a prompt chunk on the GPU: one Triton kernel (GQA in place, window and sinks included); the
        # torch code below is its reference (tests/test_prefill_attention_kernel.py)
        from ..kernels.prefill_attention_kernel import prefill_attention_triton

        return prefill_attention_triton(q, k, v, scale, sliding_window, sinks)
    if sinks is None:
        return _sdpa(q, k, v, start, scale, sliding_window)
    mask = _causal_mask(start, t, T, sliding_window, q.device)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    rep = qh.shape[0] // kh.shape[0]
    kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(-1, 1, 1).to(scores.dtype).expand(-1, t, 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined.float(), dim=-1).to(scores.dtype)[..., :-1]
    return torch.matmul(probs, vh).transpose(0, 1)


# Not cuDNN: it builds an execution plan for every new shape (27-562 ms on the H100, device_check),
# and a service's prompts and decode steps keep bringing new lengths. On CUDA this path serves what
# the prompt kernel does not take (MLA's head sizes, float32, one query off the decode kernel).
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, start: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """attend() through F.scaled_dot_product_attention, shaped so that CUDA can pick a fused kernel
    (flash or memory-efficient): those take only 4-D inputs and one head size for q, k and v."""
    t, T, dv = q.shape[0], k.shape[0], v.shape[-1]
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and t > 1:
        # a prompt chunk: flash attention takes one head count for q, k and v, and repeating the KV
        # heads costs far less than the attention itself (0.1 ms of copies against ~2 ms of attention
        # at 10K tokens). A decode step (t = 1) keeps the broadcast: copying the whole cache would
        # dominate it.
        k, v, rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 1
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # MLA: zero value columns add nothing to the output
    q4, k4, v4 = (a.transpose(0, 1).unsqueeze(0) for a in (q, k, v))
    with sdpa_kernel(_BACKENDS):
        out = _sdpa4(q4, k4, v4, start, t, T, rep, scale, sliding_window)
    return out[0, ..., :dv].transpose(0, 1)


def _sdpa4(q4, k4, v4, start: int, t: int, T: int, rep: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    if sliding_window is None and T == start + t and t > 1:
        # a prompt chunk over everything before it: causal from the bottom right (is_causal aligns
        # the triangle to the top left). CausalBias keeps flash attention's own causal masking, where
        # a boolean mask would force the slower masked kernels on every chunk past the first.
        if start == 0:
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
        if q4.device.type == "cuda":
            # imported at first use: the module pulls in torch._dynamo, 1.5-4 s. Elsewhere the
            # boolean mask below (no fused kernel there to keep) spares every process that import.
            from torch.nn.attention.bias import causal_lower_right

            return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(t, T), scale=scale)
    if sliding_window is None and T == start + t and t == 1:
        # one query that sees every key: no mask (a one-token prompt, or a decode step off the kernel)
        return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=rep > 1)
    # a sliding window, or a later prompt chunk off CUDA
    mask = _causal_mask(start, t, T, sliding_window, q4.device)
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=rep > 1)


def _causal_mask(start: int, t: int, T: int, window: int | None, device) -> torch.Tensor:
    """[t, T] True where query start+i may see key j: j <= start+i, and within the sliding window."""
    qpos = torch.arange(start, start + t, device=device)[:, None]
    kpos = torch.arange(T, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (kpos > qpos - window)
    return mask


def split_slices(slices: list[SeqSlice], chunk: int) -> list[tuple[list[SeqSlice], tuple[int, int]]]:
    """The step's tokens cut every `chunk` rows: each chunk's slices (a slice that crosses a cut
    continues in the next chunk at a later start) and its row range [a, b). Only a slice's last
    piece keeps its logits request ("sample", "last"); "all" stays on every piece."""
    out, cur, a, r = [], [], 0, 0
    for s in slices:
        done = 0
        while done < s.n:
            n = min(s.n - done, a + chunk - r)
            end = done + n == s.n
            logits = s.logits if s.logits == "all" or end else "none"
            cur.append(dataclasses.replace(s, start=s.start + done, n=n, logits=logits,
                                           draw=s.draw if end else None))
            done, r = done + n, r + n
            if r == a + chunk:
                out.append((cur, (a, r)))
                cur, a = [], r
    if cur:
        out.append((cur, (a, r)))
    return out


def rows_for_slices(slices: list[SeqSlice]) -> list[tuple[int, int]]:
    """Row ranges [a, b) of each slice in the concatenated token dimension."""
    out, a = [], 0
    for s in slices:
        out.append((a, a + s.n))
        a += s.n
    return out
