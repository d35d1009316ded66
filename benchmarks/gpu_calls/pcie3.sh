# Session 37: the host share staged (gpu_worker/host_share.py: its experts copied from host memory into
# device memory by a gather kernel, then the decode GEMV there; it read them in place over PCIe at ~22
# GB/s in session 36). First the split and gather kernels against their references on CUDA (k0) and
# dram_share.py (its "staged host" rows: the gather then the GEMV, against the GEMV in place); then
# every layer through the pool at --pcie-share 0, 0.125, 0.25 and 0.375, with .old (61f0b88: the share
# read in place) at 0.25 beside them, twice; and the defaults at 1, 4, 16 and 32 sequences, off and
# auto. Carry .old at 61f0b88.
. benchmarks/gpu_calls/lib.sh
machine
step k0 60 bash -c "cd tests && python3 -c 'import test_host_share as t; exec(t.CHECK)'"
step d0 100 python3 benchmarks/dram_share.py --json $L/d0.json
peer_gguf
for r in 1 2; do
  for s in 0 0.125 0.25 old 0.375; do
    [ $r$s = 20.375 ] && continue
    if [ $s = old ]; then
      old_step sold_$r 60 $PB --decode-tokens 256 --pcie-share 0.25 --json $L/sold_$r.json
    else
      step s${s#0.}_$r $([ $r$s = 10 ] && echo 150 || echo 60) $PB --decode-tokens 256 --pcie-share $s --json $L/s${s#0.}_$r.json
    fi
  done
  [ $r = 1 ] && for s in 0 auto; do
    step m${s} 120 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --concurrency 1,4,16,32 \
      $([ $s = auto ] || echo --pcie-share $s) --json $L/m${s}.json
  done
done
finish
tail -n 3 $L/k0.log
grep -v "^\s*$" $L/d0.log | grep -v tiles | tail -n 16 | cut -c1-300
grep tiles $L/d0.log | cut -c1-200
for s in m0 mauto; do echo "== $s"; grep "^| qwen\|host share" $L/$s.log | cut -c1-260 | head -12; done
for r in 1 2; do for s in 0 125 25 old 375; do [ -f $L/s${s}_$r.log ] || continue; echo "== s${s}_$r"; grep "^| qwen\|pool us\|routed choices\|host share" $L/s${s}_$r.log | cut -c1-260 | head -5; done; done
