"""The GPU dequantization kernel (gpu_worker/dequant.py) against its torch reference, bit for bit,
and the fused dequantize-and-multiply kernel of decode on the GPU (gpu_worker/expert_gemv_kernel.py)
against that reference followed by a float32 matrix-vector product, to float32 rounding (and zero
for a choice the tensors do not hold), and moe_pairs's four-launch form built on it against its
generic path. Without a
GPU, Triton's interpreter runs the same kernels on the CPU (TRITON_INTERPRET, set before triton is
first imported: this test runs the check in a fresh interpreter). benchmarks/device_check.py runs
the same check on CUDA, where bfloat16 results must be identical too."""

from __future__ import annotations

import pytest

import tiny_models as tm

pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")

CHECK = r"""
import torch
from krasis.gpu_worker.dequant import dequant_reference
from krasis.gpu_worker.dequant_kernel import dequant_triton
from krasis.gpu_worker.expert_gemv_kernel import expert_gemv
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.quant import quantized

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"


def block(fmt, O, K, n, name="w", scale=0.1):
    # n random [O, K] weights of `name`, quantized in fmt and stacked as a block's tensors
    parts = [quantized(fmt, torch.randn(O, K) * scale, name) for _ in range(n)]
    return {k: torch.stack([p[k] for p in parts]).to(dev) for k in parts[0]}


def products(fmt, t, rows, x, dtype):
    # the reference: rows' weights dequantized to `dtype`, times the matching rows of x, in float32
    return torch.bmm(dequant_reference(fmt, t, "w", rows, dtype).float(), x.float().unsqueeze(-1)).squeeze(-1)


def rel_err(got, want):
    return float((got.float() - want).abs().max() / want.abs().max())


# the grouped products' tolerance in each dtype: their weights are rounded to it
GROUPED_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
for kind in ("int4", "int8"):
    # odd sizes: O not a power of two, K / 2 not a multiple of the kernel's block, 3 groups per row;
    # O beyond one and two of the gemv kernel's 32-row blocks, a group of 96 (not a power of two),
    # 20 groups a row (the gemv kernel's 8 a step: the last step partly past the row)
    for O, K, group, n in ((5, 96, 32, 4), (3, 1536, 512, 3), (45, 288, 96, 4), (70, 512, 128, 3), (40, 640, 32, 3)):
        fmt = ExpertFormat(kind, torch.bfloat16, group)
        t = block(fmt, O, K, n)
        rows = torch.tensor([n - 1, 0, n - 1], device=dev)  # gathered, out of order, repeated
        for dtype in (torch.bfloat16, torch.float32):
            want = dequant_reference(fmt, t, "w", rows, dtype)
            got = dequant_triton(fmt, t, "w", rows, dtype)
            assert got.dtype == dtype and got.shape == want.shape == (3, O, K), (got.shape, want.shape)
            if dev == "cuda" or dtype == torch.float32:
                assert torch.equal(got, want), (kind, O, K, dtype, (got.float() - want.float()).abs().max())
            else:  # the interpreter's float32 -> bfloat16 cast truncates where CUDA's rounds to nearest
                assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0), (kind, O, K, dtype)
        x = torch.randn(3, K, device=dev).bfloat16()
        want = products(fmt, t, rows, x, torch.float32)
        got = expert_gemv(fmt, t, "w", rows, x)
        assert got.dtype == torch.float32 and got.shape == (3, O), got.shape
        err = rel_err(got, want)
        assert err < 1e-5, (kind, O, K, err)
        # pairs of row -1 (choices these tensors do not hold): zero, the others as before
        rows = torch.tensor([-1, 0, -1, n - 1], device=dev)
        x = torch.randn(4, K, device=dev).bfloat16()
        got = expert_gemv(fmt, t, "w", rows, x)
        assert not got[0].any() and not got[2].any()
        want = products(fmt, t, rows[1::2], x[1::2], torch.float32)
        assert rel_err(got[1::2], want) < 1e-5
        # pair p reading row p // x_div (a token's k choices, its one row), written in x's dtype
        f32 = expert_gemv(fmt, t, "w", rows, x[:2].repeat_interleave(2, 0))
        assert torch.equal(expert_gemv(fmt, t, "w", rows, x[:2], x_div=2), f32)
        got = expert_gemv(fmt, t, "w", rows, x[:2], x_div=2, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16
        if dev == "cuda":
            assert torch.equal(got, f32.bfloat16())
        else:  # the interpreter's cast truncates
            assert torch.allclose(got.float(), f32, rtol=2**-7, atol=0)

# the grouped product (pairs sorted by expert, an expert's weights read once for all its pairs) against
# the weights dequantized to x's dtype times x in float32: rows -1 zero, an expert with more pairs than
# one pass (16), pairs out of order, x_div. The interpreter's bfloat16 dot is wrong (Triton 3.9:
# ~1e10 for unit inputs), so it runs in float16 there and in both on CUDA.
from krasis.gpu_worker.expert_grouped_kernel import expert_grouped, pair_groups
for kind in ("int4", "int8"):
    for O, K, group, n in ((5, 96, 32, 4), (45, 288, 96, 4), (70, 512, 128, 3)):
        fmt = ExpertFormat(kind, torch.bfloat16, group)
        t = block(fmt, O, K, n)
        rows = torch.tensor([n - 1, 0, -1, n - 1, 1, 0, -1] + [n - 1] * 17 + [2, 1], device=dev)
        for dtype in (torch.float16, torch.bfloat16) if dev == "cuda" else (torch.float16,):
            x = torch.randn(rows.numel() // 2, K, device=dev).to(dtype)
            y = expert_grouped(fmt, t, "w", pair_groups(rows), x, x_div=2)
            want = products(fmt, t, rows.clamp(min=0), x.repeat_interleave(2, 0), dtype)
            assert y.dtype == dtype and y.shape == want.shape, (y.dtype, y.shape)
            assert not y[rows < 0].any()
            err = float((y.float() - want)[rows >= 0].abs().max() / want.abs().max())
            assert err < GROUPED_TOL[dtype], (kind, O, K, dtype, err)

# the prefill's grouped product: rows sorted into groups (one empty, one over two tiles of 16 rows), each
# group's expert a row of t (out of order, or group g row g), the input gathered by idx or x in order
from krasis.gpu_worker.expert_grouped_kernel import expert_gemm
for kind in ("int4", "int8"):
    for O, K, group, n in ((45, 288, 96, 4), (40, 512, 32, 4)):
        fmt = ExpertFormat(kind, torch.bfloat16, group)
        t = block(fmt, O, K, n)
        counts = torch.tensor([3, 0, 37, 5], device=dev)
        R = int(counts.sum())
        for experts in (torch.tensor([2, 0, 3, 1], device=dev), None):
            for gather in (True, False):
                dtype = torch.bfloat16 if dev == "cuda" else torch.float16
                x = torch.randn(R + 3 if gather else R, K, device=dev).to(dtype)
                idx = torch.randperm(R + 3, device=dev)[:R] if gather else None
                y = expert_gemm(fmt, t, "w", x, idx, counts, experts, tiles=(16, 32, 64, 4, 2))
                erows = (experts if experts is not None else torch.arange(4, device=dev)).repeat_interleave(counts)
                want = products(fmt, t, erows, x[idx] if gather else x, dtype)
                assert y.shape == (R, O) and y.dtype == dtype, (y.shape, y.dtype)
                err = rel_err(y, want)
                assert err < GROUPED_TOL[dtype], (kind, O, K, gather, err)

# moe_pairs's four launches (quantized experts, no biases) against its generic path in float32: the
# same products, x's rounding between them; choices not held (-1) and held ones weighing nothing
from krasis.gpu_worker.moe_gpu import moe_pairs, pair_rows_reference, pairs_in_kernels
from krasis.gpu_worker.pair_rows_kernel import pair_rows_triton
from krasis.shared.models.family import ExpertShape
E, H, I, M, k = 5, 64, 96, 3, 4
# the experts' rows in the block's tensors: expert 2 is not held, and id -1 names none
lookup = torch.tensor([4, 0, -1, 3, 1], device=dev)
for kind in ("int4", "int8"):
    fmt = ExpertFormat(kind, torch.bfloat16, 32)
    t = block(fmt, 2 * I, H, E, "w13", 0.2) | block(fmt, H, I, E, "w2", 0.2)
    # 3 tokens: a program per pair; 66 (264 pairs, GROUPED_MIN_PAIRS 256): grouped by expert, in float16
    # under the interpreter (its bfloat16 dot is wrong)
    for M, dtype in ((3, torch.bfloat16), (66, torch.bfloat16 if dev == "cuda" else torch.float16)):
        x = torch.randn(M, H, device=dev).to(dtype)
        ids = torch.tensor([[1, 0, 2, 4], [3, 3, 4, -1], [2, 2, 1, 0]] * (M // 3), device=dev)
        weights = torch.rand(M, k, device=dev)
        weights[1, 2] = 0.0
        # the kernel itself, compiled or interpreted (moe_gpu.pair_rows takes it on CUDA only)
        rows, wt = pair_rows_triton(lookup, ids, weights)
        want_rows, want_wt = pair_rows_reference(lookup.cpu(), ids.cpu(), weights.cpu())
        assert torch.equal(rows.cpu(), want_rows) and torch.equal(wt.cpu(), want_wt), (rows, wt)
        assert int((rows < 0).sum()) == 4 * (M // 3) and int((wt == 0).sum()) == 4 * (M // 3) + 1
        got = pairs_in_kernels(x, rows, wt, k, t, fmt, "silu")
        want = moe_pairs(x.float().cpu(), lookup.cpu(), ids.cpu(), weights.cpu(), {n: v.cpu() for n, v in t.items()}, fmt, "silu")
        assert got.dtype == torch.float32 and got.shape == (M, H)
        err = rel_err(got.cpu(), want)
        assert err < 3e-2, (kind, M, err)
        if M == 3:  # the residual added in the combine, rounded as the torch kernels it replaces round it
            h = torch.randn(M, H, device=dev).to(dtype)
            added = pairs_in_kernels(x, rows, wt, k, t, fmt, "silu", residual=h)
            assert added.dtype == dtype and torch.equal(added, h + got.to(dtype)), (kind, M)
print("ok")
"""


def test_triton_dequant_and_expert_gemv_match_their_references():
    tm.run_interpreted(CHECK)
