# Session 36, item 3: whether the GPU reading host memory over PCIe adds to the pool's DRAM rate or
# takes from it (benchmarks/dram_share.py: the CPU and the device each alone and at once; decode's
# expert products on a layer in host memory against device memory), then the pool's kernel in
# decode's rhythm alone (c0) and with the device reading host memory meanwhile (c1).
. benchmarks/gpu_calls/lib.sh
machine
step d0 100 python3 benchmarks/dram_share.py --json $L/d0.json
CE="python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --gap-us 52 --right 6 --kernels c --seconds 1"
step c0 90 $CE
step c1 90 bash -c "python3 benchmarks/dram_share.py --reader 45 & $CE; wait"
finish
cat $L/d0.log | grep -v "^\s*$" | tail -n 20 | cut -c1-300
for s in c0 c1; do echo "== $s"; grep "DRAM read\|M=1\|reader" $L/$s.log | cut -c1-300; done
