"""Next-token choice from float32 logits: greedy at temperature 0, else temperature, top-k and top-p
(nucleus) filtering and a draw by inverse transform with u, a uniform number in [0, 1).

The coordinator owns each request's seeded generator and draws u (`Sampler.draw`); the last pipeline
stage applies `sample` on its device to the logits it just made and sends back token ids, not
[rows, vocab] of float32 logits (600 KB a token for a 152K vocabulary, plus a CPU pass over them on
the coordinator's critical path). A seed therefore reproduces a request whatever else is served
beside it and whichever process samples; the coordinator samples itself (the same function, on the
CPU) only when it receives the logits anyway (prompt_logits requests).
"""

from __future__ import annotations

import torch

from .models.layers import to_device
from .protocol import Draw, SamplingParams


def sample(logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """logits [R, V] -> int64 [R] token ids, row i drawn as `draws[i]` says."""
    out = logits.argmax(-1)
    hot = [i for i, d in enumerate(draws) if d.temperature > 0]
    if not hot:
        return out
    dev, v = logits.device, logits.shape[-1]
    d = [draws[i] for i in hot]
    # the draws' numbers reach the device queued behind the step (layers.to_device), not by a copy
    # that would make the host wait for it, and in one copy (a decode step's host time is mostly
    # such small calls): columns temperature, top_k (exact in float32 below 2^24), top_p, u
    cols = to_device(torch.tensor([[x.temperature, x.top_k or v, x.top_p, x.u] for x in d], dtype=torch.float32), dev)
    temperature, top_k, top_p, u = (cols[:, c : c + 1] for c in range(4))
    if len(hot) < len(draws):
        hot = to_device(torch.tensor(hot), dev)
    else:
        hot = slice(None)
    l = logits[hot].float() / temperature
    # stable: ties keep vocabulary order, so a draw does not depend on the sort's whims
    l, order = torch.sort(l, dim=-1, descending=True, stable=True)
    rank = torch.arange(v, device=dev)[None]
    l = l.masked_fill(rank >= top_k, float("-inf"))
    p = torch.softmax(l, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    p = p.masked_fill(torch.cumsum(p, -1) - p >= top_p, 0.0)
    cum = torch.cumsum(p, -1)
    # the first rank whose cumulative mass exceeds u of the kept mass: never a zero-probability rank
    at = torch.searchsorted(cum, u * cum[:, -1:], right=True).clamp_max(v - 1)
    out[hot] = order.gather(1, at)[:, 0]
    return out


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The log-probabilities that OpenAI's `logprobs` return, as vLLM does by default: the model's
    own distribution, log_softmax of the float32 logits [R, V], whatever temperature, top-k and
    top-p the token was then drawn with. -> `logprobs` [R] of the chosen `tokens` [R], and the k
    likeliest tokens per row, best first: `top_ids` [R, k], `top_logprobs` [R, k]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1)
    return {"logprobs": lp.gather(1, tokens[:, None])[:, 0], "top_ids": top_ids, "top_logprobs": top_lp}


def pick(logits: torch.Tensor, draws: list[Draw]) -> dict[str, torch.Tensor]:
    """Row i of logits [R, V] drawn as draws[i] says: `tokens` [R], and when a draw asks for them,
    the logprobs (shared/protocol.py: Logits) of every row, with as many alternatives as the most
    any draw asked for."""
    out = {"tokens": sample(logits, draws)}
    k = max((d.logprobs for d in draws if d.logprobs is not None), default=None)
    if k is not None:
        out.update(logprobs(logits, out["tokens"], k))
    return out


class Sampler:
    """A request's sampling settings and its seeded generator."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def draw(self) -> Draw:
        """The next token's draw (one number from the generator; greedy requests use none)."""
        p = self.p
        u = float(torch.rand(1, generator=self.gen)) if self.gen is not None else 0.0
        return Draw(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, u=u, logprobs=p.logprobs)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits [V], here."""
        return int(sample(logits[None], [self.draw()])[0])
