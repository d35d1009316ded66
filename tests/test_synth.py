"""`krasis-coord synth`: every shape, cut down to 2 layers, as few experts as its routing allows and
a 512-token vocabulary, gives a folder that our loader checks tensor by tensor and transformers loads
with no missing, unexpected or mismatched tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from krasis.coordinator.cli import main
from krasis.coordinator.synth import SHAPES


@pytest.mark.parametrize("shape", list(SHAPES))
def test_synth_folder_loads_in_krasis_and_transformers(shape, tmp_path):
    from transformers import AutoModelForCausalLM

    from krasis.shared.weights import load_config, load_family, open_source

    out = tmp_path / shape
    top_k = SHAPES[shape]["num_experts_per_tok"]
    r = CliRunner().invoke(main, ["synth", "--shape", shape, "--layers", "2", "--experts", str(top_k), "--vocab", "512",
                                  str(out)])
    assert r.exit_code == 0, r.output
    try:
        cfg = load_config(out)
        assert cfg["architectures"] == SHAPES[shape]["architectures"] and cfg["num_hidden_layers"] == 2
        family = load_family(out)
        assert family.vocab_size == 512 and all(family.experts(i).num == top_k for i in range(2) if family.is_moe(i))
        open_source(out).check(family.expected_tensors())
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
        assert type(model).__name__ == SHAPES[shape]["architectures"][0]
        assert not any(info.values()), info
    finally:
        shutil.rmtree(out)  # hundreds of MB per shape: not for pytest's kept temporary folders


def test_synth_experts_straight_into_the_cache(tmp_path):
    """--expert-bits 4 writes the INT4 cache itself, byte for byte the cache that converting the BF16
    synth of the same seed builds; a run uses it as current, and a 16-bit run, which would need the
    BF16 experts, is refused naming the missing tensor."""
    import tiny_models as tm

    from krasis.shared.weight_cache import WeightCache

    args = ["--shape", "qwen3-30b-a3b", "--layers", "2", "--experts", "8", "--vocab", "512"]
    bf16, direct = tmp_path / "bf16", tmp_path / "direct"
    for extra, out in (([], bf16), (["--expert-bits", "4"], direct)):
        r = CliRunner().invoke(main, ["synth", *args, *extra, str(out)])
        assert r.exit_code == 0, r.output
    assert not any(".experts." in n for n in json.loads((direct / "model.safetensors.index.json").read_text())["weight_map"])
    quant = ("--cpu-bits", "4", "--gpu-bits", "4", "--devices", "cpu", "--dtype", "bfloat16")
    p = tm.krasis("generate", direct, "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json", *quant)
    assert "cache: reusing" in p.stderr and "building" not in p.stderr
    want = tm.krasis("generate", bf16, "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json", *quant)
    assert json.loads(p.stdout)["token_ids"] == json.loads(want.stdout)["token_ids"]
    a, b = (WeightCache(m / ".krasis_cache" / "experts-int4-g128.kc") for m in (bf16, direct))
    with a, b:
        assert a.names() == b.names() and all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())
    p = tm.krasis("generate", direct, "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--devices", "cpu", check=False)
    assert p.returncode == 1 and "model.layers.0.mlp.experts.0.gate_proj.weight" in p.stderr and "missing" in p.stderr
