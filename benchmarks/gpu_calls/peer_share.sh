# Session 38: item 3 in one run, both halves: llama.cpp on the peer GGUF (experts on the CPU, and the rest
# of peer.sh's table), then every layer through our pool over 256 tokens with the host share at auto
# (twice: the tuner's interleaved last look, first run on a GPU) and off, on the same warm machine.
. benchmarks/gpu_calls/lib.sh
# peer.sh inside this call: its own logs folder (a second later) and what is left of this call's time
left() { sleep 1; echo $(( DEADLINE - $(date +%s) )); }
BUDGET=$(left) STEPS="gguf llama" bash benchmarks/gpu_calls/peer.sh > $L/peer_llama.txt 2>&1
peer_gguf
machine
for s in auto 0; do
  step s$s 100 $PB --decode-tokens 256 $([ $s = auto ] || echo --pcie-share $s) --json $L/s$s.json
done
BUDGET=$(left) STEPS="ours" bash benchmarks/gpu_calls/peer.sh > $L/peer_ours.txt 2>&1
step sauto2 100 $PB --decode-tokens 256 --json $L/sauto2.json
finish
tail -n 30 $L/peer_ours.txt
for s in auto 0 auto2; do echo "== s$s"; grep "^| qwen\|pool us\|routed choices\|host share\|takes\|floor" $L/s$s.log | cut -c1-260 | head -8; done
