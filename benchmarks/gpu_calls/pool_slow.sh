# Why the pool's kernel runs slower in bench than in cpu_experts.py on the same host (item 3): session
# 23's third call had 271-320 us a layer in bench against 227-251 us in cpu_experts.py's rhythm (14
# threads both), and its first call 265 us after 512 (the first prompt, right after the expert cache
# was built) against 176 after 10K. Two suspects:
# - writeback: a fresh machine writes the 16 GB GGUF and the 16 GB expert cache, and the kernel's
#   flusher threads then take cores and DRAM from the pool's for minutes (w0: the first bench, the
#   cache built; then `sync`, timed; w1: the same bench with nothing dirty);
# - the page tables: the pool's 16 GB store in 4 KiB pages has 32 MB of PTEs, which the caches do
#   not keep, where cpu_experts.py's 1.5 GB has 3 MB (c1: cpu_experts.py at --gb 1.5, c2 at --gb 8).
# Session 23's call 4 ruled both out (BENCHMARKS.md). Next suspect: the pool's threads pinned to 14
# cores where cpu_experts.py's float over 16 (c3: --pin, the pool's way; with two threads a core,
# lscpu in machine.txt, the GPU worker's cores would be siblings of two of the pool's).
. benchmarks/gpu_calls/lib.sh
machine
G=/tmp/peer/qwen3-30b-a3b-q4_0.gguf
[ -f $G ] || { mkdir -p /tmp/peer; step b1 320 python3 benchmarks/peer_llamacpp.py --out /tmp/peer-out --gguf --file $G; }
mem() { echo "$1: $(grep -E '^(Dirty|Writeback):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')" >> $L/meminfo.txt; }
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64 --prompt-lens 512"
mem start
step w0 100 $B --json $L/w0.json
mem "after w0"
s=$(date +%s); sync; echo "sync took $(( $(date +%s) - s )) s" >> $L/meminfo.txt
mem "after sync"
step w1 80 $B --json $L/w1.json
mem "after w1"
K="benchmarks/cpu_experts.py --threads 14 --group-size 32 --formats int4 --seconds 1 --gap-us 0"
step c1 60 python3 $K --gb 1.5
step c2 90 python3 $K --gb 8
step c3 60 python3 $K --gb 1.5 --pin
finish
cat $L/meminfo.txt
for s in w0 w1; do echo "== $s"; grep "pool us\|lookahead:\|^| qwen" $L/$s.log; done
for s in c1 c2 c3; do echo "== $s"; grep "M=1 c\|M=8 c\|DRAM read" $L/$s.log; done
