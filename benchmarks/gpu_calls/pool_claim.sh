# The layer kernel's threads taking their rows a chunk at a time, and then chunks of slower threads'
# shares (expert_kernel.c: claim), against the even split alone; and the lookahead skipped where it
# reads nothing (lookahead.py: EMPTY, SKIP). Session 24's third call: with each thread pinned to its
# own core, phase 1's threads still took 114-152 us for equal shares (some cores get less of the
# DRAM) and the phase ended with its slowest, 187 us after the call's start against 124 for its
# first; with every layer through the pool the lookahead read nothing (its Python took 26-39 us, the
# guess 17, the GPU's turn ~50) and kept the next request waiting 76 us against 58.
# .old (carried; `git -C .old checkout --detach b688e72`): pinned threads, the even split, no skip.
# a: every layer through the pool, the lookahead off; b: on; d: the defaults, after 512 and 10K,
# 1 and 32 sequences. 0: .old, 1: this tree.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
old_step a0 110 $PB --lookahead-kb 0 --json $L/a0.json
step a1 60 $PB --lookahead-kb 0 --json $L/a1.json
old_step b0 60 $PB --json $L/b0.json
step b1 60 $PB --json $L/b1.json
old_step d0 90 $PD --json $L/d0.json
step d1 90 $PD --json $L/d1.json
finish
for s in a0 a1 b0 b1 d0 d1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|lookahead:" $L/$s.log | cut -c1-400; done
