# Session 25's fourth call (the ~1.1 ms turned out to be main.py's naps, fixed after it: still_idle). The third (pool_step.sh) found the pool's C loop, polling its slots' request
# words in a tight loop, made the GPU's next request come ~1.1 ms after the reply instead of ~60 us:
# every layer with the lookahead off (15.9 tok/s), and before each step's first layer otherwise. Now
# the loop waits a few pauses between reads and a team's first thread alone reads the words
# (expert_kernel.c: relax, halted). b: every layer through the pool (0 .old, 1 this tree); a1: the
# lookahead off; d: the defaults after 512 and 10K, 1 and 32 sequences.
# .old (carried): `git -C .old checkout --detach ffb8d9b` (this session's start).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
old_step b0 100 $PB --json $L/b0.json
step b1 50 $PB --json $L/b1.json
step a1 50 $PB --lookahead-kb 0 --json $L/a1.json
step d1 85 $PD --json $L/d1.json
old_step d0 85 $PD --json $L/d0.json
finish
for s in b0 b1 a1 d1 d0; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-300; done
