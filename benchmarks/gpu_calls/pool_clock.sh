# Where the pool's layer kernel spends a decode layer (item 3), by the C kernel's own clock
# (expert_kernel.c: krasis_clock; bench prints "pool kernel us from a call's start"): how long its
# OpenMP threads take to start (a thread asleep since the last call is woken through the OS), how
# unevenly phase 1's static split ends, and how long the lookahead takes to make its guess, which
# session 24's first call found never read a byte with every layer through the pool (its guesses
# named 5% of the choices, and it kept the pool 71 us after each answer against 8 without it).
# Every layer through the pool, 64 tokens after 512, each bench one process start:
# - r1 the lookahead off, r0 on (the defaults);
# - r3 off with GOMP_SPINCOUNT=1e6 (libgomp's threads spin ~10 ms before sleeping instead of ~3 ms;
#   unless libgomp counts more threads than cores, when it lets them spin ~100 times only);
# - r4 off and r5 on with OMP_WAIT_POLICY=active (they spin ~5 min; 1,000 times where oversubscribed).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64 --prompt-lens 512 --resident-decode off"
step r1 110 $B --lookahead-kb 0 --json $L/r1.json
step r0 60 $B --json $L/r0.json
GOMP_SPINCOUNT=1000000 step r3 60 $B --lookahead-kb 0 --json $L/r3.json
OMP_WAIT_POLICY=active step r4 60 $B --lookahead-kb 0 --json $L/r4.json
OMP_WAIT_POLICY=active step r5 60 $B --json $L/r5.json
finish
for s in r1 r0 r3 r4 r5; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|lookahead:" $L/$s.log; done
