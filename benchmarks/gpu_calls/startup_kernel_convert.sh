# Warm start of the 48-layer model, the pool kernel at groups of 32 and 128 with its rhythm (lookahead),
# GGUF conversion on 16 cores. (The stage boundary is prefill_decode.sh's: run after it, not again here.)
. benchmarks/gpu_calls/lib.sh
machine
synth_model
step c1 170 python3 benchmarks/startup.py $M --devices cuda:0 --cpu-bits 4 --gpu-bits 4 --attn-bits 8 --group-size 32 --runs 3
step c2 150 bash -c "python3 benchmarks/cpu_experts.py --formats int4 --seconds 1 --right 8,6 --group-size 32; python3 benchmarks/cpu_experts.py --formats int4 --seconds 0.5 --gap-us 0"
step c3 140 python3 benchmarks/convert_speed.py --layers 4 --types Q4_0
finish
for f in $L/c*.log; do echo "== $f"; tail -n 30 $f; done
