# Session 32: where a 10K prefill step of the defaults goes now (item 1). split.sh's trace (session 22)
# found the step bound by the GPU's compute, not PCIe (attention 90.7 ms, the grouped expert products
# 95.4, dequantization 40.4, ~70 ms of small kernels, of a 380.9 ms span); the grouped products have
# dequantized in their tiles since (sessions 26-28), and 10K runs 69-87% of the one-pass floor on
# different hosts. On the peer GGUF, 48 layers, the budget:
# - f1: the figure, no profiler; f0: its prefill step under torch.profiler (the step after the
#   warm-up), each stream's busy time and the kernels by name (trace_summary.py --streams);
# - o1: f1 with .old (carried: session 29's tree), once: whether session 30's tree changed prefill;
# - v0/v1: 512 tokens with the whole model in VRAM, .old (carried: session 29's tree) against this
#   one, interleaved, twice: session 31's one run each read 5,737 against 3,764-3,917 tok/s.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
P10="python3 -m krasis.coordinator bench $PO --prompt-lens 10000 --runs 2 --decode-tokens 8"
step f1 120 $P10 --json $L/f1.json
old_step o1 80 $P10 --json $L/o1.json
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=1,0 step f0 120 $P10 --runs 1 --json $L/f0.json
python3 benchmarks/trace_summary.py $L/prof/stage0-prefill.json --streams > $L/f0_kernels.txt 2>&1
rm -f $L/prof/*.json
V="python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 2 --decode-tokens 8 --prompt-lens 512"
for r in 1 2; do
  old_step v0_$r 60 $V --json $L/v0_$r.json
  step v1_$r 60 $V --json $L/v1_$r.json
done
finish
for s in f1 o1 f0 v0_1 v1_1 v0_2 v1_2; do echo "== $s"; grep "^| qwen" $L/$s.log | cut -c1-200; done
head -n 30 $L/prof/stage0-prefill.txt | cut -c1-200; head -n 45 $L/f0_kernels.txt | cut -c1-200
