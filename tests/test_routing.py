"""Routing like a trained model's (docs/routing.md): synth's routers spread a long input's choices
near-evenly where the old recipe's did not, and consecutive tokens' choices repeat as they do not
without synth's recency attention; the figures themselves, and `calibrate`'s report of them, which
must equal the figures of transformers' own router choices on the same prompts.

Only the small structures run here: the real widths (benchmarks/synth_routing.py, docs/routing.md
has their figures) take about 5 minutes for 8 layers of Qwen3-30B-A3B on a 2-core machine, most
of it drawing the 151,936-row embedding and head and 1.2 GB of experts per layer."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tiny_models as tm
from krasis.coordinator import synth as synth_module
from krasis.coordinator.synth import DENSE_STD, synth
from krasis.shared.routing_stats import (TARGETS, choice_stats, count_choices, failures, layer_stats,
                                         next_layer_predictability)

# Qwen3-30B-A3B's and DeepSeek-V2-Lite's structures, small: 32 experts, 6 layers
SMALL = {
    "qwen3-30b-a3b": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64),
    "deepseek-v2-lite": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=64,
                             v_head_dim=32),
}
EXPERTS, LAYERS, TOKENS = 32, 6, 1024


def router_choices(model, ids: list[int]) -> list[torch.Tensor]:
    """Per MoE layer, transformers' top-k choices [T, k] for one prompt."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [lg.reshape(len(ids), -1).topk(k, -1).indices for lg in out.router_logits]


def load_failures(stats: dict) -> list[str]:
    return [f for f in failures(stats) if not f.startswith("locality")]


def test_figures_of_balanced_and_skewed_choices():
    g = torch.Generator().manual_seed(0)
    uniform = torch.stack([torch.randperm(64, generator=g)[:4] for _ in range(4000)])
    st = choice_stats(uniform, 64)
    assert st["entropy"] > 0.99 and st["max_mean"] < 1.3 and st["chance"] == pytest.approx(16 / 64, rel=0.05)
    # balanced, but consecutive tokens no more alike than any two
    assert st["locality"] == pytest.approx(1.0, abs=0.1) and [f.split()[0] for f in failures(st)] == ["locality"]
    # each token keeps the 2 newest of the last one's 4 choices: every choice lives two tokens
    rep = [uniform[0]]
    for u in uniform[1:]:
        keep = rep[-1][2:].tolist()
        rep.append(torch.tensor(keep + [e for e in u.tolist() if e not in keep][:2]))
    st = choice_stats(torch.stack(rep), 64)
    assert st["locality"] > 2 and not failures(st), st
    skewed = torch.stack([torch.cat([torch.tensor([0, 1]), torch.randperm(62, generator=g)[:2] + 2]) for _ in range(4000)])
    st = choice_stats(skewed, 64)
    assert st["max_mean"] > 8 and st["entropy"] < TARGETS["entropy"] and len(load_failures(st)) == 2
    assert layer_stats([3, 1], 1)["max_mean"] == pytest.approx(1.5) and "locality" not in layer_stats([3, 1], 1)


def synth_routing(path, shape: str) -> list[dict]:
    """Per MoE layer of a small synth model of `shape`, the figures of TOKENS random tokens and the
    next-layer predictability (from transformers' router inputs)."""
    from transformers import AutoModelForCausalLM

    path = synth(shape, path, layers=LAYERS, experts=EXPERTS, vocab=512, config=SMALL[shape])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    inputs = []
    for m in gates:
        m.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].reshape(-1, inp[0].shape[-1])))
    ids = torch.randint(0, 512, (TOKENS,), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        model(ids[None])
    k = model.config.num_experts_per_tok
    choices = [(x @ m.weight.T).topk(k, -1).indices for x, m in zip(inputs, gates)]
    stats = [choice_stats(c, EXPERTS) for c in choices]
    for st, x, m, c in zip(stats, inputs, gates[1:], choices[1:]):
        st["next_layer"] = next_layer_predictability(x, m.weight, c)
    return stats


@pytest.mark.parametrize("shape", list(SMALL))
def test_synth_routing_is_balanced_and_local(shape, tmp_path):
    stats = synth_routing(tmp_path / "m", shape)
    assert len(stats) >= LAYERS - 1 and not [failures(s) for s in stats if failures(s)], stats
    # the layers' states differ by more than a little noise: a layer's router input does not name
    # the next layer's experts outright
    assert all(0.3 < s["next_layer"] < 0.95 for s in stats[:-1]), stats


@pytest.mark.parametrize("shape", list(SMALL))
def test_without_recency_routing_is_not_local_and_with_the_old_recipe_not_balanced(shape, tmp_path, monkeypatch):
    monkeypatch.setattr(synth_module, "_QK_LAYOUT", {})  # plain random attention
    plain = synth_routing(tmp_path / "plain", shape)
    assert all(s["locality"] < 1.1 for s in plain) and not [load_failures(s) for s in plain if load_failures(s)], plain
    # the old recipe: attention output projections, dense MLPs and shared experts as large as every
    # other weight (at the small width MLP_GAIN draws DeepSeek's MLPs larger than N(0, 0.02), and with
    # them its routing stayed balanced under the old attention)
    monkeypatch.setattr(synth_module, "ATTN_OUT_STD", DENSE_STD)
    monkeypatch.setattr(synth_module, "MLP", re.compile("(?!)"))
    old = synth_routing(tmp_path / "old", shape)
    assert sum(bool(load_failures(s)) for s in old) >= len(old) // 2, old


def test_calibrate_reports_the_routing_of_its_text(tmp_path):
    from krasis.coordinator.synth import write_tokenizer
    from krasis.coordinator.tokenizer import TextCodec

    model = tm.build(tmp_path / "qwen3", "qwen3", seed=4, vocab_size=256)
    write_tokenizer(model)  # byte-level: every byte one token
    text = tmp_path / "text.txt"
    text.write_text("for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }  // the calibration text\n")
    ids = TextCodec(str(model)).encode(text.read_text())
    p = tm.krasis("calibrate", model, "--text", text, "--devices", "cpu", "--dtype", "float32", "--prefill-chunk", "16")
    assert "consecutive tokens share" in p.stdout and "entropy" in p.stdout
    saved = json.loads((model / ".krasis_cache" / "routing_stats.json").read_text())
    ref = tm.reference_model(model)
    per_layer = None
    for a in range(0, len(ids), 16):  # calibrate's prompts
        choices = router_choices(ref, ids[a : a + 16])
        per_layer = per_layer or [[torch.zeros(8, dtype=torch.int64), 0, 0] for _ in choices]
        for acc, c in zip(per_layer, choices):
            acc[0] += torch.bincount(c.reshape(-1), minlength=8)
            acc[1] += int((c[1:, :, None] == c[:-1, None, :]).sum())
            acc[2] += len(c) - 1
    assert sorted(saved["layers"], key=int) == [str(i) for i in range(len(per_layer))]
    for i, (counts, ov, n) in enumerate(per_layer):
        assert saved["layers"][str(i)] == pytest.approx(layer_stats(counts, 2, ov, n))


def test_count_choices_is_bincount():
    """The prefill loop's count (scatter-add, no host wait on CUDA) against torch.bincount, with
    experts never chosen and repeated choices."""
    g = torch.Generator().manual_seed(3)
    for shape, n in (((37, 8), 128), ((5, 2), 8), ((1, 1), 4), ((0, 4), 16)):
        ids = torch.randint(0, max(1, n // 3), shape, generator=g)
        got = count_choices(ids, n)
        assert got.dtype == torch.int64 and got.shape == (n,)
        assert torch.equal(got, torch.bincount(ids.reshape(-1), minlength=n))
