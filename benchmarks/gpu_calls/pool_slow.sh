# Why the pool's kernel runs slower in bench than in cpu_experts.py on the same host (item 3): 266-320
# us a layer in bench against 227-251 us in cpu_experts.py's rhythm (14 threads both, session 23).
# Session 23 ruled out the prompt length, writeback and page tables alone. Left:
# - the lookahead: in bench it reads ~12 MB a layer into the pool threads' L2s between calls, its
#   guesses naming ~57% of the choices; a line a thread needs may sit in another core's L2, and the
#   pool answers the next request only once the lookahead has halted (r0 against r1, --lookahead-kb 0,
#   every layer through the pool; r2 repeats r0 for the order);
# - the cores: the pool's 14 threads pinned to CPUs 0-13, the GPU worker and coordinator on 14-15
#   (where they spin in CUDA's synchronize); if those are hyperthreads of two of the pool's cores, two
#   of its threads run at half speed and the kernel's static split waits for them (machine.txt's lscpu
#   -e; c3: cpu_experts.py pinned as the pool is; c4: the same beside two spinning processes on 14-15).
# p0 traces the GPU worker's decode (pool layers only) for the GPU's own turn.
. benchmarks/gpu_calls/lib.sh
machine
lscpu -e >> $L/machine.txt 2>&1
peer_gguf
B="python3 -m krasis.coordinator bench $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64 --prompt-lens 512 --resident-decode off"
step r0 110 $B --json $L/r0.json
step r1 60 $B --lookahead-kb 0 --json $L/r1.json
step r2 60 $B --json $L/r2.json
K="benchmarks/cpu_experts.py --threads 14 --group-size 32 --formats int4 --seconds 1 --gap-us 66 --gb 1.5"
step c3 60 python3 $K --pin
spin() { taskset -c $1 sh -c 'while :; do :; done' & }
n=$(nproc); spin $((n - 2)); a=$!; spin $((n - 1)); b=$!
step c4 60 python3 $K --pin
kill $a $b
KRASIS_PROFILE=$L/prof0 KRASIS_PROFILE_TRACE=1 KRASIS_PROFILE_STEPS=0,20-22 step p0 60 $B --json $L/p0.json
python3 benchmarks/trace_summary.py $L/prof0/stage0-decode.json --show 2 > $L/p0_trace.txt 2>&1
rm -rf $L/prof0
finish
grep -i "thread(s) per core" $L/machine.txt; sed -n '/^CPU /,$p' $L/machine.txt
python3 - $L <<'PY'
import json, sys
for s in ("r0", "r1", "r2", "p0"):
    try:
        d = json.load(open(f"{sys.argv[1]}/{s}.json"))
    except OSError:
        continue
    p = d["pool"][0]
    n = p["calls"]
    print(f"{s}: decode {d['decode_tok_s']:.2f} tok/s (floor {d['decode_floor_tok_s']:.1f}), kernel {1e6 * p['kernel_s'] / n:.0f} us, "
          f"gap {1e6 * p['gap_s'] / max(p['gaps'], 1):.0f} us, after {1e6 * p['after_s'] / n:.0f} us, lookahead "
          f"{p.get('lookahead_bytes', 0) / n / 1e6:.1f} MB a call, guessed {p.get('guessed', 0)}/{p.get('chosen', 0)}")
PY
for s in c3 c4; do echo "== $s"; grep "M=1 c\|M=8 c\|DRAM read\|turn" $L/$s.log; done
head -40 $L/p0_trace.txt
