# Session 38: item 3 in one run, both halves: llama.cpp on the peer GGUF with its experts on the CPU
# beside every layer through our pool (host share at auto), the pool with the share off, then the
# rest of peer.sh's table, then auto again (the tuner's interleaved last look, first run on a GPU), on
# the same warm machine. Most needed first: a short call loses the last steps.
. benchmarks/gpu_calls/lib.sh
peer_inner 60 "gguf llama pool"
machine
step s0 100 $PB --decode-tokens 256 --pcie-share 0 --json $L/s0.json
peer_inner 0 ours
step sauto2 100 $PB --decode-tokens 256 --json $L/sauto2.json
finish
tail -n 24 $L/peer_ours.txt
for s in 0 auto2; do echo "== s$s"; grep "^| qwen\|host share\|takes\|floor" $L/s$s.log | cut -c1-260 | head -8; done
