# Session 26's last call, lean (grouped2.sh found no machine twice; 470 s of device time left):
# prefill's grouped tile (128, 128, 64, 8, 3) at a one-chunk prompt, on (p1) and off (p0), and the
# whole model in VRAM at 1, 4, 16 and 32 sequences (e2: grouped decode products from 32 tokens).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
step p1 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p1.json
KRASIS_GROUPED_KERNELS=0 step p0 40 python3 -m krasis.coordinator bench $PO --prompt-lens 4000 --decode-tokens 8 --json $L/p0.json
step e2 90 python3 -m krasis.coordinator bench $G --devices cuda:0 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 \
  --decode-tokens 64 --prompt-lens 512 --concurrency 1,4,16,32 --json $L/e2.json
finish
for s in p1 p0 e2; do echo "== $s"; grep "^| qwen\|ms per token" $L/$s.log | cut -c1-300; done
