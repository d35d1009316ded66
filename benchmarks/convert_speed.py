"""How fast the routed experts convert into our INT4/INT8 cache from a GGUF, against the same shape
from BF16 safetensors shards (issue 14, item 6: at least half the BF16 rate per source byte, and at
least 1 GB/s of source on 16 cores).

    python benchmarks/convert_speed.py --shape qwen3-30b-a3b --layers 4 --types Q4_0,Q8_0,MXFP4

writes, under --dir, a seeded random GGUF per expert type (synth_gguf.py) and a BF16 folder
(`krasis-coord synth`) of that shape, converts each with what `convert` runs (coordinator/convert.py:
prepare, --rebuild), and prints GB/s of source (the experts' bytes in the file) for each, and each
GGUF rate's ratio to the BF16 one. Source files are written once and reused; the page cache is
warmed by reading each file before its timing, so the figures are conversion, not disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_gguf import write_qwen3moe_gguf  # noqa: E402


def gguf_shape(cfg: dict) -> dict:
    """synth_gguf's shape of an HF config from coordinator/synth.py."""
    return dict(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
                moe_inter=cfg["moe_intermediate_size"], experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"],
                heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                vocab=cfg["vocab_size"], rope_theta=cfg["rope_theta"], context=cfg["max_position_embeddings"],
                rms_eps=cfg["rms_norm_eps"])


def expert_bytes(model: Path) -> int:
    """Bytes of the routed experts in the checkpoint (what conversion reads)."""
    from krasis.shared.weights import load_family, open_source

    fam, src = load_family(model), open_source(model)
    if hasattr(src, "routed_experts"):
        return sum(src.routed_experts(i, p)[0].nbytes for i in range(fam.num_layers) if fam.is_moe(i)
                   for p in ("gate", "up", "down"))
    shapes = [fam.experts(i) for i in range(fam.num_layers) if fam.is_moe(i)]
    return sum(2 * 3 * es.num * es.hidden * es.inter for es in shapes)  # BF16


def warm(path: Path) -> None:
    for f in ([path] if path.is_file() else sorted(path.glob("*.safetensors"))):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def time_convert(model: Path, bits: int, group: int, cache: Path) -> float:
    from krasis.coordinator.convert import prepare
    from krasis.coordinator.processes import RuntimeOptions
    from krasis.shared.weights import load_family

    warm(model)
    opts = RuntimeOptions(cpu_bits=bits, gpu_bits=bits, group_size=group, cache_dir=str(cache), rebuild=True)
    t0 = time.perf_counter()
    prepare(model, load_family(model), opts, log=lambda m: None)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    from krasis.coordinator.convert import conversion_threads
    from krasis.coordinator.synth import synth, synth_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="a `krasis-coord synth` shape of Qwen3-MoE (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, help="experts per layer (default: the shape's)")
    ap.add_argument("--types", default="Q4_0,Q8_0,MXFP4", help="GGUF expert types (default: %(default)s)")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--no-bf16", action="store_true", help="skip the BF16 baseline")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/convert_speed"), help="source files and caches (default: %(default)s)")
    a = ap.parse_args(argv)
    cfg = synth_config(a.shape, a.layers, a.experts, vocab=1024)
    a.dir.mkdir(parents=True, exist_ok=True)
    tag = f"{a.shape}-l{a.layers}-e{cfg['num_experts']}"
    rows = []
    if not a.no_bf16:
        folder = a.dir / f"{tag}-bf16"
        if not (folder / "config.json").exists():
            synth(a.shape, folder, a.layers, a.experts, vocab=1024)
        rows.append(("BF16 shards", folder))
    for qtype in a.types.split(","):
        path = a.dir / f"{tag}-{qtype}.gguf"
        if not path.exists():
            write_qwen3moe_gguf(path, gguf_shape(cfg), expert_type=qtype, dense_type="F16")
        rows.append((f"GGUF {qtype}", path))
    print(f"{tag}: experts to INT{a.bits}/g{a.group_size} on {conversion_threads()} threads")
    print("| source | expert bytes | seconds | GB/s of source | vs BF16 per byte |\n|---|---|---|---|---|")
    base = None
    for name, model in rows:
        n = expert_bytes(model)
        s = time_convert(model, a.bits, a.group_size, a.dir / f"cache-{model.name}")
        rate = n / s / 1e9
        base = rate if name.startswith("BF16") else base
        print(f"| {name} | {n / 1e9:.2f} GB | {s:.2f} | {rate:.2f} | {f'{rate / base:.2f}x' if base else '—'} |", flush=True)


if __name__ == "__main__":
    main()
