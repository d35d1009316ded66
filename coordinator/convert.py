"""Building the weight caches (docs/quantization.md): `krasis-coord convert`, and what `generate`,
`serve` and `bench` do on first use.

    expert caches   one per quantized ExpertFormat asked for by --cpu-bits / --gpu-bits (one file
                    when both ask for the same format): every routed expert, as the store holds it
    dense cache     with --attn-bits 8: attention projections, shared experts, dense MLP layers and
                    an untied lm_head, INT8 per output channel
16 bits means unquantized: that part is read from the checkpoint and needs no cache.

Routed experts are converted on every core (threads; numpy, torch, zlib and pwrite release the GIL),
a few experts per task, layer by layer: a safetensors checkpoint is reopened per layer, so the shards
mapped for the previous layers are unmapped and the resident set stays near a layer's weights; a GGUF
hands over its blocks, taken as they are where their grid is ours (coordinator/gguf_blocks.py).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..shared.expert_store import ExpertFormat, format_expert
from ..shared.models.family import ModelFamily
from ..shared.quant import QuantLinear, dense_names
from ..shared.weight_cache import CacheWriter, WeightCache, expert_key, fingerprint
from ..shared.weights import open_source
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


# Weights per conversion task: one expert of Qwen3-30B-A3B (4.7 M), a few of a small model; small
# enough that the threads' float temporaries stay a few hundred MB, large enough that numpy's and
# torch's per-call costs vanish.
TASK_WEIGHTS = 1 << 23


def conversion_threads() -> int:
    return len(os.sched_getaffinity(0))


@contextmanager
def _torch_threads(n: int):
    """Each conversion thread runs its torch ops on one core: the threads are the parallelism, and
    torch's own pool under every one of them would oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_experts(w: CacheWriter, model_dir: Path, gguf: str | None, family: ModelFamily, fmt: ExpertFormat,
                   layers: list[int], threads: int | None = None) -> None:
    """Every routed expert of `layers`, converted on `threads` threads (default: every core this
    process may run on) into tensors reserved up front (reserve_experts)."""
    reserve_experts(w, family, fmt, layers)
    run_expert_tasks(_expert_tasks(w, model_dir, gguf, family, fmt, layers), sum(family.experts(layer).num for layer in layers),
                     f"converting experts to {fmt.describe()}", threads)


def reserve_experts(w: CacheWriter, family: ModelFamily, fmt: ExpertFormat, layers: list[int]) -> None:
    """Reserve every expert tensor of `layers` in the cache, so the file does not depend on the order
    the threads that fill them finish in."""
    for layer in layers:
        es = family.experts(layer)
        for e in range(es.num):
            for name, (dtype, shape) in fmt.tensors(es, 1).items():
                w.reserve(expert_key(layer, e, name), dtype, shape[1:])


def run_expert_tasks(tasks, total: int, desc: str, threads: int | None = None) -> None:
    """Run `tasks` (callables that fill reserved experts and return how many) on `threads` threads
    (default: every core this process may run on), each with one torch thread. At most two tasks per
    thread are in flight, which bounds the memory: `tasks` may be a generator that reads a layer's
    source only when its tasks are wanted."""
    threads = threads or conversion_threads()
    with (tqdm(total=total, unit="expert", desc=desc, disable=None, leave=False) as bar, _torch_threads(1),
          ThreadPoolExecutor(threads) as pool):
        pending: set = set()
        try:
            for task in tasks:
                pending.add(pool.submit(task))
                if len(pending) >= 2 * threads:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(sum(f.result() for f in done))
            for f in as_completed(pending):
                bar.update(f.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _expert_tasks(w: CacheWriter, model_dir: Path, gguf: str | None, family: ModelFamily, fmt: ExpertFormat,
                  layers: list[int]):
    """The conversion as tasks, layer by layer. A GGUF (one mapped file, parsed once) hands over its
    stacked experts' blocks, many experts per task (coordinator/gguf_blocks.py); a safetensors
    checkpoint is read one expert per task, reopened per layer (see the module docstring)."""
    src = open_source(model_dir, gguf)
    stacked = getattr(src, "routed_experts", None)
    for layer in layers:
        es = family.experts(layer)
        if stacked is not None and all(stacked(layer, p) is not None for p in ("gate", "up", "down")):
            n = max(1, TASK_WEIGHTS // (3 * es.hidden * es.inter))
            for e0 in range(0, es.num, n):
                yield functools.partial(_stacked_task, w, stacked, es, fmt, layer, e0, min(e0 + n, es.num))
            continue
        if stacked is None and layer != layers[0]:
            src = open_source(model_dir, gguf)
        fam = copy.copy(family)  # load_expert may keep a layer's tensors on the family (gpt-oss): one per layer
        for e in range(es.num):
            yield functools.partial(expert_task, w, fam, src.get, fmt, layer, e)


def expert_task(w: CacheWriter, family: ModelFamily, get, fmt: ExpertFormat, layer: int, e: int) -> int:
    """Expert e of a layer from `get` (name -> tensor, as a checkpoint holds it) into its reserved tensors."""
    for name, t in format_expert(fmt, family, get, layer, e).items():
        w.write_at(expert_key(layer, e, name), t)
    return 1


def _stacked_task(w: CacheWriter, stacked, es, fmt: ExpertFormat, layer: int, e0: int, e1: int) -> int:
    """Experts [e0, e1) of a layer from a GGUF's stacked tensors: gate and up rows make w13, as in
    format_expert (quantization is per row, so quantizing them apart changes nothing)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from .gguf_blocks import convert

    bits = int(fmt.kind.removeprefix("int"))
    part = {}
    for p, (rows, cols) in (("gate", (es.inter, es.hidden)), ("up", (es.inter, es.hidden)), ("down", (es.hidden, es.inter))):
        data, qtype = stacked(layer, p)
        part[p] = convert(data[e0:e1], qtype, bits, fmt.group_size, rows, cols)
    out = {"w13.q": torch.cat([part["gate"][0], part["up"][0]], dim=1), "w13.s": torch.cat([part["gate"][1], part["up"][1]], dim=1),
           "w2.q": part["down"][0], "w2.s": part["down"][1]}
    if es.bias:
        bias = {}
        for p in ("gate", "up", "down"):
            data, qtype = stacked(layer, p, "bias")
            bias[p] = torch.from_numpy(np.array(dequantize(np.asarray(data[e0:e1]), GGMLQuantizationType[qtype]),
                                                dtype=np.float32)).reshape(e1 - e0, -1)
        out["b13"], out["b2"] = torch.cat([bias["gate"], bias["up"]], dim=1), bias["down"]
    for i, e in enumerate(range(e0, e1)):
        for name, t in out.items():
            w.write_at(expert_key(layer, e, name), t[i])
    return e1 - e0


def _write_dense(w: CacheWriter, model_dir: Path, gguf: str | None, family: ModelFamily) -> None:
    for src, names in _per_layer(model_dir, gguf, dense_names(family), "converting dense weights to int8"):
        for n in names:
            q = QuantLinear.quantize(src.get(n))
            w.add(n + ".q", q.q)
            w.add(n + ".s", q.scale)
