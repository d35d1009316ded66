"""One pipeline stage: a contiguous slice of decoder layers on one device, plus the embedding on
the first stage and the final norm and LM head on the last.

    h = embed(tokens)                                       (first stage)
    for each layer in the slice:
        h = h + attention(input_norm(h))
        x = post_norm(h)
        MoE layer:   h = h + (routed(x) + shared(x))        routed: the prefill or decode strategy
        dense layer: h = h + dense(x)
    logits = lm_head(norm(h)) for the rows the slices ask for   (last stage)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..shared.models.family import ModelFamily
from ..shared.models.layers import linear, rows_for_slices, slice_positions
from ..shared.protocol import SeqSlice
from .kv_cache import KVCache


class Stage:
    def __init__(
        self,
        family: ModelFamily,
        get,
        layers: tuple[int, int],
        first: bool,
        last: bool,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        experts,
        kv_dtype: str | None = None,
    ):
        self.f, self.device, self.dtype = family, device, dtype
        self.first, self.last = first, last
        self.layers = [family.make_layer(i, get) for i in range(*layers)]
        self.embed = get("model.embed_tokens.weight") if first else None
        if last:
            self.norm = get("model.norm.weight")
            self.lm_head = get(family.lm_head_name())
        self.kv = KVCache(device, dtype, max_context, kv_dtype)
        self.experts = experts  # the prefill and decode strategies (gpu_worker/experts.py)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, slices: list[SeqSlice], decode: bool) -> torch.Tensor:
        h = F.embedding(x.to(self.device), self.embed) if self.first else x.to(self.device, self.dtype)
        positions = slice_positions(slices, self.device)
        runner = self.experts.decode if decode else self.experts.prefill
        runner.begin()
        for layer in self.layers:
            with record_function("attention"):
                h = h + layer.attention(layer.input_norm(h), slices, positions, self.kv)
            x = layer.post_norm(h)
            if layer.is_moe:
                with record_function("route"):
                    ids, weights = layer.route(x)
                with record_function("routed_experts"):
                    mlp = runner.run(layer.index, x, ids, weights)
                with record_function("shared_expert"):
                    shared = layer.shared(x)
                h = h + (mlp if shared is None else mlp + shared)
            else:
                with record_function("dense_mlp"):
                    h = h + layer.dense(x)
        if not self.last:
            return h
        rows = []
        for (a, b), s in zip(rows_for_slices(slices), slices):
            if s.logits == "all":
                rows.append(h[a:b])
            elif s.logits == "last":
                rows.append(h[b - 1 : b])
        if not rows:
            return torch.empty(0, self.f.vocab_size, dtype=torch.float32)
        hn = self.f.final_norm(torch.cat(rows), self.norm)
        return linear(hn, self.lm_head).float()  # lm_head may be INT8 (--attn-bits 8)

    def free(self, seqs: list[int]) -> None:
        for s in seqs:
            self.kv.free(s)
