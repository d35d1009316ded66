# Session 26's first call: session 25's C decode loop with main.py's idle fix (still_idle), which
# no GPU host has run: session 25's calls 3-4 found each step's first request waiting ~1.1 ms
# (main.py napped 1 ms after every run that served a request). b: every layer through the pool
# (0 .old = session 25's start, 1 this tree); r1: the same with --reserved-cores 1 (15 pool threads:
# the kernel 5% faster in session 25's call 1, before the loop); a1: the lookahead off; d: the
# defaults after 512 and 10K, 1 and 32 sequences.
# .old (carried): `git worktree add --detach .old ffb8d9b`.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
old_step b0 100 $PB --json $L/b0.json
step b1 50 $PB --json $L/b1.json
step r1 50 $PB --reserved-cores 1 --json $L/r1.json
step a1 50 $PB --lookahead-kb 0 --json $L/a1.json
step d1 85 $PD --json $L/d1.json
old_step d0 85 $PD --json $L/d0.json
finish
for s in b0 b1 r1 a1 d1 d0; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-300; done
