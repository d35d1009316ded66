"""Moving experts from the shared host store to the device.

The store's segments (shared/expert_store.py, memfd MAP_SHARED) are page-locked in place with
cudaHostRegister, so the one copy the CPU pool computes from is also the GPU's DMA source: no
second pinned copy and no pageable host-to-device copy on the hot path (pageable runs at ~7 GB/s,
pinned at ~54). Copies run on a dedicated copy stream and are ordered against the compute stream
with events only, so the DMA of the next layer group overlaps the compute of this one.

On a CPU device the same objects do plain synchronous copies into the same staging buffers, so the
offsets, slot reuse and lookups are exercised by CI without a GPU.
"""

from __future__ import annotations

import torch

from ..shared.expert_store import ExpertStore

Block = tuple[dict[str, torch.Tensor], torch.Tensor]


class DmaError(RuntimeError):
    pass


def pin_segment(seg: torch.Tensor, mapped: bool = False) -> None:
    """Page-lock a host tensor's memory in place (no copy); `mapped`: also into the device's address
    space (cudaHostRegisterMapped), for kernels that read and write it directly."""
    nbytes = seg.numel() * seg.element_size()
    rc = torch.cuda.cudart().cudaHostRegister(seg.data_ptr(), nbytes, 2 if mapped else 0)
    code = getattr(rc, "value", rc)
    if int(code) != 0:
        raise DmaError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB of host memory failed (cudaError {int(code)})")


class _DeviceArray:
    """A host pointer offered to torch as device memory (the CUDA array interface): valid where the
    memory is page-locked and mapped, whose device address is its host address under unified
    addressing (as the mailbox's kernels already use it, pool_client.py)."""

    def __init__(self, t: torch.Tensor):
        self.t = t  # kept alive as long as the view
        self.__cuda_array_interface__ = {"shape": (t.numel() * t.element_size(),), "typestr": "|u1",
                                         "data": (t.data_ptr(), False), "version": 3, "strides": None}


def mapped_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device tensor over host tensor t's memory, no copy: the device's loads from it cross PCIe.
    t must lie in memory pinned with `mapped` (pin_segment) and be contiguous."""
    if not t.is_contiguous():
        raise DmaError("a mapped view needs a contiguous host tensor")
    raw = torch.as_tensor(_DeviceArray(t), device=device)
    if raw.data_ptr() != t.data_ptr():  # torch copied it: the host memory is not the device's to read
        raise DmaError("host memory not mapped into the device's address space")
    return raw.view(t.dtype).view(t.shape)


def block_lookup(num_experts: int, first: int, count: int, device) -> torch.Tensor:
    """The lookup of a contiguous block [first, first + count) stored in order."""
    lk = torch.full((num_experts,), -1, dtype=torch.long)
    lk[first : first + count] = torch.arange(count)
    return lk.to(device)


class CopyEngine:
    """A copy stream beside the compute (current) stream; plain copies on a CPU device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def event_after_compute(self):
        """An event marking that compute enqueued so far is done (for reusing a buffer)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after=None):
        """dst.copy_(src) for each pair on the copy stream, after event `after`; returns the event the
        compute stream waits on."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def wait(self, ev) -> None:
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)


class HostExperts:
    """The stage's MoE layers in the host store: per-node tensor views, the byte span each layer
    occupies in each segment (layers are laid out in order, so a run of layers is one span), and
    the lookups of each node's contiguous block."""

    def __init__(self, store: ExpertStore, layers, device: torch.device):
        self.store, self.layout, self.fmt, self.device = store, store.layout, store.layout.fmt, device
        self.layers = [i for i in layers if i in self.layout.shapes]
        self.nodes = self.layout.nodes
        if device.type == "cuda":
            for n in range(self.nodes):
                # mapped too: the device's host share reads experts in place (host_share.py)
                pin_segment(store.segment(n), mapped=True)
        self.span: dict[tuple[int, int], tuple[int, int]] = {}
        for n in range(self.nodes):
            for layer in self.layers:
                ents = [e for (lay, _), e in self.layout.entries[n].items() if lay == layer]
                self.span[(layer, n)] = (min(e.offset for e in ents), max(e.offset + e.nbytes for e in ents))
        self.lookups = {}
        for layer in self.layers:
            num = self.layout.shapes[layer].num
            for n in range(self.nodes):
                a, b = self.layout.range(layer, n)
                self.lookups[(layer, n)] = block_lookup(num, a, b - a, device)

    def shape(self, layer: int):
        return self.layout.shapes[layer]

    def host_blocks(self, layer: int) -> list[Block]:
        return [(self.store.tensors(layer, n), self.lookups[(layer, n)]) for n in range(self.nodes)]

    def mapped_blocks(self, layer: int) -> list[Block]:
        """host_blocks with device views of the host tensors (mapped_view: the device's loads read
        the store over PCIe); on a CPU device, the host tensors themselves."""
        blocks = self.host_blocks(layer)
        if self.device.type != "cuda":
            return blocks
        return [({name: mapped_view(v, self.device) for name, v in t.items()}, lookup) for t, lookup in blocks]

    def layer_bytes(self, layer: int) -> int:
        return sum(b - a for (lay, _), (a, b) in self.span.items() if lay == layer)

    def group_span(self, group: list[int], node: int) -> tuple[int, int]:
        return self.span[(group[0], node)][0], self.span[(group[-1], node)][1]

    def where(self, layer: int, e: int) -> tuple[int, int]:
        """(node, row in that node's block) of expert e."""
        for n in range(self.nodes):
            a, b = self.layout.range(layer, n)
            if a <= e < b:
                return n, e - a
        raise IndexError(f"expert {e} of layer {layer}")

    def expert_nbytes(self, layer: int) -> int:
        return sum(e.nbytes for e in self._entries_per_expert(layer).values())

    def _entries_per_expert(self, layer):
        from ..shared.expert_store import Entry

        out = {}
        for name, (dtype, shape) in self.fmt.tensors(self.shape(layer), 1).items():
            out[name] = Entry(0, dtype, shape)
        return out


class GroupStager:
    """Whole layer groups (or a group's first `count` layers: a decode step split between the
    stream and the CPU pool, decode_split.py) copied span by span into `slots` device buffers. With
    two slots the copy of the next group runs while this one computes; a slot is overwritten only
    after the compute that read it (an event recorded at `release`). Slots are taken in turn, in the
    order groups are fetched, not by group number: a step that skips groups would otherwise put two
    consecutive ones in one slot and overwrite the group it is computing."""

    def __init__(self, host: HostExperts, groups: list[list[int]], slots: int, engine: CopyEngine):
        self.host, self.groups, self.engine = host, groups, engine
        self.nslots = slots
        dev = host.device
        self.bufs = []
        for _ in range(slots):
            per_node = []
            for n in range(host.nodes):
                size = max(b - a for a, b in (host.group_span(g, n) for g in groups))
                per_node.append(torch.empty(size, dtype=torch.uint8, device=dev))
            self.bufs.append(per_node)
        self.loaded: list[tuple[int, int] | None] = [None] * slots  # (group, its first layers held)
        self.ready = [None] * slots
        self.released = [None] * slots
        self._next = 0  # the slot the next copy goes to

    def nbytes(self) -> int:
        return sum(b.numel() for slot in self.bufs for b in slot)

    def _holding(self, g: int, count: int) -> int | None:
        return next((s for s, held in enumerate(self.loaded) if held and held[0] == g and held[1] >= count), None)

    def fetch(self, g: int, count: int | None = None) -> int:
        """Start copying group g's first `count` layers (all of them by default), unless a slot
        holds them already (the last step's group, kept). Returns the slot they are in."""
        count = len(self.groups[g]) if count is None else count
        s = self._holding(g, count)
        if s is None:
            s = self._next
            pairs = []
            for n in range(self.host.nodes):
                a, b = self.host.group_span(self.groups[g][:count], n)
                pairs.append((self.bufs[s][n][: b - a], self.host.store.segment(n)[a:b]))
            self.ready[s] = self.engine.copy(pairs, after=self.released[s])
            self.loaded[s] = (g, count)
        # the next copy goes to the slot after the one this group is in, never into this one
        self._next = (s + 1) % self.nslots
        return s

    def acquire(self, g: int, count: int | None = None) -> dict[int, list[Block]]:
        """Group g's first `count` layers as blocks in device memory, once their copy has landed."""
        s = self.fetch(g, count)
        self.engine.wait(self.ready[s])
        layers = self.groups[g][:count]  # None: all of them
        out = {}
        for layer in layers:
            blocks = []
            for n in range(self.host.nodes):
                base = self.host.group_span(layers, n)[0]
                t = {}
                for (lay, name), e in self.host.layout.entries[n].items():
                    if lay == layer:
                        o = e.offset - base
                        t[name] = self.bufs[s][n][o : o + e.nbytes].view(e.dtype).view(e.shape)
                blocks.append((t, self.host.lookups[(layer, n)]))
            out[layer] = blocks
        return out

    def release(self, g: int) -> None:
        """Group g's compute is enqueued: its slot may be refilled after it."""
        for s, held in enumerate(self.loaded):
            if held and held[0] == g:
                self.released[s] = self.engine.event_after_compute()


class ExpertSlots:
    """`capacity` single-expert slots in device memory, filled one expert at a time from the host
    store (active_only, hcs, compact and lru all keep experts this way)."""

    def __init__(self, host: HostExperts, capacity: int, engine: CopyEngine):
        self.host, self.engine, self.capacity = host, engine, capacity
        es = host.shape(host.layers[0])
        # zeroed: a choice no slot holds reads slot 0 with weight 0 (moe_pairs), and an unfilled
        # slot's leftover bytes may be NaN, which a zero weight does not cancel
        self.t = {
            name: torch.zeros(shape, dtype=dtype, device=host.device)
            for name, (dtype, shape) in host.fmt.tensors(es, capacity).items()
        }
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def load(self, slot: int, layer: int, e: int) -> None:
        n, row = self.host.where(layer, e)
        src = self.host.store.tensors(layer, n)
        self._pending += [(self.t[name][slot], src[name][row]) for name in self.t]

    def flush(self, after=None) -> None:
        """Issue the queued loads and make compute wait for them."""
        if self._pending:
            self.engine.wait(self.engine.copy(self._pending, after=after))
            self._pending = []
