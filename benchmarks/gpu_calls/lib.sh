# The GPU machine's calls, each one device `run` well inside its 10 minutes (../shared/device/README.md):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
#   >/dev/null 2>&1; bash benchmarks/gpu_calls/prefill_decode.sh      (carry [".whl"]; peer.sh also ".peer/bin.tar.xz")
#
# .whl: `../shared/device/wheels.sh tomli-w` (the image lacks pyzmq, gguf and tomli-w, which the
# config module imports at every start: without it every krasis process exits at once).
#
# prefill_decode.sh, then startup_kernel_convert.sh on the same warm machine (the synth model in /tmp is
# kept while it stays warm); peer.sh after `benchmarks/peer_llamacpp.py --fetch-source` and
# `--build --portable` where nvcc is (the GPU machine builds it too, in ~5.5 minutes of its time), then
# `tar cf - -C .peer/build-cuda bin | xz -T0 > .peer/bin.tar.xz` (45 MB; the folder is ~100 MB).
#
# step NAME SECONDS CMD...: run CMD into $L/NAME.log, bounded by SECONDS and by the call's deadline.
# Everything under $L comes back as $OUT/logs-HHMMSS.tgz, one per script, so that one call can run
# several of them (at most 8 files come back from a call).
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + ${BUDGET:-575} ))
L=/tmp/devlogs/$(date +%H%M%S); mkdir -p $L
step() {
  local name=$1 secs=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 8 ))
  [ $left -lt $secs ] && secs=$left
  if [ $secs -lt 20 ]; then echo "$name: skipped, no time left" | tee -a $L/steps.txt; return; fi
  local s=$(date +%s)
  timeout -k 5 $secs "$@" > $L/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s (limit $secs)" | tee -a $L/steps.txt
}
machine() {
  ( nproc; free -g; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -i "model name"
    # whether the 16 "cores" are 8 with two threads each (the pool's 14 threads would then share
    # cores with the GPU worker's two), and the caches the lookahead reads into
    lscpu | grep -i "thread(s) per core\|core(s) per socket\|socket(s)\|l2 cache\|l3 cache"
    lscpu | grep -io "avx512[a-z_0-9]*\|amx[a-z_0-9]*" | sort -u | tr '\n' ' '; echo; ldd --version | head -1; df -h /tmp
    # whether the pool's store (shared memory) can have 2 MiB pages: its reads walk 4 KiB ones otherwise
    echo "THP enabled: $(cat /sys/kernel/mm/transparent_hugepage/enabled) shmem: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)"
  ) > $L/machine.txt 2>&1
}
finish() { tar czf $OUT/logs-$(basename $L).tgz -C $L . ; cat $L/machine.txt $L/steps.txt; }
# LAYERS=N: a slice of the first N layers instead of all 48, for a call with little device time left
# (per-layer costs and every fraction of a floor are the same; tok/s scale by 48/N).
M=/tmp/krasis-synth/qwen3-30b-a3b-${LAYERS:-all}-g32
# The issue's 16 GB budget, scaled with a slice's layers so the same share of experts stays resident.
VB=$(awk "BEGIN{printf \"%.2f\", 16 * ${LAYERS:-48} / 48}")
O="--devices cuda:0 --vram-budget $VB --gpu-bits 4 --cpu-bits 4 --group-size 32 --decode-tokens 64"
# That the decode kernels (batched attention, inside the graph since session 17) match their references
# compiled, and that graphs replay the eager steps exactly: before any decode figure is believed.
# CHECKS: device_check's checks; CHECK_TESTS: the pytest arguments of the GPU tests to run.
gpu_checks() {
  step g0 90 python3 benchmarks/device_check.py --checks ${CHECKS:-attention,dequant} --skip-exact --skip-bench
  step g1 120 python3 -m pytest -q -x ${CHECK_TESTS:-tests/test_decode_graphs.py -k pp1-fp8}
}
# g1: moe_blocks and moe_pairs in bf16 against moe_reference on CUDA (the grouped expert kernels of
# gpu_worker/expert_grouped_kernel.py); if they fail, the call's later steps run with them off.
grouped_check() {
  step g1 90 python3 -m pytest -q -x tests/test_strategies.py -k "grouped_moe and cuda"
  grep -q " passed" $L/g1.log && ! grep -q "failed\|error" $L/g1.log ||
    { export KRASIS_GROUPED_KERNELS=0; echo "g1 failed: grouped kernels off" | tee -a $L/steps.txt; }
}
synth_model() { [ -f $M/config.json ] || step synth 220 python3 -m krasis.coordinator synth --shape qwen3-30b-a3b ${LAYERS:+--layers $LAYERS} --expert-bits 4 --group-size 32 $M; }
# The peer GGUF (Qwen3-30B-A3B's shape, Q4_0 experts: benchmarks/peer_llamacpp.py) at $G, written on a
# fresh machine (66-82 s since session 23's writer).
G=/tmp/peer/qwen3-30b-a3b-q4_0.gguf
# bench on it as the issue runs it: every layer through the pool (PB), and the defaults after 512 and
# 10K tokens with 1 and 32 sequences (PD); each step adds its --json.
PO="$G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 1 --decode-tokens 64"
PB="python3 -m krasis.coordinator bench $PO --prompt-lens 512 --resident-decode off"
PD="python3 -m krasis.coordinator bench $PO --prompt-lens 512,10000 --concurrency 1,32"
peer_gguf() { [ -f $G ] || { mkdir -p /tmp/peer; step gguf 320 python3 benchmarks/peer_llamacpp.py --out /tmp/peer-out --gguf --file $G; }; }
# peer_inner RESERVE [STEPS]: peer.sh inside this call (its own logs folder, a second later), within
# what is left of this call less RESERVE seconds, its output in $L/peer_STEPS.txt (STEPS: else the
# caller's $STEPS, else peer.sh's default, named "default")
peer_inner() {
  local steps="${2:-$STEPS}"; local name="${steps:-default}"
  sleep 1
  BUDGET=$(( DEADLINE - $(date +%s) - $1 )) STEPS="$steps" bash benchmarks/gpu_calls/peer.sh > "$L/peer_${name// /_}.txt" 2>&1
}
# step NAME SECONDS CMD... with .old (a carried worktree of an earlier tree: `git worktree add --detach
# .old REV`) imported as krasis, for an A/B against this tree on one machine.
old_step() { mkdir -p /tmp/old && ln -sfn $PWD/.old /tmp/old/krasis; PYTHONPATH=/tmp/old:$PYTHONPATH step "$@"; }
# alt_tree NAME VALUE [NAME VALUE ...]: /tmp/alt, this tree with cpu_worker/expert_kernel.c's `#define NAME`
# set to VALUE (every top-level folder linked but cpu_worker, which is copied and edited), for an A/B
# against this tree with PYTHONPATH=/tmp/alt:$PYTHONPATH. steps.txt gets how many lines say so (1 each,
# or the edit did not take).
alt_tree() {
  rm -rf /tmp/alt/krasis/cpu_worker
  mkdir -p /tmp/alt/krasis && for f in $PWD/*; do ln -sfn $f /tmp/alt/krasis/; done
  rm /tmp/alt/krasis/cpu_worker && cp -r $PWD/cpu_worker /tmp/alt/krasis/
  while [ $# -ge 2 ]; do
    sed -i "s/^#define $1 .*$/#define $1 $2/" /tmp/alt/krasis/cpu_worker/expert_kernel.c
    echo "alt tree, #define $1 $2: $(grep -c "^#define $1 $2$" /tmp/alt/krasis/cpu_worker/expert_kernel.c) line(s)" >> $L/steps.txt
    shift 2
  done
}
# alt_ab THIS ALT SECONDS: every layer through the pool ($PB, 256 tokens after 512), this tree as steps
# THIS_1, THIS_2 interleaved with the alt_tree copy as ALT_1, ALT_2, each bounded by SECONDS.
alt_ab() {
  for r in 1 2; do
    step $1_$r $3 $PB --decode-tokens 256 --json $L/$1_$r.json
    PYTHONPATH=/tmp/alt:$PYTHONPATH step $2_$r $3 $PB --decode-tokens 256 --json $L/$2_$r.json
  done
}
