# Session 28's third call, after turn2.sh found the decode GEMV (a row a program, one token) faster
# than cuBLAS for qkv, o and the LM head with cold weights, and the decode 93.30 tok/s with it
# against 90.17 / 90.32 without (one run); at 4 tokens slower (each token re-read the rows).
# Since: the GEMV on by default for one token, its rows loaded once for every token (and before the
# norm's statistics), INT8 rows (--attn-bits 8: half the bytes of the turn's products) in the same
# kernel, and the VRAM plan counting INT8 dense weights at their size (more resident layers).
# g0: device_check's turn check (bf16 and INT8 GEMV tilings against cuBLAS, cold weights; the INT8
# GEMV's weights against the reference's);
# then every layer through the pool (item 3), 256 tokens a run, interleaved: the defaults (b1),
# KRASIS_GEMV=0 (bk), --attn-bits 8 (b8), twice; the defaults and --attn-bits 8 after 512 tokens, 1
# and 32 sequences (d1, d8); --reserved-cores 1 (r1: the pool on 15 threads).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step g0 60 python3 benchmarks/device_check.py --checks turn --skip-exact --skip-bench
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 256 --prompt-lens 512"
for r in 1 2; do
  step b1_$r 70 $B --resident-decode off --json $L/b1_$r.json
  KRASIS_GEMV=0 step bk_$r 45 $B --resident-decode off --json $L/bk_$r.json
  step b8_$r 90 $B --resident-decode off --attn-bits 8 --json $L/b8_$r.json
done
step d1 60 $PD --prompt-lens 512 --json $L/d1.json
step d8 60 $PD --prompt-lens 512 --attn-bits 8 --json $L/d8.json
step r1 45 $B --resident-decode off --reserved-cores 1 --json $L/r1.json
finish
grep "^turn " $L/g0.log | tr ',' '\n' | grep "best\|exact\|int8.*_us\|m[14]_cublas_us\|norm" | head -60
grep -i "error\|Traceback" $L/g0.log | cut -c1-300 | head -5
for s in b1_1 bk_1 b8_1 b1_2 bk_2 b8_2 d1 d8 r1; do echo "== $s"; grep "^| qwen\|pool us\|MoE layers on the GPU" $L/$s.log | cut -c1-220 | head -8; done
