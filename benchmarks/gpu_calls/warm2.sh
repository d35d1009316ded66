# Session 35, after warm.sh (whose device_check step found no tensors to warm: L2Warm compared
# "cuda" with "cuda:0"; mended): the turn's products cold and warmed (w0), then every layer through
# the pool with the L2 warm-up (a) and without it (n, KRASIS_L2_WARM=0), interleaved three times,
# and the same with --attn-bits 8 (a8, n8: 19 MB of INT8 attention weights a layer), twice.
. benchmarks/gpu_calls/lib.sh
machine
step w0 90 python3 benchmarks/device_check.py --checks warm --skip-exact --skip-bench
peer_gguf
for r in 1 2 3; do
  step a_$r $([ $r = 1 ] && echo 150 || echo 60) $PB --decode-tokens 256 --json $L/a_$r.json
  KRASIS_L2_WARM=0 step n_$r 60 $PB --decode-tokens 256 --json $L/n_$r.json
done
for r in 1 2; do
  step a8_$r 60 $PB --attn-bits 8 --decode-tokens 256 --json $L/a8_$r.json
  KRASIS_L2_WARM=0 step n8_$r 60 $PB --attn-bits 8 --decode-tokens 256 --json $L/n8_$r.json
done
finish
grep "warm" $L/w0.log | cut -c1-1500
for s in a_1 n_1 a_2 n_2 a_3 n_3 a8_1 n8_1 a8_2 n8_2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-240 | head -4; done
