# Session 34: a restart after a fault, the zygote's (this tree: restarted workers are forked, their
# modules imported) against session 32's tree (.old at 2823f81: each restarted worker imports torch),
# by chaos.py on the peer GGUF with the options: a fault-free storm, then a worker killed
# 10 s after each recovery; each restart timed from the kill until health says "ok" again.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
ARGS="--devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32"
C="python3 benchmarks/chaos.py $G --minutes 0.6 --kill-every 10 --clients 4 --"
step cn 210 $C $ARGS  # first: a fresh machine builds the expert cache here
old_step co 170 $C $ARGS
finish
for s in cn co; do echo "== $s"; grep -v "decode graphs" $L/$s.log | tail -n 9 | cut -c1-220; done
