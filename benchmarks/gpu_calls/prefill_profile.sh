# Where a 10K-token prefill step's GPU time goes, on the LAYERS-layer slice (default 8) with default
# options: host C's 10K prefill took 366 ms against 229 ms of copies (its own streamed floor) and
# ~94 TFLOP (121 ms at its matmul rate), so the GPU's compute, not PCIe, set the step (item 1).
# - f0: bench at 10K, its prefill step under torch.profiler (KRASIS_PROFILE_STEPS=1,0: the step after
#   the warm-up), the operator table and the timeline;
# - f1: the same step without the profiler, the figure the table is read against.
: "${LAYERS:=8}"
export LAYERS
. benchmarks/gpu_calls/lib.sh
machine
synth_model
step f1 90 python3 -m krasis.coordinator bench $M $O --prompt-lens 10000 --runs 1 --json $L/f1.json
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=1,0 step f0 120 python3 -m krasis.coordinator bench $M $O --prompt-lens 10000 --runs 1 --json $L/f0.json
python3 benchmarks/trace_summary.py $L/prof/stage0-prefill.json --streams > $L/f0_kernels.txt 2>&1
finish
for s in f1 f0; do echo "== $s"; grep -v "^\[" $L/$s.log | tail -n 4; done
head -n 45 $L/prof/stage0-prefill.txt; head -n 40 $L/f0_kernels.txt
