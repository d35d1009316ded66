# Where a decode step's time goes, on an 8-layer slice (LAYERS): tok/s scale by 48/LAYERS, per-layer
# costs and fractions of a floor do not.
# - g0/g1 (CHECKS, CHECK_TESTS: lib.sh's gpu_checks): the decode kernels against their references,
#   the decode attention kernel's tilings and the expert kernel's timings; graphs replay eager steps.
# - c0: the pool's kernel at group 32 (the peer GGUF's Q4_0 bytes), from DRAM, in decode's rhythm
#   with its lookahead, and its arithmetic alone (in cache): whether a layer's ~113 us is DRAM or math.
# - a0/a1: the same bench, one sequence through the pool after 512 and 32K-token prompts (AB_LENS), with this
#   tree (a1) and with an older one in .old (a0, where present: `git worktree add --detach .old REV`,
#   carried), on one machine: what the change did.
# - h0: hcs_hybrid with about half the slice's experts hot (`--vram-budget 6`): the pool's share of
#   decode's choices beside the hot set's size (the 48-layer GGUF's hot 35% served 100.0% twice);
# - p0: one sequence through the pool (`--resident-decode off`), its worker traced
#   (KRASIS_PROFILE_TRACE), the trace cut into the pool hop's cycles by benchmarks/trace_summary.py;
# - p1: every layer resident (no pool), ten full-batch steps of 32 sequences, where hcs_hybrid's step
#   grew ~1.5 ms a layer from 1 to 32 sequences beyond its expert products on the H100 (session 19).
: "${LAYERS:=8}"
export LAYERS
. benchmarks/gpu_calls/lib.sh
# ordered by what a short call must not miss: correctness, the A/B, the hot share, the profiles
machine
[ -n "${CHECK_TESTS-x}" ] && step g1 240 python3 -m pytest -q -x ${CHECK_TESTS:-tests/test_doorbell.py tests/test_decode_graphs.py -k "doorbell or (qwen3 and pp1)"}
synth_model
B="python3 -m krasis.coordinator bench $M --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64 --runs 1"
if [ -d .old ]; then
  old_step a0 120 $B --vram-budget $VB --resident-decode off --prompt-lens ${AB_LENS:-512,32768} --json $L/a0.json
fi
step a1 120 $B --vram-budget $VB --resident-decode off --prompt-lens ${AB_LENS:-512,32768} --json $L/a1.json
step h0 120 $B --vram-budget 6 --decode-strategy hcs_hybrid --prompt-lens 512 --concurrency 1,32 --json $L/h0.json
step c0 90 python3 benchmarks/cpu_experts.py --group-size 32 --formats int4 --seconds 1 --gap-us 120 --gb 1.5
KRASIS_PROFILE=$L/prof0 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step p0 120 $B --vram-budget $VB --resident-decode off --prompt-lens 512 --json $L/p0.json
python3 benchmarks/trace_summary.py $L/prof0/stage0-decode.json --show 2 > $L/p0_trace.txt 2>&1
[ -n "${CHECKS-attention,dequant}" ] && step g0 90 python3 benchmarks/device_check.py --checks ${CHECKS:-attention,dequant} --skip-exact --skip-bench
KRASIS_PROFILE=$L/prof1 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,160-169 step p1 150 $B --vram-budget 60 --prompt-lens 512 --concurrency 1,32 --json $L/p1.json
python3 benchmarks/trace_summary.py $L/prof1/stage0-decode.json > $L/p1_trace.txt 2>&1
rm -f $L/prof1/*.json  # p0's trace stays: a few MB
finish
grep -v "^\[" $L/c0.log | tail -n 14
for s in g1 h0 a0 a1 p0 p1; do echo "== $s"; grep -v "^\[" $L/$s.log 2>/dev/null | tail -n 5; done
cat $L/p0_trace.txt $L/p1_trace.txt
