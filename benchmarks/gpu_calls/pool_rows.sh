# Session 32: phase 2 of the pool's kernel (the down rows) read ~61 GB/s where phase 1 read ~100
# (session 31's peer run: 116 us for 7.1 MB against 142 us for 14.2 MB). A down row is 0.4 KB at
# Qwen3-30B-A3B's I = 768, and a tile took two of them at M = 1: per byte, three times phase 1's
# calls, reductions and claims. TILE_ROWS2=4 takes four (adjacent bytes: no extra DRAM stream). And a
# thread's phase 2 reads one stream where phase 1 reads two, so at the same prefetch distance it keeps
# half the bytes in flight: PREFETCH2=4096 doubles phase 2's distance alone.
# k: cpu_experts.py's kernels, this build against TILE_ROWS2=4, PREFETCH2=4096, both, and PREFETCH=4096
# (both phases), pinned to the pool's 14 threads as the pool runs. r2/r4: every layer through the pool
# (PB), this tree against the /tmp/alt tree with TILE_ROWS2=4 and PREFETCH2=4096, interleaved, twice,
# 256 tokens each.
# Ran in session 32 (its call 1): no gain (BENCHMARKS.md, "Session 32"), and the two defines were taken
# out of expert_kernel.c again; this script needs the tree of b2627d5 (`git checkout b2627d5`).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step k 180 python3 benchmarks/cpu_experts.py --pin --threads 14 --group-size 32 --formats int4 --seconds 1 --gb 1.5 \
  --gap-us 120 --right 8 --c-flags=-DTILE_ROWS2=4 --c-flags=-DPREFETCH2=4096 "--c-flags=-DTILE_ROWS2=4 -DPREFETCH2=4096" \
  --c-flags=-DPREFETCH=4096
alt_tree TILE_ROWS2 4 PREFETCH2 4096
alt_ab r2 r4 60
finish
grep "^|\|phase 2" $L/k.log | cut -c1-240
for s in r2_1 r4_1 r2_2 r4_2; do echo "== $s"; grep "^| qwen\|pool us per layer\|ms per token" $L/$s.log | cut -c1-240 | head -4; done
