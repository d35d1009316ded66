# Session 25's first call: what session 24 built after its last call, and the chunk sizes.
# - krasis_hold (the kernel's threads held running while a layer's lookahead is skipped) and the
#   lookahead's array addresses taken once: b0 (.old at 5d4531e, before both) against b1, every
#   layer through the pool (session 24's call 4: "its last thread in" 7.3 us there);
# - b2: --reserved-cores 1 (15 pool threads) against b1's default 2 (14 threads);
# - c1: the layer kernel's chunk sizes (CHUNK1, CHUNK2) in cpu_experts.py's decode rhythm: phase 2
#   read its 7.1 MB at ~58 GB/s against phase 1's ~91 in session 24's b1;
# - d1: the defaults after 512 and 10K tokens, 1 and 32 sequences: today's 10K prefill against the
#   one-pass floor (session 23 77.7-84.2%, session 24 62-68% on every tree).
# .old (carried): `git -C .old checkout --detach 5d4531e`.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
K="benchmarks/cpu_experts.py --pin --threads 14 --group-size 32 --formats int4 --seconds 1 --gb 1.5 --gap-us 60"
step c1 100 python3 $K --c-flags=-DCHUNK2=32 --c-flags=-DCHUNK2=64 --c-flags=-DCHUNK1=64 --c-flags=-DCHUNK1=16
old_step b0 110 $PB --json $L/b0.json
step b1 60 $PB --json $L/b1.json
step b2 60 $PB --reserved-cores 1 --json $L/b2.json
step d1 90 $PD --json $L/d1.json
finish
grep -v numba $L/c1.log | tail -32
for s in b0 b1 b2 d1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|lookahead:" $L/$s.log | cut -c1-500; done
