"""Attention of a few new queries of one sequence over its cache, read as the cache stores it
(gpu_worker/kv_cache.py): no dequantized copy of the keys and values is made.

    o[i, h] = softmax_j( q[i, h] . K[j, h / rep] * scale   for j visible to i ;  sink[h] ) V[j, h / rep]

Query i sits at position start + i and sees keys j <= start + i (and j > start + i - window when
windowed); rep = Hq / Hkv query heads share a key head (GQA). K may come in parts concatenated along
the head dim (MLA: [latent c ; rope key]), each part a `Rows` (cache_rows.py) of plain or fp8 values.

`decode_attention_reference` dequantizes the rows to float32 and runs layers.attend; on CUDA
`decode_attention_triton` (decode_attention_kernel.py) is one flash-decoding pass over the stored
rows, fp8 included. A decode step needs it: at a 10K-token context on an H100, dequantizing the
whole cache every step and attending through SDPA's math backend cost ~0.9 ms per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..shared.models.layers import attend
from .cache_rows import Rows


def decode_attention_reference(
    q: torch.Tensor,
    k: Sequence[Rows],
    v: Rows,
    start: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [t, Hq, dk], k parts [T, Hkv, d_p] (sum of d_p = dk), v [T, Hkv, dv] -> [t, Hq, dv] in q's
    dtype, all math in float32."""
    keys = torch.cat([part.dense(torch.float32) for part in k], dim=-1)
    out = attend(q.float(), keys, v.dense(torch.float32), start, scale, window, sinks)
    return out.to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k: Sequence[Rows],
    v: Rows,
    start: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """decode_attention_triton (decode_attention_kernel.py, imported only here: CPU workers never
    load Triton) on CUDA, else the reference; written into `out` when given (a decode graph reads
    the same buffer at every step)."""
    if q.is_cuda:
        from .decode_attention_kernel import decode_attention_triton

        return decode_attention_triton(q, k, v, start, scale, window, sinks, out=out)
    result = decode_attention_reference(q, k, v, start, scale, window, sinks)
    return result if out is None else out.copy_(result)
