# After session 36's pcie.sh: the decode GEMV's tilings on host memory (dram_share.py's last step: its
# default tile read ~22 GB/s there, a plain sum 49), then every layer through the pool with the share
# off, auto (none below 8 tokens since session 36) and a fixed eighth (one expert of a token's eight:
# whether one expert on the device pays at one token with this GEMV), and the defaults at 1, 4, 16
# and 32 sequences with the share off and auto (auto's rules since the call: none below 8 tokens,
# level 0 measured again after its climb).
. benchmarks/gpu_calls/lib.sh
machine
step d0 120 python3 benchmarks/dram_share.py --json $L/d0.json
peer_gguf
for r in 1 2; do
  for s in 0 auto 0.125; do
    step s${s#0.}_$r $([ $r$s = 10 ] && echo 150 || echo 60) $PB --decode-tokens 256 \
      $([ $s = auto ] || echo --pcie-share $s) --json $L/s${s#0.}_$r.json
  done
done
for s in 0 auto; do
  step m${s} 120 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --concurrency 1,4,16,32 \
    $([ $s = auto ] || echo --pcie-share $s) --json $L/m${s}.json
done
finish
grep -v "^\s*$" $L/d0.log | tail -n 24 | cut -c1-300
for s in m0 mauto; do echo "== $s"; grep "^| qwen\|host share\|takes" $L/$s.log | cut -c1-260 | head -12; done
for r in 1 2; do for s in 0 auto 125; do echo "== s${s}_$r"; grep "^| qwen\|pool us\|routed choices\|host share" $L/s${s}_$r.log | cut -c1-260 | head -5; done; done
