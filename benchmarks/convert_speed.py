"""Expert-cache conversion speed from GGUF blocks against the same shape from BF16 shards (issue 14,
item 6: GGUF at no less than half the BF16 rate per source byte, and >= 1 GB/s on 16 cores).

    python benchmarks/convert_speed.py [--layers 4] [--experts 128] [--types Q4_0,Q8_0,MXFP4]
                                       [--bits 4] [--group-size 32] [--dir DIR] [--json FILE]

Writes, seeded: a Hugging Face folder of the Qwen3-30B-A3B shape with --layers layers and
--experts experts (`krasis-coord synth`: BF16 shards) and, with benchmarks/qwen3_gguf.py, one GGUF
of the same shape per --types entry. Each is then converted into the --bits/--group-size expert
cache by the code `convert` runs (coordinator/convert.py:prepare), timed from the call to the
renamed, fsync'ed cache file. The GGUF header is parsed before the clock starts (a process parses
it once; it holds the 150K-entry vocabulary's strings and costs seconds whatever the experts), and
the block kernel is compiled (or loaded from numba's cache) first: a process pays either once.
Rates are routed-expert bytes of the source per second. The files are written first and read back
while still in the page cache, so this measures conversion, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qwen3_gguf  # noqa: E402

from krasis.coordinator.convert import prepare  # noqa: E402
from krasis.coordinator.processes import RuntimeOptions  # noqa: E402
from krasis.coordinator.synth import synth  # noqa: E402
from krasis.shared import gguf_quant as gq  # noqa: E402
from krasis.shared.weights import load_family  # noqa: E402


def timed_conversion(model: Path, bits: int, group: int, cache: Path) -> float:
    family = load_family(model)  # parses (and keeps) a GGUF's header
    opts = RuntimeOptions(cpu_bits=bits, group_size=group, cache_dir=str(cache))
    t = time.perf_counter()
    prepare(model, family, opts, log=lambda _: None)
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=qwen3_gguf.SHAPE["num_experts"])
    p.add_argument("--types", default="Q4_0,Q8_0,MXFP4")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dir", help="where to write the models (default: a temporary folder, removed after)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="convert_speed-"))
    root.mkdir(parents=True, exist_ok=True)
    shape = qwen3_gguf.SHAPE | {"num_hidden_layers": a.layers, "num_experts": a.experts, "vocab_size": 1000,
                                "num_experts_per_tok": min(a.experts, qwen3_gguf.SHAPE["num_experts_per_tok"])}
    H, I = shape["hidden_size"], shape["moe_intermediate_size"]
    rows = []
    try:
        hf = Path(synth("qwen3-30b-a3b", root / "bf16", a.layers, a.experts, 1000, 0))
        bf16_bytes = a.layers * a.experts * 3 * H * I * 2
        secs = timed_conversion(hf, a.bits, a.group_size, root / "cache-bf16")
        rows.append({"source": "BF16 shards", "bytes": bf16_bytes, "seconds": secs})
        for qtype in a.types.split(","):
            warm = np.zeros((1, gq.BLOCK_BYTES[qtype]), np.uint8)
            gq.convert(warm, qtype, a.bits, a.group_size)
            path = root / f"{qtype}.gguf"
            written = qwen3_gguf.write(path, shape, qtype)
            secs = timed_conversion(path, a.bits, a.group_size, root / f"cache-{qtype}")
            rows.append({"source": f"GGUF {qtype}", "bytes": written["expert_bytes"], "seconds": secs})
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["bytes"] / rows[0]["seconds"]
    for r in rows:
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["vs_bf16"] = r["bytes"] / r["seconds"] / base
    print(f"\nExpert conversion to int{a.bits}/g{a.group_size}: {a.layers} layers x {a.experts} experts of "
          f"hidden {H}, expert intermediate {I}; {os.cpu_count()} cores, {numba.get_num_threads()} numba threads\n")
    print("| source | expert bytes | seconds | GB/s of source | per byte vs BF16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['bytes'] / 1e9:.2f} GB | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['vs_bf16']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"bits": a.bits, "group_size": a.group_size, "layers": a.layers,
                                            "experts": a.experts, "cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
