"""How the KV cache hands out what it stores (kv_cache.py). Its own module because both decode
attention (decode_attention.py) and its Triton kernels (decode_attention_kernel.py), which
decode_attention.py imports, read it: neither may import the other for it."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """Cached rows [T, H, d] as stored: `values` in the compute dtype (scales None), or
    float8_e4m3fn with float32 `scales` [T, H, 1], row = values * scales."""

    values: torch.Tensor
    scales: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scales is None:
            return self.values.to(dtype)
        return (self.values.float() * self.scales).to(dtype)
