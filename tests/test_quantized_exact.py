"""INT4/INT8 runs against transformers running fake-quantized weights (docs/quantization.md).

The reference is built from the checkpoint's tensors by name, independently of the runtime's choice
of what to quantize (tiny_models.fake_quant_copy). When --gpu-bits and --cpu-bits differ, the prompt
runs with the GPU's precision and the decode steps with the CPU's, which is what the reference does
too (tiny_models.greedy_two_phase).
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm

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
    "qnext-int4-attn8-pp2-pool2": ("qwen3_next", "qn-base", 4, 4, 8, ("--devices", "cpu,cpu", "--cpu-workers", "2")),
    "qnext-dense-cpu8-gpu4-pp1": ("qwen3_next", "qn-dense-bias-tied", 8, 4, 16, ("--devices", "cpu", "--cpu-workers", "1")),
    "gptoss-int8-attn8-pp2-numa2": ("gpt_oss", "go-base", 8, 8, 8, ("--devices", "cpu,cpu", "--numa-nodes", "2")),
    "gptoss-cpu4-gpu8-pp1": ("gpt_oss", "go-mha-nobias-default-rope", 4, 8, 16, ("--devices", "cpu", "--cpu-workers", "1")),
}
CONFIGS = {**tm.QWEN3_CONFIGS, **tm.DEEPSEEK_CONFIGS, **tm.QWEN3_NEXT_CONFIGS, **tm.GPT_OSS_CONFIGS}


@pytest.mark.parametrize("run", list(RUNS))
def test_quantized_greedy_matches_fake_quant_transformers(tmp_path, run):
    family, config, cpu_bits, gpu_bits, attn_bits, switches = RUNS[run]
    path = tm.build(tmp_path / "model", family, **CONFIGS[config])
    cpu_ref = tm.fake_quant_copy(path, tmp_path / "ref-cpu", cpu_bits, attn_bits, GROUP)
    if gpu_bits == cpu_bits:
        want = tm.reference_greedy(cpu_ref, PROMPT, 32)
        # the two-phase reference reduces to transformers' own generate when both are the same
        assert tm.greedy_two_phase(cpu_ref, cpu_ref, PROMPT, 32) == want
    else:
        gpu_ref = tm.fake_quant_copy(path, tmp_path / "ref-gpu", gpu_bits, attn_bits, GROUP)
        want = tm.greedy_two_phase(gpu_ref, cpu_ref, PROMPT, 32)
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
