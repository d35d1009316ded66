# layer_grouped's group size against what it leaves resident (items 1, 3, 5), and items 3 and 4 on
# the 48-layer peer GGUF (written first on a fresh machine: 171 s single-threaded), one run each:
# - d4: the defaults as they were chosen up to session 22 (layer_grouped_4: two staging slots of four
#   layers, ~2.7 GB at --vram-budget 16, idle through decode), 512 and 10K prompts, 1 and 32 sequences;
# - d1: the same with layer_grouped_1 (two one-layer slots: ~2 GB more for resident layers, so fewer
#   layers crossing PCIe in prefill and fewer through the pool in decode);
# - r0: every layer through the pool (--resident-decode off): item 3's pure_cpu against the DRAM floor
#   of all 48 layers, and item 4's baseline;
# - h0: hcs_hybrid with 10 GB of hot experts (--vram-budget 17.8: the plan's fixed parts take 7.8).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
A="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64"
step d4 120 $A --vram-budget 16 ${D4_ARGS---prefill-strategy layer_grouped_4} --prompt-lens 512,10000 --concurrency 1,32 --json $L/d4.json
step d1 120 $A --vram-budget 16 ${D1_ARGS---prefill-strategy layer_grouped_1} --prompt-lens 512,10000 --concurrency 1,32 --json $L/d1.json
step r0 90 $A --vram-budget 16 --resident-decode off --prompt-lens 512 --json $L/r0.json
step h0 100 $A --vram-budget 17.8 --decode-strategy hcs_hybrid --prompt-lens 512 --json $L/h0.json
finish
for s in d4 d1 r0 h0; do echo "== $s"; grep -v "^\[" $L/$s.log | grep -i "prefill\|decode\|^| \|floor\|resident\|error" | tail -n 14; done
