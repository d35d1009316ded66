# Session 34: the zygote (b0e4c95: one exec'd process imports the workers' modules and forks every
# worker) against session 32's tree (.old at 2823f81, each worker importing torch itself), on the peer
# GGUF with the options, interleaved: benchmarks/startup.py's time to ready (o*/n*, three
# starts a step), then chaos.py (a random worker killed every 15 s for a minute, 4 clients): a
# restart's cost shows in the time to first token with faults (co/cn).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
ARGS="--devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32"
S="python3 benchmarks/startup.py $G $ARGS --prompt-ids 1,2,3"
step s0 150 $S --runs 1  # builds the caches on a fresh machine
for r in 1 2; do
  old_step o$r 80 $S --runs 3
  step n$r 80 $S --runs 3
done
C="python3 benchmarks/chaos.py $G --minutes 1 --kill-every 15 --clients 4 --"
old_step co 150 $C $ARGS
step cn 150 $C $ARGS
finish
for s in o1 n1 o2 n2; do echo "== $s"; tail -n 14 $L/$s.log | cut -c1-160; done
for s in co cn; do echo "== $s"; tail -n 8 $L/$s.log | cut -c1-200; done
