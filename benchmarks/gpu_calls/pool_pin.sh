# The pool's threads pinned one to a core (expert_kernel.c: krasis_pin) against unpinned (item 3).
# Session 24's second call timed the layer kernel by its own clock with every layer through the pool:
# its threads all in after 3.4 us (none asleep), but phase 1's first thread done at 116 us and its
# last at 204 (the static split waits for the slowest), phase 2 another 115; and the lookahead's
# Python before its C call long enough that the next request was in before the guess (0 bytes read).
# .old (carried; `git -C .old checkout --detach 9fc35af`) is the tree with the clock and no pinning.
# Every layer through the pool, 64 tokens after 512; a: the lookahead off, b: on; 0 .old, 1 this tree;
# then this tree's defaults (resident decode) for the headline decode figures.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
O="$G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64"
B="python3 -m krasis.coordinator bench $O --prompt-lens 512 --resident-decode off"
old_step a0 110 $B --lookahead-kb 0 --json $L/a0.json
step a1 60 $B --lookahead-kb 0 --json $L/a1.json
old_step b0 60 $B --json $L/b0.json
step b1 60 $B --json $L/b1.json
step a2 60 $B --lookahead-kb 0 --json $L/a2.json
step d1 90 python3 -m krasis.coordinator bench $O --prompt-lens 512,10000 --concurrency 1,32 --json $L/d1.json
finish
for s in a0 a1 b0 b1 a2 d1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|lookahead:\|^| Seq\|^| 32\|^| 1 " $L/$s.log; done
