"""Building the weight caches (docs/quantization.md): `krasis-coord convert`, and what `generate`,
`serve` and `bench` do on first use.

    expert caches   one per quantized ExpertFormat asked for by --cpu-bits / --gpu-bits (one file
                    when both ask for the same format): every routed expert, as the store holds it
    dense cache     with --attn-bits 8: attention projections, shared experts, dense MLP layers and
                    an untied lm_head, INT8 per output channel
16 bits means unquantized: that part is read from the checkpoint and needs no cache.

Conversion streams one layer at a time: the checkpoint is reopened per layer, so the shards mapped
for the previous layer are unmapped and the resident set stays near one layer's weights (from a
GGUF file, two layers' output: the one being written and the next, converted meanwhile).
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..shared.expert_store import ExpertFormat, format_expert
from ..shared.models.family import ModelFamily
from ..shared.quant import QuantLinear
from ..shared.weight_cache import CacheWriter, WeightCache, checksum, expert_key, fingerprint
from ..shared.weights import is_gguf, open_source
from .processes import RuntimeOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Caches:
    """The formats the run uses and the cache file behind each (None: read from the checkpoint)."""

    cpu_fmt: ExpertFormat
    gpu_fmt: ExpertFormat
    cpu: Path | None
    gpu: Path | None
    dense: Path | None


def expert_format(bits: int, dtype: torch.dtype, group_size: int) -> ExpertFormat:
    return ExpertFormat("dense", dtype) if bits == 16 else ExpertFormat(f"int{bits}", dtype, group_size)


def cache_dir(model, override: str | None = None) -> Path:
    """--cache-dir, else .krasis_cache beside the weights (in the model folder; next to a .gguf file,
    in a subfolder named after it, since one folder may hold several), else (not writable) under
    ~/.cache/krasis, tagged with the path so same-named models do not share it."""
    if override:
        return Path(override)
    model = Path(model).resolve()
    folder, sub = (model.parent, model.name) if model.is_file() else (model, "")
    if os.access(folder, os.W_OK):
        return folder / ".krasis_cache" / sub
    tag = hashlib.sha1(str(model).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "krasis" / f"{model.name}-{tag}"


def dense_names(family: ModelFamily) -> list[list[str]]:
    """Names of the dense weights --attn-bits 8 quantizes, grouped per layer (lm_head last, unless
    tied to the embedding, which stays unquantized): the 2-D projection weights (`*_proj*.weight`).
    Routers (`mlp.gate`), norms and embeddings are not projections, so they stay as they are."""
    out = [
        [n for n, shape in family.layer_tensors(i).items() if "_proj" in n and n.endswith(".weight") and len(shape) == 2]
        for i in range(family.num_layers)
    ]
    if not family.tie_word_embeddings:
        out.append(["lm_head.weight"])
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(model_dir, family: ModelFamily, opts: RuntimeOptions, verify: bool = False, log=_log) -> Caches:
    """Make sure every cache the options need exists and is current: reuse, build, or (corrupt,
    without --rebuild) refuse with CacheError. With `verify`, reused caches are checked in full."""
    model_dir = Path(model_dir)
    dtype = DTYPES[opts.dtype]
    cpu_fmt = expert_format(opts.cpu_bits, dtype, opts.group_size)
    gpu_fmt = expert_format(opts.gpu_bits, dtype, opts.group_size)
    moe_layers = [i for i in range(family.num_layers) if family.is_moe(i)]
    for fmt in {cpu_fmt, gpu_fmt}:
        for layer in moe_layers:  # raises QuantError when the group size does not divide K
            fmt.tensors(family.experts(layer), 1)
    source = open_source(model_dir, opts.gguf)
    # The routed experts must be in the checkpoint only where something reads them there: a 16-bit
    # expert format, or a cache still to build. A folder may ship them only as a current cache
    # (`synth --expert-bits`, for shapes too large to write in BF16). A --gguf file is there for its
    # experts, so they are checked with the rest at once.
    source.check(family.expected_tensors(routed=bool(opts.gguf)))
    check_routed = (lambda: None) if opts.gguf else (lambda: source.check(family.expected_tensors(dense=False)))
    need_experts = [f for f in dict.fromkeys([cpu_fmt, gpu_fmt]) if f.kind != "dense" and moe_layers]
    if moe_layers and "dense" in (cpu_fmt.kind, gpu_fmt.kind):
        check_routed()
    if not need_experts and opts.attn_bits == 16:
        return Caches(cpu_fmt, gpu_fmt, None, None, None)
    sources = fingerprint(source.source_files())
    folder = cache_dir(model_dir, opts.cache_dir)
    paths: dict[ExpertFormat, Path] = {}
    for fmt in need_experts:
        path, options = expert_cache(folder, fmt)
        _ensure(path, "experts", options, sources, opts.rebuild, verify, log,
                lambda w, fmt=fmt: (check_routed(), _write_experts(w, model_dir, opts.gguf, family, fmt, moe_layers)))
        paths[fmt] = path
    dense = None
    if opts.attn_bits == 8:
        dense = folder / "dense-int8.kc"
        options = {"bits": 8, "group_size": "row", "scale_dtype": "bfloat16"}
        _ensure(dense, "dense", options, sources, opts.rebuild, verify, log,
                lambda w: _write_dense(w, model_dir, opts.gguf, family))
    return Caches(cpu_fmt, gpu_fmt, paths.get(cpu_fmt), paths.get(gpu_fmt), dense)


def expert_cache(folder: Path, fmt: ExpertFormat) -> tuple[Path, dict]:
    """The file of an expert cache of `fmt` and the options its header records."""
    options = {"bits": int(fmt.kind[3:]), "group_size": fmt.group_size, "scale_dtype": "bfloat16"}
    return folder / f"experts-{fmt.kind}-g{fmt.group_size}.kc", options


def _ensure(path: Path, kind: str, options: dict, sources: list[dict], rebuild: bool, verify: bool, log, build) -> None:
    reason = "missing"
    if path.exists():
        if rebuild:
            reason = "--rebuild"
        else:
            with WeightCache(path) as cache:
                reason = cache.stale_reason(kind, options, sources)
                if reason is None:
                    log(f"cache: reusing {path}")
                    if verify:
                        with tqdm(total=cache.nbytes(), unit="B", unit_scale=True, desc=f"verifying {path.name}",
                                  disable=None, leave=False) as bar:
                            cache.verify(bar.update)
                    return
    log(f"cache: building {path} ({reason})")
    with CacheWriter(path, kind, options, sources) as w:
        build(w)


def _per_layer(model_dir: Path, gguf: str | None, groups: list, desc: str):
    """(source, group) per layer, with a fresh view of the checkpoint each time (see the module
    docstring: this is what bounds the resident set)."""
    for g in tqdm(groups, desc=desc, unit="layer", disable=None, leave=False):
        src = open_source(model_dir, gguf)
        yield src, g


def _write_experts(w: CacheWriter, model_dir: Path, gguf: str | None, family: ModelFamily, fmt: ExpertFormat,
                   layers: list[int]) -> None:
    """From a GGUF file every core works: a layer's experts are converted in one compiled pass from
    their blocks (source.quantized_experts) or formatted expert by expert on a thread pool, their
    checksums are computed on the pool, and the next layer is converted while this one is written.
    Safetensors experts are formatted one at a time in this thread (torch spreads each over the
    cores), so the resident set stays at one layer of the checkpoint (tests/test_memory.py)."""
    from_gguf = bool(gguf) or is_gguf(model_dir)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:

        def layer_tensors(src, layer):
            """(cache name, tensor) of every expert of the layer, as they are made."""
            n = family.experts(layer).num
            stacked = src.quantized_experts(layer, fmt) if from_gguf else None
            if stacked is not None:
                experts = ({name: t[e] for name, t in stacked.items()} for e in range(n))
            else:
                experts = (pool.map if from_gguf else map)(lambda e: format_expert(fmt, family, src.get, layer, e), range(n))
            for e, ts in enumerate(experts):
                for name, t in ts.items():
                    yield expert_key(layer, e, name), t

        sources = _per_layer(model_dir, gguf, layers, f"converting experts to {fmt.describe()}")
        if not from_gguf:
            for src, layer in sources:
                for key, t in layer_tensors(src, layer):
                    w.add(key, t)
            return
        for tensors in _one_ahead(lambda item: list(layer_tensors(*item)), sources):
            for (key, t), crc in zip(tensors, pool.map(checksum, [t for _, t in tensors])):
                w.add(key, t, crc)


def _one_ahead(fn, items):
    """fn(item) for each item, in order, with fn of the next item running while the caller uses the
    current result (at most two results exist at once)."""
    with ThreadPoolExecutor(1) as ahead:
        pending = None
        for item in items:
            nxt = ahead.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def _write_dense(w: CacheWriter, model_dir: Path, gguf: str | None, family: ModelFamily) -> None:
    for src, names in _per_layer(model_dir, gguf, dense_names(family), "converting dense weights to int8"):
        for n in names:
            q = QuantLinear.quantize(src.get(n))
            w.add(n + ".q", q.q)
            w.add(n + ".s", q.scale)
