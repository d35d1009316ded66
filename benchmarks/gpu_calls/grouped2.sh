# The next call after session 26 (this script never found a machine in session 26; grouped3.sh ran a
# lean part of it, whose prefill A/B ran out of time building and first reading the expert cache, so
# e2 runs first here and builds it). With session 26's final code: grouped decode products from 32
# sequences (GROUPED_MIN_PAIRS 256) and prefill's tile (128, 128, 64, 8, 3), the fastest of
# grouped.sh's g0 (1,456 us a 4096-token layer against 1,676 for dequantize + torch's product).
# g1: moe_blocks and moe_pairs in bf16 against moe_reference on CUDA (120 tokens grouped);
# e2: the whole model in VRAM (no --vram-budget) at 1, 4, 16 and 32 sequences;
# p1, p0: a one-chunk prompt (4000 tokens), the grouped kernels on and off;
# g0: the kernels' check and timings (torch's product alone on a layer dequantized once, too);
# d2: the defaults after 512 and 10K, 1 and 32 sequences.
. benchmarks/gpu_calls/lib.sh
machine
grouped_check
peer_gguf
step e2 110 python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 \
  --decode-tokens 64 --prompt-lens 512 --concurrency 1,4,16,32 --json $L/e2.json
step p1 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p1.json
KRASIS_GROUPED_KERNELS=0 step p0 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p0.json
step g0 70 python3 benchmarks/device_check.py --checks dequant --skip-exact --skip-bench
step d2 85 $PD --json $L/d2.json
finish
grep "passed\|failed\|Error" $L/g1.log | tail -3
grep "^expert_gemm" $L/g0.log | tr ',' '\n' | grep -v "_err'" | tr -d "'{}" | paste -sd' ' | fold -w 300
grep -o "'[a-z_0-9]*_err': [0-9.e-]*" $L/g0.log | sort -t: -k2 -g | tail -2
grep "dequant_exact" $L/g0.log | cut -c1-300
for s in e2 p1 p0 d2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-300; done
