# Where a decode step's GPU time goes, on an 8-layer slice (LAYERS), each run's worker traced
# (KRASIS_PROFILE_TRACE) and the trace cut up by benchmarks/trace_summary.py:
# - p0: one sequence, every layer through the pool (`--resident-decode off`): the GPU's turn between
#   the pool's reply and its next request, kernel by kernel and the idle gaps between them;
# - p1: every layer resident (no pool: only the GPU's own work), ten full-batch steps of 32
#   sequences, where hcs_hybrid's step grew ~1.5 ms a layer from 1 to 32 sequences beyond its expert
#   products on the H100 (BENCHMARKS.md, session 19).
# CHECKS (device_check's, before them): the decode attention kernel's tilings, the expert kernel.
# c0: the pool's kernel at group 32 (the peer GGUF's Q4_0 bytes), from DRAM, in decode's rhythm with
# its lookahead, and its arithmetic alone (cache-resident): whether a layer's ~113 us is DRAM or math.
: "${LAYERS:=8}"
export LAYERS
. benchmarks/gpu_calls/lib.sh
machine
[ -n "${CHECKS-attention,dequant}" ] && step g0 150 python3 benchmarks/device_check.py --checks ${CHECKS-attention,dequant} --skip-exact --skip-bench
step c0 120 python3 benchmarks/cpu_experts.py --group-size 32 --formats int4 --seconds 1 --gap-us 120
synth_model
B="python3 -m krasis.coordinator bench $M --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64 --prompt-lens 512 --runs 1"
KRASIS_PROFILE=$L/prof0 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step p0 200 $B --vram-budget $VB --resident-decode off --json $L/p0.json
python3 benchmarks/trace_summary.py $L/prof0/stage0-decode.json --show 2 > $L/p0_trace.txt 2>&1
KRASIS_PROFILE=$L/prof1 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,160-169 step p1 240 $B --vram-budget 60 --concurrency 1,32 --json $L/p1.json
python3 benchmarks/trace_summary.py $L/prof1/stage0-decode.json > $L/p1_trace.txt 2>&1
rm -f $L/prof1/*.json  # p0's trace stays: a few MB
finish
grep -v "^\\[" $L/c0.log | tail -n 25
for s in p0 p1; do grep -v "^\[" $L/$s.log | tail -n 6; cat $L/${s}_trace.txt; cat $L/prof${s#p}/stage0-phases.txt 2>/dev/null; done
