"""`krasis-coord synth`: every shape, cut down to 2 layers, as few experts as its routing allows and
a 512-token vocabulary, gives a folder that our loader checks tensor by tensor and transformers loads
with no missing, unexpected or mismatched tensor."""

from __future__ import annotations

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
