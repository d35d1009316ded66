# Session 30: item 3, where the pool's 14 threads read ~8.7 GB/s each (session 29: 121 GB/s where the
# DRAM gave 184). A core holds ~16 misses into L1 at once; the kernel's row prefetches go to L1
# (expert_kernel.c: PREFETCH_HINT 3). Into L2 (hint 2) they would use its larger miss queue.
# c0: the kernel alone, back to back, 14 pinned threads, INT4/g32, at each hint and distance;
# b*: every layer through the pool (PB), this tree (hint 3) interleaved with a copy at hint 2, twice.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step c0 170 python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --seconds 1 --gap-us 0 \
  --c-flags=-DPREFETCH_HINT=2 "--c-flags=-DPREFETCH_HINT=2 -DPREFETCH=4096" "--c-flags=-DPREFETCH_HINT=2 -DPREFETCH=8192" \
  --c-flags=-DPREFETCH=4096 --c-flags=-DPREFETCH=0
alt_tree PREFETCH_HINT ${HINT:-2}
alt_ab b3 b${HINT:-2} 70
finish
grep -A40 "^threads" $L/c0.log | grep -v "^  c.*max error" | head -40
for s in b3_1 b${HINT:-2}_1 b3_2 b${HINT:-2}_2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-240 | head -4; done
