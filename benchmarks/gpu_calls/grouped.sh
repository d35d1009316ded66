# Session 26's device call (its first call, pool_idle.sh, found no machine: four refusals cost
# 450 s, so this one call carries both). g0: the grouped expert product (expert_gemv_kernel.py:
# expert_grouped) against its reference on CUDA in bf16 and fp16 (test_dequant's check), then timed
# against a program per pair at 1-32 tokens; b: every layer through the pool, session 25's C loop
# with main.py's idle fix (still_idle, never run on a GPU host) against session 25's start (.old);
# e1: item 5 with no --vram-budget (the whole model in VRAM), 1 and 32 sequences; d1: the defaults.
# .old (carried): `git worktree add --detach .old ffb8d9b`.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
CHECKS=dequant step g0 100 python3 benchmarks/device_check.py --checks dequant --skip-exact --skip-bench
old_step b0 100 $PB --json $L/b0.json
step b1 50 $PB --json $L/b1.json
step e1 110 python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 \
  --decode-tokens 64 --prompt-lens 512 --concurrency 1,32 --json $L/e1.json
step d1 85 $PD --json $L/d1.json
finish
grep "^expert_gemv" $L/g0.log | tr ',' '\n' | grep -v "_err'" | tr -d "'{}" | paste -sd' ' | fold -w 300
grep "dequant_exact\|Error\|error" $L/g0.log | cut -c1-400 | head -5
for s in b0 b1 e1 d1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|ms per token" $L/$s.log | cut -c1-300; done
