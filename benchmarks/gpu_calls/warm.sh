# (P2_AHEAD was taken out of expert_kernel.c after this call, which found no gain; warm2.sh follows it.)
# Session 35 (item 3): two ways to shorten a layer of pure_cpu decode, each against this tree with it
# off, interleaved: the device reading the next layer's weights into its L2 during the pool's kernel
# (gpu_worker/l2_warm_kernel.py; off: KRASIS_L2_WARM=0), and the pool's threads out of phase 1
# reading their first phase-2 rows while the slowest end it (expert_kernel.c: P2_AHEAD; off: the
# alt_tree copy built with it 0). w0 times the turn's products cold and warmed (device_check's warm
# check) and checks the compiled kernel's reads; g1 that decode graphs with the warm-up in them
# replay the eager steps exactly. Then the 256-bit build of the pool's kernel against the AVX-512 one
# (vnni256.sh's step), if time is left.
. benchmarks/gpu_calls/lib.sh
machine
step w0 120 python3 benchmarks/device_check.py --checks warm --skip-exact --skip-bench
step g1 100 python3 -m pytest -q -x tests/test_decode_graphs.py -k pp1-fp8
peer_gguf
alt_tree P2_AHEAD 0
for r in 1 2; do
  step a_$r $([ $r = 1 ] && echo 170 || echo 80) $PB --decode-tokens 256 --json $L/a_$r.json
  KRASIS_L2_WARM=0 step n_$r 80 $PB --decode-tokens 256 --json $L/n_$r.json
  PYTHONPATH=/tmp/alt:$PYTHONPATH step p_$r 80 $PB --decode-tokens 256 --json $L/p_$r.json
done
step v_1 80 python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --seconds 1 --gb 1.5 \
  --gap-us 58 --right 6 --kernels c --c-flags=-mno-avx512f
finish
grep "warm" $L/w0.log | cut -c1-1500; tail -n 3 $L/g1.log
for s in a_1 n_1 p_1 a_2 n_2 p_2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-240 | head -4; done
echo "== v_1"; grep "in cache\|M=1\|M=8" $L/v_1.log | cut -c1-200
