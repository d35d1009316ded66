# The pool's kernel in decode's rhythm (item 3), after peer.sh on the same warm machine (it needs
# peer.sh's GGUF for o0):
# - k0/k1: benchmarks/cpu_experts.py's decode rhythm (a 150 us GPU turn after each M=1 call, the
#   lookahead guessing 8, 6 or 4 of the next call's 8 experts right, or none) with the tree in .old
#   (k0, where carried) and this one (k1), 14 threads as the pool runs beside two GPU-side cores.
#   Session 23 compared phase 1's rows split per expert (so a thread's rows of an expert would not
#   depend on the other experts chosen) against the split over all the active experts' rows: the
#   lookahead's gain fell (8/8 right 0.298 against 0.265 ms), and the split went back;
# - o0: the defaults with the prompts in the other order (10K, then 512): the pool's kernel took
#   176-195 us a layer after 10K and 219-265 after 512 in session 23's first call, 512 always first.
. benchmarks/gpu_calls/lib.sh
K="benchmarks/cpu_experts.py --threads 14 --group-size 32 --formats int4 --seconds 1 --gb 1.5 --gap-us 150 --right 8,6,4"
if [ -d .old ]; then
  old_step k0 100 python3 .old/$K
fi
step k1 100 python3 $K
step o0 120 python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 \
  --runs 1 --decode-tokens 64 --prompt-lens 10000,512 --json $L/o0.json
finish
for s in k0 k1; do echo "== $s"; grep -A 8 "^Decode's rhythm" $L/$s.log; done
echo "== o0"; grep -v "^\[" $L/o0.log | grep "^| \|pool us\|lookahead:" | tail -n 8
