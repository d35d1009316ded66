"""The Triton kernels behind layers.rms_norm, layers.add_rms_norm, Rotary.rotate_half and
layers.qk_norm_rope on CUDA: RMSNorm over the last dim (after a residual add, in the same pass),
rotary embedding in the GPT-NeoX layout, and the two in one pass over q's and k's heads (Qwen3's
per-head norms: four launches of a decode layer's ~20 made one).

Why: a profile of a Qwen3-30B-A3B-shaped layer at a 10K-token prompt on an H100 spent ~3 ms per
layer outside the matmuls and attention in float32 RMSNorm passes (the input and post-attention
norms on [T, 2048], the per-head q/k norms on [T, 32, 128] and [T, 4, 128]) and in the rotary
embedding (cat, cos/sin tables, several bf16 multiplies), each a chain of 5-8 torch kernels over the
whole activation. Each kernel here reads its input once and writes its output once; rotary computes
cos/sin in registers from the positions, once per token for all the heads of a program.

Results are those of the torch code (layers.rms_norm_reference, Rotary.rotate_half_reference, which
mirror Hugging Face transformers), roundings included:

    rms_norm:  y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
               statistics in float32; the normalized value is rounded to x's dtype before it meets
               the weight, and the product is rounded again (to the promoted dtype of w and x);
    rotary:    cos, sin = (cos|sin(position * inv_freq) * attention_factor).to(x.dtype)
               y = x * cos + rotate_half(x) * sin, each product rounded to x's dtype, then the sum.

Only the order of the sum of squares differs from torch's, so mean(x^2) may be one float32 ulp off
and an output, rarely, one ulp of x's dtype. The rest is meant to be bit for bit on CUDA (on the
lent H100: rotary identical, RMSNorm one ulp off on 2.5e-6 of the elements): the float32 steps that torch runs as separate kernels stay
separate roundings (fp fusion, fmul + fadd -> fma, is off), the mean is the sum times float32(1/D) as
torch's CUDA mean computes it, and cos, sin and rsqrt are libdevice's cosf, sinf and rsqrtf, the CUDA
math functions torch's kernels call. Triton links libdevice flushing denormals to zero, which these
inputs never are (angles are 0 or above ~1e-7, mean(x^2) + eps is at least eps). Under Triton's
interpreter (tests) numpy's cos, sin and 1/sqrt stand in, as close as those of the CPU reference.

CUDA graphs: no host syncs, no data-dependent shapes (outputs are allocated from the input's shape),
and nothing kept between calls: a captured graph recomputes cos/sin from the positions buffer at
every replay, where a table cached on the positions tensor would go stale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# The interpreter cannot call libdevice (extern) functions; numpy's stand in there.
_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)

RMS_MAX_D = 16384  # a row is held in registers by one program: 16 warps, 32 values a thread
_TILE = 4096  # elements a program takes: 16-32 a thread, enough loads in flight to stream memory


@triton.jit
def _cos_sin(x):
    if _LIBDEVICE:
        return libdevice.cos(x), libdevice.sin(x)
    else:
        return tl.cos(x), tl.sin(x)


@triton.jit
def _inv_rms(sum_sq, eps, D: tl.constexpr):
    # torch's CUDA mean multiplies the float32 sum by float32(1 / D); eps is a separate add
    ms = sum_sq * (1.0 / D) + eps
    if _LIBDEVICE:
        return libdevice.rsqrt(ms)
    else:
        return tl.rsqrt(ms)


@triton.jit
def _weighted(xf, inv_rms, w, DT: tl.constexpr, OUT: tl.constexpr):
    # HF's two roundings: to x's dtype before the weight, to the result dtype after it
    return (w.to(tl.float32) * (xf * inv_rms).to(DT).to(tl.float32)).to(OUT)


@triton.jit(do_not_specialize=["R"])
def _rms_norm_kernel(X, A, S, W, Y, R, sx, sa, eps, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     ADD: tl.constexpr):
    # ADD: the rows are X + A, rounded to X's dtype as torch's add rounds them, and kept in S
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = (r < R)[:, None] & (d < D)[None, :]
    x = tl.load(X + r[:, None] * sx + d[None, :], mask=ok, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(A + r[:, None] * sa + d[None, :], mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(S + r[:, None] * D + d[None, :], x, mask=ok)
    x = x.to(tl.float32)
    w = tl.load(W + d, mask=d < D, other=0.0)
    inv = _inv_rms(tl.sum(x * x, 1), eps, D)
    y = _weighted(x, inv[:, None], w[None, :], X.dtype.element_ty, Y.dtype.element_ty)
    tl.store(Y + r[:, None] * D + d[None, :], y, mask=ok)


@triton.jit(do_not_specialize=["T"])
def _rope_kernel(X, P, F, Y, T, H, sx_t, sx_h, attention_factor,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # program: BLOCK_T tokens x BLOCK_H heads; the two halves of a head row are x1 (real) and x2
    DT = X.dtype.element_ty
    f32 = tl.float32
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    t_ok = t < T
    pos = tl.load(P + t, mask=t_ok, other=0).to(f32)
    angle = pos[:, None] * tl.load(F + j, mask=j < HALF, other=0.0)[None, :]
    cos, sin = _cos_sin(angle)
    # the reference's tables: float32, times the factor, rounded to x's dtype
    cos = (cos * attention_factor).to(DT).to(f32)[:, None, :]
    sin = (sin * attention_factor).to(DT).to(f32)[:, None, :]

    ok = t_ok[:, None, None] & (h < H)[None, :, None] & (j < HALF)[None, None, :]
    src = X + t[:, None, None] * sx_t + h[None, :, None] * sx_h + j[None, None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(f32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(f32)
    # x * cos + cat(-x2, x1) * sin as x.dtype tensor ops: each product rounded, then the sum
    y1 = ((x1 * cos).to(DT).to(f32) + (-x2 * sin).to(DT).to(f32)).to(DT)
    y2 = ((x2 * cos).to(DT).to(f32) + (x1 * sin).to(DT).to(f32)).to(DT)
    dst = Y + (t[:, None, None] * H + h[None, :, None]) * (2 * HALF) + j[None, None, :]
    tl.store(dst, y1, mask=ok)
    tl.store(dst + HALF, y2, mask=ok)


@triton.jit(do_not_specialize=["T"])
def _qk_norm_rope_kernel(X, WQ, WK, P, F, Q, K, T, sx_t, sx_h, eps, attention_factor,
                         HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_HALF: tl.constexpr):
    # program: token t, BLOCK_H of its HQ + HKV head rows (q's first): _rms_norm_kernel's RMSNorm with
    # q's or k's weight, rounded as it rounds, then _rope_kernel's rotary on the result
    DT = X.dtype.element_ty
    f32 = tl.float32
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    ok = (h < HQ + HKV)[:, None] & jm[None, :]
    is_q = (h < HQ)[:, None]
    src = X + t * sx_t + h[:, None] * sx_h + j[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(f32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(f32)
    inv = _inv_rms(tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1), eps, 2 * HALF)[:, None]
    w1 = tl.where(is_q, tl.load(WQ + j, mask=jm, other=0.0)[None, :], tl.load(WK + j, mask=jm, other=0.0)[None, :])
    w2 = tl.where(is_q, tl.load(WQ + HALF + j, mask=jm, other=0.0)[None, :], tl.load(WK + HALF + j, mask=jm, other=0.0)[None, :])
    x1 = _weighted(x1, inv, w1, DT, DT).to(f32)
    x2 = _weighted(x2, inv, w2, DT, DT).to(f32)
    cos, sin = _cos_sin(tl.load(P + t).to(f32) * tl.load(F + j, mask=jm, other=0.0))
    cos = (cos * attention_factor).to(DT).to(f32)[None, :]
    sin = (sin * attention_factor).to(DT).to(f32)[None, :]
    y1 = ((x1 * cos).to(DT).to(f32) + (-x2 * sin).to(DT).to(f32)).to(DT)
    y2 = ((x2 * cos).to(DT).to(f32) + (x1 * sin).to(DT).to(f32)).to(DT)
    # q's heads to Q [T, HQ, 2 HALF], k's to K [T, HKV, 2 HALF] (a head's offset in the other is masked)
    dq = Q + (t * HQ + h[:, None]) * (2 * HALF) + j[None, :]
    dk = K + (t * HKV + h[:, None] - HQ) * (2 * HALF) + j[None, :]
    tl.store(dq, y1, mask=ok & is_q)
    tl.store(dq + HALF, y2, mask=ok & is_q)
    tl.store(dk, y1, mask=ok & ~is_q)
    tl.store(dk + HALF, y2, mask=ok & ~is_q)


def _launch_options(elements: int) -> dict:
    # fp fusion off: an fma would round once where torch's separate kernels round twice
    return dict(num_warps=min(16, max(1, elements // 512)), enable_fp_fusion=False)


def _rows_of(x: torch.Tensor, D: int) -> torch.Tensor:
    x2 = x.reshape(-1, D)  # a view unless the leading dims cannot be merged
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None):
    """layers.rms_norm_reference(x, weight, eps) for x [..., D] (D <= RMS_MAX_D), weight [D]; with
    `add` (x's shape and dtype), (x + add, rms_norm_reference(x + add, weight, eps)): layers.add_rms_norm."""
    D = x.shape[-1]
    if D > RMS_MAX_D:
        raise ValueError(f"rows of {D} > RMS_MAX_D = {RMS_MAX_D}")
    if add is not None and (add.shape != x.shape or add.dtype != x.dtype):
        raise ValueError(f"{add.dtype} {list(add.shape)} added to {x.dtype} {list(x.shape)}")
    x2 = _rows_of(x, D)
    a2, s = (x2, x2) if add is None else (_rows_of(add, D), torch.empty(x.shape, dtype=x.dtype, device=x.device))
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    R = x2.shape[0]
    if R:
        BLOCK_D = triton.next_power_of_2(D)
        BLOCK_R = max(1, _TILE // BLOCK_D)
        _rms_norm_kernel[(triton.cdiv(R, BLOCK_R),)](
            x2, a2, s, weight.contiguous(), y, R, x2.stride(0), a2.stride(0), eps,
            D=D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, ADD=add is not None, **_launch_options(BLOCK_R * BLOCK_D),
        )
    return y if add is None else (s, y)


def rotate_half_triton(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
) -> torch.Tensor:
    """Rotary.rotate_half_reference for x [T, heads, dim] (any strides but the last), positions [T],
    inv_freq float32 [dim / 2]."""
    T, H, dim = x.shape
    if dim % 2 or inv_freq.shape != (dim // 2,):
        raise ValueError(f"head dim {dim} against {tuple(inv_freq.shape)} frequencies")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(T, H, dim, dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return y
    half = dim // 2
    BLOCK_HALF = triton.next_power_of_2(half)
    # all heads of a token in one program where they fit, so its cos/sin serve every head
    BLOCK_H = min(triton.next_power_of_2(H), max(1, _TILE // (2 * BLOCK_HALF)))
    BLOCK_T = max(1, _TILE // (2 * BLOCK_HALF * BLOCK_H))
    _rope_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
        x, positions.contiguous(), inv_freq.float().contiguous(), y, T, H, x.stride(0), x.stride(1),
        attention_factor, HALF=half, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
        **_launch_options(2 * BLOCK_T * BLOCK_H * BLOCK_HALF),
    )
    return y


def qk_norm_rope_triton(
    x: torch.Tensor,
    num_q: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.qk_norm_rope's reference for x [T, Hq + Hkv, dim] (any strides but the last: q's and
    k's columns of the qkv product), weights of x's dtype: (q [T, Hq, dim], k [T, Hkv, dim])."""
    T, H, dim = x.shape
    if dim % 2 or inv_freq.shape != (dim // 2,) or not 0 < num_q < H or q_weight.shape != (dim,) != k_weight.shape:
        raise ValueError(f"{num_q} of {H} heads of dim {dim}, weights {tuple(q_weight.shape)} {tuple(k_weight.shape)}, "
                         f"{tuple(inv_freq.shape)} frequencies")
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(T, num_q, dim, dtype=x.dtype, device=x.device)
    k = torch.empty(T, H - num_q, dim, dtype=x.dtype, device=x.device)
    if T == 0:
        return q, k
    half = dim // 2
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_H = min(triton.next_power_of_2(H), max(1, _TILE // (2 * BLOCK_HALF)))
    _qk_norm_rope_kernel[(T, triton.cdiv(H, BLOCK_H))](
        x, q_weight.contiguous(), k_weight.contiguous(), positions.contiguous(), inv_freq.float().contiguous(), q, k,
        T, x.stride(0), x.stride(1), eps, attention_factor,
        HQ=num_q, HKV=H - num_q, HALF=half, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
        **_launch_options(2 * BLOCK_H * BLOCK_HALF),
    )
    return q, k
