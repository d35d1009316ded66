"""Prefill and decode strategies (gpu_worker/), the grouped MoE kernel, the VRAM plan, the FP8 KV
cache and the flash-attention fast path. Every strategy runs on `--devices cpu` (the copy engine
does plain copies there) and must match transformers in float32 exactly."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm
from krasis.gpu_worker.kv_cache import KVCache, fp8_quantize
from krasis.gpu_worker.dma import block_lookup
from krasis.gpu_worker.moe_gpu import moe_blocks, moe_pairs
from krasis.shared.expert_store import ExpertFormat
from krasis.shared.models.layers import attend
from krasis.shared.moe import moe_reference
from krasis.shared.protocol import SeqSlice
from krasis.shared.quant import quantized

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 2, 71, 82, 81]

# (model, prefill, decode, topology): each strategy once, with one- and two-node stores and PP=2
CASES = [
    ("qwen3-base", "persistent", "pure_cpu", ("--devices", "cpu", "--cpu-workers", "1")),
    # the device's host share of the pool's choices (gpu_worker/host_share.py), over a two-node store
    ("qwen3-base", "persistent", "pure_cpu", ("--devices", "cpu", "--cpu-workers", "2", "--pcie-share", "0.5")),
    ("qwen3-norm-tied-dense", "layer_grouped_2", "hcs_hybrid", ("--devices", "cpu", "--cpu-workers", "2")),
    ("qwen3-norm-tied-dense", "chunked", "compact", ("--devices", "cpu,cpu", "--cpu-workers", "2")),
    ("dsv2-qlora-group-yarn", "active_only", "lru", ("--devices", "cpu", "--cpu-workers", "2")),
    ("dsv2-qlora-group-yarn", "hcs_prefill", "hcs_hybrid", ("--devices", "cpu,cpu", "--cpu-workers", "1", "--pcie-share", "0.4")),
    # a middle stage holding only the dense layer 1: no routed experts, so no hot set
    ("qwen3-norm-tied-dense", "hcs_prefill", "hcs_hybrid", ("--devices", "cpu,cpu,cpu", "--pp-layers", "1,1,2", "--cpu-workers", "1")),
]
CONFIGS = {**{k: ("qwen3", v) for k, v in tm.QWEN3_CONFIGS.items()}, **{k: ("deepseek", v) for k, v in tm.DEEPSEEK_CONFIGS.items()}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy-models")
    names = {c[0] for c in CASES}
    return {n: tm.build(root / n, CONFIGS[n][0], **CONFIGS[n][1]) for n in names}


@pytest.mark.parametrize("model,prefill,decode,topology", CASES, ids=[f"{c[1]}+{c[2]}-pp{c[3][1].count(',') + 1}" + ("-pcie" if "--pcie-share" in c[3] else "") for c in CASES])
def test_strategy_exact_against_transformers(models, model, prefill, decode, topology, tmp_path):
    import shutil

    from krasis.shared.weights import load_family

    path = shutil.copytree(models[model], tmp_path / "m")  # a fresh state folder per case
    want = tm.reference_greedy(tm.reference_model(path), PROMPT, 16)
    got = tm.generate_json(path, PROMPT, 16, "--prefill-strategy", prefill, "--decode-strategy", decode,
                           "--prefill-chunk", "5", *topology)
    assert got["token_ids"] == want
    # every prefill token's top-k choices counted once per MoE layer, all stages merged into one file
    counts = json.loads((path / ".krasis_cache" / "hcs_counts.json").read_text())["layers"]
    fam = load_family(path)
    moe = [i for i in range(fam.num_layers) if fam.is_moe(i)]
    assert sorted(map(int, counts)) == moe
    for layer in moe:
        es = fam.experts(layer)
        assert len(counts[str(layer)]) == es.num and sum(counts[str(layer)]) == len(PROMPT) * es.top_k


def test_unknown_strategy_and_budget_refusal(models):
    path = models["qwen3-base"]
    # a usage error, before any worker starts
    p = tm.krasis("generate", path, "--prompt-ids", "1,2", "--prefill-strategy", "layer_grouped_0", check=False)
    assert p.returncode == 2 and "layer_grouped_N needs N >= 1" in p.stderr and "--prefill-strategy" in p.stderr
    p = tm.krasis("generate", path, "--prompt-ids", "1,2", "--prefill-strategy", "streamed", check=False)
    assert p.returncode == 2 and "unknown prefill strategy 'streamed'" in p.stderr
    p = tm.krasis("generate", path, "--prompt-ids", "1,2", "--vram-budget", "0.0001", check=False)
    assert p.returncode == 1
    line = [x for x in p.stderr.splitlines() if "--vram-budget" in x][0]
    assert "GB short for layers 0-2" in line and "weights" in line and "KV" in line


def test_hot_set_completes_layers_where_that_saves_more_pool_time():
    """hcs.hottest: under even counts (balanced routing) whole layers, each saving the pool its hop
    as well as its kernel, fill the hot set before scattered experts; under skewed counts the most
    chosen experts of every layer come first; never-chosen experts only complete a layer."""
    from krasis.gpu_worker.hcs import hottest

    class Counts:
        def __init__(self, c):
            self.c = {layer: torch.tensor(v) for layer, v in c.items()}

    even = Counts({layer: [100] * 8 for layer in range(4)})
    hot = hottest(even, 20)
    per = [sum(1 for lay, _ in hot if lay == layer) for layer in range(4)]
    assert len(hot) == 20 and sorted(per) == [0, 4, 8, 8]  # two whole layers, then the best 4 of a third
    skewed = Counts({layer: [90, 80] + [1] * 6 for layer in range(4)})
    assert sorted(hottest(skewed, 8)) == [(layer, e) for layer in range(4) for e in (0, 1)]
    # a layer's never-chosen experts are taken to complete it, not on their own
    sparse = Counts({0: [50, 50, 0, 0]})
    assert sorted(hottest(sparse, 4)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert sorted(hottest(sparse, 3)) == [(0, 0), (0, 1)]
    # a layer whose one chosen expert takes all its choices: that expert before half of another layer
    assert sorted(hottest(Counts({0: [50, 50, 0, 0], 1: [0, 0, 0, 7]}), 4)) == [(0, 0), (0, 1), (1, 3)]
    assert hottest(Counts({0: [0, 0]}), 5) == []


def test_vram_plan_gives_the_rest_to_hot_experts():
    from krasis.gpu_worker.vram_budget import VramBudgetError, layer_expert_bytes, plan
    from krasis.shared.expert_store import StoreLayout
    from krasis.shared.models.registry import family_for

    fam = family_for(tm.qwen3_config().to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]})
    layout = StoreLayout(fam, 1, ExpertFormat("int4", torch.bfloat16, 32))
    args = (fam, layout, (0, 3), True, True, 2, "fp8", 256, 64)
    base = plan(*args, "chunked", "pure_cpu", None, 10**12)
    assert base.hot == base.resident == 0
    # the first claim on what is spare: a layer's other projection dequantized, for steps of several chunks
    es = layout.shapes[0]
    assert base.dequant_once == es.num * es.inter * fam.hidden_size * 2
    assert base.total() == base.weights + base.kv + base.staging + base.activations + base.dequant_once
    tight = plan(*args, "chunked", "pure_cpu", (base.total() - 1) / 1e9, None)
    assert tight.dequant_once == 0 and tight.total() == base.total() - base.dequant_once  # it fits without
    # layer_grouped keeps as many whole layers resident as the rest holds (none where decode wants it)
    grouped = plan(*args, "layer_grouped_1", "pure_cpu", None, 10**12)
    layer = layer_expert_bytes(layout, 0)
    assert grouped.resident == 3 * layer and grouped.kept == 3  # all three fit in a terabyte,
    assert grouped.staging == 0  # and then nothing is streamed: no staging slot
    assert plan(*args, "layer_grouped_1", "hcs_hybrid", None, 10**12).resident == 0
    # what a plan needs besides experts; with no layer kept, layer_grouped_1 stages two one-layer slots
    other = grouped.total() - grouped.resident
    lg1 = lambda spare: plan(*args, "layer_grouped_1", "pure_cpu", (other + 2 * layer + spare) / 1e9, None)
    assert lg1(0.5 * layer).kept == 0 and lg1(0.5 * layer).staging == 2 * layer
    # one layer kept would cost its bytes and leave both slots; all three cost their bytes and no slot
    assert lg1(1.5 * layer).kept == 3 and lg1(1.5 * layer).staging == 0
    # Six MoE layers in groups of two: layers kept cut the streamed runs, and the slots shrink to the
    # largest group left (two slots of two layers sat idle beside runs of one, when the plan sized
    # them for N whatever it kept)
    fam6 = family_for(tm.qwen3_config(num_hidden_layers=6).to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]})
    layout6 = StoreLayout(fam6, 1, ExpertFormat("int4", torch.bfloat16, 32))
    args6 = (fam6, layout6, (0, 6)) + args[3:]
    big = plan(*args6, "layer_grouped_2", "pure_cpu", None, 10**12)
    other6 = big.total() - big.resident
    lg2 = lambda spare: plan(*args6, "layer_grouped_2", "pure_cpu", (other6 + 4 * layer + spare) / 1e9, None)
    assert lg2(0.5 * layer).kept == 0 and lg2(0.5 * layer).staging == 4 * layer  # groups [0, 1] [2, 3] [4, 5]
    # three kept (1, 3, 5) leave runs of one: 3 layers + two one-layer slots = 5 <= 4 + 1.2
    p = lg2(1.2 * layer)
    assert (p.kept, p.staging, p.resident) == (3, 2 * layer, 3 * layer)
    assert p.total() <= p.budget
    fixed = plan(*args, "hcs_prefill", "hcs_hybrid", None, 10**12)
    spare = 12345
    p = plan(*args, "hcs_prefill", "hcs_hybrid", (fixed.total() - fixed.hot + spare) / 1e9, None)
    assert abs(p.hot - spare) <= 1
    with pytest.raises(VramBudgetError, match=r"is 0\.00 GB short"):
        plan(*args, "hcs_prefill", "hcs_hybrid", (fixed.total() - fixed.hot - fixed.dequant_once - 1000) / 1e9, None)
    # --attn-bits 8: the projections it quantizes count as QuantLinear holds them, each an INT8 row and its scale
    from krasis.shared.quant import QuantLinear, dense_names

    shapes = {n: s for i in range(3) for n, s in fam.layer_tensors(i).items()} | fam.global_tensors()
    held = [QuantLinear.quantize(torch.ones(shapes[n])) for names in dense_names(fam) for n in names]
    saved = sum(q.q.numel() * 2 - q.q.numel() * q.q.element_size() - q.scale.numel() * q.scale.element_size() for q in held)
    assert held and plan(*args, "chunked", "pure_cpu", None, 10**12, int8_dense=True).weights == base.weights - saved
    # FP8 halves the bf16 cache (plus one float32 scale per row)
    assert plan(*args[:6], "bf16", *args[7:], "chunked", "pure_cpu", None, None).kv > 1.5 * base.kv


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
def test_grouped_moe_matches_reference(kind, device):
    """moe_blocks and moe_pairs against moe_reference (on CUDA, moe_pairs' quantized projections
    are the fused kernel of expert_gemv_kernel.py, and moe_blocks' in bf16 expert_grouped_kernel.py's)."""
    torch.manual_seed(0)
    E, H, I, M, k = 6, 64, 32, 40, 3
    fmt = ExpertFormat(kind, torch.float32, 16)
    t = {name: torch.empty(shape, dtype=dt) for name, (dt, shape) in fmt.tensors(tm_shape(E, H, I), E).items()}
    for e in range(E):
        w13, w2 = torch.randn(2 * I, H), torch.randn(H, I)
        if kind == "dense":
            t["w13"][e], t["w2"][e] = w13, w2
        else:
            for name, v in (quantized(fmt, w13, "w13") | quantized(fmt, w2, "w2")).items():
                t[name][e] = v
    x = torch.randn(M, H)
    ids = torch.randint(0, E + 2, (M, k))  # ids E, E+1 belong to nobody here
    ids[0] = torch.tensor([1, 3, E])  # the one-token case: one expert of each block and one of nobody's
    w = torch.rand(M, k)
    # two blocks: experts [0, 2) in order, and [2, E) held in reversed rows through a lookup
    first = {n: v[:2] for n, v in t.items()}
    rev = {n: v[2:].flip(0) for n, v in t.items()}
    lk_rev = torch.full((E + 2,), -1, dtype=torch.long)
    lk_rev[2:E] = torch.arange(E - 3, -1, -1)
    blocks = [(first, block_lookup(E + 2, 0, 2, "cpu")), (rev, lk_rev)]
    if device == "cuda":
        x, ids, w, lk_rev = x.cuda(), ids.cuda(), w.cuda(), lk_rev.cuda()
        first, rev = ({n: v.cuda() for n, v in d.items()} for d in (first, rev))
        blocks = [(first, block_lookup(E + 2, 0, 2, "cuda")), (rev, lk_rev)]
    # 40 tokens: every held expert is a group (the sync-free path); 1 token: only the active ones
    for m in (M, 1):
        got = moe_blocks(x[:m], ids[:m], w[:m], blocks, fmt)
        want = moe_reference(x[:m].cpu(), ids[:m].cpu(), w[:m].cpu(), t, fmt, 0, E).to(device)
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-5
    if device == "cuda":  # in bf16: torch's grouped product (dense) or the quantized one of expert_grouped_kernel.py
        for m in (M, 1):
            got = moe_blocks(x[:m].bfloat16(), ids[:m], w[:m], blocks, fmt)
            want = moe_reference(x[:m].cpu(), ids[:m].cpu(), w[:m].cpu(), t, fmt, 0, E).to(device)
            assert float((got - want).norm() / want.norm()) < 2e-2
    # one group per (token, choice), as hcs_hybrid decode runs its hot share: only the reversed
    # block's experts count; the others read row 0 with weight 0 (also in bf16 on CUDA, and there 120
    # tokens group their pairs by expert: expert_grouped_kernel.py)
    for m in (M, 1):
        want = moe_reference(x[:m].cpu(), ids[:m].cpu(), w[:m].cpu(), {n: v[2:] for n, v in t.items()}, fmt, 2, E - 2).to(device)
        got = moe_pairs(x[:m], lk_rev, ids[:m], w[:m], rev, fmt)
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-5
        if device == "cuda" and kind != "dense":
            got = moe_pairs(x[:m].bfloat16(), lk_rev, ids[:m], w[:m], rev, fmt)
            assert float((got - want).norm() / want.norm()) < 2e-2
            r = 3 if m == M else 1
            got = moe_pairs(x[:m].repeat(r, 1).bfloat16(), lk_rev, ids[:m].repeat(r, 1), w[:m].repeat(r, 1), rev, fmt)
            assert float((got - want.repeat(r, 1)).norm() / want.repeat(r, 1).norm()) < 2e-2


def tm_shape(E, H, I):
    from krasis.shared.models.family import ExpertShape

    return ExpertShape(E, 2, H, I)


def test_fp8_kv_cache():
    torch.manual_seed(0)
    k = torch.randn(20, 2, 16) * torch.logspace(-2, 2, 20)[:, None, None]  # rows of very different scale
    q, s = fp8_quantize(k)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (20, 2, 1)
    back = q.float() * s
    assert float(((back - k).abs() / k.abs().amax(-1, keepdim=True)).max()) < 1 / 16  # e4m3: 3 mantissa bits
    cache = KVCache(torch.device("cpu"), torch.float32, 64, "fp8")
    (a,) = cache.update(0, SeqSlice(seq=0, start=0, n=12), k[:12])
    (b,) = cache.update(0, SeqSlice(seq=0, start=12, n=8), k[12:])
    assert torch.equal(b[:12], a) and torch.allclose(b, back)
    exact = KVCache(torch.device("cpu"), torch.float32, 64)
    (c,) = exact.update(0, SeqSlice(seq=0, start=0, n=20), k)
    assert torch.equal(c, k)


def test_attention_fast_path_matches_masked():
    torch.manual_seed(0)
    q, k, v = torch.randn(33, 4, 16), torch.randn(33, 2, 16), torch.randn(33, 2, 16)
    fast = attend(q, k, v, 0, 0.25)
    masked = attend(q, k, v, 0, 0.25, sliding_window=10**6)  # the mask path, same function
    assert torch.allclose(fast, masked, atol=1e-6)
    # a chunk's queries over every earlier key (bottom-right causal), one query alone, and a
    # one-token prompt (GQA), each the rows of the whole prompt's attention
    for start, t in [(20, 13), (32, 1), (0, 1), (5, 9)]:
        T = start + t
        part = attend(q[start:T], k[:T], v[:T], start, 0.25)
        whole = attend(q[:T], k[:T], v[:T], 0, 0.25, sliding_window=10**6)
        assert torch.allclose(part, whole[start:], atol=1e-6), (start, t)


def test_calibrate_counts_every_token_of_the_text(tmp_path):
    """`calibrate` prefills a text in several prompts; the saved counts hold each token's top-k
    choices once per MoE layer, and a second calibration adds to them."""
    from click.testing import CliRunner

    from krasis.coordinator.cli import main

    model = tmp_path / "m"
    r = CliRunner().invoke(main, ["synth", "--shape", "qwen3-30b-a3b", "--layers", "2", "--experts", "8", "--vocab", "512",
                                  str(model)])
    assert r.exit_code == 0, r.output
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2  # calibration text, one byte per token\n")
    n = len(text.read_bytes())  # the synthetic tokenizer is byte-level with no merges
    for rounds in (1, 2):
        p = tm.krasis("calibrate", model, "--text", text, "--devices", "cpu", "--prefill-chunk", "16")
        assert f"calibrate: {n} tokens" in p.stdout
        counts = json.loads((model / ".krasis_cache" / "hcs_counts.json").read_text())["layers"]
        assert sorted(counts) == ["0", "1"] and all(sum(c) == rounds * n * 8 for c in counts.values())


def test_optimize_ranks_every_strategy_and_bench_uses_the_winner(models, tmp_path):
    import re
    import shutil

    from krasis.coordinator.optimize import prefill_candidates
    from krasis.shared.strategy_names import DECODE_STRATEGIES
    from krasis.shared.weights import load_family

    path = shutil.copytree(models["qwen3-base"], tmp_path / "m")
    small = ("--prompt-tokens", "24", "--decode-tokens", "3", "--runs", "1", "--devices", "cpu", "--cpu-workers", "1",
             "--prefill-chunk", "8")
    p = tm.krasis("optimize", path, *small)
    fam = load_family(path)
    tables = p.stdout.split("**Decode strategies**")
    for text, names, col in ((tables[0], prefill_candidates(sum(map(fam.is_moe, range(fam.num_layers)))), 1),
                             (tables[1], DECODE_STRATEGIES, 1)):
        rows = [r.split("|")[1:-1] for r in text.splitlines() if re.match(r"\| [a-z_0-9]+ \|", r)]
        assert sorted(r[0].strip() for r in rows) == sorted(names)  # every strategy ran, none failed
        speeds = [float(r[col].replace(",", "")) for r in rows]
        assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0
    winner = json.loads((path / ".krasis_cache" / "strategy.json").read_text())
    first = lambda text: re.search(r"\| ([a-z_0-9]+) \|", text).group(1)  # noqa: E731
    assert (winner["prefill"], winner["decode"]) == (first(tables[0]), first(tables[1]))
    out = tmp_path / "bench.json"
    p = tm.krasis("bench", path, *small, "--json", out)
    r = json.loads(out.read_text())
    assert (r["prefill_strategy"], r["decode_strategy"]) == (winner["prefill"], winner["decode"])
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and len(r["runs"]) == 1
    assert r["prefill_fraction"] == pytest.approx(r["prefill_tok_s"] / r["prefill_floor_tok_s"])
    assert r["decode_fraction"] == pytest.approx(r["decode_tok_s"] / r["decode_floor_tok_s"])
    assert "| Prefill (tok/s) | TTFT (s) | Decode (tok/s) |" in p.stdout and "| of floor |" in p.stdout
    # a token's time by part: a decode step's time in the worker, and the worker's wait between steps
    split = r["decode_split_ms"]
    assert list(split) == ["worker", "between"] and split["worker"] > 0 and split["between"] >= 0
    assert "decode ms per token: worker" in p.stdout
    # the pool's own account of its calls: each measured call is one hop, after the previous one in
    # its step or starting a step, and its serve time holds its kernel time
    for pool in r["pool"]:
        assert pool["gaps"] + pool["step_gaps"] == pool["calls"]
        assert pool["serve_s"] >= pool["kernel_s"] >= 0 and pool["gap_s"] >= 0
        assert pool["after_s"] >= 0 and (pool["after_s"] > 0) == (pool["calls"] > 0)  # its time after each answer
    if r["pool"][0]["gaps"]:
        assert "pool us per layer: kernel" in p.stdout
    # the CPU pool's share of the routed choices: all of them in pure_cpu; in hcs_hybrid (half the
    # experts hot on a CPU device: vram_budget.plan) the rest ran on the device's hot experts
    share = {r["decode_strategy"]: r["cpu_share"]}  # the winner's run counts for its strategy
    for decode in {"pure_cpu", "hcs_hybrid"} - set(share):
        tm.krasis("bench", path, *small, "--decode-strategy", decode, "--json", out)
        share[decode] = json.loads(out.read_text())["cpu_share"]
    assert share["pure_cpu"] == 1.0 and 0 < share["hcs_hybrid"] < 1, share
    # with a host share of half, the device takes one of each step's two distinct experts (M = 1, top-2)
    tm.krasis("bench", path, *small, "--decode-strategy", "pure_cpu", "--pcie-share", "0.5", "--json", out)
    assert json.loads(out.read_text())["cpu_share"] == 0.5
