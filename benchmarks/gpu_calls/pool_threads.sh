# Session 29: every layer through the pool (item 3) with 14, 15 and 16 pool threads (--reserved-cores
# 2, the default on 16 cores; 1; 0). Call 1 found the pool's kernel reading 121 GB/s where the host's
# DRAM read 158-184: 14 threads at ~8.7 GB/s each, about what a core's outstanding misses sustain, so
# more threads should read more, if the GPU worker's thread (it launches a layer's kernels between two
# pool calls) is not delayed by pool threads spinning on its core. Interleaved, twice, 256 tokens each.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
for r in 1 2; do
  for c in 2 1 0; do step b${c}_$r 60 $PB --decode-tokens 256 --reserved-cores $c --json $L/b${c}_$r.json; done
done
finish
for s in b2_1 b1_1 b0_1 b2_2 b1_2 b0_2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-240 | head -4; done
