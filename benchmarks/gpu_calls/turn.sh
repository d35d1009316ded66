# Session 27's call: a decode layer's GPU turn made shorter, and the pool's guess made by the GPU.
# - the router's product, softmax and top-k in one kernel, with the residual add and the norm
#   before it (shared/kernels/router_kernel.py: three launches of the turn made one);
# - the attention's products (and the LM head) at a decode step's few tokens by a Triton GEMV
#   (shared/kernels/gemv_kernel.py) instead of cuBLAS's GEMV and split-K + reduction;
# - the pool's lookahead guess computed on the GPU while the pool runs the layer and posted in the
#   slot (mailbox version 3), so the pool reads ahead from the moment it answers.
# .old: the tree before (e3fe92d), for the A/B on this machine. (It ran the GEMV's first version, on by
# default then; turn2.sh is the next call.)
# g1: the doorbell (the guess kernel too), decode graphs against eager steps (the new kernels inside
#     graphs), the grouped expert products, all on CUDA;
# g0: device_check's turn check: the fused router against linear + top-k, the GEMV's tilings
#     against cuBLAS (qkv, o, LM head at 1 and 4 tokens);
# b1 / b0 / bg: every layer through the pool (item 3): this tree, .old, this tree with
#     KRASIS_POOL_GUESS=0 (the pool guessing itself), then bk with KRASIS_GEMV=0;
# d1 / d0: the defaults after 512 tokens, 1 sequence, this tree and .old;
# p0: b1 with the worker traced for three steps, cut into the pool hop's cycles (trace_summary.py):
#     the GPU's own turn, kernel by kernel, after the change.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step g1 150 python3 -m pytest -q -x tests/test_doorbell.py tests/test_decode_graphs.py tests/test_strategies.py \
  -k "doorbell or qwen3-pp1 or (grouped_moe and cuda)"
step b1 110 $PB --json $L/b1.json
old_step b0 55 $PB --json $L/b0.json
KRASIS_POOL_GUESS=0 step bg 55 $PB --json $L/bg.json
step g0 50 python3 benchmarks/device_check.py --checks turn --skip-exact --skip-bench
step d1 55 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --json $L/d1.json
old_step d0 55 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --json $L/d0.json
KRASIS_GEMV=0 step bk 55 $PB --json $L/bk.json
KRASIS_PROFILE=$L/prof0 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step p0 55 $PB --json $L/p0.json
python3 benchmarks/trace_summary.py $L/prof0/stage0-decode.json --show 2 > $L/p0_trace.txt 2>&1
finish
grep "passed\|failed\|Error" $L/g1.log | tail -3
grep "^turn" $L/g0.log | tr ',' '\n' | grep "best\|router\|ulps" | grep -v "ulps_off': 0.0$" | head -40
grep -i "error" $L/g0.log | cut -c1-300 | head -5
for s in b1 b0 bg bk d1 d0 p0; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|pool lookahead\|ms per token" $L/$s.log | cut -c1-300; done
head -c 3000 $L/p0_trace.txt
