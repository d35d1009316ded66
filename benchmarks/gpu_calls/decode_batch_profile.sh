# Where a 32-sequence decode step's GPU time goes (issue 14, item 5): hcs_hybrid's step grew ~1.5 ms a
# layer from 1 to 32 sequences beyond its expert products on the H100 (BENCHMARKS.md, session 19).
# An 8-layer slice with every layer resident (no pool: only the GPU's own work), torch.profiler over
# ten full-batch decode steps near the end of the 32-sequence group, and the host's time by phase.
: "${LAYERS:=8}"
export LAYERS
. benchmarks/gpu_calls/lib.sh
machine
synth_model
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_STEPS=0,160-169 step p1 240 python3 -m krasis.coordinator bench $M \
  --devices cuda:0 --vram-budget 60 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64 --prompt-lens 512 \
  --concurrency 1,32 --runs 1 --json $L/p1.json
finish
grep -v "^\[" $L/p1.log | tail -n 12
cut -c1-58,100-200 $L/prof/stage0-decode.txt 2>/dev/null | head -80
cat $L/prof/stage0-phases.txt 2>/dev/null
