"""gpt-oss: its experts (de-interleaved gate/up, clamped SwiGLU, biases, MXFP4) against transformers'
GptOssExperts, and the whole runtime against transformers in float32, BF16-layout and MXFP4 weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 8, 45, 90, 45, 23, 53, 60, 28, 74]]
PP1 = ("--devices", "cpu", "--cpu-workers", "1")
PP2 = ("--devices", "cpu,cpu", "--cpu-workers", "2")


def random_mxfp4(shape_rows: tuple[int, ...], cols: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [..., cols/32, 16] and scales [..., cols/32] (exponents 2^-4 .. 2^-2)."""
    blocks = torch.randint(0, 256, (*shape_rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(123, 126, (*shape_rows, cols // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def build_mxfp4(ref_dir, mx_dir, seed=1, **over):
    """The same random model twice: `mx_dir` with experts as published (MXFP4 blocks and scales,
    quantization_config mxfp4), `ref_dir` with transformers' own dequantization of them in float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = tm.random_model("gpt_oss", seed, **over)
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gu_b, gu_s = random_mxfp4((E, 2 * I), H, gen)
            d_b, d_s = random_mxfp4((E, H), I, gen)
            layer.mlp.experts.gate_up_proj.copy_(convert_moe_packed_tensors(gu_b, gu_s, dtype=torch.float32))
            layer.mlp.experts.down_proj.copy_(convert_moe_packed_tensors(d_b, d_s, dtype=torch.float32))
            p = f"model.layers.{i}.mlp.experts."
            packed |= {p + "gate_up_proj_blocks": gu_b, p + "gate_up_proj_scales": gu_s,
                       p + "down_proj_blocks": d_b, p + "down_proj_scales": d_s}
    model.save_pretrained(ref_dir)
    model.save_pretrained(mx_dir)
    tensors = load_file(mx_dir / "model.safetensors")
    for i in range(cfg.num_hidden_layers):
        for n in ("gate_up_proj", "down_proj"):
            del tensors[f"model.layers.{i}.mlp.experts.{n}"]
    save_file(tensors | packed, mx_dir / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((mx_dir / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx_dir / "config.json").write_text(json.dumps(c))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptoss")
    out = {}
    for name, over in tm.GPT_OSS_CONFIGS.items():
        tm.build(root / name, "gpt_oss", **over)
        out[name] = (root / name, root / name)
    build_mxfp4(root / "mx-ref", root / "mx", sliding_window=6)
    out["go-mxfp4"] = (root / "mx", root / "mx-ref")
    return out


def test_experts_match_transformers():
    """load_expert's de-interleaving of the fused gate_up_proj, the clamped SwiGLU and the biases,
    through the store layout and moe_reference, against GptOssExperts; weights large enough that
    both clamps bite."""
    from krasis.shared.expert_store import ExpertFormat
    from krasis.shared.models.registry import family_for
    from krasis.shared.moe import moe_reference

    model = tm.random_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.6)
        experts.down_proj.normal_(0, 0.6)
        experts.gate_up_proj_bias.normal_(0, 0.5)
        experts.down_proj_bias.normal_(0, 0.5)
    fam = family_for(model.config.to_dict() | {"architectures": ["GptOssForCausalLM"]})
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ws = [fam.load_expert(sd.__getitem__, 0, e) for e in range(fam.num_experts)]
    t = {
        "w13": torch.stack([torch.cat([w["gate"], w["up"]]) for w in ws]),
        "w2": torch.stack([w["down"] for w in ws]),
        "b13": torch.stack([torch.cat([w["gate_bias"], w["up_bias"]]) for w in ws]),
        "b2": torch.stack([w["down_bias"] for w in ws]),
    }
    x = torch.randn(20, 64)
    gu = x @ experts.gate_up_proj[0].detach()
    assert gu[..., ::2].max() > 7 and gu[..., 1::2].abs().max() > 7  # both clamps are exercised
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(20)])
    w = torch.softmax(torch.randn(20, 2), dim=-1)
    with torch.no_grad():
        want = experts(x, ids, w)
    got = moe_reference(x, ids, w, t, ExpertFormat("dense", torch.float32), 0, 8, "gptoss")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mxfp4_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from krasis.shared.models.gpt_oss import mxfp4_dequantize

    b, s = random_mxfp4((3, 10), 64, torch.Generator().manual_seed(0))
    want = convert_moe_packed_tensors(b, s, dtype=torch.float32).transpose(1, 2)  # back to [E, rows, cols]
    assert torch.equal(mxfp4_dequantize(b, s), want)


@pytest.mark.parametrize("config,topology", [("go-base", PP1), ("go-mha-nobias-default-rope", PP2), ("go-mxfp4", PP2)])
def test_exact_against_transformers(models, config, topology):
    path, ref_path = models[config]
    ref = tm.reference_model(ref_path)
    with tm.Service(path, "--dtype", "float32", *topology) as svc:
        for ids in PROMPTS:
            got = svc.client.complete(prompt_ids=ids, max_new_tokens=32, prompt_logits=True, ignore_eos=True)
            assert got.token_ids == tm.reference_greedy(ref, ids, 32)
            want = tm.reference_logits(ref, ids)
            assert float((torch.from_numpy(got.prompt_logits) - want).norm() / want.norm()) < 1e-4


def test_unsupported_swiglu_is_refused(tmp_path):
    tm.build(tmp_path, "gpt_oss", swiglu_limit=5.0)
    p = tm.krasis("generate", tmp_path, "--prompt-ids", "1,2", check=False)
    assert p.returncode == 1 and "swiglu_limit" in p.stderr and "Traceback" not in p.stderr
