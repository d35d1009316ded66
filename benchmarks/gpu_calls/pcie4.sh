# Session 37, after pcie3.sh: auto's rules since that call (every batch size, one token too; levels to
# a half; the climb past one slower level). The defaults at 1, 4, 16 and 32 sequences, auto and off
# (item 5); every layer through the pool at 256 tokens, auto twice, off and a quarter (item 3); then
# the defaults at 1 and 32 sequences over 256 tokens, auto and off (the tuner's climb is a smaller
# part of a longer run).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
for s in auto 0; do
  step m${s} 120 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --concurrency 1,4,16,32 \
    $([ $s = auto ] || echo --pcie-share $s) --json $L/m${s}.json
done
for s in auto 0 auto2 0.25; do
  step s${s#0.} $([ $s = auto ] && echo 150 || echo 60) $PB --decode-tokens 256 \
    $([ ${s%2} = auto ] || echo --pcie-share $s) --json $L/s${s#0.}.json
done
for s in auto 0; do
  step l${s} 90 python3 -m krasis.coordinator bench $PO --prompt-lens 512 --concurrency 1,32 --decode-tokens 256 \
    $([ $s = auto ] || echo --pcie-share $s) --json $L/l${s}.json
done
finish
for s in mauto m0 lauto l0; do echo "== $s"; grep "^| qwen\|host share\|takes\|MoE layers on the GPU" $L/$s.log | cut -c1-260 | head -14; done
for s in auto 0 auto2 25; do echo "== s$s"; grep "^| qwen\|pool us\|routed choices\|host share\|takes" $L/s$s.log | cut -c1-260 | head -6; done
