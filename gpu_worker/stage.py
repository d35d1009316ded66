"""One pipeline stage: a contiguous slice of decoder layers on one device, plus the embedding on
the first stage and the final norm and LM head on the last.

    h = embed(tokens)                                       (first stage)
    for each layer in the slice:
        h = h + attention(input_norm(h))
        x = post_norm(h)
        MoE layer:   h = h + (routed(x) + shared(x))        routed: GPU in prefill, CPU pool in decode
        dense layer: h = h + dense(x)
    logits = lm_head(norm(h)) for the rows the slices ask for   (last stage)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..shared.expert_store import ExpertStore
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
        prefill_experts,
        pool,
    ):
        self.f, self.device, self.dtype = family, device, dtype
        self.first, self.last = first, last
        self.layers = [family.make_layer(i, get) for i in range(*layers)]
        self.embed = get("model.embed_tokens.weight") if first else None
        if last:
            self.norm = get("model.norm.weight")
            self.lm_head = get(family.lm_head_name())
        self.kv = KVCache(device, dtype, max_context)
        self.prefill_experts = prefill_experts  # runs routed experts on this device (prefill)
        self.pool = pool  # runs routed experts on the CPU pool (decode)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, slices: list[SeqSlice], decode: bool) -> torch.Tensor:
        h = F.embedding(x.to(self.device), self.embed) if self.first else x.to(self.device, self.dtype)
        positions = slice_positions(slices, self.device)
        for layer in self.layers:
            h = h + layer.attention(layer.input_norm(h), slices, positions, self.kv)
            x = layer.post_norm(h)
            if layer.is_moe:
                ids, weights = layer.route(x)
                runner = self.pool if decode else self.prefill_experts
                mlp = runner.run(layer.index, x, ids, weights)
                shared = layer.shared(x)
                h = h + (mlp if shared is None else mlp + shared)
            else:
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


class ResidentExperts:
    """Prefill experts that stay where they are: views of the shared store on a CPU device, or a
    copy in device memory (the `persistent` strategy) on CUDA."""

    def __init__(self, store: ExpertStore, layers: range, device: torch.device, act: str):
        from ..shared.moe import moe_reference

        self._run = moe_reference
        self.store, self.fmt, self.act = store, store.layout.fmt, act
        self.blocks: dict[int, list[tuple[int, int, dict]]] = {}
        for layer in layers:
            if layer not in store.layout.shapes:
                continue
            self.blocks[layer] = []
            for node in range(store.layout.nodes):
                a, b = store.layout.range(layer, node)
                t = store.tensors(layer, node)
                if device.type != "cpu":
                    t = {k: v.to(device) for k, v in t.items()}
                self.blocks[layer].append((a, b - a, t))

    def run(self, layer: int, x, ids, weights):
        out = None
        for first, count, t in self.blocks[layer]:
            part = self._run(x, ids, weights, t, self.fmt, first, count, self.act)
            out = part if out is None else out + part
        return out
