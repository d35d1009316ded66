# Session 26's device call (its first tries found no machine: six refusals cost 630 s of the 1,800,
# so this one call carries what the session built and what session 25 left unmeasured).
# g0: the grouped expert products (gpu_worker/expert_grouped_kernel.py: decode's pairs grouped by
#     expert, prefill's experts dequantized inside the tile product) against their references on
#     CUDA (test_dequant's check), then timed against the per-pair kernel (1-32 tokens) and against
#     dequantize + torch's grouped product (a 4096-token chunk); g1: moe_blocks in bf16 against
#     moe_reference on CUDA. If g1 fails, the benches run with KRASIS_GROUPED_KERNELS=0.
# e1: item 5 with no --vram-budget (the whole model in VRAM), 1 and 32 sequences;
# d1: the defaults after 512 and 10K, 1 and 32 sequences (a 10K prompt's 3 chunks still dequantize
#     each layer once into bf16, the plan's `dequant_once`: the grouped product runs one-chunk prompts);
# p1, p0: a one-chunk prompt (4000 tokens), the grouped kernels on and off;
# b1: every layer through the pool: session 25's C loop with main.py's idle fix (still_idle), which
#     no GPU host has run.
. benchmarks/gpu_calls/lib.sh
machine
grouped_check
peer_gguf
step e1 110 python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 \
  --decode-tokens 64 --prompt-lens 512 --concurrency 1,32 --json $L/e1.json
step d1 85 $PD --json $L/d1.json
step g0 100 python3 benchmarks/device_check.py --checks dequant --skip-exact --skip-bench
step p1 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p1.json
KRASIS_GROUPED_KERNELS=0 step p0 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p0.json
step b1 50 $PB --json $L/b1.json
finish
grep "passed\|failed\|Error" $L/g1.log | tail -3
grep "^expert_gem" $L/g0.log | tr ',' '\n' | grep -v "_err'" | tr -d "'{}" | paste -sd' ' | fold -w 300
grep -o "'[a-z_0-9]*_err': [0-9.e-]*" $L/g0.log | sort -t: -k2 -g | tail -2
grep "dequant_exact\|Error\|error" $L/g0.log | cut -c1-600 | head -5
for s in e1 d1 p1 p0 b1; do echo "== $s"; grep "^| qwen\|pool us\|pool kernel us\|ms per token\|floor" $L/$s.log | cut -c1-300; done
