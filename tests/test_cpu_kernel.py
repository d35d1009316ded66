"""The CPU pool's layer kernels (cpu_worker/expert_kernel.c through native.py, and the numba kernel
in cpu_worker/expert_kernel.py) against the plain reference (shared/moe.py:moe_reference) on the
same stored experts.

Tolerances: float32 inputs are compared to 2e-5 of the output's largest magnitude (the kernels sum
in another order, and fold INT4's -8 offset per group); bfloat16 inputs to 2e-2, since the reference
rounds the dequantized weights and every intermediate to bf16 while the kernels keep float32 until
the output is rounded once.

The C kernel's vector width is the build machine's (8 lanes with AVX2, 16 with AVX-512), so the
odd shapes below put groups of 4, 8, 20 and 48 bytes, and row counts that do not split evenly over
threads, through either width's whole-vector and scalar-tail paths. For INT4 with bf16 x it runs its
Q8 path (activations quantized to int8 per group), which is compared tightly with its own reference,
shared/moe.py:moe_reference_q8, as well as loosely with moe_reference like everything else.
"""

from __future__ import annotations

import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from krasis.cpu_worker import expert_kernel, native
from krasis.cpu_worker.expert_kernel import moe_layer
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.family import ExpertShape
from krasis.shared.moe import expert_weight, gated_act, moe_reference, moe_reference_q8
from krasis.shared.quant import quantized

HIDDEN, INTER, TOP_K = 256, 128, 4
FIRST, COUNT, LAYER_EXPERTS = 3, 6, 12  # this node holds experts [3, 9) of 12

FORMATS = {
    "int4-g64": ExpertFormat("int4", group_size=64),
    "int4-g128": ExpertFormat("int4", group_size=128),
    "int8-g64": ExpertFormat("int8", group_size=64),
    "dense-f32": ExpertFormat("dense", torch.float32),
    "dense-bf16": ExpertFormat("dense", torch.bfloat16),
}
KERNELS = ["c", "numba"]

HAVE_CC = any(shutil.which(n) for n in ([os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")


def node_block(fmt: ExpertFormat, gen: torch.Generator, hidden: int = HIDDEN, inter: int = INTER,
               bias: bool = False) -> dict[str, torch.Tensor]:
    """A node's experts in the store layout, from random weights quantized by the scheme. Biases
    are large enough to push some gpt-oss gate and up values past its clamp at 7."""
    spec = fmt.tensors(ExpertShape(LAYER_EXPERTS, TOP_K, hidden, inter, bias=bias), COUNT)
    t = {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    for e in range(COUNT):
        w13 = torch.randn(2 * inter, hidden, generator=gen) * 0.05
        w2 = torch.randn(hidden, inter, generator=gen) * 0.05
        if fmt.kind == "dense":
            t["w13"][e], t["w2"][e] = w13, w2
        else:
            for name, v in (quantized(fmt, w13, "w13") | quantized(fmt, w2, "w2")).items():
                t[name][e] = v
        if bias:
            t["b13"][e] = torch.randn(2 * inter, generator=gen) * 6
            t["b2"][e] = torch.randn(hidden, generator=gen)
    return t


def routing(m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids over the whole layer (so some fall outside this node's block), with repeats across
    tokens and, for some tokens, the same expert twice."""
    ids = torch.randint(0, LAYER_EXPERTS, (m, TOP_K), generator=gen, dtype=torch.int32)
    ids[::3, 1] = ids[::3, 0]
    ids[0, 0] = FIRST  # at least one token hits the block
    return ids, torch.rand(m, TOP_K, generator=gen)


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max()
    assert scale > 0
    tol = 2e-5 if want.dtype == torch.float32 else 2e-2
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * scale, f"max error {float(err / scale):.1e} of the output's magnitude"


@pytest.fixture(params=KERNELS)
def kernel(request):
    if request.param == "c" and not HAVE_CC:
        pytest.skip("no C compiler")
    return request.param


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 8, 32])
def test_kernel_matches_reference(fmt_name, dtype, m, kernel):
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt_name} {dtype} {m}".encode()))
    t = node_block(fmt, gen)
    x = (torch.randn(m, HIDDEN, generator=gen) * 2).to(dtype)
    ids, weights = routing(m, gen)
    got = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, kernel=kernel)
    # the C kernel runs INT4 with bf16 x on activations quantized to int8: its own reference
    q8 = kernel == "c" and fmt.kind == "int4" and dtype == torch.bfloat16
    assert_close_to_reference(got, (moe_reference_q8 if q8 else moe_reference)(x, ids, weights, t, fmt, FIRST, COUNT))


# (hidden, inter, format), with the bytes per group of w13 and w2
ODD_SHAPES = {
    "int4-120x40-g40": (120, 40, ExpertFormat("int4", group_size=40)),  # 20, 20
    "int4-200x48-g8": (200, 48, ExpertFormat("int4", group_size=8)),  # 4, 4
    "int4-96x64-g128": (96, 64, ExpertFormat("int4", group_size=128)),  # 48 (K < group size), 32
    "int8-97x33": (97, 33, ExpertFormat("int8", group_size=128)),  # 97, 33
    "int8-96x48-g48": (96, 48, ExpertFormat("int8", group_size=48)),  # 48, 48
}


@needs_cc
@pytest.mark.parametrize("shape", list(ODD_SHAPES))
@pytest.mark.parametrize("act", ["silu", "gptoss"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("m, threads", [(1, 3), (5, 1), (32, 3)])
def test_c_kernel_odd_shapes_activations_biases(shape, act, bias, m, threads, monkeypatch):
    hidden, inter, fmt = ODD_SHAPES[shape]
    monkeypatch.setattr(expert_kernel, "_threads", threads)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape} {act} {bias} {m}".encode()))
    t = node_block(fmt, gen, hidden, inter, bias)
    x = torch.randn(m, hidden, generator=gen) * 2
    ids, weights = routing(m, gen)
    got = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, act, kernel="c")
    assert_close_to_reference(got, moe_reference(x, ids, weights, t, fmt, FIRST, COUNT, act))
    if act == "silu" and not bias:  # what the numba kernel covers: the two kernels agree
        numba = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, act, kernel="numba")
        torch.testing.assert_close(got, numba, rtol=0, atol=2e-5 * float(numba.abs().max()))


# INT4 shapes for the Q8 path, with the bytes per group of w13 and w2: groups of 128 (64 bytes, one
# zmm or two ymm; 17 of them along K take a second chunk of scales), whole and partial registers of
# either width, scalar or masked tails, K smaller than the group size, groups smaller than a register.
Q8_SHAPES = {
    "int4-256x128-g128": (HIDDEN, INTER, FORMATS["int4-g128"]),  # 64, 64
    "int4-2176x128-g128": (2176, 128, FORMATS["int4-g128"]),  # 64 (17 groups), 64
    "int4-256x128-g64": (HIDDEN, INTER, FORMATS["int4-g64"]),  # 32, 32
    "int4-512x256-g256": (512, 256, ExpertFormat("int4", group_size=256)),  # 128, 128
    "int4-384x192-g192": (384, 192, ExpertFormat("int4", group_size=192)),  # 96, 96
    **{name: shape for name, shape in ODD_SHAPES.items() if shape[2].kind == "int4"},  # 20; 4; 48, 32
    "int4-96x48-g6": (96, 48, ExpertFormat("int4", group_size=6)),  # 3, 3
    # groups smaller than a register, whole registers of them (dots_q8_small), one chunk or several
    "int4-1024x128-g32": (1024, 128, ExpertFormat("int4", group_size=32)),  # 16 (32 groups), 16
    "int4-256x128-g16": (HIDDEN, INTER, ExpertFormat("int4", group_size=16)),  # 8, 8
    # ... and where a row's groups do not fill whole registers (dots_q8's tails instead)
    "int4-224x96-g32": (224, 96, ExpertFormat("int4", group_size=32)),  # 16 (7 groups), 16 (3)
}
# Q8 reference against the float32 weight-only one: the activations' rounding (two quantizations,
# x and the activation, each up to half a step of max|group| / 127) costs ~1% of the output here
Q8_ERROR = 2e-2


def q8_case(shape: str, act: str, bias: bool, m: int):
    hidden, inter, fmt = Q8_SHAPES[shape]
    gen = torch.Generator().manual_seed(zlib.crc32(f"q8 {shape} {act} {bias} {m}".encode()))
    t = node_block(fmt, gen, hidden, inter, bias)
    x = (torch.randn(m, hidden, generator=gen) * 2).to(torch.bfloat16)
    return fmt, t, x, *routing(m, gen)


def q8_flip_step(x, ids, weights, t, fmt, act) -> torch.Tensor:
    """[M, 1]: how far a token's outputs move when one of the down projection's int8 inputs rounds
    the other way (at most max|act| / 127 x max|W2| x routing weight, over its experts): the
    kernel's activation and the reference's differ by float32 rounding (their own order of sums,
    libm's expf against torch's), so one within that of a rounding boundary (xq + 1/2, ~1e-5 of
    them) can go either way."""
    step = torch.zeros(x.shape[0], 1)
    for i, j in zip(*torch.where((ids >= FIRST) & (ids < FIRST + COUNT))):
        e = int(ids[i, j]) - FIRST
        b13 = t["b13"][e] if "b13" in t else None
        a = gated_act(torch.nn.functional.linear(x[i].float(), expert_weight(fmt, t, "w13", e, torch.float32), b13), act)
        w2 = expert_weight(fmt, t, "w2", e, torch.float32)
        step[i] = max(step[i], a.abs().max() / 127 * w2.abs().max() * weights[i, j])
    return step


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next((line for line in f if line.startswith("flags")), "").split())


@needs_cc
@pytest.mark.parametrize("shape", list(Q8_SHAPES))
@pytest.mark.parametrize("act, bias", [("silu", False), ("gptoss", True)], ids=["silu", "gptoss-bias"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("build", [(), ("-mno-avx512f",)], ids=["native", "256-bit"])
def test_c_kernel_q8_path_matches_q8_reference(shape, act, bias, m, build):
    """INT4 with bf16 x runs expert_kernel.c's Q8 path (on this machine's instructions: vpmaddubsw
    with AVX2, vpdpbusd with AVX512-VNNI; the 256-bit build, on an AVX-512 machine, those of its
    256-bit registers: vpdpbusd with AVX-VNNI, else vpmaddubsw). Its integer sums are exact, so against
    moe_reference_q8 in float32 only the order of float32 sums differs: the bf16 out must be the
    reference rounded to bf16, to within half a bf16 ulp (2^-8 of each element) plus float32 noise.
    One token may be further off by two of its down projection's inputs rounding the other way
    (q8_flip_step), which these seeds hit once. A wrong plane, scale, offset or tail costs
    percents everywhere. Threads 1 and 2 split rows differently but each row's arithmetic is the
    same, so they agree bit for bit."""
    fmt, t, x, ids, weights = q8_case(shape, act, bias, m)
    c = native.load(build)
    cpu = cpu_flags()
    wide = "avx512f" in cpu and not build  # the build's registers: 512-bit, else 256-bit
    assert c.int4_q8 == (1 if ({"avx512_vnni", "avx512bw"} <= cpu if wide else "avx_vnni" in cpu) else 2)
    got = c(x, ids, weights, t, 4, FIRST, COUNT, act, 1)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, c(x, ids, weights, t, 4, FIRST, COUNT, act, 2))
    want = moe_reference_q8(x.float(), ids, weights, t, fmt, FIRST, COUNT, act)
    err = (got.float() - want).abs()
    rounding = 2**-8 * want.abs() + 1e-5 * want.abs().max()
    off = (err > rounding).any(dim=1)
    assert off.sum() <= 1, f"tokens {off.nonzero().flatten().tolist()} off by more than rounding"
    excess = err - rounding - 2 * q8_flip_step(x, ids, weights, t, fmt, act)
    assert torch.all(excess <= 0), f"max error {float(err.max() / want.abs().max()):.1e} of the output's magnitude"


@pytest.mark.parametrize("shape", list(Q8_SHAPES))
@pytest.mark.parametrize("act, bias", [("silu", False), ("gptoss", True)], ids=["silu", "gptoss-bias"])
def test_q8_reference_is_close_to_float32(shape, act, bias):
    """The Q8 scheme itself: its only error is the activations' rounding, small against the output
    (a wrong scale, a swapped nibble plane or a lost offset would cost O(1))."""
    fmt, t, x, ids, weights = q8_case(shape, act, bias, 8)
    want = moe_reference(x.float(), ids, weights, t, fmt, FIRST, COUNT, act)
    got = moe_reference_q8(x, ids, weights, t, fmt, FIRST, COUNT, act)
    assert got.dtype == torch.bfloat16
    err = float((got.float() - want).norm() / want.norm())
    assert 0 < err < Q8_ERROR, f"relative error {err:.1e}"


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int8-g64"])
def test_tokens_outside_the_block_get_zero_and_rows_are_independent(fmt_name, kernel):
    """A token whose experts all live on another node gets exactly 0; a token's result does not
    depend on which other tokens share the batch (the grouping by expert must not mix rows)."""
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(7)
    t = node_block(fmt, gen)
    x = torch.randn(5, HIDDEN, generator=gen)
    ids, weights = routing(5, gen)
    ids[2] = torch.tensor([0, 1, 2, FIRST + COUNT])  # all outside [FIRST, FIRST + COUNT)
    out = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, kernel=kernel)
    assert torch.all(out[2] == 0)
    for i in (0, 4):
        alone = moe_layer(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], t, fmt, FIRST, COUNT, kernel=kernel)
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=2e-5 * float(alone.abs().max()))


@pytest.mark.parametrize("fmt_name", ["int4-g128", "int8-g64", "int4-g9"])
def test_the_call_counts_the_pairs_of_its_block(fmt_name, kernel):
    """layer_kernel's call returns how many (token, choice) pairs were its block's, an expert chosen
    twice by one token counted twice (the pool's share of the routing, in its counters), on every
    path (int4-g9: the reference's)."""
    fmt = FORMATS.get(fmt_name) or ExpertFormat("int4", group_size=9)
    gen = torch.Generator().manual_seed(11)
    h, inter = (18, 18) if fmt.group_size == 9 else (HIDDEN, INTER)
    t = node_block(fmt, gen, h, inter)
    x = torch.randn(6, h, generator=gen)
    ids, weights = routing(6, gen)
    ids[1] = torch.tensor([-1] * TOP_K)  # hcs_hybrid's masked choices: nobody's
    out = torch.empty(6, h)
    n = expert_kernel.layer_kernel(t, fmt, FIRST, COUNT, kernel=kernel)(x, ids, weights, out)
    assert n == int(((ids >= FIRST) & (ids < FIRST + COUNT)).sum()) > 0


@needs_cc
def test_a_bound_call_reused_on_the_same_buffers_reads_their_new_contents():
    """The C call remembers the buffers it last checked (the pool's slot views, the same tensors every
    step) and passes their addresses again: each call still reads what they hold then; other buffers,
    and ids or weights of other dtypes (converted on each call), get the same results."""
    fmt = FORMATS["int4-g64"]
    gen = torch.Generator().manual_seed(5)
    t = node_block(fmt, gen)
    run = expert_kernel.layer_kernel(t, fmt, FIRST, COUNT, kernel="c")
    x, out = torch.empty(3, HIDDEN), torch.empty(3, HIDDEN)
    strided = torch.empty(HIDDEN, 3).t()
    ids, weights = routing(3, gen)
    for step in range(3):  # new contents in the same tensors, as the GPU worker writes a slot
        x.copy_(torch.randn(3, HIDDEN, generator=gen))
        ids.copy_(routing(3, gen)[0])
        weights.copy_(torch.rand(3, TOP_K, generator=gen))
        run(x, ids, weights, out)
        want = moe_reference(x, ids, weights, t, fmt, FIRST, COUNT)
        assert_close_to_reference(out, want)
        other = torch.empty(3, HIDDEN)
        run(x.clone(), ids.long(), weights.double(), other)  # converted, and not remembered
        assert torch.equal(other, out)
        # a non-contiguous x, the same tensor every step: its contiguous copy is made on each call
        strided.copy_(x)
        run(strided, ids, weights, other)
        assert torch.equal(other, out)


@needs_cc
def test_the_clock_times_each_call_in_order_and_restarts_when_read():
    """krasis_clock (native.CKernel.clock): one entry per kernel call, its marks in the order the call
    passes them (every thread in, then phase 1's first and last thread done, then phase 2), within
    the call's own wall time; and zero again once read."""
    import time

    fmt = FORMATS["int4-g64"]
    gen = torch.Generator().manual_seed(8)
    t = node_block(fmt, gen)
    c = native.load()
    run = c.bind(t, 4, FIRST, COUNT, "silu", 2)
    x, out = torch.randn(3, HIDDEN, generator=gen), torch.empty(3, HIDDEN)
    ids, weights = routing(3, gen)
    c.clock()
    t0 = time.perf_counter()
    for _ in range(5):
        run(x, ids, weights, out)
    wall = time.perf_counter() - t0
    clk = c.clock()
    assert clk["calls"] == 5 and clk["ahead_calls"] == 0
    assert 0 <= clk["wake_s"] <= clk["p1_first_s"] <= clk["p1_last_s"]
    assert clk["p2_s"] > 0 and clk["p1_last_s"] + clk["p2_s"] <= wall
    # each of the team's two threads ran its share of phase 1, within the call's phase 1
    assert len(clk["p1_by_thread_s"]) == len(clk["cpu_by_thread"]) == 2
    assert all(0 < t <= clk["p1_last_s"] for t in clk["p1_by_thread_s"])
    again = c.clock()
    assert not any(v for v in again.values() if not isinstance(v, list)) and again["p1_by_thread_s"] == [0.0, 0.0]


@needs_cc
@pytest.mark.parametrize("kind, xdtype", [("int4", torch.bfloat16), ("int8", torch.float32)])
def test_any_number_of_threads_gives_the_same_bits(kind, xdtype):
    """The threads take a phase's rows a chunk at a time, from their own share and then from others'
    (expert_kernel.c: claim): a row lost or taken twice would change the output, and which thread
    computes a row must not, so every team size gives the one-thread result bit for bit. 20 tokens
    over a larger block give each phase several chunks a thread."""
    fmt = ExpertFormat(kind, group_size=64)
    gen = torch.Generator().manual_seed(12)
    t = node_block(fmt, gen, hidden=512, inter=384)
    x = torch.randn(20, 512, generator=gen).to(xdtype)
    ids, weights = routing(20, gen)
    c = native.load()
    outs = []
    for threads in (1, 2, 3, 7):
        out = torch.empty(20, 512)
        c.bind(t, int(kind[3:]), FIRST, COUNT, "silu", threads)(x, ids, weights, out)
        outs.append(out)
    assert float(outs[0].abs().max()) > 0
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@needs_cc
def test_a_refused_pin_leaves_the_threads_as_they_were(caplog):
    """Pinning is an optimisation: a CPU the process may not run on leaves the kernel's threads
    unpinned, with a warning, and the caller's mask unchanged."""
    assert expert_kernel.c_kernel() is not None
    threads, mask = expert_kernel._threads, os.sched_getaffinity(0)
    try:
        expert_kernel.set_threads(1)
        with caplog.at_level("WARNING", logger="krasis.cpu_worker"):
            assert not expert_kernel.pin_threads([min(1023, (os.cpu_count() or 1) + 7)])
        assert "unpinned" in caplog.text and os.sched_getaffinity(0) == mask
    finally:
        expert_kernel.set_threads(threads)


@needs_cc
def test_pinned_threads_run_on_their_cpus():
    """krasis_pin puts thread i of the team on cpus[i]: the kernel's clock then sees its phase 1 run
    there (a team of one: the calling thread, whose own mask is put back afterwards)."""
    fmt = FORMATS["int4-g64"]
    gen = torch.Generator().manual_seed(9)
    c = native.load()
    run = c.bind(node_block(fmt, gen), 4, FIRST, COUNT, "silu", 1)
    ids, weights = routing(2, gen)
    mask = os.sched_getaffinity(0)
    cpu = max(mask)
    try:
        c.pin([cpu])
        run(torch.randn(2, HIDDEN, generator=gen), ids, weights, torch.empty(2, HIDDEN))
        assert c.clock()["cpu_by_thread"] == [cpu]
        assert os.sched_getaffinity(0) == {cpu}
    finally:
        os.sched_setaffinity(0, mask)


def test_no_token_in_the_block(kernel):
    fmt = FORMATS["int4-g128"]
    t = node_block(fmt, torch.Generator().manual_seed(1))
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    out = moe_layer(x, torch.zeros(2, TOP_K, dtype=torch.int32), torch.ones(2, TOP_K), t, fmt, FIRST, COUNT, kernel=kernel)
    assert out.dtype == torch.bfloat16 and torch.all(out == 0)


def test_int4_groups_ending_inside_a_byte_take_the_reference(kernel):
    """Groups of 9 weights end in the middle of a byte, which neither kernel reads."""
    fmt = ExpertFormat("int4", group_size=9)
    gen = torch.Generator().manual_seed(5)
    t = node_block(fmt, gen, 18, 18)
    x = torch.randn(3, 18, generator=gen)
    ids, weights = routing(3, gen)
    assert_close_to_reference(moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, kernel=kernel),
                              moe_reference(x, ids, weights, t, fmt, FIRST, COUNT))


@needs_cc
def test_build_is_cached_and_keyed_by_flags(tmp_path):
    first = native.build(cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    other = native.build(("-DPREFETCH=0",), cache=tmp_path)
    assert other != first and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temporary files left


@needs_cc
def test_concurrent_builds_do_not_race(tmp_path):
    """Pool processes starting together each compile into the same cache; every one of them ends
    up with a complete library (threads here: the compiler runs as a subprocess either way)."""
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: native.build(cache=tmp_path), range(3)))
    assert len(set(paths)) == 1 and list(tmp_path.iterdir()) == [paths[0]]
    native.CKernel(paths[0])


def test_no_compiler_falls_back_to_numba_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("CC", "krasis-no-such-compiler")
    monkeypatch.setattr(expert_kernel, "_c_kernel", None)
    fmt = FORMATS["int4-g64"]
    gen = torch.Generator().manual_seed(9)
    t = node_block(fmt, gen)
    x = torch.randn(3, HIDDEN, generator=gen)
    ids, weights = routing(3, gen)
    with caplog.at_level("WARNING", logger="krasis.cpu_worker"):
        got = moe_layer(x, ids, weights, t, fmt, FIRST, COUNT)
        moe_layer(x, ids, weights, t, fmt, FIRST, COUNT)
    assert [r.getMessage() for r in caplog.records] == [
        "C expert kernel unavailable, using the numba kernel: no C compiler ('krasis-no-such-compiler' is not on PATH)"
    ]
    assert torch.equal(got, moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, kernel="numba"))
    with pytest.raises(RuntimeError, match="could not be built"):
        moe_layer(x, ids, weights, t, fmt, FIRST, COUNT, kernel="c")


@needs_cc
def test_a_failing_build_falls_back(monkeypatch, tmp_path, caplog):
    """A compiler that runs but fails (here: rejects the flags) is reported in one line."""
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setattr(expert_kernel, "_c_kernel", None)
    monkeypatch.setattr(native, "CACHE", tmp_path / "kernels")
    assert expert_kernel.c_kernel() is None
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"failed on {native.SOURCE.name}: cc: error: unrecognized option" in msg and "\n" not in msg
