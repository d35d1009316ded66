# Session 29's third call, on peer.sh's warm machine (its GGUF and expert cache stay in /tmp): the
# decode expert GEMV's default tiling, a whole row a step (default_tiles), against session 28's
# [32 rows, 128 bytes] a step (.old = f2e08c6, the tree before the change). Its trace (call 2's p1,
# the whole model in VRAM) gave the GEMV 10.7 us a projection, 21.5 us of a resident layer's ~74.
# Interleaved, ROUNDS times (default 2): the whole model in VRAM (v1 / v0), one sequence, 128 tokens
# after 512; then, unless D=0, the defaults at --vram-budget 16 (d1 / d0, 28 resident layers).
# g0: device_check's dequant check (the tilings, each call on its own experts: pairs_cold): the
# compiled kernels against their references.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step g0 150 python3 benchmarks/device_check.py --checks dequant --skip-exact --skip-bench
V="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 128 --prompt-lens 512"
for r in $(seq ${ROUNDS:-2}); do
  step v1_$r 75 $V --json $L/v1_$r.json
  old_step v0_$r 75 $V --json $L/v0_$r.json
done
if [ "${D:-1}" = 1 ]; then
  step d1 60 $PD --prompt-lens 512 --concurrency 1 --json $L/d1.json
  old_step d0 60 $PD --prompt-lens 512 --concurrency 1 --json $L/d0.json
fi
finish
grep "^dequant_exact\|^combine_matches\|^act_matches" $L/g0.log | cut -c1-200
grep "^expert_gemv\|^turn" $L/g0.log | tr ',' '\n' | grep "cold\|pairs_us\|exact\|match" | head -60
grep -i "error\|Traceback" $L/g0.log | cut -c1-300 | head -5
for s in v1_1 v0_1 v1_2 v0_2 d1 d0; do echo "== $s"; grep "^| qwen\|ms per token\|MoE layers" $L/$s.log | cut -c1-240 | head -6; done
