# Session 29's first call (on a fresh machine: peer_gguf writes the GGUF where none is). Session 28 found
# --attn-bits 8's 10K prefill 6% below the defaults' (each chunk dequantizes its products), before
# QuantLinear.dequantize multiplied in bf16; and item 3's runs compared floors from one DRAM read
# each (bench reads it twice since). Interleaved, twice: the defaults (d1) and --attn-bits 8 (d8)
# after 512 and 10K tokens, 1 and 32 sequences; then every layer through the pool, 256 tokens (b1);
# p1: the whole model in VRAM (no --vram-budget), one sequence, the worker traced for three steps: where
# a resident layer's decode time goes (ours ~245 tok/s there, llama.cpp's ~300: peer.sh's "vram" row).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
for r in 1 2; do
  step d1_$r 110 $PD --json $L/d1_$r.json
  step d8_$r 110 $PD --attn-bits 8 --json $L/d8_$r.json
done
step b1 80 $PB --decode-tokens 256 --json $L/b1.json
KRASIS_PROFILE=$L/prof1 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step p1 90 python3 -m krasis.coordinator \
  bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64 --prompt-lens 512 --json $L/p1.json
python3 benchmarks/trace_summary.py $L/prof1/stage0-decode.json --show 1 > $L/p1_trace.txt 2>&1
finish
for s in d1_1 d8_1 d1_2 d8_2 b1 p1; do echo "== $s"; grep "^| qwen\|^| [0-9]\|pool us\|MoE layers on the GPU\|dram" $L/$s.log | cut -c1-240 | head -10; done
head -c 2500 $L/p1_trace.txt; head -40 $L/prof1/stage0-decode.txt 2>/dev/null | cut -c1-200
