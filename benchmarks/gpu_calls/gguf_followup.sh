# After peer.sh on the same warm machine (the GGUF and its expert cache are in /tmp): decode with
# every layer through the pool (issue 14's pure_cpu fraction of the DRAM floor), decode at 1-32
# sequences with the defaults and with hcs_hybrid holding ~10 GB of hot experts (items 4 and 5), the
# warm start on the GGUF (item 6); the GPU's turn traced, and the pool's kernel alone. A first bench
# process compiles for ~40 s: the limits allow it.
. benchmarks/gpu_calls/lib.sh
machine
ARGS="--devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64 --prompt-lens 512"
B="python3 -m krasis.coordinator bench $G $ARGS"
step h0 90 $B --vram-budget 16 --resident-decode off --runs 2 --json $L/h0.json
# the VRAM plan's fixed parts take 7.8 GB of this model's budget (layer_grouped_4 staging, dense
# weights, activations): 17.8 leaves 10 GB of hot experts, issue 14's item 4
step h2 150 $B --vram-budget 17.8 --decode-strategy hcs_hybrid --concurrency 1,4,16,32 --runs 1 --json $L/h2.json
step h1 150 $B --vram-budget 16 --concurrency 1,4,16,32 --runs 1 --json $L/h1.json
# where the GPU's turn goes between the pool's reply and its next request (every layer through the
# pool): three decode steps traced, cut into the hop's cycles by benchmarks/trace_summary.py
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step h4 90 $B --vram-budget 16 --resident-decode off --runs 1 --json $L/h4.json
python3 benchmarks/trace_summary.py $L/prof/stage0-decode.json --show 2 > $L/h4_trace.txt 2>&1
# the pool's kernel at group 32 alone: from DRAM, in decode's rhythm with its lookahead, and its arithmetic in cache
step c0 60 python3 benchmarks/cpu_experts.py --group-size 32 --formats int4 --seconds 1 --gap-us 120 --gb 1.5
step h3 120 python3 benchmarks/startup.py $G --devices cuda:0 --cpu-bits 4 --gpu-bits 4 --group-size 32 --runs 2
rm -f $L/prof/*.json
finish
for f in $L/h*.log $L/c0.log; do echo "== $f"; grep -v "^\[" $f | tail -n 16; done
cat $L/h4_trace.txt 2>/dev/null
