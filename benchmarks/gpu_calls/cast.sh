# Session 35's last call, little device time left: the GPU worker's dense weights cast on the device
# (this tree: a 16-bit source crosses as it is) against on the host (.old at e328d33), by
# startup.py's phases on the peer GGUF (s0 builds the caches), then device_check's warm step.
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
ARGS="--devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32"
S="python3 benchmarks/startup.py $G $ARGS --prompt-ids 1,2,3"
step s0 90 $S --runs 1
old_step o1 45 $S --runs 2
step n1 45 $S --runs 2
step w0 30 python3 benchmarks/device_check.py --checks warm --skip-exact --skip-bench
finish
for s in s0 o1 n1; do echo "== $s"; grep "dense\|pin\|ready\|Ready" $L/$s.log | tail -n 6 | cut -c1-160; done
grep "warm" $L/w0.log | cut -c1-1200
