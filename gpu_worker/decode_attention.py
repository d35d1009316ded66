"""Attention of a few new queries of one sequence over its cache, read as the cache stores it
(gpu_worker/kv_cache.py): no dequantized copy of the keys and values is made.

    o[i, h] = softmax_j( q[i, h] . K[j, h / rep] * scale   for j visible to i ;  sink[h] ) V[j, h / rep]

Query i sits at position start + i and sees keys j <= start + i (and j > start + i - window when
windowed); rep = Hq / Hkv query heads share a key head (GQA). K may come in parts concatenated along
the head dim (MLA: [latent c ; rope key]), each part a `Rows` (cache_rows.py) of plain or fp8 values.

`decode_attention_reference` dequantizes the rows to float32 and runs layers.attend; on CUDA
`decode_attention_batch` (decode_attention_kernel.py) is one flash-decoding pass over the stored
rows, fp8 included, for every sequence of a decode step in one launch. A decode step needs it: at a 10K-token context on an H100, dequantizing the
whole cache every step and attending through SDPA's math backend cost ~0.9 ms per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..shared.models.layers import attend
from . import cache_rows
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
    ks: Sequence[Sequence[Rows]],
    vs: Sequence[Rows],
    starts: Sequence[int],
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    table=None,
) -> torch.Tensor:
    """Several sequences' new queries, q [B * t, Hq, dk] (t of each, one sequence after another),
    each over its own cached rows (ks[b], vs[b], from position starts[b]): on CUDA one launch for the
    batch (decode_attention_kernel.py: decode_attention_batch, imported only here: CPU workers never
    load Triton), else the reference per sequence; written into `out` when given (a decode graph
    reads the same buffer at every step). `table`: the kernel's, when the caller made it
    (decode_attention_batch)."""
    if cache_rows.kernels_on(q.device):
        from .decode_attention_kernel import decode_attention_batch

        return decode_attention_batch(q, ks, vs, starts, scale, window, sinks, out=out, table=table)
    t = q.shape[0] // len(ks)
    result = torch.cat([decode_attention_reference(q[b * t : (b + 1) * t], k, v, st, scale, window, sinks)
                        for b, (k, v, st) in enumerate(zip(ks, vs, starts))])
    return result if out is None else out.copy_(result)
