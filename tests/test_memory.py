"""Memory: the routed experts live once in RAM however many processes use them, and conversion
streams one layer at a time."""

from __future__ import annotations

import subprocess
import sys

import tiny_models as tm

# Experts big enough to measure: 4 layers x 32 experts x 3 x 256 x 512 = 50 M weights (INT8: ~50 MB).
BIG = dict(hidden_size=256, moe_intermediate_size=512, intermediate_size=512, num_experts=32, num_experts_per_tok=4,
           num_hidden_layers=4, vocab_size=256)


def store_usage(pid: int) -> tuple[int, int]:
    """(Pss, Rss) in bytes of the expert-store mappings of a process."""
    pss = rss = 0
    in_store = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                in_store = "krasis-experts" in line
            elif in_store and first in ("Pss:", "Rss:"):
                kb = int(line.split()[1]) * 1024
                if first == "Pss:":
                    pss += kb
                else:
                    rss += kb
    return pss, rss


def test_experts_once_in_ram_with_two_pool_processes(tmp_path):
    path = tm.build(tmp_path / "big", "qwen3", **BIG)
    with tm.Service(path, "--cpu-workers", "2", "--cpu-bits", "8", "--gpu-bits", "8", "--devices", "cpu") as svc:
        # a prefill (GPU worker reads the store) and decode steps (both pool processes read it)
        svc.client.complete(prompt_ids=list(range(40)), max_new_tokens=4, ignore_eos=True)
        workers = svc.client.health().workers
        pools = [w for w in workers if w["role"] == "cpu"]
        assert len(pools) == 2
        store_bytes = sum(w["bytes"] for w in pools)
        usage = {w["pid"]: store_usage(w["pid"]) for w in workers}
    assert store_bytes > 40e6
    pss = sum(p for p, _ in usage.values())
    rss = sum(r for _, r in usage.values())
    # every page of the store is resident and counted once across all processes ...
    assert abs(pss - store_bytes) < 0.02 * store_bytes, (pss, store_bytes)
    # ... while more than one process maps it (a second copy would add to Pss, sharing adds to Rss)
    assert rss > 1.3 * store_bytes, (rss, store_bytes)


def _peak_rss_of(*args: str) -> int:
    """Peak RSS in bytes of `krasis-coord ARGS`, measured in a fresh parent so that no other child
    of the test process counts."""
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'krasis.coordinator', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stderr.write(p.stderr)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    rc, kb = p.stdout.split()
    assert rc == "0", p.stderr[-2000:]
    return int(kb) * 1024


def test_conversion_streams_one_layer_at_a_time(tmp_path):
    # 10 MoE layers of 32 experts x 3 x 256 x 256 float32 weights: 25 MB a layer, 250 MB in all
    over = dict(hidden_size=256, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=2,
                num_hidden_layers=10, vocab_size=256)
    big = tm.build(tmp_path / "big", "qwen3", **over)
    small = tm.build(tmp_path / "small", "qwen3")
    args = ("--cpu-bits", "4", "--gpu-bits", "8", "--attn-bits", "8", "--group-size", "64")
    baseline = _peak_rss_of("convert", small, *args)
    peak = _peak_rss_of("convert", big, *args)
    layer = 32 * 3 * 256 * 256 * 4 + 4 * 256 * 256 * 4
    total = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    bound = 2 * layer + 32 * 2**20
    assert total > 2 * bound  # holding the checkpoint would break the bound by far
    assert peak - baseline < bound, f"conversion peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB"
    assert (big / ".krasis_cache" / "experts-int4-g64.kc").exists() and (big / ".krasis_cache" / "dense-int8.kc").exists()
