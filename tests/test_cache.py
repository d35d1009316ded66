"""Weight caches (shared/weight_cache.py, coordinator/convert.py): reuse, staleness, corruption."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import torch

import tiny_models as tm
from krasis.coordinator.convert import prepare
from krasis.coordinator.processes import RuntimeOptions
from krasis.shared import weight_cache as wc
from krasis.shared.expert_store import ExpertStore, StoreLayout, fill_node, from_source
from krasis.shared.weights import SafetensorsSource, load_family

QUANT = ("--cpu-bits", "4", "--gpu-bits", "4", "--attn-bits", "8", "--group-size", "16")


def _write(path, tensors, options=None):
    with wc.CacheWriter(path, "test", options or {"bits": 4}, [{"file": "x", "size": 1, "mtime_ns": 2}]) as w:
        for name, t in tensors.items():
            w.add(name, t)


def test_roundtrip_and_streaming_verify(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randint(-128, 127, (3, 33), generator=gen, dtype=torch.int8),
        "c": torch.randn(100, generator=gen),
    }
    path = tmp_path / "t.kc"
    _write(path, tensors)
    assert not list(tmp_path.glob("*.tmp"))
    with wc.WeightCache(path) as c:
        for name, t in tensors.items():
            assert torch.equal(c.tensor(name), t)
        seen = []
        c.verify(seen.append)
        assert sum(seen) == c.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        assert c.stale_reason("test", {"bits": 4}, [{"file": "x", "size": 1, "mtime_ns": 2}]) is None
        assert "options" in c.stale_reason("test", {"bits": 8}, [{"file": "x", "size": 1, "mtime_ns": 2}])
        assert "source x changed" in c.stale_reason("test", {"bits": 4}, [{"file": "x", "size": 1, "mtime_ns": 3}])
        off = c.entries["b"][2]
    # an aborted write leaves nothing behind
    with pytest.raises(RuntimeError):
        with wc.CacheWriter(tmp_path / "u.kc", "test", {}, []) as w:
            w.add("a", tensors["a"])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.kc"]

    # a flipped byte in tensor data: found when that tensor is read and by a full verify
    data = bytearray(path.read_bytes())
    data[off + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with wc.WeightCache(path) as c:
        assert torch.equal(c.tensor("a"), tensors["a"])
        with pytest.raises(wc.CacheError, match=f"{path}.*tensor b fails its checksum"):
            c.tensor("b")
        with pytest.raises(wc.CacheError, match=str(path)):
            c.verify()

    # a flipped byte in the header, in the prefix, and a truncated file: refused on open
    _write(path, tensors)
    raw = path.read_bytes()
    hoff = struct.unpack_from("<Q", raw, 16)[0]
    for where, what in ((hoff + 10, "header checksum"), (20, "prefix checksum")):
        bad = bytearray(raw)
        bad[where] ^= 1
        path.write_bytes(bytes(bad))
        with pytest.raises(wc.CacheError, match=f"{path}.*{what}"):
            wc.WeightCache(path)
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(wc.CacheError, match=f"{path} is truncated"):
        wc.WeightCache(path)


def test_version_change_is_stale(tmp_path, monkeypatch):
    path = tmp_path / "t.kc"
    _write(path, {"a": torch.ones(3)})
    monkeypatch.setattr(wc, "VERSION", wc.VERSION + 1)
    with wc.WeightCache(path) as c:
        assert "version" in c.stale_reason("test", {"bits": 4}, [{"file": "x", "size": 1, "mtime_ns": 2}])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("cache") / "qwen3", "qwen3")


@pytest.mark.parametrize("bits, threads", [(4, 1), (8, 1), (4, 3)])
def test_store_from_cache_equals_store_from_checkpoint(model, tmp_path, bits, threads):
    """Filling the shared store by copying the cache gives the very bytes that formatting the
    checkpoint's experts gives (the cache adds nothing and loses nothing), on one thread or several
    (each expert lands in its own slots)."""
    family = load_family(model)
    opts = RuntimeOptions(cpu_bits=bits, gpu_bits=bits, group_size=16, cache_dir=str(tmp_path))
    caches = prepare(model, family, opts, log=lambda m: None)
    layout = StoreLayout(family, 2, caches.cpu_fmt)
    stores = [ExpertStore(layout, ExpertStore.create_segments(layout)) for _ in range(2)]
    source = SafetensorsSource(model)
    with wc.WeightCache(caches.cpu) as cache:
        for node in range(2):
            fill_node(stores[0], node, cache.expert_writer(), threads=threads)
            fill_node(stores[1], node, from_source(caches.cpu_fmt, family, source.get))
    for node in range(2):
        assert torch.equal(stores[0].segment(node), stores[1].segment(node))
    assert stores[0].segment(0).any()


def test_threaded_fill_names_a_corrupt_tensor(model, tmp_path):
    """A flipped byte in one expert's tensor fails the fill on several threads as on one, naming
    that tensor, and no later layer is reported done."""
    family = load_family(model)
    opts = RuntimeOptions(cpu_bits=4, gpu_bits=4, group_size=16, cache_dir=str(tmp_path))
    caches = prepare(model, family, opts, log=lambda m: None)
    layout = StoreLayout(family, 1, caches.cpu_fmt)
    store = ExpertStore(layout, ExpertStore.create_segments(layout))
    layer = layout.moe_layers[1]
    name = wc.expert_key(layer, 2, "w13.q")
    with wc.WeightCache(caches.cpu) as cache:
        off, nbytes = cache.entries[name][2:4]
    with open(caches.cpu, "r+b") as f:
        f.seek(off + nbytes // 2)
        byte = f.read(1)
        f.seek(off + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    done = []
    with wc.WeightCache(caches.cpu) as cache, pytest.raises(wc.CacheError, match=f"tensor {name} fails its checksum"):
        fill_node(store, 0, cache.expert_writer(), on_layer=done.append, threads=3)
    assert done == layout.moe_layers[:1]


def _stderr_cache_lines(p):
    return [ln for ln in p.stderr.splitlines() if ln.startswith("cache:")]


def test_cli_reuse_stale_corrupt_truncated_rebuild(model):
    cache = model / ".krasis_cache"
    experts, dense = cache / "experts-int4-g16.kc", cache / "dense-int8.kc"
    first = tm.krasis("convert", model, *QUANT)
    assert _stderr_cache_lines(first) == [f"cache: building {experts} (missing)", f"cache: building {dense} (missing)"]

    # the second start reuses both (generate runs the model from them)
    p = tm.krasis("generate", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--dtype", "float32", "--json", *QUANT)
    assert _stderr_cache_lines(p) == [f"cache: reusing {experts}", f"cache: reusing {dense}"]
    tokens = json.loads(p.stdout.strip().splitlines()[-1])["token_ids"]
    assert len(tokens) == 4

    # a source file that changed makes both stale
    st = next(model.glob("*.safetensors"))
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    lines = _stderr_cache_lines(tm.krasis("convert", model, *QUANT))
    assert lines == [f"cache: building {experts} (source {st.name} changed)", f"cache: building {dense} (source {st.name} changed)"]

    # a flipped byte in an expert's data: refused by convert (full verify) and by a run (the CPU
    # pool verifies what it copies), naming the file, never used
    header = _header(experts)
    off = header["tensors"]["1.3.w2.q"][2]
    raw = bytearray(experts.read_bytes())
    raw[off + 5] ^= 0x01
    experts.write_bytes(bytes(raw))
    p = tm.krasis("convert", model, *QUANT, check=False)
    assert p.returncode == 1 and f"{experts} is corrupt (tensor 1.3.w2.q fails its checksum)" in p.stderr
    p = tm.krasis("generate", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *QUANT, check=False)
    assert p.returncode == 1 and f"{experts} is corrupt" in p.stderr.splitlines()[-1]

    # --rebuild replaces it
    lines = _stderr_cache_lines(tm.krasis("convert", model, *QUANT, "--rebuild"))
    assert lines == [f"cache: building {experts} (--rebuild)", f"cache: building {dense} (--rebuild)"]

    # a truncated file is refused on open, naming the file
    size = dense.stat().st_size
    os.truncate(dense, size - 1000)
    p = tm.krasis("generate", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *QUANT, check=False)
    assert p.returncode == 1 and f"{dense} is truncated ({size - 1000} of {size} bytes)" in p.stderr.splitlines()[-1]
    tm.krasis("convert", model, *QUANT, "--rebuild")
    assert tm.generate_json(model, [1, 2, 3], 4, *QUANT)["token_ids"] == tokens


def _header(path) -> dict:
    raw = path.read_bytes()
    _, _, _, hoff, hlen, *_ = wc.PREFIX.unpack_from(raw)
    header = raw[hoff : hoff + hlen]
    assert zlib.crc32(header) == wc.PREFIX.unpack_from(raw)[6]
    return json.loads(header)


def test_bad_group_size_is_one_line_error(model, tmp_path):
    p = tm.krasis("convert", model, "--cpu-bits", "8", "--group-size", "24", "--cache-dir", tmp_path, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "error: input dimension 64 is not a multiple of the quantization group size 24"
