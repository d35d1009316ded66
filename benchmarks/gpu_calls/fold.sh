# Session 30: a resident layer's decode with its element-wise kernels folded (session 29's trace: six
# torch kernels, ~7.5 us of a layer's ~74). The pairs' rows and weights are one kernel
# (pair_rows_kernel.py) instead of a gather, a comparison and a select, and the combine adds the
# residual (combine_kernel.py) instead of a cast and an add. k0: device_check's dequant check (the new
# kernels against their references, compiled, and the expert GEMV's tilings); then the whole model in
# VRAM (no --vram-budget), one sequence, 256 tokens after 512: the tree before (.old, carried: `git
# -C .old checkout --detach REV`) interleaved with this one, twice; t1: this tree traced, three steps.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step k0 100 python3 benchmarks/device_check.py --checks dequant --skip-exact --skip-bench
V="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 256 --prompt-lens 512"
for r in 1 2; do
  old_step v0_$r 60 $V --json $L/v0_$r.json
  step v1_$r 60 $V --json $L/v1_$r.json
done
KRASIS_PROFILE=$L/prof1 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step t1 60 $V --decode-tokens 64 --json $L/t1.json
python3 benchmarks/trace_summary.py $L/prof1/stage0-decode.json --show 1 > $L/t1_trace.txt 2>&1
rm -f $L/prof1/*.json
finish
grep -i "matches\|exact\|pairs_cold\|error" $L/k0.log | cut -c1-300 | head -20
for s in v0_1 v1_1 v0_2 v1_2; do echo "== $s"; grep "^| qwen" $L/$s.log | cut -c1-200; done
head -c 2000 $L/t1_trace.txt
