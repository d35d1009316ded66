"""The routed experts, once in RAM, in shared memory that every process maps.

The store is split into one segment per CPU-pool node (a NUMA node, or a simulated one). Node n
holds a contiguous block of each MoE layer's experts; its pool process fills the segment (so the
first touch, and with it the physical pages, land on that node) and runs those experts in decode.
GPU workers map every segment read-only, as the source of their host-to-device copies in prefill.

Segments are memfd files created by the coordinator (or a host agent, for its stages) and handed to children as inherited file
descriptors: they have no name in /dev/shm, so no exit path, not even SIGKILL of the coordinator,
leaves one behind; the memory is freed when the last process holding it exits.

Per layer and node the segment holds, for the node's E_n experts, the tensors of the layer's
`ExpertFormat` (for unquantized weights: w13 = [gate; up] as [E_n, 2I, H] and w2 as [E_n, H, I]).
The layout is a pure function of (family, nodes, format), so every process computes the same one.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .models.family import ExpertShape, ModelFamily

ALIGN = 4096


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertFormat:
    """How one expert's weights are stored. `kind` is "dense" (weights in `dtype`), "int8" or
    "int4" (see shared/quant.py for the quantized layouts)."""

    kind: str = "dense"
    dtype: torch.dtype = torch.float32
    group_size: int = 128

    def tensors(self, es: ExpertShape, n: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        H, I = es.hidden, es.inter
        if self.kind == "dense":
            t = {"w13": (self.dtype, (n, 2 * I, H)), "w2": (self.dtype, (n, H, I))}
        else:
            from .quant import quantized_tensors

            t = quantized_tensors(self, n, 2 * I, H, "w13") | quantized_tensors(self, n, H, I, "w2")
        if es.bias:
            t["b13"] = (torch.float32, (n, 2 * I))
            t["b2"] = (torch.float32, (n, H))
        return t

    def to_spec(self) -> dict:
        return {"kind": self.kind, "dtype": str(self.dtype).removeprefix("torch."), "group_size": self.group_size}

    @classmethod
    def from_spec(cls, d: dict) -> "ExpertFormat":
        return cls(d["kind"], getattr(torch, d["dtype"]), int(d["group_size"]))

    def describe(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.kind == "dense" else f"{self.kind}/g{self.group_size}"


def node_range(num_experts: int, nodes: int, node: int) -> tuple[int, int]:
    """Experts [a, b) of a layer placed on `node`: contiguous, as equal as possible."""
    return num_experts * node // nodes, num_experts * (node + 1) // nodes


@dataclass
class Entry:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class StoreLayout:
    """`layers` [a, b): only those layers' experts (a host of a multi-host pipeline holds its own
    stages' layers); None: every layer."""

    def __init__(self, family: ModelFamily, nodes: int, fmt: ExpertFormat, layers: tuple[int, int] | None = None):
        self.nodes, self.fmt = nodes, fmt
        a, b = layers or (0, family.num_layers)
        self.moe_layers = [i for i in range(a, b) if family.is_moe(i)]
        self.shapes = {i: family.experts(i) for i in self.moe_layers}
        # entries[node][(layer, name)]
        self.entries: list[dict[tuple[int, str], Entry]] = []
        self.sizes: list[int] = []
        for node in range(nodes):
            off, ent = 0, {}
            for layer in self.moe_layers:
                a, b = node_range(self.shapes[layer].num, nodes, node)
                for name, (dtype, shape) in fmt.tensors(self.shapes[layer], b - a).items():
                    e = Entry(off, dtype, shape)
                    ent[(layer, name)] = e
                    off = _align(off + e.nbytes)
            self.entries.append(ent)
            self.sizes.append(max(off, ALIGN))

    @classmethod
    def from_spec(cls, family: ModelFamily, store: dict) -> "StoreLayout":
        """The layout of a worker spec's store (coordinator/processes.py)."""
        return cls(family, store["nodes"], ExpertFormat.from_spec(store["format"]), store.get("layers"))

    def range(self, layer: int, node: int) -> tuple[int, int]:
        return node_range(self.shapes[layer].num, self.nodes, node)


def _huge_pages(m: mmap.mmap) -> None:
    """Ask for 2 MiB pages where the kernel gives them to shared memory (transparent_hugepage/
    shmem_enabled "advise" or "always"): the pool reads ~19 MB of experts per layer of a decode step
    from all over the store, and with 4 KiB pages that is ~4,600 pages per layer, far past what the
    TLB holds, so every page's first read also walks the page tables (worth 2-6% of decode on the
    lent hosts with "advise", session 34: not the pool's bound). Elsewhere a no-op."""
    if len(m) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass


def map_segment(fd: int, size: int) -> mmap.mmap:
    """A store segment mapped shared and writable, asking for 2 MiB pages (_huge_pages)."""
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    _huge_pages(m)
    return m


class ExpertStore:
    """Maps the segments given as file descriptors and exposes tensor views into them."""

    def __init__(self, layout: StoreLayout, fds: list[int]):
        if len(fds) != layout.nodes:
            raise ValueError(f"expert store needs {layout.nodes} segment fds, got {len(fds)}")
        self.layout = layout
        self._maps = [map_segment(fd, size) for fd, size in zip(fds, layout.sizes)]
        self._bytes = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]

    @staticmethod
    def create_segments(layout: StoreLayout) -> list[int]:
        """Coordinator side: one anonymous, inheritable memfd per node, sized for its experts."""
        fds = []
        for node, size in enumerate(layout.sizes):
            fd = os.memfd_create(f"krasis-experts-node{node}", 0)
            os.ftruncate(fd, size)
            os.set_inheritable(fd, True)
            fds.append(fd)
        return fds

    def seal(self) -> None:
        """This process's mapping of the store, read-only from here (mprotect): once filled, nothing
        writes it, and it outlives the process (coordinator/processes.py: KeptStores), so a stray
        write would carry into the groups after it; it faults in the writer instead."""
        libc = ctypes.CDLL(None, use_errno=True)
        for m, b in zip(self._maps, self._bytes):
            if len(m) and libc.mprotect(ctypes.c_void_p(b.data_ptr()), ctypes.c_size_t(len(m)), mmap.PROT_READ):
                raise OSError(ctypes.get_errno(), "mprotect of the expert store failed")

    def tensors(self, layer: int, node: int) -> dict[str, torch.Tensor]:
        out = {}
        for (lay, name), e in self.layout.entries[node].items():
            if lay == layer:
                out[name] = self._bytes[node][e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
        return out

    def segment(self, node: int) -> torch.Tensor:
        """The whole segment as bytes (for pinning it for DMA)."""
        return self._bytes[node]

    def nbytes(self) -> int:
        return sum(self.layout.sizes)


def format_expert(fmt: ExpertFormat, family: ModelFamily, get, layer: int, e: int) -> dict[str, torch.Tensor]:
    """Expert `e` of `layer`, read through `get(name) -> tensor`, as the tensors of `fmt` without
    the leading expert dimension (quantized here when `fmt` is INT4/INT8)."""
    w = family.load_expert(get, layer, e)
    w13 = torch.cat([w["gate"], w["up"]], dim=0)
    if fmt.kind == "dense":
        out = {"w13": w13.to(fmt.dtype), "w2": w["down"].to(fmt.dtype)}
    else:
        from .quant import quantized

        out = quantized(fmt, w13, "w13") | quantized(fmt, w["down"], "w2")
    if family.experts(layer).bias:
        out["b13"] = torch.cat([w["gate_bias"], w["up_bias"]]).float()
        out["b2"] = w["down_bias"].float()
    return out


def from_source(fmt: ExpertFormat, family: ModelFamily, get):
    """An expert writer for fill_node that formats experts from the checkpoint (16-bit parts, and
    what `convert` writes into a cache)."""

    def write(layer: int, e: int, dst: dict[str, torch.Tensor]) -> None:
        for name, t in format_expert(fmt, family, get, layer, e).items():
            dst[name].copy_(t)

    return write


def fill_node(store: ExpertStore, node: int, write, layers=None, on_layer=None, threads: int = 1) -> None:
    """Fill node `node`'s experts of every MoE layer (or of `layers`) one expert at a time through
    `write(layer, e, dst)`, dst being that expert's slots in the store (so resident memory stays at
    one expert per thread beyond the store). With `threads` > 1 a layer's experts are written by that
    many threads at once; `write` must then be thread-safe (a cache copy: positioned reads and
    crc32s, which release the GIL, so the fill scales with cores)."""
    layout = store.layout
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for layer in layout.moe_layers:
            if layers is not None and layer not in layers:
                continue
            a, b = layout.range(layer, node)
            dst = store.tensors(layer, node)
            jobs = [(layer, e, {name: t[local] for name, t in dst.items()}) for local, e in enumerate(range(a, b))]
            if pool is None:
                for job in jobs:
                    write(*job)
            else:
                for f in [pool.submit(write, *job) for job in jobs]:
                    f.result()  # the first failure, by expert order, is the one raised
            if on_layer is not None:
                on_layer(layer)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
