"""Per-sequence, per-layer cache of whatever the attention keeps (K and V for GQA; the compressed
latent and the rope key for MLA; the conv and SSM state of a linear-attention layer), grown by
doubling and freed with the sequence."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..shared.models.layers import attend, rows_for_slices
from ..shared.protocol import SeqSlice
from . import cache_rows
from .cache_rows import Rows
from .decode_attention import decode_attention


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


def _write(rows: Rows, t: torch.Tensor, start: int) -> None:
    """t's entries into the cached rows from `start`: encoded straight into them where they are fp8."""
    end = start + t.shape[0]
    if rows.scales is not None:
        fp8_quantize(t, out=(rows.values[start:end], rows.scales[start:end]))
    else:
        rows.values[start:end] = t


class _Held:
    """One sequence's rows of one layer: how many hold entries, its buffers and their rows (`cap`),
    and, once a decode step's table asked for them, where the buffers start (cache_rows.part_gaps):
    a 32-sequence step's table covers ~1,500 of these, and working each one's out again at every
    step took ~9 ms of the host's time on a GPU host (BENCHMARKS.md, session 22)."""

    __slots__ = ("length", "bufs", "cap", "gaps")

    def __init__(self, length: int, bufs: list[torch.Tensor]):
        self.length, self.bufs, self.gaps = length, bufs, None
        self.cap = bufs[0].shape[0] if bufs else 0


class _Prepared(NamedTuple):
    """A decode step's rows, reserved: the step's slices (seq, start, n), and per layer (its table on
    the device, the table's width per sequence, each slice's buffers)."""

    key: tuple
    layers: dict[int, tuple[torch.Tensor | None, int, list[list[torch.Tensor]]]]


class KVCache:
    """kv_dtype "fp8" keeps e4m3 values with per-row scales (half the bytes of bf16); anything else
    keeps the compute dtype (float32 exact-check runs always do)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, max_context: int, kv_dtype: str | None = None):
        self.device, self.dtype, self.max_context = device, dtype, max_context
        self.fp8 = kv_dtype == "fp8"
        self._seqs: dict[int, dict[int, _Held]] = {}  # seq -> layer -> its rows
        self._kv_layers: set[int] = set()  # layers that keep K/V rows (not a linear-attention state)
        self._step: _Prepared | None = None  # what begin_step prepared for the decode step running
        self._tables: dict[int, torch.Tensor] = {}  # batch size -> its steps' table on the device
        if cache_rows.kernels_on(device):
            for dtype in (torch.float8_e4m3fn if self.fp8 else dtype, torch.float32):
                cache_rows.anchor(dtype, device)  # made here, never inside a graph capture

    def _layout(self, t: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(row shape, dtype) of the buffers that keep entries like t: e4m3 values and their scales,
        or t's own."""
        if self.fp8:
            return [(tuple(t.shape[1:]), torch.float8_e4m3fn), ((*t.shape[1:-1], 1), torch.float32)]
        return [(tuple(t.shape[1:]), t.dtype)]

    def _reserve(self, layer: int, s: SeqSlice, new: tuple[torch.Tensor, ...] | None) -> _Held:
        """The sequence's rows of the layer, grown (by doubling) to hold the slice, its length
        advanced past it: the caller writes the slice's rows. `new` (the entries to write) shapes a
        sequence's first buffers; later ones keep the layout they have."""
        self._kv_layers.add(layer)
        layers = self._seqs.setdefault(s.seq, {})
        held = layers.get(layer)
        length = 0 if held is None else held.length
        if s.start != length:
            raise ValueError(f"sequence {s.seq} layer {layer}: slice starts at {s.start}, cache holds {length}")
        end = length + s.n
        if end > self.max_context:
            raise ContextOverflow(f"sequence {s.seq} would reach {end} tokens, max context is {self.max_context}")
        if held is None or held.cap < end:
            bufs = held.bufs if held is not None else []
            cap = min(self.max_context, max(end, 2 * held.cap if held is not None else 0, 64))
            layout = [(b.shape[1:], b.dtype) for b in bufs] if bufs else [x for t in new for x in self._layout(t)]
            grown = [torch.empty((cap, *shape), dtype=dtype, device=self.device) for shape, dtype in layout]
            for g, old in zip(grown, bufs):
                g[:length] = old[:length]
            held = layers[layer] = _Held(length, grown)
        held.length = end
        return held

    def _parts(self, bufs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """A sequence's buffers of a layer as its stored parts: (values, scales or None) each."""
        return list(zip(bufs[0::2], bufs[1::2])) if self.fp8 else [(b, None) for b in bufs]

    def _rows(self, bufs: list[torch.Tensor], end: int) -> tuple[Rows, ...]:
        return tuple(Rows(v[:end], None if sc is None else sc[:end]) for v, sc in self._parts(bufs))

    def append(self, layer: int, s: SeqSlice, *new: torch.Tensor) -> tuple[Rows, ...]:
        """Append the slice's new entries and return everything cached, [start + n, ...], as stored:
        fp8 entries are encoded straight into the cache's rows."""
        cached = self._rows(self._reserve(layer, s, new).bufs, s.start + s.n)
        for r, t in zip(cached, new):
            _write(r, t, s.start)
        return cached

    def begin_step(self, slices: list[SeqSlice] | None) -> None:
        """Before each step (Stage.launch; None for a prompt step): for a decode step that runs the
        decode kernels, reserve every slice's new rows in every layer holding K/V rows and copy one
        table of where they all are (cache_rows.offsets) to the device, into a buffer of its batch
        size's own, which the step's attention layers then read: nothing in them depends on the host
        any more, so a CUDA graph captures them, and a replay reads the table this call copied."""
        self._step = None
        if slices is None or not self.decode_kernel(slices):
            return
        layers = sorted(self._kv_layers)
        if layers and all(layer in self._seqs.get(s.seq, {}) for s in slices for layer in layers):
            self._step = self._prepare(layers, slices, None)

    def _prepare(self, layers: list[int], slices: list[SeqSlice], new: tuple[torch.Tensor, ...] | None) -> "_Prepared":
        """Reserve the slices' rows in `layers` and put their table on the device: the step's buffer
        when preparing a whole step (new None), else a table of its own."""
        starts, kernels = [s.start for s in slices], cache_rows.kernels_on(self.device)
        table, at = [], {}
        for layer in layers:
            held = [self._reserve(layer, s, new) for s in slices]
            bufs = [h.bufs for h in held]
            at[layer] = (len(table), 2 * len(self._parts(bufs[0])) + 1, bufs)
            if kernels:  # cache_rows.offsets, from each buffer's gaps as first worked out
                for h in held:
                    if h.gaps is None:
                        h.gaps = cache_rows.part_gaps(self._parts(h.bufs))
                table += cache_rows.table_rows([h.gaps for h in held], starts)
        if not kernels:
            data = None  # the references write and attend per slice
        elif new is not None:
            data = cache_rows.device_table(table, self.device)
        else:
            data = self._tables.get(len(slices))
            if data is None or data.numel() != len(table):
                # a batch size's buffer is made once (its captured graphs read it) and sized for
                # every K/V layer, which a stage's decode steps all have
                data = self._tables[len(slices)] = torch.empty(len(table), dtype=torch.int64, device=self.device)
            data.copy_(cache_rows.host_table(table), non_blocking=True)
        return _Prepared(tuple((s.seq, s.start, s.n) for s in slices),
                         {layer: (data if data is None else data[a : a + len(slices) * w], w, bufs)
                          for layer, (a, w, bufs) in at.items()})

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

        With the decode kernels (the same few new tokens for every slice), the appends (fp8 encoded
        into the cache's rows) and the attention are one launch each for all slices, reading where
        each sequence's rows are from the table begin_step copied for the step (or, for a step it did
        not prepare, one made here): graph-capturable."""
        rows = rows_for_slices(slices)
        if self.decode_kernel(slices):
            step = self._step
            if step is None or step.key != tuple((s.seq, s.start, s.n) for s in slices) or layer not in step.layers:
                step = self._prepare([layer], slices, new)
            data, width, bufs = step.layers[layer]
            cached = [self._rows(b, s.start + s.n) for b, s in zip(bufs, slices)]  # host-side views: not in a replay
            if data is not None:
                from .fp8_kernel import write_rows_triton

                write_rows_triton(new, cached[0][0].values.dtype, data, width)
            else:
                for (a, b), s, c in zip(rows, slices, cached):
                    for r, t in zip(c, new):
                        _write(r, t[a:b], s.start)
            roles = (keys[0], keys[1] if len(keys) == 2 else 0, values)
            return decode_attention(q, [[c[i] for i in keys] for c in cached], [c[values] for c in cached],
                                    [s.start for s in slices], scale, window, sinks,
                                    table=None if data is None else (data, width, roles))
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
        held = layers.get(layer)
        length = 0 if held is None else held.length
        if s.start != length:
            raise ValueError(f"sequence {s.seq} layer {layer}: slice starts at {s.start}, state holds {length}")
        if length + s.n > self.max_context:
            raise ContextOverflow(f"sequence {s.seq} would reach {length + s.n} tokens, max context is {self.max_context}")
        if held is None:
            held = layers[layer] = _Held(0, init())
        held.length = length + s.n
        return held.bufs

    def fork(self, seq: int, into: list[int]) -> None:
        """Give each sequence of `into` a copy of everything `seq` holds (choices of one prompt
        continue from its prefill; each appends to its own rows from there)."""
        if seq not in self._seqs:
            raise ValueError(f"sequence {seq}: nothing cached to fork")
        for s in into:
            self._seqs[s] = {layer: _Held(h.length, [b.clone() for b in h.bufs]) for layer, h in self._seqs[seq].items()}

    def free(self, seq: int) -> None:
        self._seqs.pop(seq, None)

    def sequences(self) -> int:
        return len(self._seqs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layers in self._seqs.values() for h in layers.values() for b in h.bufs)
