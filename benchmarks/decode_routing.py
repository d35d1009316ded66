"""Whether a model's sampled decode tokens route like its prompts: the question behind a hot set
that served 100.0% of a decode's choices on the H100 (BENCHMARKS.md, session 19), which balanced
routing cannot give. Runs a Hugging Face checkpoint (synth's output, say) in transformers on the CPU:
counts each layer's choices over one random prompt (the "other text" a hot set is built from), then
prefills a second prompt and samples tokens at temperature 1, and prints per MoE layer how many
experts the decode tokens chose and what share of their choices fell in the hottest `--hot` of the
experts by the first prompt's counts (balanced routing: about `--hot`; the H100 run: 100%).

    python benchmarks/decode_routing.py MODEL [--prompt 256] [--decode 48] [--hot 0.35]

Session 19, `synth --shape qwen3-30b-a3b --layers 8 --experts 32 --vocab 8192` (real width), 2-core
machine, defaults: 49 of 49 sampled tokens distinct; every layer's decode used all 32 experts, 31-40%
of its choices in the hot 35%: balanced.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=256, help="tokens of each random prompt")
    ap.add_argument("--decode", type=int, default=48, help="tokens sampled at temperature 1")
    ap.add_argument("--hot", type=float, default=0.35, help="share of each layer's experts taken as hot")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    cfg = model.config
    num, k, vocab = cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size

    def choices(ids: list[int]):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_router_logits=True)
        return [r.topk(k, dim=-1).indices for r in out.router_logits], out.logits[0, -1]

    g = torch.Generator().manual_seed(a.seed)
    other = torch.randint(0, vocab, (a.prompt,), generator=g).tolist()
    prompt = torch.randint(0, vocab, (a.prompt,), generator=g).tolist()
    counts = [torch.bincount(c.reshape(-1), minlength=num) for c in choices(other)[0]]
    hot = [set(torch.argsort(c, descending=True)[: int(a.hot * num)].tolist()) for c in counts]
    ids, decoded = list(prompt), [[] for _ in counts]
    for step in range(a.decode + 1):
        layers, logits = choices(ids)  # the whole sequence again: no cache, fine for a few layers
        if step:
            for layer, c in enumerate(layers):
                decoded[layer] += c[-1].tolist()
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    print(f"{len(set(ids[a.prompt:]))} of {a.decode + 1} sampled tokens distinct")
    for layer, d in enumerate(decoded):
        share = sum(e in hot[layer] for e in d) / len(d)
        print(f"layer {layer}: decode chose {len(set(d))} of {num} experts; {share:.0%} of its choices in the hot {a.hot:.0%}")


if __name__ == "__main__":
    main()
