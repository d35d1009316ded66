"""The routing figures (docs/routing.md) of a synth model, per MoE layer, without writing it: synth's
tensors are drawn in its order (coordinator/synth.py, synth_weights) and run through transformers'
decoder layers one layer at a time, so a real width with 128 experts needs one layer's weights in
memory (about 2.4 GB in float32 for Qwen3-30B-A3B) rather than the model's.

    python benchmarks/synth_routing.py qwen3-30b-a3b --layers 8 [--tokens 1024] [--experts N] [--small]

prints max/mean, entropy, locality and next-layer predictability per MoE layer, and the residual
stream's RMS after it. --small runs tests/test_routing.py's small structure (hidden 256, 32 experts).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from krasis.coordinator.synth import synth_config, synth_weights  # noqa: E402
from krasis.shared.routing_stats import choice_stats, failures, next_layer_predictability  # noqa: E402

EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _load_layer(layer: torch.nn.Module, prefix: str, tensors: dict, num_experts: int, dtype) -> None:
    """Loads a checkpoint layer's tensors into transformers' layer, whose experts are fused 3D tensors."""
    plain, experts = {}, {}
    for k, t in tensors.items():
        m = EXPERT.search(k)
        if m:
            experts[(int(m[1]), m[2])] = t
        else:
            plain[k[len(prefix):]] = t
    if experts:
        plain["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(e, "gate")], experts[(e, "up")]]) for e in range(num_experts)])
        plain["mlp.experts.down_proj"] = torch.stack([experts[(e, "down")] for e in range(num_experts)])
    layer.to_empty(device="cpu")
    missing, unexpected = layer.load_state_dict({k: v.to(dtype) for k, v in plain.items()}, strict=False)
    if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
        raise RuntimeError(f"layer load: missing {missing}, unexpected {unexpected}")
    layer.to(dtype)


def routing_table(cfg: dict, tokens: int = 1024, dtype=torch.float32, seed: int = 99):
    """Yields, per MoE layer of synth's model of `cfg`: choice_stats of `tokens` random tokens, with
    next_layer (from the previous MoE layer's router input) and rms (the residual after the layer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fam, shards, dense, window = synth_weights(cfg)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rotary = type(model.model.rotary_emb)(config=config)
    ids = torch.randint(0, cfg["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(seed))
    k = cfg["num_experts_per_tok"]
    prev = None
    with torch.no_grad():
        for name, plain, routed in shards:
            tensors = {n: dense(n, s) for n, s in plain.items()}
            tensors.update({n: window(s) for n, s in routed.items()})
            if name == "globals":
                h = torch.nn.functional.embedding(ids, tensors["model.embed_tokens.weight"].to(dtype))
                pos = torch.arange(tokens)[None]
                pe = rotary(h, pos)
                continue
            i = int(name[len("layer"):])
            layer = model.model.layers[i]
            _load_layer(layer, f"model.layers.{i}.", tensors, fam.experts(i).num if routed else 0, dtype)
            del tensors
            seen = []
            hook = layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(tokens, -1)))
            h = layer(h, position_ids=pos, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
            hook.remove()
            if routed:
                x, w = seen[0], layer.mlp.gate.weight
                choices = (x.float() @ w.float().T).topk(k, -1).indices
                st = choice_stats(choices, fam.experts(i).num)
                if prev is not None:
                    st["next_layer"] = next_layer_predictability(prev, w, choices)
                st["layer"], st["rms"] = i, float(h.float().pow(2).mean().sqrt())
                yield st
                prev = x
            layer.to("meta")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    if a.small:
        from test_routing import EXPERTS, SMALL

        cfg = synth_config(a.shape, a.layers, EXPERTS, 512, SMALL[a.shape])
    else:
        cfg = synth_config(a.shape, a.layers, a.experts)
    print("layer  max/mean  entropy  locality  next-layer  rms     misses")
    for s in routing_table(cfg, a.tokens, torch.bfloat16 if a.bf16 else torch.float32):
        nl = f"{s['next_layer']:.2f}" if "next_layer" in s else "-"
        print(f"{s['layer']:5d}  {s['max_mean']:8.2f}  {s['entropy']:7.3f}  {s['locality']:8.2f}  {nl:>10}  "
              f"{s['rms']:.3f}  {'; '.join(failures(s))}", flush=True)


if __name__ == "__main__":
    main()
