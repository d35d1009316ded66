"""Per-sequence, per-layer cache of whatever the attention keeps (K and V for GQA; the compressed
latent and the rope key for MLA; the conv and SSM state of a linear-attention layer), grown by
doubling and freed with the sequence."""

from __future__ import annotations

import torch

from ..shared.models.layers import attend, rows_for_slices
from ..shared.protocol import SeqSlice
from . import cache_rows
from .cache_rows import Rows
from .decode_attention import decode_attention
from .decode_graphs import eager


class ContextOverflow(ValueError):
    pass


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0


def fp8_quantize(t: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [n, ..., d] -> (e4m3 values, float32 scales [n, ..., 1]): one scale per cached row (token
    and head), amax / 448, so every row uses the format's whole range; written into `out` (contiguous
    tensors of those shapes: the cache's own rows) when given. One Triton kernel on CUDA
    (fp8_kernel.py, the same bits), else fp8_quantize_reference."""
    if t.is_cuda:
        from .fp8_kernel import fp8_quantize_triton

        return fp8_quantize_triton(t, out)
    q, s = fp8_quantize_reference(t)
    if out is None:
        return q, s
    out[0].copy_(q), out[1].copy_(s)
    return out


def fp8_quantize_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tf = t.float()
    # times float32(1 / 448), not divided by 448: torch's CUDA division by a scalar is that product,
    # so the CPU and CUDA references agree, and the kernel with both, bit for bit
    scale = (tf.abs().amax(dim=-1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(1e-12)
    return (tf / scale).to(torch.float8_e4m3fn), scale


DECODE_MAX_T = 16  # new tokens of a slice up to which attend() runs the decode kernel


def decode_shaped(slices: list[SeqSlice]) -> bool:
    """Whether a step's slices suit the decode kernel: the same few new tokens for every sequence."""
    return slices[0].n <= DECODE_MAX_T and all(s.n == slices[0].n for s in slices)


class KVCache:
    """kv_dtype "fp8" keeps e4m3 values with per-row scales (half the bytes of bf16); anything else
    keeps the compute dtype (float32 exact-check runs always do)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_context: int, kv_dtype: str | None = None):
        self.device, self.dtype, self.max_context = device, dtype, max_context
        self.fp8 = kv_dtype == "fp8"
        # seq -> layer -> (length, [buffers])
        self._seqs: dict[int, dict[int, tuple[int, list[torch.Tensor]]]] = {}

    def _layout(self, t: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(row shape, dtype) of the buffers that keep entries like t: e4m3 values and their scales,
        or t's own."""
        if self.fp8:
            return [(tuple(t.shape[1:]), torch.float8_e4m3fn), ((*t.shape[1:-1], 1), torch.float32)]
        return [(tuple(t.shape[1:]), t.dtype)]

    def _reserve(self, layer: int, s: SeqSlice, new: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The sequence's buffers for the layer, grown (by doubling) to hold the slice, its length
        advanced past it: the caller writes the slice's rows."""
        layers = self._seqs.setdefault(s.seq, {})
        length, bufs = layers.get(layer, (0, []))
        if s.start != length:
            raise ValueError(f"sequence {s.seq} layer {layer}: slice starts at {s.start}, cache holds {length}")
        end = length + s.n
        if end > self.max_context:
            raise ContextOverflow(f"sequence {s.seq} would reach {end} tokens, max context is {self.max_context}")
        if not bufs or bufs[0].shape[0] < end:
            cap = min(self.max_context, max(end, 2 * (bufs[0].shape[0] if bufs else 0), 64))
            grown = [torch.empty((cap, *shape), dtype=dtype, device=self.device) for t in new for shape, dtype in self._layout(t)]
            for g, old in zip(grown, bufs):
                g[:length] = old[:length]
            bufs = grown
        layers[layer] = (end, bufs)
        return bufs

    def _rows(self, bufs: list[torch.Tensor], end: int) -> tuple[Rows, ...]:
        if self.fp8:
            return tuple(Rows(q[:end], sc[:end]) for q, sc in zip(bufs[0::2], bufs[1::2]))
        return tuple(Rows(b[:end]) for b in bufs)

    def append(self, layer: int, s: SeqSlice, *new: torch.Tensor) -> tuple[Rows, ...]:
        """Append the slice's new entries and return everything cached, [start + n, ...], as stored:
        fp8 entries are encoded straight into the cache's rows."""
        bufs = self._reserve(layer, s, new)
        length, end = s.start, s.start + s.n
        if self.fp8:
            for q, sc, t in zip(bufs[0::2], bufs[1::2], new):
                fp8_quantize(t, out=(q[length:end], sc[length:end]))
        else:
            for b, t in zip(bufs, new):
                b[length:end] = t
        return self._rows(bufs, end)

    def append_batch(self, layer: int, slices: list[SeqSlice], *new: torch.Tensor) -> list[tuple[Rows, ...]]:
        """append() for every slice of a decode step (the same count of new entries each, the new
        tensors holding them one slice after another): on CUDA one write per part for all slices
        (fp8_kernel.py: write_rows_triton), else append() per slice."""
        if not cache_rows.kernels_on(self.device):
            return [self.append(layer, s, *(t[a:b] for t in new)) for (a, b), s in zip(rows_for_slices(slices), slices)]
        from .fp8_kernel import write_rows_triton

        bufs = [self._reserve(layer, s, new) for s in slices]
        starts = [s.start for s in slices]
        per = 2 if self.fp8 else 1
        for i, t in enumerate(new):
            write_rows_triton(t, [(b[per * i], b[per * i + 1] if self.fp8 else None) for b in bufs], starts)
        return [self._rows(b, s.start + s.n) for b, s in zip(bufs, slices)]

    def update(self, layer: int, s: SeqSlice, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """append(), then everything cached in the compute dtype (views, or dequantized copies)."""
        return tuple(r.dense(self.dtype) for r in self.append(layer, s, *new))

    def decode_kernel(self, slices: list[SeqSlice]) -> bool:
        """Whether attend() runs decode_attention on the stored rows: the same few new tokens for
        every sequence, on CUDA. Prompt chunks, and every step on CPU, keep layers.attend on
        dequantized views (what the exactness checks against transformers run)."""
        return cache_rows.kernels_on(self.device) and decode_shaped(slices)

    def attend(
        self,
        layer: int,
        slices: list[SeqSlice],
        q: torch.Tensor,
        *new: torch.Tensor,
        scale: float,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
        keys: tuple[int, ...] = (0,),
        values: int = 1,
    ) -> torch.Tensor:
        """Append each slice's new entries, then attend its queries over everything its sequence has
        cached (layers.attend's contract); q [T, Hq, dk] and the new entries hold the slices' rows one
        after another. The keys are the cached parts `keys` concatenated along the head dim, the values
        part `values`: (k, v) for GQA, [c ; k_r] and c for MLA.

        With the decode kernel, the appends (fp8 encoded into the cache's rows) and the kernel (one
        launch for every slice, whose grid follows the caches' lengths) run as one `eager` part of a
        decode graph, which writes into the same output at every replay. Its slices have one length."""
        rows = rows_for_slices(slices)
        if self.decode_kernel(slices):
            out = torch.empty(q.shape[0], q.shape[1], new[values].shape[-1], dtype=q.dtype, device=q.device)

            def run(slices):
                cached = self.append_batch(layer, slices, *new)
                return decode_attention(q, [[c[i] for i in keys] for c in cached], [c[values] for c in cached],
                                        [s.start for s in slices], scale, window, sinks, out=out)

            return eager(run, slices)
        out = []
        for (a, b), s in zip(rows, slices):
            parts = self.update(layer, s, *(t[a:b] for t in new))
            k = parts[keys[0]] if len(keys) == 1 else torch.cat([parts[i] for i in keys], dim=-1)
            out.append(attend(q[a:b], k, parts[values], s.start, scale, window, sinks))
        return out[0] if len(out) == 1 else torch.cat(out)

    def state(self, layer: int, s: SeqSlice, init) -> list[torch.Tensor]:
        """The fixed-size recurrent state of a linear-attention layer for the slice's sequence
        (`init()` makes it at the sequence's first token), checked to cover exactly the tokens before
        the slice; the caller updates the tensors in place. Freed with the sequence like K and V."""
        layers = self._seqs.setdefault(s.seq, {})
        length, bufs = layers.get(layer, (0, None))
        if s.start != length:
            raise ValueError(f"sequence {s.seq} layer {layer}: slice starts at {s.start}, state holds {length}")
        if length + s.n > self.max_context:
            raise ContextOverflow(f"sequence {s.seq} would reach {length + s.n} tokens, max context is {self.max_context}")
        if bufs is None:
            bufs = init()
        layers[layer] = (length + s.n, bufs)
        return bufs

    def fork(self, seq: int, into: list[int]) -> None:
        """Give each sequence of `into` a copy of everything `seq` holds (choices of one prompt
        continue from its prefill; each appends to its own rows from there)."""
        if seq not in self._seqs:
            raise ValueError(f"sequence {seq}: nothing cached to fork")
        for s in into:
            self._seqs[s] = {layer: (length, [b.clone() for b in bufs]) for layer, (length, bufs) in self._seqs[seq].items()}

    def free(self, seq: int) -> None:
        self._seqs.pop(seq, None)

    def sequences(self) -> int:
        return len(self._seqs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layers in self._seqs.values() for _, bufs in layers.values() for b in bufs)
