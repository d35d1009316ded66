# Item 5 (32 sequences at least 6x one): a decode step split between the PCIe stream and the pool
# (gpu_worker/decode_split.py), against each alone, on the peer GGUF (peer.sh writes it; on a fresh
# machine this script writes it first: 170-200 s single-threaded) with default options but those named: 32 sequences
# after 512-token prompts, one run each.
# - s3: the defaults (auto: the route measures the two ends, the balancing split and one more, keeps
#   the fastest and logs each one's median step time), 128 tokens a sequence (its first ~16 steps at
#   32 are the route trying its runners);
# - s0: every decode step through the pool (--stream-decode off), the one end as a bench figure;
# - p1: every layer resident (no pool, no stream: --vram-budget 60), ten full-batch steps of 32
#   sequences traced, where the GPU's own step grew ~1.5 ms a layer from 1 to 32 sequences beyond its
#   expert products on host B (session 19);
# - f0: one 10K-token prefill step of the defaults traced with its copy stream (item 1: host C's step
#   took 366 ms against 229 ms of copies and ~121 ms of matmul FLOPs, as if the two did not overlap).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
A="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1"
B="$A --decode-tokens 64 --prompt-lens 512 --concurrency 32"
step s3 130 $B --vram-budget 16 --decode-tokens 128 --json $L/s3.json
step s0 100 $B --vram-budget 16 --stream-decode off --json $L/s0.json
KRASIS_PROFILE=$L/prof1 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,80-89 step p1 120 $B --vram-budget 60 --json $L/p1.json
python3 benchmarks/trace_summary.py $L/prof1/stage0-decode.json > $L/p1_trace.txt 2>&1
KRASIS_PROFILE=$L/prof2 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=1,0 step f0 100 $A --vram-budget 16 --decode-tokens 8 --prompt-lens 10000 --json $L/f0.json
python3 benchmarks/trace_summary.py $L/prof2/stage0-prefill.json --streams > $L/f0_kernels.txt 2>&1
rm -f $L/prof1/*.json $L/prof2/*.json
finish
for s in s3 s0 p1 f0; do echo "== $s"; grep "decode steps of up to\|^| \|prefill" $L/$s.log | tail -n 8; done
head -n 40 $L/p1_trace.txt; head -n 30 $L/prof2/stage0-prefill.txt; head -n 40 $L/f0_kernels.txt
