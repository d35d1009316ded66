"""One pipeline stage: a contiguous slice of decoder layers on one device, plus the embedding on
the first stage and the final norm and LM head on the last.

    h = embed(tokens)                                       (first stage)
    for each layer in the slice:
        for each chunk:  h = h + attention(input_norm(h));  x = post_norm(h)   (add_post_norm: one pass;
                         with the MoE layer's route(x), add_post_norm_route: one kernel in decode)
        MoE layer:   the strategy takes the layer's experts (layer_begin: a DMA'd group, the chosen
                     experts of every chunk, ...), then for each chunk h = h + (routed(x) + shared(x))
        dense layer: for each chunk h = h + dense(x)
    logits = lm_head(norm(h)) for the rows the slices ask for   (last stage)
    tokens = sample(logits of "sample" slices)                   (last stage, on its device)

A prefill step holds whole prompts (one or several) and runs layer by layer: every chunk of
`prefill_chunk` tokens goes through a layer before the next layer starts, so a streamed layer's
experts cross PCIe once per step, whatever the prompt's length (DESIGN.md: layer_grouped streams
"ONCE per prompt"). Chunks bound only the activations and the attention's working memory; a
chunk's attention sees the earlier chunks' keys and values of that layer, already cached. A decode
step is one chunk; its experts come from the decode strategy, or, for a batch large enough that
streaming them is faster (decode_route.py measures it), from the prefill strategy.

On CUDA a plain decode step runs as CUDA graphs (decode_graphs.py) when every layer and the decode
strategy allow it; KRASIS_CUDA_GRAPHS=0 turns them off (to compare, or to debug).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..shared.models.family import ModelFamily
from ..shared.models.layers import linear, rows_for_slices, slice_positions, split_slices, to_device
from ..shared.protocol import Draw, SeqSlice
from ..shared.sampling import pick
from .decode_graphs import DecodeGraphs
from .kv_cache import KVCache
from .profiling import PHASES


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows], a view when the rows are all of t or none (a list index is a host-to-device copy)."""
    if len(rows) == t.shape[0]:
        return t
    if not rows:
        return t[:0]
    return t[to_device(torch.tensor(rows), t.device)]


@dataclass
class Launched:
    """A step enqueued on the device: its routed-expert runner (which waits for it), its outputs on
    the host once `done` (a CUDA event; None on a CPU device, where launching ran the step). A
    decode step also keeps its token count and what times it for the decode route: the CUDA event
    `start` (elapsed to `done`), or on a CPU device the seconds launching took, and the level of the
    device's host share it ran at (host_share.py), for that share's tuner."""

    runner: object
    out: dict[str, torch.Tensor]
    done: object
    tokens: int = 0
    start: object = None
    seconds: float = 0.0
    share: int | None = None


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
        kv_dtype: str | None = None,
        prefill_chunk: int = 4096,
    ):
        self.f, self.device, self.dtype = family, device, dtype
        self.first, self.last = first, last
        self.layers = [family.make_layer(i, get) for i in range(*layers)]
        self.embed = get("model.embed_tokens.weight") if first else None
        if last:
            self.norm = get("model.norm.weight")
            self.lm_head = get(family.lm_head_name())
        self.kv = KVCache(device, dtype, max_context, kv_dtype)
        self.prefill_chunk = prefill_chunk
        self.sampled: dict[int, tuple[torch.Tensor, int]] = {}  # seq -> (tokens, row): its last sampled token
        self.experts = self.graphs = None

    def attach(self, experts) -> None:
        """The routed experts' prefill and decode strategies (gpu_worker/experts.py), made once the
        CPU pool has filled the store: separate from the constructor so that the dense weights load
        while the pool fills it."""
        self.experts = experts
        experts.decode.routes = {layer.index: layer.route for layer in self.layers if layer.is_moe}
        if self.device.type == "cuda":
            from .l2_warm_kernel import L2_SHARE, L2Warm  # here: triton, which CPU hosts may lack

            budget = int(L2_SHARE * torch.cuda.get_device_properties(self.device).L2_cache_size)
            experts.decode.warms = {a.index: L2Warm(b.tensors(), self.device, budget) for a, b in zip(self.layers, self.layers[1:])}
        if (self.device.type == "cuda" and os.environ.get("KRASIS_CUDA_GRAPHS", "1") != "0"
                and experts.decode.graphable and all(layer.graphable for layer in self.layers)):
            self.graphs = DecodeGraphs(self.device, self._graph_body, self._graph_inputs)

    @torch.inference_mode()
    def launch(self, x: torch.Tensor, slices: list[SeqSlice], decode: bool) -> "Launched":
        """Enqueue a step; on CUDA return without waiting for the device, so that the worker can
        launch the next step behind it before it waits (wait()). Its outputs, `hidden` or on the last
        stage `tokens` and `logits` (shared/protocol.py: Logits), are copied to the host in stream
        order (a decode graph's output is overwritten by the next replay)."""
        PHASES.mark("decode msg")
        t0, start = time.perf_counter(), None
        if decode and self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        # a decode step's experts: the decode strategy's, or streamed as a prefill's when the batch
        # makes that faster (decode_route.py)
        runner, share = self.experts.pick(len(slices)) if decode else (self.experts.prefill, None)
        runner.begin()  # here, not in _forward: a graph's replay would skip it
        self.kv.begin_step(slices if decode else None)  # the step's cache rows and their table, likewise
        if self.first:
            x = self._feed(x, slices)
        if runner is self.experts.decode and self.graphs is not None and self.graphs.ready(slices):
            inputs = self.graphs.buffers(len(slices))
            inputs["x"].copy_(to_device(x, self.device))
            inputs["positions"].copy_(to_device(torch.tensor([s.start for s in slices]), self.device))
            PHASES.mark("prep")
            out = self.graphs.run(slices)
        else:
            PHASES.mark("prep")
            out = self._forward(to_device(x, self.device), slice_positions(slices, self.device), slices, decode, runner)
        PHASES.mark("enqueue")
        out = self._reply(out, slices) if self.last else {"hidden": out}
        done = None
        if self.device.type == "cuda":
            out = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True) for k, v in out.items()}
            done = torch.cuda.Event(enable_timing=start is not None)
            done.record()
        PHASES.mark("sample")
        return Launched(runner, out, done, len(slices) if decode else 0, start, time.perf_counter() - t0, share)

    def wait(self, step: "Launched", interrupt=None) -> bool:
        """Wait for a launched step (its outputs are then on the host); False, without waiting, as
        soon as `interrupt()` says the worker has the next step to launch first. Raises what the step
        failed with (the CPU pool's PoolError)."""
        if not step.runner.end(step.done, interrupt):
            return False
        if step.tokens:
            # on the device's timeline: from the step's first kernel (after the step before it) to its last
            seconds = step.start.elapsed_time(step.done) / 1e3 if step.start is not None else step.seconds
            self.experts.record(step.runner, step.share, step.tokens, seconds)
        return True

    def _feed(self, tokens: torch.Tensor, slices: list[SeqSlice]) -> torch.Tensor:
        """The step's input tokens, a -1 (shared/protocol.py: Step) replaced by the token this stage
        last sampled for that slice's sequence, still on the device: the coordinator sent the step
        before that token reached it, so the messages' latency overlaps the previous step."""
        neg = tokens < 0
        if not bool(neg.any()):
            return tokens
        fed = neg.nonzero().flatten().tolist()
        if not self.last:
            raise ValueError("a step without its tokens needs a single-stage pipeline (the sampler's)")
        x = to_device(tokens, self.device)
        # by the step that sampled them: usually one, in the same order, so one copy, not one a sequence
        by_step: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        for i in fed:
            s = slices[i]
            if s.n != 1 or s.seq not in self.sampled:
                raise ValueError(f"sequence {s.seq}: no sampled token to continue from")
            tok, j = self.sampled[s.seq]
            rows = by_step.setdefault(id(tok), (tok, [], []))
            rows[1].append(i)
            rows[2].append(j)
        for tok, xs, js in by_step.values():  # after the kernels that sampled them, in stream order
            if xs == list(range(xs[0], xs[0] + len(xs))) and js == list(range(js[0], js[0] + len(js))):
                x[xs[0] : xs[0] + len(xs)].copy_(tok[js[0] : js[0] + len(js)])
            else:
                x[to_device(torch.tensor(xs), self.device)] = tok[to_device(torch.tensor(js), self.device)]
        return x

    def _reply(self, logits: torch.Tensor, slices: list[SeqSlice]) -> dict[str, torch.Tensor]:
        """The logits rows split by what their slices asked for: sampled here (with their logprobs
        when asked), or sent as they are."""
        keep, drawn, draws, seqs, r = [], [], [], [], 0
        for s in slices:
            n = s.n if s.logits == "all" else 1 if s.logits in ("last", "sample") else 0
            if s.logits == "sample":
                drawn.append(r)
                draws.append(s.draw or Draw())
                seqs.append(s.seq)
            else:
                keep.extend(range(r, r + n))
            r += n
        out = pick(_rows(logits, drawn), draws) if drawn else {"tokens": torch.empty(0, dtype=torch.int64)}
        for i, seq in enumerate(seqs):
            self.sampled[seq] = (out["tokens"], i)
        return {**out, "logits": _rows(logits, keep)}

    def _graph_inputs(self, m: int) -> dict[str, torch.Tensor]:
        if self.first:
            x = torch.empty(m, dtype=torch.long, device=self.device)
        else:
            x = torch.empty(m, self.f.hidden_size, dtype=self.dtype, device=self.device)
        return {"x": x, "positions": torch.empty(m, dtype=torch.long, device=self.device)}

    def _graph_body(self, slices: list[SeqSlice]) -> torch.Tensor:
        inputs = self.graphs.buffers(len(slices))
        return self._forward(inputs["x"], inputs["positions"], slices, True, self.experts.decode)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, slices: list[SeqSlice], decode: bool, runner) -> torch.Tensor:
        h = F.embedding(x, self.embed) if self.first else x.to(self.dtype)
        if decode:
            chunks = [(slices, h, positions)]
        else:
            chunks = [(sub, h[a:b], positions[a:b]) for sub, (a, b) in split_slices(slices, self.prefill_chunk)]
        for layer in self.layers:
            chunks = self._layer(layer, chunks, runner)
        h = chunks[0][1] if len(chunks) == 1 else torch.cat([c[1] for c in chunks])
        if not self.last:
            return h
        rows = []
        for (a, b), s in zip(rows_for_slices(slices), slices):
            if s.logits == "all":
                rows.append(h[a:b])
            elif s.logits in ("last", "sample"):
                rows.append(h[b - 1 : b])
        if not rows:
            return torch.empty(0, self.f.vocab_size, dtype=torch.float32)
        hn = self.f.final_norm(torch.cat(rows), self.norm)
        return linear(hn, self.lm_head).float()  # lm_head may be INT8 (--attn-bits 8)

    def _layer(self, layer, chunks: list, runner) -> list:
        """One layer over every chunk, in order: attention first for all of them (a chunk attends over
        the earlier ones' cached keys), then the routed experts, which the strategy takes once for
        the whole step (`layer_begin`) before every chunk runs through them."""
        hs, xs, routes = [], [], []
        for sub, h, pos in chunks:
            with record_function("attention"):
                a = layer.norm_attention(h, sub, pos, self.kv)
            if layer.is_moe:
                with record_function("route"):  # the residual add and the norm with it (one kernel in decode)
                    h, x, route = layer.add_post_norm_route(h, a)
                routes.append(route)
            else:
                h, x = layer.add_post_norm(h, a)
            hs.append(h)
            xs.append(x)
        if not layer.is_moe:
            with record_function("dense_mlp"):
                return [(sub, h + layer.dense(x), pos) for (sub, _, pos), h, x in zip(chunks, hs, xs)]
        with record_function("routed_experts"):
            runner.layer_begin(layer.index, [ids for ids, _ in routes])
        out = []
        for (sub, _, pos), h, x, (ids, weights) in zip(chunks, hs, xs, routes):
            with record_function("routed_experts"):
                pending = runner.submit(layer.index, x, ids, weights)
            with record_function("shared_expert"):
                shared = layer.shared(x)  # on the device while the routed experts run elsewhere
            with record_function("routed_experts"):
                h = runner.collect_add(pending, h) if shared is None else h + (runner.collect(pending) + shared)
            out.append((sub, h, pos))
        runner.layer_end(layer.index)
        return out

    def fork(self, seq: int, into: list[int]) -> None:
        self.kv.fork(seq, into)

    def free(self, seqs: list[int]) -> None:
        for s in seqs:
            self.kv.free(s)
            self.sampled.pop(s, None)
