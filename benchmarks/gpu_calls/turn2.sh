# Session 27's second call, after turn.sh (call 1) found: the fused router faster at one token
# (5.2 against 7.9 us) and slower from four; the first GEMV (tensor-core tiles) slower than cuBLAS in
# the decode step (10-11 us a product), device_check's timing misled by the weight staying in L2;
# and this host's kernel times 174-200 us a layer between runs, more than any change made.
# Since (not yet run: session 27's device time ran out): the router fused up to two tokens; the GEMV rewritten (each program loads its rows whole,
# all loads in flight at once), with the input norm inside the qkv product; device_check times the
# products with each call's weight cold in HBM.
# g1: the doorbell (the guess kernel too) and decode graphs against eager steps, on CUDA;
# g0: device_check's turn check (cold weights);
# then every layer through the pool (item 3), 256 tokens a run, interleaved so that the host's
# drift falls on all alike: this tree (b1), .old = e3fe92d (b0), KRASIS_GEMV=1 (bv: the GEMV is off
# by default until this measures it),
# then b1 and b0 again, then KRASIS_POOL_GUESS=0 (bg); the defaults after 512 tokens, this tree and
# .old (trimmed to the session's last ~320 s of device time: the last steps run if time is left).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step g1 90 python3 -m pytest -q -x tests/test_doorbell.py tests/test_decode_graphs.py -k "doorbell or qwen3-pp1-fp8"
step g0 40 python3 benchmarks/device_check.py --checks turn --skip-exact --skip-bench
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 256 --prompt-lens 512"
for r in 1 2; do
  step b1_$r 70 $B --resident-decode off --json $L/b1_$r.json
  old_step b0_$r 45 $B --resident-decode off --json $L/b0_$r.json
  [ $r = 1 ] && KRASIS_GEMV=1 step bv_$r 45 $B --resident-decode off --json $L/bv_$r.json
done
KRASIS_POOL_GUESS=0 step bg_1 45 $B --resident-decode off --json $L/bg_1.json
step d1_1 45 $B --json $L/d1_1.json
old_step d0_1 45 $B --json $L/d0_1.json
finish
grep "passed\|failed\|Error" $L/g1.log | tail -3
grep "^turn" $L/g0.log | tr ',' '\n' | grep "best\|router_m[12]\|norm\|cublas_us" | head -40
grep -i "error" $L/g0.log | cut -c1-300 | head -5
for s in b1_1 b0_1 bv_1 bg_1 b1_2 b0_2 d1_1 d0_1; do echo "== $s"; grep "^| qwen\|pool us\|pool lookahead" $L/$s.log | cut -c1-220; done
