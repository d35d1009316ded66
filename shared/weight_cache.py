"""Weight cache files: what `krasis-coord convert` writes once and every later start reads.

One file per cache (routed experts in one ExpertFormat, or the INT8 dense weights). Layout:

    [0, 64)        prefix: magic "KRASISWC", format version (u32), reserved (u32), header offset,
                   header length, file size (u64 each), crc32 of the header, crc32 of the prefix
    [4096, ...)    tensor data, each tensor at a 64-byte aligned offset (so a mapping of the file
                   gives aligned tensor views)
    header         JSON at the end: {version, kind, options, sources, tensors}
                   sources: [{file, size, mtime_ns}] of config.json and every safetensors shard
                   tensors: {name: [dtype, shape, offset, nbytes, crc32]}

A cache is written under a temporary name and renamed when complete, so a crash never leaves a
file that looks finished. Opening checks the prefix, the file size (truncation) and the header
checksum; a file whose version, options or sources differ from what is asked is stale (rebuilt);
one that fails a check is corrupt and refused with its name. Tensor data is verified against its
crc32 as it is read, streaming: nothing holds a second copy of the weights to check them.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

MAGIC = b"KRASISWC"
VERSION = 1
PREFIX = struct.Struct("<8sIIQQQII")
DATA_START = 4096
ALIGN = 64
CHUNK = 64 << 20  # bytes read at a time when verifying a whole file


class CacheError(ValueError):
    """A cache file that must not be used; the text names the file."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def fingerprint(files: list[Path]) -> list[dict]:
    """What identifies the source weights: each file's name, size and modification time."""
    out = []
    for f in sorted(files):
        st = os.stat(f)
        out.append({"file": Path(f).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class CacheWriter:
    """Streams tensors into a new cache file; `close()` writes the header and renames it into place.
    Used as a context manager: on an exception the partial file is removed.

    `add` appends a tensor. A converter running on many threads instead `reserve`s every tensor
    first (so the layout, and with it the file, is the same whatever order the threads finish in)
    and then fills each with `write_at` from any thread: the writes are positioned (pwrite), so
    they neither share a file position nor hold the GIL."""

    def __init__(self, path: Path, kind: str, options: dict, sources: list[dict]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.off = DATA_START
        self.header = {"version": VERSION, "kind": kind, "options": options, "sources": sources, "tensors": {}}
        self._unwritten: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, name: str, dtype: torch.dtype, shape) -> None:
        nbytes = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
        self.header["tensors"][name] = [str(dtype).removeprefix("torch."), list(shape), self.off, nbytes, None]
        self._unwritten.add(name)
        self.off += nbytes + (-(self.off + nbytes) % ALIGN)

    def write_at(self, name: str, t: torch.Tensor) -> None:
        """Fill reserved tensor `name` (thread-safe)."""
        entry = self.header["tensors"][name]
        t = t.detach().cpu().contiguous()
        if [str(t.dtype).removeprefix("torch."), list(t.shape)] != entry[:2]:
            raise ValueError(f"cache tensor {name}: got {t.dtype} {list(t.shape)}, reserved {entry[:2]}")
        data = memoryview(_as_bytes(t).numpy())
        crc = zlib.crc32(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], entry[2] + done)
        with self._lock:
            entry[4] = crc
            self._unwritten.discard(name)

    def add(self, name: str, t: torch.Tensor) -> None:
        self.reserve(name, t.dtype, t.shape)
        self.write_at(name, t)

    def close(self) -> None:
        if self._unwritten:
            raise ValueError(f"cache {self.path}: {len(self._unwritten)} reserved tensors were never written, "
                             f"e.g. {next(iter(self._unwritten))}")
        header = json.dumps(self.header, separators=(",", ":")).encode()
        os.pwrite(self.fd, header, self.off)
        size = self.off + len(header)
        head = PREFIX.pack(MAGIC, VERSION, 0, self.off, len(header), size, zlib.crc32(header), 0)
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        os.pwrite(self.fd, head, 0)
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            os.close(self.fd)
            self.tmp.unlink(missing_ok=True)


class WeightCache:
    """An opened cache file whose prefix and header passed their checks."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CacheError(f"cache {self.path} cannot be opened: {e.strerror}") from None
        try:
            self.header = self._read_header()
        except BaseException:
            os.close(self.fd)
            raise
        self.entries = self.header.get("tensors", {})

    def _bad(self, why: str) -> CacheError:
        return CacheError(f"cache {self.path} is {why}; rebuild it with --rebuild")

    def _read_header(self) -> dict:
        actual = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, PREFIX.size, 0)
        if len(raw) < PREFIX.size:
            raise self._bad(f"truncated ({actual} bytes)")
        magic, version, _, hoff, hlen, size, hcrc, pcrc = PREFIX.unpack(raw)
        if magic != MAGIC:
            raise self._bad("not a krasis cache file (bad magic)")
        if zlib.crc32(raw[:-4]) != pcrc:
            raise self._bad("corrupt (prefix checksum mismatch)")
        if actual < size:
            raise self._bad(f"truncated ({actual} of {size} bytes)")
        if actual > size:
            raise self._bad(f"corrupt ({actual} bytes, {size} expected)")
        if version != VERSION:
            return {"version": version}
        header = os.pread(self.fd, hlen, hoff)
        if zlib.crc32(header) != hcrc:
            raise self._bad("corrupt (header checksum mismatch)")
        return json.loads(header)

    def stale_reason(self, kind: str, options: dict, sources: list[dict]) -> str | None:
        """Why this cache does not hold what is asked for, or None when it does."""
        h = self.header
        if h["version"] != VERSION:
            return f"cache format version {h['version']}, this build writes {VERSION}"
        if h["kind"] != kind or h["options"] != options:
            return f"built with options {h['options']}"
        if h["sources"] != sources:
            old = {s["file"]: s for s in h["sources"]}
            for s in sources:
                if old.get(s["file"]) != s:
                    return f"source {s['file']} changed"
            return "source files changed"
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries.values())

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Copy tensor `name` into `dst` (contiguous, same byte size), verifying its checksum on the
        bytes as they landed."""
        dtype, shape, off, nbytes, crc = self.entries[name]
        buf = _as_bytes(dst)
        if buf.numel() != nbytes:
            raise self._bad(f"inconsistent (tensor {name} has {nbytes} bytes, {buf.numel()} expected)")
        mv = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self.fd, [mv[done:]], off + done)
            if n <= 0:
                raise self._bad(f"truncated (tensor {name})")
            done += n
        if zlib.crc32(mv) != crc:
            raise self._bad(f"corrupt (tensor {name} fails its checksum)")

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, *_ = self.entries[name]
        t = torch.empty(shape, dtype=_dtype(dtype))
        self.read_into(name, t)
        return t

    def verify(self, progress=None) -> None:
        """Check every tensor's checksum, reading the file in bounded chunks."""
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        for name, (_, _, off, nbytes, crc) in self.entries.items():
            got, done = 0, 0
            while done < nbytes:
                n = os.preadv(self.fd, [mv[: min(CHUNK, nbytes - done)]], off + done)
                if n <= 0:
                    raise self._bad(f"truncated (tensor {name})")
                got = zlib.crc32(mv[:n], got)
                done += n
            if got != crc:
                raise self._bad(f"corrupt (tensor {name} fails its checksum)")
            if progress is not None:
                progress(nbytes)

    def expert_writer(self):
        """An expert writer for shared/expert_store.py:fill_node: copies (never re-quantizes)."""

        def write(layer: int, e: int, dst: dict[str, torch.Tensor]) -> None:
            for name, t in dst.items():
                self.read_into(expert_key(layer, e, name), t)

        return write

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "WeightCache":
        return self

    def __exit__(self, *_):
        self.close()


def expert_key(layer: int, e: int, name: str) -> str:
    return f"{layer}.{e}.{name}"


@contextmanager
def store_writer(store_spec: dict, fmt, family, model_dir, threads: int):
    """The expert writer that fills a store described by a worker spec (coordinator/processes.py),
    and the threads fill_node may run it on: a copy from its cache file, on `threads` (its reads are
    positioned, and the copy's time is reads and crc32s, outside the GIL), or, for an unquantized
    store, the experts read from the checkpoint (or from the spec's GGUF file) on one thread, the
    sources not being made for concurrent use."""
    if store_spec.get("cache"):
        with WeightCache(store_spec["cache"]) as cache:
            yield cache.expert_writer(), threads
    else:
        from .expert_store import from_source
        from .weights import open_source

        yield from_source(fmt, family, open_source(model_dir, store_spec.get("gguf")).get), 1
