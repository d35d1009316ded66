"""INT4/INT8 runs against transformers running fake-quantized weights (docs/quantization.md).

The reference is built here, from the checkpoint's tensors by name, independently of the runtime's
choice of what to quantize: every routed expert weight gets the expert scheme (groups along K), and
with --attn-bits 8 every attention / shared-expert / dense-MLP projection and an untied lm_head
gets INT8 per output channel. When --gpu-bits and --cpu-bits differ, the prompt runs with the GPU's
precision and the decode steps with the CPU's, which is what the reference does too.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from krasis.shared.quant import fake_quantize

EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
DENSE = re.compile(r"(\.self_attn\.\w*_proj\w*|\.mlp\.(shared_experts\.)?(gate|up|down)_proj)\.weight$|^lm_head\.weight$")
GROUP = 16
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 2, 71]

# (family, config, cpu bits, gpu bits, attn bits, switches): each precision, family, PP 1 and 2,
# 1 and 2 CPU workers and --numa-nodes 2 appear, without the cost of the full product.
RUNS = {
    "qwen3-int4-attn8-pp2-pool2": ("qwen3", "qwen3-base", 4, 4, 8, ("--devices", "cpu,cpu", "--cpu-workers", "2")),
    "dsv2-int8-pp1-numa2": ("deepseek", "dsv2-lite-like", 8, 8, 16, ("--devices", "cpu", "--numa-nodes", "2")),
    "qwen3-tied-cpu4-gpu8-attn8-pool1": ("qwen3", "qwen3-norm-tied-dense", 4, 8, 8, ("--devices", "cpu", "--cpu-workers", "1")),
    "dsv2-group-cpu8-gpu4-attn8-pp2-numa2": (
        "deepseek", "dsv2-qlora-group-yarn", 8, 4, 8, ("--devices", "cpu,cpu", "--numa-nodes", "2", "--cpu-workers", "2"),
    ),
}
CONFIGS = {**tm.QWEN3_CONFIGS, **tm.DEEPSEEK_CONFIGS}


def fake_quant_copy(src, dst, expert_bits: int, attn_bits: int):
    """A copy of the model folder whose weights are what the runtime computes with."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    hits = {"expert": 0, "dense": 0}
    for f in src.glob("*.safetensors"):
        state = load_file(f)
        for name, w in state.items():
            if EXPERT.search(name) and expert_bits != 16:
                state[name] = fake_quantize(w, expert_bits, GROUP)
                hits["expert"] += 1
            elif DENSE.search(name) and attn_bits == 8:
                state[name] = fake_quantize(w, 8, w.shape[-1])
                hits["dense"] += 1
        save_file(state, dst / f.name, metadata={"format": "pt"})
    assert hits["expert"] > 0 and (attn_bits == 16 or hits["dense"] > 0)
    return tm.reference_model(dst)


def greedy_two_phase(prefill_model, decode_model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens with the prompt run by one model and every decode step by another, sharing
    the KV cache: the runtime's prefill-on-GPU / decode-on-CPU split with different precisions."""
    with torch.no_grad():
        out = prefill_model(torch.tensor([prompt]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        for _ in range(n - 1):
            out = decode_model(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


@pytest.mark.parametrize("run", list(RUNS))
def test_quantized_greedy_matches_fake_quant_transformers(tmp_path, run):
    family, config, cpu_bits, gpu_bits, attn_bits, switches = RUNS[run]
    path = tm.build(tmp_path / "model", family, **CONFIGS[config])
    cpu_ref = fake_quant_copy(path, tmp_path / f"ref-cpu", cpu_bits, attn_bits)
    if gpu_bits == cpu_bits:
        want = tm.reference_greedy(cpu_ref, PROMPT, 32)
        # the two-phase reference reduces to transformers' own generate when both are the same
        assert greedy_two_phase(cpu_ref, cpu_ref, PROMPT, 32) == want
    else:
        gpu_ref = fake_quant_copy(path, tmp_path / f"ref-gpu", gpu_bits, attn_bits)
        want = greedy_two_phase(gpu_ref, cpu_ref, PROMPT, 32)
    # the references really differ from the unquantized model (so agreeing with them means something)
    plain = tm.reference_logits(tm.reference_model(path), PROMPT)
    assert not torch.allclose(tm.reference_logits(cpu_ref, PROMPT), plain, rtol=0, atol=1e-5)

    p = tm.krasis("generate", path, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 32,
                  "--dtype", "float32", "--json", "--group-size", GROUP, "--cpu-bits", cpu_bits, "--gpu-bits", gpu_bits,
                  "--attn-bits", attn_bits, *switches)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["token_ids"] == want
    built = {ln.split()[2] for ln in p.stderr.splitlines() if ln.startswith("cache: building")}
    expected = {str(path / ".krasis_cache" / f"experts-int{b}-g{GROUP}.kc") for b in {cpu_bits, gpu_bits}}
    if attn_bits == 8:
        expected.add(str(path / ".krasis_cache" / "dense-int8.kc"))
    assert built == expected
