# Session 39: on a fresh host, whether bench's DRAM read moves with where a buffer lies or with when
# it is read (benchmarks/dram_read.py), then the whole peer table with every llama.cpp configuration
# and item 3's pool row (peer.sh's default steps), then the read again on fewer buffers.
. benchmarks/gpu_calls/lib.sh
machine
step r0 60 python3 benchmarks/dram_read.py --json $L/r0.json
peer_inner 45
step r1 40 python3 benchmarks/dram_read.py --buffers 3 --json $L/r1.json
finish
tail -n 24 $L/peer_*.txt; cat $L/r0.log $L/r1.log
