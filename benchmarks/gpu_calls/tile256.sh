# Session 28's fourth call. Call 2 (grouped2.sh) timed prefill's grouped expert tile (256, 128, 64,
# 8, 3) at 1,277 us a 4096-token layer against 1,458 for session 26's (128, 128, 64, 8, 3), the same
# bits; call 3 (attn8.sh) found --attn-bits 8 at --vram-budget 16 keeping 33 layers resident instead
# of 29 (decode 172.6 against 150.9 tok/s). Since: the tile is (256, ...); the INT8 GEMV's tiling
# (8192, 4); bench measures the DRAM read after the workers stop too and takes the faster.
# .old = 34e4d42 (the tree before the tile change) for the prefill A/B.
# g0: the turn check (the INT8 tiling by default); p1 / p0o / p0: a one-chunk prompt (4000 tokens)
# with the new tile, the old tile (.old) and the grouped kernels off; d1, d8: the defaults and
# --attn-bits 8 after 512 and 10K tokens, 1 and 32 sequences.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step g0 40 python3 benchmarks/device_check.py --checks turn --skip-exact --skip-bench
step p1 60 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p1.json
old_step p0o 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p0o.json
KRASIS_GROUPED_KERNELS=0 step p0 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p0.json
step p1b 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p1b.json
step d1 70 $PD --json $L/d1.json
step d8 70 $PD --attn-bits 8 --json $L/d8.json
finish
grep "^turn " $L/g0.log | tr ',' '\n' | grep "int8_best\|exact\|m1_best" | head -20
grep -i "error\|Traceback" $L/g0.log | cut -c1-300 | head -5
for s in p1 p0o p0 p1b d1 d8; do echo "== $s"; grep "^| qwen\|MoE layers on the GPU" $L/$s.log | cut -c1-220 | head -8; done
python3 -c "import json; [print(s, [r.get('dram_gb_s_before_after') for r in (lambda d: d if isinstance(d, list) else [d])(json.load(open('$L/'+s+'.json')))]) for s in ('p1','d1','d8')]"
