# The GPU's own share of decode and prefill, on a 16-layer slice of the peer GGUF (written here, ~65 s;
# per-layer costs and fractions of a floor are the whole file's, tok/s scale by 48/16):
# - k0: the fused expert activation (gpu_worker/act_kernel.py) against its reference, compiled;
# - f1/f2: a 10K prefill with the tree before it (.old, carried: `git worktree add --detach .old REV`)
#   and with it, default options: session 22 saw three ~60 us elementwise kernels a chunk and layer;
# - r0/r1: one sequence with every layer resident (no pool), 64 tokens after 512, traced (r0: three
#   decode steps, cut by benchmarks/trace_summary.py) and not (r1): session 22's host D decoded
#   138 us a layer this way, llama.cpp all in VRAM ~70;
# - c1/c2: 32 sequences, the pool for the non-resident layers (off) and auto (the route now measures
#   the decode strategy again before it decides).
. benchmarks/gpu_calls/lib.sh
machine
python3 -c "import sys; sys.path.insert(0, 'tests'); import test_act_kernel; print(test_act_kernel.CHECK)" > /tmp/act_check.py
step k0 60 python3 /tmp/act_check.py
G=/tmp/peer/qwen3-30b-a3b-16-q4_0.gguf; mkdir -p /tmp/peer
[ -f $G ] || step b1 120 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from synth_gguf import QWEN3_30B_A3B as S, write_qwen3moe_gguf as w; w('$G', dict(S, layers=16))"
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32"
if [ -d .old ]; then
  old_step f1 80 $B --vram-budget 5.33 --prompt-lens 10000 --decode-tokens 8 --runs 2 --json $L/f1.json
fi
step f2 80 $B --vram-budget 5.33 --prompt-lens 10000 --decode-tokens 8 --runs 2 --json $L/f2.json
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step r0 80 $B --vram-budget 30 --prompt-lens 512 --decode-tokens 64 --runs 1 --json $L/r0.json
python3 benchmarks/trace_summary.py $L/prof/stage0-decode.json --show 1 > $L/r0_trace.txt 2>&1
rm -f $L/prof/*.json
step r1 60 $B --vram-budget 30 --prompt-lens 512 --decode-tokens 64 --runs 2 --json $L/r1.json
step c1 80 $B --vram-budget 5.33 --prompt-lens 512 --decode-tokens 64 --runs 1 --concurrency 32 --stream-decode off --json $L/c1.json
step c2 90 $B --vram-budget 5.33 --prompt-lens 512 --decode-tokens 128 --runs 1 --concurrency 32 --json $L/c2.json
finish
cat $L/k0.log | tail -3
for s in f1 f2 r1 c1 c2; do echo "== $s"; grep "decode steps of up to\|^| q\|ms per token\|pool us" $L/$s.log | tail -n 6; done
head -n 60 $L/r0_trace.txt; cat $L/prof/stage0-phases.txt
