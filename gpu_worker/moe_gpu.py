"""Routed experts on the worker's device: tokens sorted by expert, the active experts' weights
dequantized once on the device, then one grouped GEMM per projection.

    rows  = (token, slot) pairs whose expert is held by a block, sorted by expert
    W13_g = dequant(q13_g, s13_g), W2_g = dequant(q2_g, s2_g)      (dequant.py) for the G experts that
            are groups: all the block holds when the pairs are at least as many (no host sync),
            else only the active ones
    Y     = grouped_mm(X_sorted, W13^T);  A = act(Y);  Z = grouped_mm(A, W2^T)
    out  += sum over each token's k pairs of w * Z                    in float32

On CUDA, quantized experts are dequantized inside the grouped product (expert_grouped_kernel.py:
expert_gemm), tile by tile, instead of into a bf16 copy of every expert that torch's product reads
again, and the product reads each row of x where it lies instead of from a sorted copy.

Where the pairs are all of a chunk's (token, slot) pairs (a prompt chunk), the combine gathers each
token's k rows of Z and sums them, with no scatter-add: at 10K tokens Z is ~0.3 GB, and the float32
atomics and masking passes of a scatter cost ~2 ms per layer (on CUDA one Triton pass,
combine_kernel.py). (Folding w into A before the down
projection saves one more float32 pass, but adds a bf16 rounding; the bf16 device check's top-1
agreement fell from 99.2% to 98.8% with it, so the weight stays in float32.)

A block is (tensors, lookup): tensors in an ExpertFormat layout ([n, ...] per name) wherever they
live (pinned host views, a staging slot, a hot-expert cache) and `lookup` int64 [num_experts] that
maps a layer's expert id to its row in the tensors, or -1 where the block does not hold it. Every
strategy hands its experts to `moe_blocks` in that one form.

`torch._grouped_mm` (bf16, sm90) is used on CUDA for unquantized experts (and a layer a prefill
strategy dequantized once for its chunks); elsewhere, and in float32, the same sorted rows go
through one F.linear per active expert. `moe_pairs` (hcs_hybrid decode, resident layers) makes
every (token, choice) pair its own group, so nothing waits for the host; on CUDA each is one
matrix-vector product that dequantizes in the kernel (expert_gemv_kernel.py), or from 32 tokens
the pairs are grouped by expert on the device (expert_grouped_kernel.py). `shared/moe.py:moe_reference` is the
plain reference; they agree to rounding (tests/test_strategies.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..shared.expert_store import ExpertFormat
from ..shared.moe import gated_act
from ..shared.routing_stats import count_choices
from .dequant import dequant_rows

# KRASIS_GROUPED_KERNELS=0: quantized experts as before expert_grouped_kernel.py (prefill dequantizes
# every expert into bf16 for torch's grouped product, decode runs a program per pair), to compare or
# to debug.
GROUPED_KERNELS = os.environ.get("KRASIS_GROUPED_KERNELS", "1") != "0"


class RoutedExperts:
    """What a stage calls for a MoE layer's routed experts, prefill and decode strategies alike:
    `begin()` once per step; per layer `layer_begin(layer, ids)` with every chunk's choices, then
    per chunk `submit(layer, x, ids, weights)` and, after whatever the stage overlaps with it (the
    shared expert), `collect(pending)` -> x's dtype [T, H], then `layer_end(layer)`; and `end(done)`
    once the step is enqueued (graphed or not) to wait for it. A strategy whose work runs elsewhere
    (the CPU pool) splits submit and collect; the others do it all in `run`.
    `graphable`: submit and collect may be captured in a decode graph (decode_graphs.py)."""

    graphable = False

    def begin(self) -> None:
        pass

    def end(self, done=None, interrupt=None) -> bool:
        """Wait for a step enqueued before the CUDA event `done` (None: nothing to wait for); False
        if `interrupt()` came first (pool_client.wait_for)."""
        from .pool_client import wait_for

        return wait_for(done, interrupt)

    def layer_begin(self, layer: int, ids: list[torch.Tensor]) -> None:
        """Before the layer's chunks run: `ids`, each chunk's choices [T_c, k]."""

    def layer_end(self, layer: int) -> None:
        """After the layer's last chunk was enqueued."""

    def run(self, layer: int, x, ids, weights) -> torch.Tensor:
        raise NotImplementedError

    def submit(self, layer: int, x, ids, weights):
        return self.run(layer, x, ids, weights)

    def collect(self, pending) -> torch.Tensor:
        return pending

    def collect_add(self, pending, h: torch.Tensor) -> torch.Tensor:
        """h + collect(pending): the layer's residual stream with the routed experts added (a
        strategy whose wait can add them itself saves a kernel or two a layer)."""
        return h + self.collect(pending)


def _grouped_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def _project(xs: torch.Tensor, fmt: ExpertFormat, t: dict[str, torch.Tensor], name: str, experts: torch.Tensor,
             offs: torch.Tensor | None, counts: list[int] | None, grouped: bool) -> torch.Tensor:
    """Rows xs [R, K] sorted into groups (ending at `offs`, of sizes `counts`), times W_g^T for the
    weights `name` of the groups' `experts` -> [R, O] in xs's dtype. `offs` None: one row per group,
    a matrix-vector product each, dequantized inside the kernel on CUDA (expert_gemv_kernel.py)."""
    if offs is None and xs.is_cuda and fmt.kind != "dense":
        from .expert_gemv_kernel import expert_gemv

        return expert_gemv(fmt, t, name, experts, xs).to(xs.dtype)
    if offs is None:  # moe_pairs: a pair not held (row -1) computes with row 0, and its weight is 0
        experts = experts.clamp(min=0)
    w = dequant_rows(fmt, t, name, experts, xs.dtype)
    if offs is None:
        return torch.bmm(w, xs.unsqueeze(-1)).squeeze(-1)
    if grouped:
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)
    out, a = [], 0
    for g, c in enumerate(counts):
        out.append(F.linear(xs[a : a + c], w[g]))
        a += c
    return torch.cat(out)


def moe_blocks(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    blocks: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
    fmt: ExpertFormat,
    act: str = "silu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, H], ids [M, k], weights [M, k] -> float32 [M, H]: the weighted sum over the experts the
    blocks hold (added into `out` when given)."""
    if out is None:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grouped = _grouped_ok(x)
    ids = ids.to(x.device).long()
    weights = weights.to(x.device)
    for t, lookup in blocks:
        held = next(iter(t.values())).shape[0]  # experts (rows) the block holds
        if ids.numel() >= held:
            sorted_rows = _all_rows(lookup[ids], weights, held)
        else:
            sorted_rows = _active_rows(lookup[ids], weights)
        if sorted_rows is not None:
            _block(x, t, fmt, act, grouped, out, *sorted_rows)
    return out


def moe_pairs(x: torch.Tensor, lookup: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              t: dict[str, torch.Tensor], fmt: ExpertFormat, act: str = "silu",
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, H], ids [M, k] and weights [M, k] (the choices), lookup [experts] (each expert's row in
    `t`, -1 where `t` does not hold it) -> float32 [M, H]: the weighted sum over the held choices
    (with `residual`, residual + that sum rounded to residual's dtype, as the pool's wait adds its
    layers: one kernel fewer, and no float32 sum written and read), each (token, choice) pair a
    matrix-vector product, so that nothing waits for the host and the step can be a CUDA graph
    (decode: hcs_hybrid's hot share, resident layers). A pair not held weighs 0, and the fused
    kernel skips it (hcs_hybrid's cold pairs: with a hot set of half the experts, half the pairs).
    A few pairs read an expert each (the L2 serves an expert's repeats); from GROUPED_MIN_PAIRS the
    pairs are sorted by expert on the device and each expert is read once; either is cheaper for a
    decode step's few rows than finding the active ones on the host (moe_blocks). A token's pairs
    are summed in their own order, not by a scatter's atomics, so a graph's replay and an eager step
    agree bit for bit, and a token's result depends on the others in its step only through their
    number (which kernel runs)."""
    m, k = ids.shape
    rows, wt = pair_rows(lookup, ids, weights)
    if x.is_cuda and fmt.kind != "dense" and "b13" not in t and "b2" not in t:
        return pairs_in_kernels(x, rows, wt, k, t, fmt, act, residual)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    tok = torch.arange(m * k, device=x.device) // k
    # the pairs are in token order already: the combine needs no map (None), and a pair's row
    # clamped matters only to a bias's lookup (each is a kernel of a decode layer)
    erow = rows.clamp(min=0) if "b13" in t or "b2" in t else rows
    _block(x, t, fmt, act, False, out, tok, wt, erow, rows, None, (None, wt))
    return out if residual is None else residual + out.to(residual.dtype)


def pair_rows_reference(lookup: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """(rows, wt), each [P] for the P = ids.numel() (token, choice) pairs in token order: a pair's
    row in the tensors `lookup` maps experts to (-1: not held, as for an id below 0), and its weight
    as float32, 0 where it is not held."""
    ids = ids.reshape(-1)
    rows = torch.where(ids >= 0, lookup[ids.clamp(min=0)], -1)
    return rows, torch.where(rows >= 0, weights.reshape(-1).float(), 0.0)


def pair_rows(lookup: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """pair_rows_reference; on CUDA one Triton launch (pair_rows_kernel.py)."""
    if ids.is_cuda:
        from .pair_rows_kernel import pair_rows_triton

        return pair_rows_triton(lookup, ids, weights)
    return pair_rows_reference(lookup, ids, weights)


def pairs_in_kernels(x: torch.Tensor, rows: torch.Tensor, wt: torch.Tensor, k: int, t: dict[str, torch.Tensor],
                     fmt: ExpertFormat, act: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """moe_pairs in four launches where the experts are quantized and have no biases (CUDA; Triton's
    interpreter in the tests): each projection reads its token's row of x by the pair's number and
    writes x's dtype (from GROUPED_MIN_PAIRS pairs, two more launches sort them by expert, and each
    expert's weights are read once for all its pairs: expert_grouped_kernel.py), the activation
    keeps the pairs that weigh something, and the combine writes the float32 sum in token order.
    The generic path (_block) gathers x, casts both projections' outputs, builds the pairs' indices
    and zeroes `out` first: six more small kernels a decode layer for the same numbers on CUDA
    (tests/test_dequant.py compares the two, this one in x's dtype and the generic one in float32).
    With `residual`, the combine adds it (moe_pairs)."""
    from .expert_gemv_kernel import expert_gemv
    from .expert_grouped_kernel import GROUPED_MIN_PAIRS, expert_grouped, pair_groups

    if GROUPED_KERNELS and rows.numel() >= GROUPED_MIN_PAIRS and x.dtype in (torch.bfloat16, torch.float16):
        groups = pair_groups(rows)

        def product(name, v, x_div=1):
            return expert_grouped(fmt, t, name, groups, v, x_div=x_div)
    else:
        def product(name, v, x_div=1):
            return expert_gemv(fmt, t, name, rows, v, x_div=x_div, dtype=x.dtype)

    gu = product("w13", x, k)
    a = masked_act(gu, act, wt)
    del gu
    y = product("w2", a)
    del a
    out = torch.empty(x.shape, dtype=torch.float32 if residual is None else residual.dtype, device=x.device)
    combine_pairs(y, None, wt, out, add=False, residual=residual)
    return out


def _all_rows(local, weights, held: int):
    """Every (token, slot) pair, sorted by expert; pairs the block does not hold join group 0 with
    weight 0. Every held expert is a group (empty ones included), so nothing here waits for the
    device: a prompt chunk chooses nearly every expert anyway, and the prefill loop keeps the GPU
    queue full only while the host never synchronises."""
    k = local.shape[1]
    mine = (local >= 0).reshape(-1)
    key, order = torch.sort(local.clamp(min=0).reshape(-1), stable=True)
    wt = torch.where(mine[order], weights.reshape(-1)[order].float(), 0.0)
    counts = count_choices(key, held)
    # where each (token, slot) pair sits in expert order, and its weight in token order
    inv, w = torch.empty_like(order), torch.empty_like(wt)
    inv[order], w[order] = torch.arange(order.numel(), device=order.device), wt
    return order // k, wt, key, None, counts, (inv, w)  # None: every row of the block, in order


def _active_rows(local, weights):
    """The pairs the block holds, sorted by expert, and only their experts as groups (a decode
    step's few tokens use a few of the experts held; reading all of them would cost more than the
    synchronisation that finding the active ones needs)."""
    tok, slot = torch.nonzero(local >= 0, as_tuple=True)
    if tok.numel() == 0:
        return None
    rows, order = torch.sort(local[tok, slot], stable=True)
    tok, slot = tok[order], slot[order]
    active, counts = torch.unique_consecutive(rows, return_counts=True)
    return tok, weights[tok, slot].float(), rows, active, counts, None


def _block(x, t, fmt: ExpertFormat, act: str, grouped: bool, out, tok, wt, erow, experts, counts, combine) -> None:
    """out[tok] += wt * expert(x[tok]) for sorted pairs: `erow` is each pair's expert row in `t`
    (for a bias's lookup), `experts` the rows dequantized as the groups (None: all the block's),
    `counts` the pairs per group (None: one each); `combine` (when the pairs are every (token,
    slot) of x) is combine_pairs's (inv, w): where each (token, slot) pair sits among the sorted
    pairs (None: they are in token order), and its weight in token order."""
    if grouped and fmt.kind != "dense" and GROUPED_KERNELS:  # dequantized in the product, which gathers x's rows
        from .expert_grouped_kernel import expert_gemm

        def project(v, name, rows):
            return expert_gemm(fmt, t, name, v, rows, counts, experts)
    else:
        offs = torch.cumsum(counts, 0).to(torch.int32) if counts is not None else None
        sizes = None if grouped or counts is None else counts.tolist()

        def project(v, name, rows):
            v = v if rows is None else v.index_select(0, rows)
            return _project(v, fmt, t, name, experts, offs=offs, counts=sizes, grouped=grouped)

    gu = project(x, "w13", tok)
    if "b13" in t:
        gu = gu + t["b13"].index_select(0, erow).to(x.dtype)
    # a pair outside the block (weight 0) gets a zero activation: its rows may have overflowed to inf
    a = masked_act(gu, act, wt != 0)
    del gu
    y = project(a, "w2", None)
    del a
    if "b2" in t:
        y = y + t["b2"].index_select(0, erow).to(x.dtype)
    if combine is None:
        out.index_add_(0, tok, y.float() * wt[:, None])
        return
    combine_pairs(y, *combine, out)


def masked_act_reference(gu: torch.Tensor, act: str, keep: torch.Tensor) -> torch.Tensor:
    """The experts' activation of gu [R, 2I] (shared/moe.py: gated_act), zero in the rows where
    `keep` [R] is zero (bool, or the pairs' weights: a pair that weighs nothing is not kept)."""
    return torch.where(keep[:, None] != 0, gated_act(gu, act), 0)


def masked_act(gu: torch.Tensor, act: str, keep: torch.Tensor) -> torch.Tensor:
    """masked_act_reference; on CUDA for SiLU experts in 16 bits, one Triton pass (act_kernel.py)."""
    if gu.is_cuda and act == "silu" and gu.dtype in (torch.bfloat16, torch.float16):
        from .act_kernel import masked_silu_mul_triton

        return masked_silu_mul_triton(gu, keep)
    return masked_act_reference(gu, act, keep)


def combine_pairs_reference(y: torch.Tensor, inv: torch.Tensor | None, w: torch.Tensor, out: torch.Tensor,
                            add: bool = True, residual: torch.Tensor | None = None) -> None:
    """out [T, H] float32 += (or, not `add`, =) for each token t the sum over its k pairs j of
    w[t k + j] y[inv[t k + j]]: y [T k, H] the pairs' outputs in expert order, inv the position of
    each (token, slot) pair in that order (None: y is in token order), w float32 [T k] the weights
    in token order (combine_kernel.py is the fast form). With `residual` [T, H] (`add` aside): out,
    in residual's dtype, = residual + that sum rounded to the dtype."""
    T, H = out.shape
    s = ((y if inv is None else y.index_select(0, inv)).reshape(T, -1, H).float() * w.view(T, -1, 1)).sum(1)
    if residual is not None:
        out.copy_(residual + s.to(residual.dtype))
    elif add:
        out += s
    else:
        out.copy_(s)


def combine_pairs(y: torch.Tensor, inv: torch.Tensor | None, w: torch.Tensor, out: torch.Tensor,
                  add: bool = True, residual: torch.Tensor | None = None) -> None:
    """combine_pairs_reference; on CUDA the one-pass Triton kernel (imported only here: CPU workers
    never load Triton)."""
    if out.is_cuda:
        from .combine_kernel import combine_pairs_triton

        combine_pairs_triton(y, inv, w, out, add, residual)
    else:
        combine_pairs_reference(y, inv, w, out, add, residual)
