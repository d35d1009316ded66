# After peer.sh on the same warm machine (the GGUF, its expert cache and the hot-expert counts its
# bench prefills gathered are in /tmp): decode with every layer through the pool, decode at 1-32
# sequences with hcs_hybrid (issue 14 items 4 and 5), the warm start on the GGUF (item 6), and a
# profile of default-chunk prefill (item 1: where a 4096-token chunk's time goes). A first bench
# process compiles for ~40 s: the limits allow for it.
. benchmarks/gpu_calls/lib.sh
machine
G=/tmp/peer/qwen3-30b-a3b-q4_0.gguf
OG="--devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64"
# every layer's experts through the pool (issue 14's pure_cpu fraction of the DRAM floor; the default
# decodes the layers kept in VRAM on the GPU since session 18)
step h0 90 python3 -m krasis.coordinator bench $G $OG --resident-decode off --prompt-lens 512 --runs 2 --json $L/h0.json
step h1 200 python3 -m krasis.coordinator bench $G $OG --decode-strategy hcs_hybrid --prompt-lens 512 --concurrency 1,4,16,32 --runs 1 --json $L/h1.json
step h2 120 python3 benchmarks/startup.py $G --devices cuda:0 --cpu-bits 4 --gpu-bits 4 --group-size 32 --runs 2
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_STEPS=2-2,1 step h3 150 python3 -m krasis.coordinator bench $G $OG --decode-tokens 4 --prompt-lens 10000 --runs 2 --json $L/h3.json
finish
for f in $L/h*.log; do echo "== $f"; grep -v "^\[" $f | tail -n 20; done
head -60 $L/prof/stage0-prefill.txt 2>/dev/null | cut -c1-60,100-190
