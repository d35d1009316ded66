# Session 25's second call: the pool's decode loop in C (decode_loop.c: no Python between a request
# and its kernel, nor between the answer and the lookahead's first read) and the layer kernel's
# phase 2 along each expert's rows (session 25's first call, pool_hold.sh: phase 2 read its 7.1 MB at
# ~69 GB/s against phase 1's ~98; the Python loop took ~11 us around each kernel call and 60-70 us
# between answer and request, of which its own work 30-65).
# .old (carried): `git -C .old checkout --detach ffb8d9b` (this session's start).
# b: every layer through the pool (0 .old, 1 this tree, 2 this tree with --reserved-cores 1);
# d: the defaults after 512 and 10K, 1 and 32 sequences; c: cpu_experts.py's kernels (no rhythm).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
old_step b0 110 $PB --json $L/b0.json
step b1 60 $PB --json $L/b1.json
step b2 60 $PB --reserved-cores 1 --json $L/b2.json
old_step d0 90 $PD --json $L/d0.json
step d1 90 $PD --json $L/d1.json
K="benchmarks/cpu_experts.py --pin --threads 14 --group-size 32 --formats int4 --seconds 1 --gb 1.5 --gap-us 0"
old_step c0 50 python3 $K
step c1 50 python3 $K
finish
for s in b0 b1 b2 d0 d1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|lookahead:" $L/$s.log | cut -c1-420; done
for s in c0 c1; do echo "== $s"; grep "DRAM read\|M=1 c\|M=8 c" $L/$s.log; done
