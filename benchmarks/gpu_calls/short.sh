# The fewest measurements that answer issue 14's first questions, for a call with about three
# minutes of device time (run with LAYERS=16 BUDGET=170): prefill at 2K, 10K and 32K with default
# options (does tok/s hold as the prompt grows? what share of the floor?), decode against the DRAM
# floor after the groups-of-32 kernel fix, and decode at 1, 4 and 32 sequences with the decode
# route (--stream-decode auto, the default) and without it. First, that the decode kernels (batched,
# inside the graph since session 17) match their references compiled, and that graphs replay the
# eager steps exactly (device_check's attention check; the graphs test at one stage, fp8 KV).
. benchmarks/gpu_calls/lib.sh
machine
gpu_checks
synth_model
step s1 70 python3 -m krasis.coordinator bench $M $O --prompt-lens 2048,10240,32768 --runs 1 --json $L/s1.json
step s2 50 python3 -m krasis.coordinator bench $M $O --prompt-lens 512 --concurrency 1,4,32 --runs 1 --json $L/s2.json
step s3 40 python3 -m krasis.coordinator bench $M $O --stream-decode off --prompt-lens 512 --concurrency 32 --runs 1 --json $L/s3.json
finish
for f in $L/g*.log $L/s*.log; do echo "== $f"; grep -v "^\[" $f | grep -v "it/s\]\|s/it\]" | tail -n 16; done
