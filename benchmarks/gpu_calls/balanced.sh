# Issue 14's items 3 and 4 on the peer GGUF as synth_gguf.py now writes it (zero-mean expert blocks:
# the file before had a rank-one part in every expert that collapsed the routing with depth, and
# hcs_hybrid's hot set served 100.0% of decode's choices on two GPU hosts). A call of its own: the
# GGUF takes 170-200 s to write single-threaded (every core since session 23: to measure), its expert
# cache ~15 s to build on the first bench.
# - x2/x1: hcs_hybrid with 10 GB of hot experts (--vram-budget 17.8: the plan's fixed parts take 7.8)
#   against the defaults (pure_cpu, the same VRAM holding whole layers), one sequence: item 4's
#   1.3x, and the pool's share of the choices (cpu_share) beside the hot set's share of the experts;
# - x3/x4: the defaults (resident decode on, VB) with the tree before session 21 (.old at cc137b7,
#   where carried) and this one: the lookahead aimed at the layer the pool is asked for next, not
#   the store's next one, which resident decode often runs on the GPU (item 3);
# - c0: the pool's kernel alone under other prefetch settings.
# LAYERS=N: a GGUF of the first N layers instead (faster to write; HOT_BUDGET then says the budget
# of x1/x2, about 0.2 GB a layer of hot experts over the fixed parts).
. benchmarks/gpu_calls/lib.sh
machine
if [ -n "$LAYERS" ]; then
  G=/tmp/peer/qwen3-30b-a3b-${LAYERS}-q4_0.gguf; mkdir -p /tmp/peer
  [ -f $G ] || step b1 120 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from synth_gguf import QWEN3_30B_A3B as S, write_qwen3moe_gguf as w; w('$G', dict(S, layers=$LAYERS))"
else
  peer_gguf
fi
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64 --prompt-lens 512 --runs 1"
step x2 130 $B --vram-budget ${HOT_BUDGET:-17.8} --decode-strategy hcs_hybrid --json $L/x2.json
step x1 110 $B --vram-budget ${HOT_BUDGET:-17.8} --json $L/x1.json
if [ -d .old ]; then
  old_step x3 90 $B --vram-budget ${VB:-16} --json $L/x3.json
fi
step x4 90 $B --vram-budget ${VB:-16} --json $L/x4.json
# the pool's kernel alone, from DRAM, with the
# row streams' software prefetch further ahead (PREFETCH, 2048 bytes by default)
step c0 70 python3 benchmarks/cpu_experts.py --group-size 32 --formats int4 --seconds 1 --gap-us 120 --gb 1.5 \
  --c-flags=-DPREFETCH=4096 --c-flags=-DPREFETCH=8192
finish
grep "| int4 |" $L/c0.log 2>/dev/null
for s in x2 x1 x3 x4; do echo "== $s"; grep -v "^\[" $L/$s.log 2>/dev/null | tail -n 9; done
