# Session 36, item 3: the device's host share (gpu_worker/host_share.py). First whether the GPU reading
# host memory over PCIe adds to the pool's DRAM rate or takes from it (dram_share.py: the CPU and the
# device each alone and at once; decode's expert products on a layer in host memory against device
# memory), and the pool's kernel in decode's rhythm alone (c0) and with the device reading host
# memory meanwhile (c1); the split kernel against its reference on CUDA (k0); then every layer through
# the pool with --pcie-share 0 (off), 0.25, 0.375 and auto (the default: measured per batch size),
# interleaved twice.
. benchmarks/gpu_calls/lib.sh
machine
step k0 60 bash -c "cd tests && python3 -c 'import test_host_share as t; exec(t.CHECK)'"
step d0 100 python3 benchmarks/dram_share.py --json $L/d0.json
peer_gguf
for r in 1 2; do
  for s in 0 0.25 auto 0.375; do
    step s${s#0.}_$r $([ $r$s = 10 ] && echo 150 || echo 60) $PB --decode-tokens 256 \
      $([ $s = auto ] || echo --pcie-share $s) --json $L/s${s#0.}_$r.json
  done
  # item 5: the defaults (28 layers resident at this budget) at 1 and 32 sequences, off and auto
  [ $r = 1 ] && for s in 0 auto; do
    step m${s}_1 90 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --concurrency 1,32 \
      $([ $s = auto ] || echo --pcie-share $s) --json $L/m${s}_1.json
  done
done
CE="python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --gap-us 52 --right 6 --kernels c --seconds 1"
step c0 80 $CE
step c1 80 bash -c "python3 benchmarks/dram_share.py --reader 40 & $CE; wait"
finish
grep -v "^\s*$" $L/d0.log | tail -n 16 | cut -c1-300
tail -n 3 $L/k0.log
for s in c0 c1; do echo "== $s"; grep "DRAM read\|M=1\|reader" $L/$s.log | cut -c1-300; done
for s in m0_1 mauto_1; do echo "== $s"; grep "^| qwen\|host share" $L/$s.log | cut -c1-260 | head -8; done
for r in 1 2; do for s in 0 25 auto 375; do echo "== s${s}_$r"; grep "^| qwen\|pool us\|routed choices\|lookahead:\|host share" $L/s${s}_$r.log | cut -c1-260 | head -6; done; done
