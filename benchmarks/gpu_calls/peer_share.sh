# Session 38: item 3 in one run, both halves: peer.sh's table (llama.cpp and ours on the peer GGUF, with
# every layer through our pool against llama.cpp's experts on the CPU, the host share at auto), then
# the pool's decode with the share off and at auto again (the tuner's interleaved last look, first
# run on a GPU), on the same warm machine.
. benchmarks/gpu_calls/lib.sh
# peer.sh inside this call: its own logs folder (a second later), within this call's time
BUDGET=$(( DEADLINE - $(date +%s) - 130 )) bash benchmarks/gpu_calls/peer.sh > $L/peer.txt 2>&1
sleep 1; machine
for s in 0 auto2; do
  step s$s 100 $PB --decode-tokens 256 $([ $s = auto2 ] || echo --pcie-share $s) --json $L/s$s.json
done
finish
tail -n 24 $L/peer.txt
for s in 0 auto2; do echo "== s$s"; grep "^| qwen\|host share\|takes\|floor" $L/s$s.log | cut -c1-260 | head -8; done
