# Item 3, for the session after 34: the pool's kernel built for 256-bit registers (AVX-VNNI's
# vpdpbusd: -mno-avx512f) against the AVX-512 build, on the pool's 14 cores in decode's rhythm
# (58 us turn). Session 34's call 1 found the Xeon's arithmetic alone at 12.8-19.5 G weights/s a
# thread in cache (the EPYC dev machine's: 33-41): if 512-bit work lowers that core's clock, the
# 256-bit build's rows read faster. Each run checks both builds against the Q8 reference first.
# Interleaved, three times.
. benchmarks/gpu_calls/lib.sh
machine
CE="python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --seconds 1 --gb 1.5 --gap-us 58 --right 6 --kernels c"
for r in 1 2 3; do step v_$r 120 $CE --c-flags=-mno-avx512f; done
finish
for r in 1 2 3; do echo "== v_$r"; grep "Q8 on\|in cache\|M=1\|M=8" $L/v_$r.log | cut -c1-200; done
