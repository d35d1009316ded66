# Session 25's third call. The second (pool_loop.sh) ran the pool's C decode loop and phase 2 along
# each expert's rows against the session's start: per layer 449.5 -> 402 us (kernel 375 -> 338,
# around it 4.7 -> 0.3, the wait 69.7 -> 64.2), but each step ~1.6 ms longer outside its layers
# (the step 21.8 -> 21.2 ms instead of ~19.7). The pool now counts the wait before a step's first
# request and that request's kernel apart (waits over 50 ms, the prefill's, left out).
# b: every layer through the pool (0 .old, 1 this tree), a: the same with the lookahead off;
# d1: the defaults at 512; e1: item 5 with no --vram-budget (the whole model in VRAM), 1 and 32
# sequences. .old (carried): `git -C .old checkout --detach ffb8d9b` (this session's start).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
old_step b0 110 $PB --json $L/b0.json
step b1 60 $PB --json $L/b1.json
step a1 60 $PB --lookahead-kb 0 --json $L/a1.json
old_step a0 60 $PB --lookahead-kb 0 --json $L/a0.json
step d1 70 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --json $L/d1.json
step e1 110 python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 \
  --decode-tokens 64 --prompt-lens 512 --concurrency 1,32 --json $L/e1.json
finish
for s in b0 b1 a1 a0 d1 e1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|ms per token\|decode route" $L/$s.log | cut -c1-330; done
