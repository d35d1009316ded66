"""Expert weights from the stored INT4/INT8 layout (shared/quant.py) to the compute dtype, on the
worker's device, for the experts a prefill step uses:

    W[g, o, k] = q[rows[g], o, k] * s[rows[g], o, k // group]        (int4: q = nibble - 8)

`dequant_reference` is the plain torch form (several passes over the weights); `dequant_triton`
(dequant_kernel.py) is one pass that gathers the rows, unpacks, scales and writes each weight once, which matters on the
prefill path: at a 10K-token prompt a Qwen3-30B layer dequantizes ~0.6 G weights, and each extra
pass over their bf16 form costs ~1 ms of HBM time. The product of an integer in [-8, 127] and a
bf16 scale is exact in float32, so both round once, to the same values.
"""

from __future__ import annotations

import torch

from ..shared.expert_store import ExpertFormat


def dequant_reference(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor, dtype) -> torch.Tensor:
    """Weights `name` of experts `rows` (int64 [G]) as `dtype` [G, O, K]."""
    if fmt.kind == "dense":
        return t[name].index_select(0, rows).to(dtype)
    q = t[f"{name}.q"].index_select(0, rows)
    s = t[f"{name}.s"].index_select(0, rows)
    wide = torch.float32 if dtype == torch.float32 else dtype
    if fmt.kind == "int4":
        w = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2).to(wide).sub_(8)
    else:
        w = q.to(wide)
    G, O, K = w.shape
    groups = s.shape[-1]
    w = w.view(G, O, groups, K // groups).mul_(s.to(wide).unsqueeze(-1))
    return w.view(G, O, K).to(dtype)


def dequant_rows(fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, rows: torch.Tensor | None, dtype) -> torch.Tensor:
    """dequant_triton (dequant_kernel.py, imported only here: CPU workers never load Triton) on CUDA
    for the quantized formats, else the reference. `rows` None: every row, in order (dense weights
    of that dtype are then returned as they are, not copied)."""
    if rows is None:
        if fmt.kind == "dense":
            return t[name].to(dtype)
        rows = torch.arange(t[f"{name}.q"].shape[0], device=t[f"{name}.q"].device)
    if fmt.kind != "dense" and t[f"{name}.q"].is_cuda:
        from .dequant_kernel import dequant_triton

        return dequant_triton(fmt, t, name, rows, dtype)
    return dequant_reference(fmt, t, name, rows, dtype)


def dequantized(fmt: ExpertFormat, t: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """Every expert of a block (tensors in `fmt`'s layout) in the dense layout of `dtype`, biases as
    they are: what a prefill step of several chunks computes with for each of them."""
    out = {name: dequant_rows(fmt, t, name, None, dtype) for name in ("w13", "w2")}
    return out | {name: v for name, v in t.items() if name in ("b13", "b2")}
