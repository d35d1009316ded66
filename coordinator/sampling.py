"""Next-token choice from float32 logits: greedy at temperature 0, else temperature, top-k and
top-p (nucleus) filtering and a draw from the request's own seeded generator, so a seed reproduces
a request whatever else is being served alongside it."""

from __future__ import annotations

import torch

from ..shared.protocol import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.p
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = cum - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.gen))
