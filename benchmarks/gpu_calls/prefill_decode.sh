# Prefill by prompt length and decode after short and long prompts; a stage
# boundary over tcp with two agents on the one GPU (issue 16); decode at 1-32 sequences (hcs_hybrid
# on balanced synthetic routing, pure_cpu); lookahead off. The options (--vram-budget 16 ...).
. benchmarks/gpu_calls/lib.sh
machine
synth_model
step a1 150 python3 -m krasis.coordinator bench $M $O --decode-strategy pure_cpu --prompt-lens 512,2048,10240,32768,65536 --runs 2 --json $L/a1.json
step c4 130 python3 benchmarks/stage_boundary.py --synth qwen3-30b-a3b --layers 8 --device cuda:0 --vram-budget 60
step a2 110 python3 -m krasis.coordinator bench $M $O --decode-strategy hcs_hybrid --prompt-lens 512 --concurrency 1,4,16,32 --runs 2 --json $L/a2.json
step a3 90 python3 -m krasis.coordinator bench $M $O --decode-strategy pure_cpu --prompt-lens 512 --concurrency 4,16,32 --runs 2 --json $L/a3.json
step a4 70 python3 -m krasis.coordinator bench $M $O --decode-strategy pure_cpu --lookahead-kb 0 --prompt-lens 512,10240 --runs 2 --json $L/a4.json
finish
for f in $L/a*.log $L/c4.log; do echo "== $f"; grep -v "^\[" $f | tail -n 22; done
