# Session 31, after fold.sh, peer.sh and prefetch_hint.sh on one H100 host. (1) peer.sh's 10K prefill ran
# 65-73% of the one-pass floor (sessions 28-29: 82-83%), and fold.sh's 512-token prefill in VRAM
# 3,764-3,917 tok/s with this tree against 5,737 with session 29's (one run): host or session 30's
# change? This tree against .old (session 29's, carried), interleaved, 10K at the issue's budget.
# (2) cpu_experts.py there: the row prefetch 4096 bytes ahead read 58.0 GB/s at M=1 (0.366 ms a layer)
# where the default 2048 read 52.7 (0.403): every layer through the pool (PB), this tree interleaved
# with a copy whose default is 4096 (the /tmp/alt tree, as prefetch_hint.sh makes it).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
P10="python3 -m krasis.coordinator bench $PO --prompt-lens 10000 --runs 2 --decode-tokens 8"
step n1 120 $P10 --json $L/n1.json
old_step o1 80 $P10 --json $L/o1.json
step n2 80 $P10 --json $L/n2.json
old_step o2 80 $P10 --json $L/o2.json
alt_tree PREFETCH ${DIST:-4096}
for r in 1 2; do
  step d2048_$r 60 $PB --decode-tokens 256 --json $L/d2048_$r.json
  PYTHONPATH=/tmp/alt:$PYTHONPATH step d${DIST:-4096}_$r 60 $PB --decode-tokens 256 --json $L/d${DIST:-4096}_$r.json
done
finish
for s in n1 o1 n2 o2 d2048_1 d${DIST:-4096}_1 d2048_2 d${DIST:-4096}_2; do
  echo "== $s"; grep "^| qwen\|pool us per layer\|ms per token" $L/$s.log | cut -c1-240 | head -4
done
