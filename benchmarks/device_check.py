"""The whole GPU check of issue 4 in one run (the lent H100): exactness of every strategy on CUDA in
bfloat16 against transformers, the grouped-MoE kernel against its reference (and timed), the
machine's ceilings (pinned and pageable host-to-device, a registered memfd, copy/compute overlap),
then `bench` on synthetic real-shaped models. Logs and JSON go to $OUT (or ./device_out); a short
table is printed last.

    python benchmarks/device_check.py [--layers 8 (0: all)] [--skip-exact] [--skip-bench] [--profile]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = Path(os.environ.get("OUT") or ROOT / "device_out")
OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {"exact": [], "kernel": [], "ceilings": {}, "bench": []}
LOG = open(OUT / "device_check.log", "a")


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def save():
    (OUT / "device_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


# --- exactness: every strategy, bf16, against transformers on the same GPU ----------------------

CASES = [
    ("qwen3-base", "persistent", "pure_cpu"),
    ("dsv2-lite-like", "layer_grouped_2", "hcs_hybrid"),
    ("qwen3-base", "chunked", "compact"),
    ("dsv2-lite-like", "active_only", "lru"),
    ("qwen3-base", "hcs_prefill", "hcs_hybrid"),
]


def exactness(root: Path):
    import tiny_models as tm

    fams = {**{k: ("qwen3", v) for k, v in tm.QWEN3_CONFIGS.items()}, **{k: ("deepseek", v) for k, v in tm.DEEPSEEK_CONFIGS.items()}}
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 160, (256,), generator=g).tolist()
    refs = {}
    for model, prefill, decode in CASES:
        path = root / model
        if not path.exists():
            tm.build(path, fams[model][0], **fams[model][1])
        if model not in refs:
            ref = tm.reference_model(path, torch.bfloat16).to("cuda")
            with torch.no_grad():
                logits = ref(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()
                gen = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, min_new_tokens=16, do_sample=False)
            refs[model] = (logits, gen[0, len(prompt):].tolist())
            del ref
        ref_logits, ref_tokens = refs[model]
        for kv in ("bf16", "fp8") if prefill == "persistent" else ("bf16",):
            t0 = time.time()
            row = {"model": model, "prefill": prefill, "decode": decode, "kv": kv}
            try:
                with tm.Service(path, "--devices", "cuda:0", "--dtype", "bfloat16", "--cpu-workers", "2",
                                "--prefill-strategy", prefill, "--decode-strategy", decode, "--kv-dtype", kv,
                                "--prefill-chunk", "100") as svc:
                    got = svc.client.complete(prompt_ids=prompt, max_new_tokens=16, prompt_logits=True, ignore_eos=True)
                agree = float((torch.from_numpy(got.prompt_logits).argmax(-1) == ref_logits.argmax(-1)).float().mean())
                row.update(top1=agree, greedy_same=got.token_ids == ref_tokens,
                           first_diff=next((i for i, (a, b) in enumerate(zip(got.token_ids, ref_tokens)) if a != b), None))
                row["pass"] = agree >= 0.99 and (row["greedy_same"] or kv == "fp8")
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}"[:400], **{"pass": False})
                traceback.print_exc(file=LOG)
            row["s"] = round(time.time() - t0, 1)
            log("exact", row)
            RESULTS["exact"].append(row)
            save()


# --- the grouped MoE kernel: correctness at a real size, and its time against the per-expert loop ---


def kernel_check():
    from krasis.gpu_worker.dma import block_lookup
    from krasis.gpu_worker.moe_gpu import moe_blocks
    from krasis.shared.expert_store import ExpertFormat
    from krasis.shared.moe import moe_reference
    from krasis.shared.quant import quantized

    E, H, I, k, M = 128, 2048, 768, 8, 10000
    torch.manual_seed(0)
    for kind in ("int4", "int8", "dense"):
        fmt = ExpertFormat(kind, torch.bfloat16, 128)
        w13, w2 = torch.randn(E, 2 * I, H, device="cuda") * 0.02, torch.randn(E, H, I, device="cuda") * 0.02
        if kind == "dense":
            t = {"w13": w13.bfloat16(), "w2": w2.bfloat16()}
        else:
            parts = [quantized(fmt, w13[e], "w13") | quantized(fmt, w2[e], "w2") for e in range(E)]
            t = {n: torch.stack([p[n] for p in parts]) for n in parts[0]}
        x = torch.randn(M, H, device="cuda").bfloat16()
        ids = torch.rand(M, E, device="cuda").topk(k, dim=-1).indices  # k distinct experts per row
        w = torch.rand(M, k, device="cuda")
        lk = block_lookup(E, 0, E, "cuda")
        out = moe_blocks(x, ids, w, [(t, lk)], fmt)
        sub = torch.arange(0, M, 97, device="cuda")  # the float32 reference on a sample of rows
        t32 = {n: (v.float() if v.dtype == torch.bfloat16 else v) for n, v in t.items()}
        ref = moe_reference(x[sub].float(), ids[sub], w[sub], t32, ExpertFormat(kind, torch.float32, 128), 0, E)
        err = float((out[sub] - ref).norm() / ref.norm())

        def timed(fn, reps=5):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            return sorted(ts)[len(ts) // 2]

        grouped_ms = timed(lambda: moe_blocks(x, ids, w, [(t, lk)], fmt))
        import krasis.gpu_worker.moe_gpu as mg

        keep = mg._grouped_ok
        mg._grouped_ok = lambda _x: False
        loop_ms = timed(lambda: moe_blocks(x, ids, w, [(t, lk)], fmt))
        mg._grouped_ok = keep
        flops = 2 * M * k * 3 * H * I
        row = {"kind": kind, "rel_err": err, "grouped_ms": grouped_ms, "loop_ms": loop_ms,
               "grouped_tflop_s": flops / grouped_ms / 1e9, "pass": err < 1e-2}
        log("kernel", row)
        RESULTS["kernel"].append(row)
        save()


# --- attention at the bench's prompt length: which SDPA path, and its time ---------------------


def ms(fn, reps=5):
    """Milliseconds per call of fn on the GPU, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def norm_rope_check(T: int = 10000):
    """The Triton RMSNorm and rotary kernels (shared/kernels/norm_rope_kernel.py) against their torch
    references on a prompt's activations: identical in bf16, and their times."""
    from krasis.shared.models.layers import Rotary, rms_norm, rms_norm_reference, rope_inv_freq

    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(T, 2048, device="cuda", generator=g).bfloat16()
    qh = torch.randn(T, 32, 128, device="cuda", generator=g).bfloat16()
    w2048, w128 = ((torch.rand(d, device="cuda", generator=g) + 0.5).bfloat16() for d in (2048, 128))
    rot = Rotary(rope_inv_freq({"rope_theta": 1e6, "rope_type": "default"}, 128, 40960)[0]).to("cuda")
    pos = torch.arange(5, 5 + T, device="cuda")
    row = {}
    for name, x, w in (("norm_2048", h, w2048), ("norm_head_128", qh, w128)):
        got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
        row[f"{name}_identical"] = bool(torch.equal(got, want))
        row[f"{name}_differ_fraction"] = float((got != want).float().mean())
        # bf16 has 8 significant bits: 2^-7 relative is one unit in the last place at most
        row[f"{name}_max_rel_diff"] = float(((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)).max())
        row[f"{name}_ms"] = ms(lambda: rms_norm(x, w, 1e-6), 20)
        row[f"{name}_reference_ms"] = ms(lambda: rms_norm_reference(x, w, 1e-6), 20)
    got, want = rot.rotate_half(qh, pos), rot.rotate_half_reference(qh, pos)
    row["rope_identical"] = bool(torch.equal(got, want))
    row["rope_max_abs_diff"] = float((got.float() - want.float()).abs().max())
    row["rope_ms"] = ms(lambda: rot.rotate_half(qh, pos), 20)
    row["rope_reference_ms"] = ms(lambda: rot.rotate_half_reference(qh, pos), 20)  # tables cached, as across a step's layers
    log("norm_rope", row)
    RESULTS["norm_rope"] = row
    save()


def graph_us(call, reps: int):
    """Microseconds per call of `call` on the device, 20 calls captured in one CUDA graph (as a decode
    graph runs it: the host's launch cost is not counted), and the last call's output as a replay
    leaves it."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            out = call()
    graph.replay()
    torch.cuda.synchronize()
    return 1000 * ms(graph.replay, reps) / 20, out


def first_call_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def prefill_attention_check():
    """Prompt-chunk attention: the Triton kernel (shared/kernels/prefill_attention_kernel.py) against
    its torch path compiled on CUDA (tests/test_prefill_attention_kernel.py's check), then timed
    against SDPA's flash kernel (the torch path: KV heads copied) for a Qwen3-30B-A3B layer's chunks
    (32 query heads, 4 KV heads, d 128) and over a few block configurations; and what a length never
    seen before costs SDPA's cuDNN and flash backends on its first call (cuDNN builds an execution
    plan per shape: the first 10K prompt of a bench ran 5.4 s slower than the second on the H100,
    2026-12-05, when cuDNN took the first chunk)."""
    import subprocess

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from krasis.shared.kernels.prefill_attention_kernel import prefill_attention_triton
    from krasis.shared.models.layers import _sdpa

    sys.path.insert(0, str(ROOT / "tests"))
    import test_prefill_attention_kernel

    p = subprocess.run([sys.executable, "-c", test_prefill_attention_kernel.CHECK], capture_output=True, text=True)
    row = {"triton_matches": p.returncode == 0 and p.stdout.strip() == "ok"}
    log("prefill attention kernel against its torch path on CUDA:", row["triton_matches"], p.stderr[-800:])
    for t, T in ((4096, 4096), (4096, 8192), (1808, 10000), (4096, 65536)):
        q = torch.randn(t, 32, 128, device="cuda").bfloat16()
        k, v = (torch.randn(T, 4, 128, device="cuda").bfloat16() for _ in range(2))
        flops = 4 * 128 * 32 * (t * (T - t) + t * t / 2)
        want = _sdpa(q, k, v, T - t, 0.088, None)
        row[f"t{t}_T{T}_flash_ms"] = ms(lambda: _sdpa(q, k, v, T - t, 0.088, None), 5)
        configs = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4)] if T == 8192 else [(128, 64, 8, 3)]
        for bm, bn, warps, stages in configs:
            name = f"t{t}_T{T}_triton_{bm}_{bn}_{warps}_{stages}"
            try:
                call = lambda: prefill_attention_triton(q, k, v, 0.088, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)  # noqa: E731
                row[f"{name}_rel_err"] = float((call().float() - want.float()).norm() / want.float().norm())
                row[f"{name}_ms"] = ms(call, 5)
                row[f"{name}_tflop_s"] = flops / row[f"{name}_ms"] / 1e9
            except Exception as e:  # a configuration past the device's shared memory, say: the others still run
                row[f"{name}_error"] = str(e)[:200]
        row[f"t{t}_T{T}_flash_tflop_s"] = flops / row[f"t{t}_T{T}_flash_ms"] / 1e9
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        # lengths no other check used, one set per backend, so each call is that backend's first
        for T in ((1000, 3000, 4096, 1808) if name == "cudnn" else (1001, 3001, 4095, 1809)):
            q = torch.randn(1, 32, T, 128, device="cuda").bfloat16()
            k, v = (torch.randn(1, 32, T, 128, device="cuda").bfloat16() for _ in range(2))

            def go():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            try:
                row[f"{name}_first_call_T{T}_ms"] = first_call_ms(go)
                row[f"{name}_T{T}_ms"] = ms(go, 10)
            except RuntimeError as e:
                row[f"{name}_T{T}_error"] = str(e)[:200]
    log("prefill_attention", row)
    RESULTS["prefill_attention"] = row
    save()


def attention_check(T: int = 10000):
    import torch.nn.functional as F

    from krasis.shared.models.layers import attend

    q = torch.randn(T, 32, 128, device="cuda").bfloat16()
    k, v = torch.randn(T, 4, 128, device="cuda").bfloat16(), torch.randn(T, 4, 128, device="cuda").bfloat16()
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    row = {
        "gqa_attend_ms": ms(lambda: attend(q, k, v, 0, 0.088)),
        "gqa_enable_gqa_4d_ms": ms(lambda: F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True, enable_gqa=True)),
    }
    qm, km, vm = (torch.randn(T, 16, d, device="cuda").bfloat16() for d in (192, 192, 128))
    row["mla_attend_ms"] = ms(lambda: attend(qm, km, vm, 0, 0.07))
    row["gqa_second_chunk_ms"] = ms(lambda: attend(q[: T // 2], k, v, T // 2, 0.088))
    # a later chunk (bottom-right causal) against the same rows of the whole prompt's attention
    want = attend(q, k, v, 0, 0.088)[T // 2 :].float()
    row["gqa_second_chunk_rel_err"] = float((attend(q[T // 2 :], k, v, T // 2, 0.088).float() - want).norm() / want.norm())
    # decode: one new token over the whole cache, the Triton kernel against its reference
    from krasis.gpu_worker.cache_rows import Rows, device_table, offsets
    from krasis.gpu_worker.decode_attention import decode_attention_reference
    from krasis.gpu_worker.decode_attention_kernel import decode_attention_batch
    from krasis.gpu_worker.kv_cache import fp8_quantize

    q1 = q[-1:]
    cases = {"bf16": (Rows(k), Rows(v)), "fp8": (Rows(*fp8_quantize(k)), Rows(*fp8_quantize(v)))}
    c, kr = torch.randn(T, 1, 512, device="cuda").bfloat16(), torch.randn(T, 1, 64, device="cuda").bfloat16()
    cq, krq = Rows(*fp8_quantize(c)), Rows(*fp8_quantize(kr))
    qm1 = torch.randn(1, 16, 576, device="cuda").bfloat16()
    for name, (kk, vv) in cases.items():
        got, want = decode_attention_batch(q1, [[kk]], [vv], [T - 1], 0.088), decode_attention_reference(q1, [kk], vv, T - 1, 0.088)
        row[f"decode_{name}_rel_err"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        row[f"decode_{name}_ms"] = ms(lambda: decode_attention_batch(q1, [[kk]], [vv], [T - 1], 0.088), 50)
        row[f"decode_{name}_reference_ms"] = ms(lambda: decode_attention_reference(q1, [kk], vv, T - 1, 0.088), 5)
    # device time per call by number of key splits (None: the kernel's own choice), as a decode
    # graph runs it (graph_us)
    kk, vv = cases["fp8"]
    want = decode_attention_reference(q1, [kk], vv, T - 1, 0.088)
    # the table made before the capture, as KVCache.begin_step makes it before a step's graph
    table = (device_table(offsets([[(kk.values, kk.scales), (vv.values, vv.scales)]], [T - 1]), q1.device), 5, (0, 1, 1))
    for splits in (None, 40, 53, 80, 106, 157, 210):
        call = lambda: decode_attention_batch(q1, [[kk]], [vv], [T - 1], 0.088, splits=splits, table=table)  # noqa: E731
        row[f"decode_fp8_splits_{splits}_us"], got = graph_us(call, 20)
        row[f"decode_fp8_splits_{splits}_rel_err"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    # keys per block, warps and pipeline stages, at this context and at 64K: the kernel read a 10K fp8
    # cache at ~230 GB/s on the H100 (session 19), and decode after 64K ran at 37% of decode after 512
    for n in (T, 65536):
        kn, vn = ((kk, vv) if n == T else
                  (Rows(*fp8_quantize(torch.randn(n, *k.shape[1:], device="cuda").bfloat16())),
                   Rows(*fp8_quantize(torch.randn(n, *k.shape[1:], device="cuda").bfloat16()))))
        nbytes = sum(r.values.numel() * r.values.element_size() + r.scales.numel() * r.scales.element_size() for r in (kn, vn))
        want_n = decode_attention_reference(q1, [kn], vn, n - 1, 0.088)
        table_n = (device_table(offsets([[(kn.values, kn.scales), (vn.values, vn.scales)]], [n - 1]), q1.device), 5, (0, 1, 1))
        for tiles in ((64, 4, None), (32, 4, None), (128, 4, None), (64, 8, None), (128, 8, None), (64, 4, 2), (64, 4, 4)):
            name = f"decode_fp8_ctx{n}_tiles_{'_'.join(map(str, tiles))}"
            try:
                call = lambda: decode_attention_batch(q1, [[kn]], [vn], [n - 1], 0.088, table=table_n, tiles=tiles)  # noqa: E731
                us, got = graph_us(call, 10)
                row[f"{name}_us"] = us
                row[f"{name}_GB_s"] = nbytes / us / 1e3
                row[f"{name}_rel_err"] = float((got.float() - want_n.float()).abs().max() / want_n.float().abs().max())
            except Exception as e:  # a configuration past the registers or shared memory: the others still run
                row[f"{name}_error"] = str(e)[:200]
    # a decode step of 32 sequences, lengths spread up to T, in one launch, against the reference
    # per sequence (the per-sequence launches it replaced: decode_fp8_ms each)
    lens = [T * (i + 1) // 32 for i in range(32)]
    kb, vb = ([Rows(*fp8_quantize(torch.randn(n, *k.shape[1:], device="cuda").bfloat16())) for n in lens] for _ in range(2))
    qb = torch.randn(32, *q.shape[1:], device="cuda").bfloat16()
    got = decode_attention_batch(qb, [[x] for x in kb], vb, [n - 1 for n in lens], 0.088)
    want = torch.cat([decode_attention_reference(qb[i : i + 1], [kb[i]], vb[i], n - 1, 0.088) for i, n in enumerate(lens)])
    row["decode_batch32_fp8_rel_err"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    row["decode_batch32_fp8_ms"] = ms(lambda: decode_attention_batch(qb, [[x] for x in kb], vb, [n - 1 for n in lens], 0.088), 20)
    got = decode_attention_batch(qm1, [[cq, krq]], [cq], [T - 1], 0.07)
    want = decode_attention_reference(qm1, [cq, krq], cq, T - 1, 0.07)
    row["decode_mla_fp8_rel_err"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    row["decode_mla_fp8_ms"] = ms(lambda: decode_attention_batch(qm1, [[cq, krq]], [cq], [T - 1], 0.07), 50)
    log("attention", row)
    RESULTS["attention"] = row
    save()


# --- ceilings -----------------------------------------------------------------------------------


def ceilings():
    from krasis.coordinator.bench import measure_dram, measure_h2d, measure_matmul
    from krasis.gpu_worker.dma import pin_segment

    c = RESULTS["ceilings"]
    c["h2d_pinned_gb_s"] = measure_h2d("cuda:0") / 1e9
    n = 1 << 30
    fd = os.memfd_create("krasis-check")
    os.ftruncate(fd, n)
    import mmap

    m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    seg = torch.frombuffer(m, dtype=torch.uint8)
    seg.random_(0, 255)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")

    def bw():
        dst.copy_(seg, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(seg, non_blocking=True)
        torch.cuda.synchronize()
        return 3 * n / (time.perf_counter() - t0) / 1e9

    c["h2d_pageable_memfd_gb_s"] = bw()
    pin_segment(seg)
    c["h2d_registered_memfd_gb_s"] = bw()
    assert torch.equal(dst[:4096].cpu(), seg[:4096])
    # unregister before the mapping goes away: a registered range that is unmapped poisons the context
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(seg.data_ptr())
    del seg, dst
    m.close()
    os.close(fd)
    c["matmul_bf16_tflop_s"] = measure_matmul("cuda:0", torch.bfloat16) / 1e12
    c["dram_gb_s"] = measure_dram() / 1e9
    log("ceilings", c)
    save()


# --- bench on synthetic real shapes -------------------------------------------------------------


def bench(layers: int | None, prompts: list[int], decode: int, runs: int, configs=None, group_size: int = 128,
          chunk: int | None = None):
    """`bench` of each (shape, prefill, decode) config at each prompt length. prefill "default": no
    strategy named and the default --prefill-chunk (what a user gets); else that strategy with one
    chunk per prompt (`chunk`: that many tokens a chunk)."""
    from krasis.coordinator.bench import run_bench, table
    from krasis.coordinator.processes import RuntimeOptions
    from krasis.coordinator.synth import synth

    configs = configs or [
        ("qwen3-30b-a3b", "layer_grouped_2", "pure_cpu"),
        ("qwen3-30b-a3b", "layer_grouped_2", "hcs_hybrid"),
        ("deepseek-v2-lite", "layer_grouped_2", "pure_cpu"),
    ]
    rows = []
    for (shape, prefill, dec, *more), prompt in ((c, p) for c in configs for p in prompts):
        env, extra = (*more, {}, {})[:2]  # environment variables, RuntimeOptions fields
        path = Path("/tmp/krasis-synth") / f"{shape}-{layers or 'all'}-g{group_size}"
        if not (path / "config.json").exists():
            t0 = time.time()
            # experts straight into the INT4 cache: the whole Qwen3-30B-A3B in BF16 would not fit the disk
            synth(shape, path, layers=layers, expert_bits=4, group_size=group_size)
            log(f"synth {shape} {layers or 'all'} layers: {time.time() - t0:.0f} s")
        default = prefill == "default"
        opts = RuntimeOptions(devices=["cuda:0"], dtype="bfloat16", gpu_bits=4, cpu_bits=4, vram_budget=16.0,
                              group_size=group_size, prefill_strategy=None if default else prefill,
                              decode_strategy=dec, max_context=prompt + decode + 8, max_batch=1,
                              **({} if default else {"prefill_chunk": chunk or prompt}), **extra)
        t0 = time.time()
        os.environ.update(env)
        try:
            r = run_bench(str(path), opts, prompt, decode, runs)
            r["model"] = (f"{shape} ({f'{layers}L ' if layers else ''}synth, {prompt} tok{', defaults' if default else ''})"
                          + "".join(f" {k}={v}" for k, v in {**env, **extra}.items()))
            r["wall_s"] = round(time.time() - t0, 1)
            log("bench", json.dumps(r, default=str))
            rows.append(r)
            RESULTS["bench"].append(r)
        except Exception as e:
            traceback.print_exc(file=LOG)
            log("bench failed", shape, prefill, dec, f"{type(e).__name__}: {e}"[:600])
            RESULTS["bench"].append({"model": shape, "prefill": prefill, "decode": dec, "error": str(e)[:2000]})
        finally:
            for k in env:
                del os.environ[k]
        save()
    return table(rows) if rows else ""


def turn_check(num: int = 128, hidden: int = 2048, k: int = 8):
    """A decode layer's turn on the device, Qwen3-30B-A3B's shapes, each timed as a graph of 20 calls:
    the router's product and top-k in one kernel (shared/kernels/router_kernel.py) against F.linear +
    softmax_topk, at 1 to 8 tokens (the same choices?); the decode GEMV (gemv_kernel.py) at its
    tilings against cuBLAS (F.linear) for qkv (5120 x 2048), o (2048 x 4096) and the LM head (151936
    x 2048) at 1, 2 and 4 tokens, each call's weight cold in HBM (which share of the outputs is not the
    float32 product rounded, for both), and qkv with the input norm inside the GEMV against rms_norm +
    cuBLAS; the same products from INT8 rows (--attn-bits 8) in the GEMV against the reference path
    (QuantLinear.matmul_t: a dequantized copy, then cuBLAS), and whether the GEMV's dequantized
    weights are the reference's."""
    import torch.nn.functional as F

    from krasis.shared.kernels.gemv_kernel import gemv
    from krasis.shared.kernels.router_kernel import router_topk_triton
    from krasis.shared.models.layers import rms_norm, rms_norm_reference, softmax_topk
    from krasis.shared.quant import QuantLinear

    g = torch.Generator(device="cuda").manual_seed(5)
    r = (torch.randn(num, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    row = {}
    for m in (1, 2, 4, 8):
        x = torch.randn(m, hidden, device="cuda", generator=g).bfloat16()
        row[f"router_m{m}_fused_us"], (ids, w) = graph_us(lambda: router_topk_triton(x, r, k, True), 20)
        row[f"router_m{m}_linear_topk_us"], (want_ids, want_w) = graph_us(lambda: softmax_topk(F.linear(x, r), k, True), 20)
        row[f"router_m{m}_same_ids"] = bool(torch.equal(ids, want_ids))
        row[f"router_m{m}_max_w_diff"] = float((w - want_w).abs().max())
    for name, (o, i) in (("qkv", (5120, 2048)), ("o", (2048, 4096)), ("lm_head", (151936, 2048))):
        # copies of the weight, 256 MB or more in all, taken in turn: each call reads its weight from
        # HBM, as a decode step's layers do (one copy would stay in the 50 MB L2 across a graph's calls)
        ws = [(torch.randn(o, i, device="cuda", generator=g) * 0.02).bfloat16() for _ in range(max(2, -(-256 * 2**20 // (o * i * 2))))]
        for m in (1, 2, 4):
            xi = torch.randn(m, i, device="cuda", generator=g).bfloat16()

            def cold(product):
                turn = itertools.cycle(ws)
                us, got = graph_us(lambda: product(next(turn)), 10)
                # graph_us's first call (not captured) took ws[0], the graph's 20 calls the next ones
                return us, (got != (xi.float() @ ws[20 % len(ws)].float().T).bfloat16()).float().mean().item()

            row[f"{name}_m{m}_cublas_us"], row[f"{name}_m{m}_cublas_ulps_off"] = cold(lambda w: F.linear(xi, w))
            for tiles in ((8192, 4), (4096, 4), (16384, 8), (8192, 8), (4096, 2), (2048, 2)):
                tag = f"{name}_m{m}_gemv_{'_'.join(map(str, tiles))}"
                row[f"{tag}_us"], row[f"{tag}_ulps_off"] = cold(lambda w: gemv(xi, w, tiles))
            if name == "qkv":  # with the input norm in the kernel (layers.norm_linear), against rms_norm + cuBLAS
                ln = (torch.rand(i, device="cuda", generator=g) + 0.5).bfloat16()
                row[f"qkv_m{m}_norm_cublas_us"] = cold(lambda w: F.linear(rms_norm(xi, ln, 1e-6), w))[0]
                row[f"qkv_m{m}_norm_gemv_us"] = cold(lambda w: gemv(xi, w, norm=(ln, 1e-6)))[0]
                want = F.linear(rms_norm_reference(xi, ln, 1e-6), ws[0])
                got = gemv(xi, ws[0], norm=(ln, 1e-6))
                row[f"qkv_m{m}_norm_gemv_max_rel_diff"] = float(((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3)).max())
            best = min((v, key) for key, v in row.items() if key.startswith(f"{name}_m{m}_gemv") and key.endswith("_us"))
            row[f"{name}_m{m}_best"] = f"{best[1]} {best[0]:.2f} us, {o * i * 2 / best[0] / 1e6:.2f} TB/s; cuBLAS " \
                                      f"{row[f'{name}_m{m}_cublas_us']:.2f} us"
        # --attn-bits 8: INT8 rows with their scales (QuantLinear), cold as above, in the GEMV against
        # the reference path (a dequantized copy at every call, then cuBLAS)
        qs = [QuantLinear.quantize(w) for w in ws[:1]]
        qs += [QuantLinear(torch.randint(-127, 128, (o, i), device="cuda", dtype=torch.int8, generator=g), qs[0].scale)
               for _ in range(max(2, -(-256 * 2**20 // (o * i))) - 1)]
        for m in (1, 2, 4):
            xi = torch.randn(m, i, device="cuda", generator=g).bfloat16()
            turn = itertools.cycle(qs)
            row[f"{name}_m{m}_int8_dequant_cublas_us"] = graph_us(lambda: next(turn).matmul_t(xi), 10)[0]
            for tiles in ((8192, 4), (16384, 4), (16384, 8), (32768, 8)):
                turn = itertools.cycle(qs)
                row[f"{name}_m{m}_int8_gemv_{'_'.join(map(str, tiles))}_us"] = graph_us(
                    lambda: (lambda q: gemv(xi, q.q, tiles, scale=q.scale))(next(turn)), 10)[0]
            best = min((v, key) for key, v in row.items() if key.startswith(f"{name}_m{m}_int8_gemv") and key.endswith("_us"))
            row[f"{name}_m{m}_int8_best"] = f"{best[1]} {best[0]:.2f} us, {o * i / best[0] / 1e6:.2f} TB/s"
        # the dequantized weights are the reference's, rounding included: unit rows pick them out
        cols = torch.randint(0, i, (4,), device="cuda", generator=g)
        unit = torch.zeros(4, i, device="cuda", dtype=torch.bfloat16)
        unit[torch.arange(4, device="cuda"), cols] = 1
        row[f"{name}_int8_weights_exact"] = bool(torch.equal(gemv(unit, qs[0].q, scale=qs[0].scale),
                                                               qs[0].dequantize(torch.bfloat16).T[cols]))
    log("turn", row)
    RESULTS["turn"] = row
    save()


def warm_check(hidden: int = 2048, heads: int = 32, kv_heads: int = 4, head_dim: int = 128, experts: int = 128):
    """The decode turn's products with their weights warmed into L2 beforehand (gpu_worker/
    l2_warm_kernel.py) against cold from HBM, Qwen3-30B-A3B's shapes at one token: qkv with the input
    norm (5120 x 2048), o (2048 x 4096) and the router (128 x 2048), from one of enough layers' copies
    (each 38 MB) that a layer's are never in L2 when it comes round again, as in a decode step. Each
    timed as a graph of 20 turns: the turn alone (cold), the warm-up alone, and the warm-up then the
    turn; the warmed turn is the difference of the last two (in a step the warm-up runs while the
    pool does). Also whether the compiled kernel read every word (its checksum against the reference)
    in bf16 and with INT8 rows (--attn-bits 8)."""
    from krasis.gpu_worker.l2_warm_kernel import L2_SHARE, L2Warm, warm_reference
    from krasis.shared.kernels.gemv_kernel import gemv
    from krasis.shared.kernels.router_kernel import router_topk_triton
    from krasis.shared.quant import QuantLinear

    g = torch.Generator(device="cuda").manual_seed(6)
    budget = int(L2_SHARE * torch.cuda.get_device_properties(0).L2_cache_size)
    row = {"l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size, "budget_bytes": budget}
    for bits in (16, 8):
        def weight(o, i):
            w = (torch.randn(o, i, device="cuda", generator=g) * 0.02).bfloat16()
            return w if bits == 16 else QuantLinear.quantize(w)

        def rows(w):
            return (w, None) if bits == 16 else (w.q, w.scale)

        layers = []
        for _ in range(8):
            ln = (torch.rand(hidden, device="cuda", generator=g) + 0.5).bfloat16()
            qkv, o = weight((heads + 2 * kv_heads) * head_dim, hidden), weight(hidden, heads * head_dim)
            router = (torch.randn(experts, hidden, device="cuda", generator=g) * 0.02).bfloat16()
            parts = [ln, *(t for w in (qkv, o) for t in rows(w) if t is not None), router]
            layers.append((ln, qkv, o, router, L2Warm(parts, torch.device("cuda"), budget)))
        x = torch.randn(1, hidden, device="cuda", generator=g).bfloat16()
        a = torch.randn(1, heads * head_dim, device="cuda", generator=g).bfloat16()

        def turn(layer):
            ln, qkv, o, router, _ = layer
            q, s = rows(qkv)
            gemv(x, q, norm=(ln, 1e-6), scale=s)
            q, s = rows(o)
            gemv(a, q, scale=s)
            return router_topk_triton(x, router, 8, True)

        def warmed(layer):
            layer[4]()
            return turn(layer)

        tag = "bf16" if bits == 16 else "int8"
        for name, call in (("cold", turn), ("warm_only", lambda layer: layer[4]()), ("warm_then_turn", warmed)):
            cycle = itertools.cycle(layers)
            row[f"{tag}_{name}_us"] = graph_us(lambda: call(next(cycle)), 10)[0]
        row[f"{tag}_warmed_turn_us"] = row[f"{tag}_warm_then_turn_us"] - row[f"{tag}_warm_only_us"]
        row[f"{tag}_warm_bytes"] = layers[0][4].nbytes
        layers[0][4]()
        row[f"{tag}_checksum_exact"] = layers[0][4].checksum() == warm_reference(layers[0][4].tensors)
    log("warm", row)
    RESULTS["warm"] = row
    save()


def dequant_check():
    """tests/test_dequant.py's comparisons on CUDA (the dequant kernel, where bfloat16 must be
    identical too, and the fused expert kernel of hcs_hybrid decode), tests/test_combine_kernel.py's
    (the prefill MoE's one-pass combine) and tests/test_act_kernel.py's (its one-pass activation)."""
    import subprocess

    sys.path.insert(0, str(ROOT / "tests"))
    import test_act_kernel
    import test_combine_kernel
    import test_dequant

    for name, check in (("dequant_exact", test_dequant.CHECK), ("combine_matches", test_combine_kernel.CHECK),
                        ("act_matches", test_act_kernel.CHECK)):
        p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
        RESULTS[name] = p.returncode == 0 and p.stdout.strip() == "ok"
        log(f"{name} (its kernels against their references on CUDA):", RESULTS[name], p.stderr[-800:])
    expert_gemv_timing()
    save()


def expert_gemv_timing(num: int = 128, hidden: int = 2048, inter: int = 768, k: int = 8):
    """Decode's expert products on the GPU (w13 then w2 of a Qwen3-30B-A3B layer, INT4/g32, routing
    uniform over 128 experts) at 1-32 tokens, all held and with half the pairs not held (row -1:
    hcs_hybrid's cold choices), as a graph of 20 calls: a program per pair (expert_gemv) against the
    pairs grouped by expert (pair_groups + expert_grouped, its sort counted) at a few tilings, and
    the distinct experts' bytes over the grouped time (what GROUPED_MIN_PAIRS is chosen from)."""
    from krasis.gpu_worker.expert_gemv_kernel import expert_gemv
    from krasis.gpu_worker.expert_grouped_kernel import expert_grouped, pair_groups
    from krasis.shared.expert_store import ExpertFormat
    from krasis.shared.quant import quantized

    fmt = ExpertFormat("int4", torch.bfloat16, 32)
    t = {}
    for name, (o, i) in (("w13", (2 * inter, hidden)), ("w2", (hidden, inter))):
        one = quantized(fmt, torch.randn(o, i) * 0.05, name)
        t |= {n: v.unsqueeze(0).expand(num, *v.shape).contiguous().cuda() for n, v in one.items()}
    expert_bytes = sum(v[0].numel() * v.element_size() for v in t.values())
    row = {}
    for m in (1, 2, 4, 8, 16, 32):
        held = torch.stack([torch.randperm(num)[:k] for _ in range(m)]).reshape(-1).cuda()
        half = torch.where(torch.arange(m * k, device="cuda") % 2 == 0, held, -1)
        x = torch.randn(m, hidden, device="cuda").bfloat16()
        a = torch.randn(m * k, inter, device="cuda").bfloat16()
        for name, rows in (("held", held), ("half_cold", half)):
            def pairs():
                return expert_gemv(fmt, t, "w13", rows, x, x_div=k, dtype=x.dtype), expert_gemv(fmt, t, "w2", rows, a, dtype=a.dtype)

            row[f"m{m}_{name}_pairs_us"], want = graph_us(pairs, 10)
            if name == "held" and m in (1, 4):
                pairs_cold(row, fmt, t, num, k, m, x, a)
            for tiles in (None, (16, 32, 64, 4, 3), (16, 64, 128, 4, 3), (16, 128, 64, 8, 3), (16, 64, 32, 4, 2)):
                def grouped():
                    g = pair_groups(rows)
                    return (expert_grouped(fmt, t, "w13", g, x, tiles, x_div=k), expert_grouped(fmt, t, "w2", g, a, tiles))

                tag = f"m{m}_{name}_grouped" + ("" if tiles is None else "_" + "_".join(map(str, tiles)))
                try:
                    row[f"{tag}_us"], got = graph_us(grouped, 10)
                    row[f"{tag}_err"] = max(float((g.float() - w.float()).abs().max() / w.float().abs().max())
                                            for g, w in zip(got, want))
                except Exception as e:  # past the registers or shared memory: the others still run
                    row[f"{tag}_error"] = str(e)[:200]
            distinct = int(torch.unique(rows[rows >= 0]).numel())
            row[f"m{m}_{name}_distinct_GBps"] = round(distinct * expert_bytes / row[f"m{m}_{name}_grouped_us"] / 1e3, 1)
    log("expert_gemv", row)
    RESULTS["expert_gemv"] = row
    expert_gemm_timing(t, fmt, num, hidden, inter, k)


def pairs_cold(row: dict, fmt, t: dict, num: int, k: int, m: int, x, a) -> None:
    """expert_gemv's tilings (one for w13 and w2) with each of the graph's 20 calls on its own experts,
    as a decode step meets them (the same 8 experts 20 times stay in the H100's 50 MB L2): the
    default, (32, 128, 4), and whole rows a step (session 29: slower)."""
    from krasis.gpu_worker.expert_gemv_kernel import expert_gemv

    sets = [torch.stack([torch.randperm(num)[:k] for _ in range(m)]).reshape(-1).cuda() for _ in range(20)]
    for tiles in (None, (64, 128, 4), (64, 128, 8), (16, 128, 4), (32, 256, 8), (16, 512, 4), (8, 1024, 4)):
        turn, last = itertools.cycle(sets), []

        def call():
            last[:] = [next(turn)]
            return (expert_gemv(fmt, t, "w13", last[0], x, tiles, x_div=k, dtype=x.dtype),
                    expert_gemv(fmt, t, "w2", last[0], a, tiles, dtype=a.dtype))

        tag = f"m{m}_cold_pairs_" + ("default" if tiles is None else "_".join(map(str, tiles)))
        try:
            row[f"{tag}_us"], got = graph_us(call, 10)
            want = [expert_gemv(fmt, t, "w13", last[0], x, (32, 128, 4), x_div=k),
                    expert_gemv(fmt, t, "w2", last[0], a, (32, 128, 4))]
            row[f"{tag}_rel_err"] = max(float((g.float() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))
        except Exception as e:  # past the registers: the others still run
            row[f"{tag}_error"] = str(e)[:200]


def expert_gemm_timing(t, fmt, num: int, hidden: int, inter: int, k: int, chunk: int = 4096):
    """A prompt chunk's routed experts for one Qwen3-30B-A3B layer (the rows sorted by expert, uniform
    routing) through w13 and w2: every expert dequantized into bf16 and torch's grouped product (the
    path before session 26), that product alone on a layer dequantized once (a step of several
    chunks), and expert_gemm's product dequantizing tile by tile, at a few tilings, as a graph of 20
    calls; the same outputs to bf16 rounding."""
    from krasis.gpu_worker.dequant import dequant_rows
    from krasis.gpu_worker.expert_grouped_kernel import expert_gemm
    from krasis.shared.routing_stats import count_choices

    ids = torch.stack([torch.randperm(num)[:k] for _ in range(chunk)]).cuda()
    key, order = torch.sort(ids.reshape(-1), stable=True)
    counts = count_choices(key, num)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // k
    x = torch.randn(chunk, hidden, device="cuda").bfloat16()
    a = torch.randn(chunk * k, inter, device="cuda").bfloat16()
    row = {}

    def torch_path():
        w13 = dequant_rows(fmt, t, "w13", None, torch.bfloat16)
        gu = torch._grouped_mm(x.index_select(0, tok), w13.transpose(-2, -1), offs=offs)
        del w13
        w2 = dequant_rows(fmt, t, "w2", None, torch.bfloat16)
        return gu, torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)

    row["dequant_grouped_mm_us"], want = graph_us(torch_path, 3)
    w13, w2 = (dequant_rows(fmt, t, n, None, torch.bfloat16) for n in ("w13", "w2"))

    def dequantized_once():  # a step of several chunks: the layer dequantized once (dequant_once)
        return (torch._grouped_mm(x.index_select(0, tok), w13.transpose(-2, -1), offs=offs),
                torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs))

    row["grouped_mm_on_bf16_us"] = graph_us(dequantized_once, 3)[0]
    del w13, w2
    flop = 2 * chunk * k * 3 * hidden * inter
    for tiles in (None, (64, 128, 32, 4, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)):
        def fused():
            return expert_gemm(fmt, t, "w13", x, tok, counts, None, tiles), expert_gemm(fmt, t, "w2", a, None, counts, None, tiles)

        tag = "fused" + ("" if tiles is None else "_" + "_".join(map(str, tiles)))
        try:
            row[f"{tag}_us"], got = graph_us(fused, 3)
            row[f"{tag}_tflops"] = round(flop / row[f"{tag}_us"] / 1e6, 1)
            row[f"{tag}_err"] = max(float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want))
        except Exception as e:  # past the registers or shared memory: the others still run
            row[f"{tag}_error"] = str(e)[:200]
    log("expert_gemm", row)
    RESULTS["expert_gemm"] = row


def graphs_check():
    """tests/test_doorbell.py (the GPU's side of the pool hop) and tests/test_decode_graphs.py
    (decode replayed as CUDA graphs against eager steps)."""
    import subprocess

    tests = [str(ROOT / "tests" / t) for t in ("test_doorbell.py", "test_decode_graphs.py")]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests], capture_output=True, text=True, cwd=ROOT)
    RESULTS["graphs_exact"] = p.returncode == 0
    log("decode graphs replay the eager steps:", RESULTS["graphs_exact"], p.stdout[-1500:], p.stderr[-800:])
    save()


def profile_bench(layers: int, prompt: int, decode: int, shape: str = "qwen3-30b-a3b", strategy: str = "pure_cpu"):
    """One more bench run of the first shape with every GPU worker under torch.profiler
    (gpu_worker/profiling.py) and the coordinator under cProfile, tables in $OUT/profile."""
    import cProfile
    import pstats

    os.environ["KRASIS_PROFILE"] = str(OUT / "profile")
    os.environ["KRASIS_PROFILE_STEPS"] = "1,8-23"  # decode steps of one request, clear of the next prefill
    os.environ["KRASIS_PROFILE_TRACE"] = "1"
    try:
        from krasis.coordinator.bench import run_bench
        from krasis.coordinator.processes import RuntimeOptions

        opts = RuntimeOptions(devices=["cuda:0"], dtype="bfloat16", gpu_bits=4, cpu_bits=4, vram_budget=16.0,
                              prefill_strategy="layer_grouped_2", decode_strategy=strategy, prefill_chunk=prompt,
                              max_context=prompt + decode + 8, max_batch=1)
        path = Path("/tmp/krasis-synth") / f"{shape}-{layers or 'all'}"
        if not (path / "config.json").exists():
            from krasis.coordinator.synth import synth

            synth(shape, path, layers=layers, expert_bits=4)
        prof = cProfile.Profile()
        r = prof.runcall(run_bench, str(path), opts, prompt, decode, 2, measure_floor=False)
        log("profiled bench", json.dumps(r, default=str))
        with open(OUT / "profile" / "coordinator.txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(45)
        trace = OUT / "profile" / "stage0-decode.json"
        if trace.exists():
            from krasis.shared.weights import load_family

            timeline = decode_timeline(json.loads(trace.read_text()), load_family(str(path)).num_layers)
            log("decode timeline", json.dumps(timeline))
        phases = OUT / "profile" / "stage0-phases.txt"
        if phases.exists():
            log(phases.read_text())
    except Exception:
        traceback.print_exc(file=LOG)
    finally:
        del os.environ["KRASIS_PROFILE"], os.environ["KRASIS_PROFILE_TRACE"]


def decode_timeline(trace: dict, layers: int) -> dict:
    """A profiled decode's GPU timeline by layer, us: each `_wait` kernel (the GPU waiting on the CPU
    pool) ends one layer's hop; between two waits of a step lie the next layer's GPU work, whose
    kernels' busy time is summed apart from the wall time (the difference is the GPU idle between
    kernels: launches, graph and eager boundaries); between the last wait of a step and the first of
    the next lie the LM head, sampling and the host's turn between steps."""
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    waits = [i for i, e in enumerate(kernels) if e["name"] == "_wait"]
    inner, between, wait_us = [], [], []
    for n, (i, j) in enumerate(zip(waits, waits[1:])):
        wall = kernels[j]["ts"] - (kernels[i]["ts"] + kernels[i]["dur"])
        (between if (n + 1) % layers == 0 else inner).append((wall, sum(e["dur"] for e in kernels[i + 1 : j])))
        wait_us.append(kernels[i]["dur"])
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    # each kernel's time per hop (per layer, the step's LM head and sampling spread over its layers)
    per_layer: dict[str, float] = {}
    for e in kernels[waits[0] + 1 : waits[-1]] if waits else ():
        if e["name"] != "_wait":
            per_layer[e["name"][:60]] = per_layer.get(e["name"][:60], 0.0) + e["dur"] / max(len(inner) + len(between), 1)
    return {
        "waits": len(waits), "wait_us": mean(wait_us),
        "layer_wall_us": mean([g[0] for g in inner]), "layer_busy_us": mean([g[1] for g in inner]),
        "step_wall_us": mean([g[0] for g in between]), "step_busy_us": mean([g[1] for g in between]),
        "kernel_us_per_hop": dict(sorted(per_layer.items(), key=lambda kv: -kv[1])[:30]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8, help="layers of each synthetic shape; 0: all (the real model's)")
    ap.add_argument("--prompts", default="10000", help="prompt lengths to bench, comma-separated")
    ap.add_argument("--prefill", default="layer_grouped_2",
                    help="prefill strategy benched; 'default': none named, the default --prefill-chunk")
    ap.add_argument("--chunk", type=int, help="--prefill-chunk with a named --prefill (default: the whole prompt)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-checks", action="store_true", help="no ceilings, attention, dequant or kernel checks")
    ap.add_argument("--checks", default="ceilings,norm_rope,attention,dequant,kernel,graphs",
                    help="which checks run (comma-separated), unless --skip-checks")
    ap.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite", help="synthetic shapes to bench")
    ap.add_argument("--decode-strategies", default="pure_cpu,hcs_hybrid", help="decode strategies benched on the first shape")
    ap.add_argument("--profile", action="store_true",
                    help="also one profiled bench run of the first shape and decode strategy (gpu_worker/profiling.py)")
    ap.add_argument("--eager-too", action="store_true", help="also bench the first shape's pure_cpu decode without CUDA graphs")
    ap.add_argument("--no-lookahead-too", action="store_true", help="also bench the first shape's pure_cpu decode with the "
                    "CPU pool's lookahead off (--lookahead-kb 0)")
    a = ap.parse_args()
    log(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t0 = time.time()
    checks = {"ceilings": ceilings, "norm_rope": norm_rope_check, "attention": attention_check,
              "prefill_attention": prefill_attention_check, "turn": turn_check, "warm": warm_check,
              "dequant": dequant_check, "kernel": kernel_check, "graphs": graphs_check}
    for step in () if a.skip_checks else [checks[c] for c in a.checks.split(",")]:
        try:
            step()
        except Exception:
            traceback.print_exc()
    if not a.skip_exact:
        exactness(Path("/tmp/krasis-exact"))
    log(f"checks done at {time.time() - t0:.0f} s")
    shapes = a.shapes.split(",")
    first = a.decode_strategies.split(",")
    configs = [(s, a.prefill, d) for s in shapes for d in (first if s == shapes[0] else ("pure_cpu",))]
    if a.eager_too:
        configs.insert(1, (shapes[0], a.prefill, "pure_cpu", {"KRASIS_CUDA_GRAPHS": "0"}))
    if a.no_lookahead_too:
        configs.insert(1, (shapes[0], a.prefill, "pure_cpu", {}, {"lookahead_kb": 0}))
    prompts = [int(p) for p in a.prompts.split(",")]
    tab = bench(a.layers or None, prompts, a.decode, a.runs, configs, a.group_size, a.chunk) if not a.skip_bench else ""
    if a.profile and not a.skip_bench:
        profile_bench(a.layers or None, prompts[0], a.decode, shapes[0], first[0])
    print("\n=== summary ===")
    print("attention:", {k: float(f"{v:.3g}") for k, v in RESULTS.get("attention", {}).items()})
    print("decode graphs identical to eager:", RESULTS.get("graphs_exact"))
    print("dequant / expert gemv kernels match their references:", RESULTS.get("dequant_exact"))
    print("prefill combine kernel matches its reference:", RESULTS.get("combine_matches"))
    print("expert activation kernel matches its reference:", RESULTS.get("act_matches"))
    print("norm/rope kernels:", RESULTS.get("norm_rope"))
    print("turn kernels:", {k: v for k, v in RESULTS.get("turn", {}).items() if "best" in k or "router" in k})
    print("ceilings:", {k: round(v, 1) for k, v in RESULTS["ceilings"].items()})
    for r in RESULTS["kernel"]:
        print(f"kernel {r['kind']}: rel_err {r['rel_err']:.2e} grouped {r['grouped_ms']:.1f} ms "
              f"({r['grouped_tflop_s']:.0f} TFLOP/s) loop {r['loop_ms']:.1f} ms")
    for r in RESULTS["exact"]:
        print(f"exact {r['model']} {r['prefill']}+{r['decode']} kv={r['kv']}: "
              f"{'PASS' if r['pass'] else 'FAIL'} top1={r.get('top1', 0):.3f} greedy_same={r.get('greedy_same')} {r.get('error', '')[:150]}")
    print(tab)


if __name__ == "__main__":
    main()
