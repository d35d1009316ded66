# Session 34 (item 3): does the page size bound the pool? The lent hosts are VMs (Firecracker) with
# transparent_hugepage/enabled "madvise" and shmem_enabled "never", so the pool's store (a memfd)
# lies on 4 KiB pages: ~4,600 of them a layer, each first read walking two levels of page tables.
# c_*: the pool's kernel alone (cpu_experts.py on the pool's 14 cores, decode's rhythm with a 58 us
# turn) on 4 KiB private pages, 2 MiB ones, and the store's kind of memory, interleaved, twice.
# n_*/a_*: every layer through the pool ($PB, 256 tokens after 512) with shmem_enabled "never" (the
# host's own setting) and "advise" (what `krasis-coord check` tells a user to set: the store asks for
# 2 MiB pages), interleaved, twice; each step's *.mem samples /proc/meminfo's huge shared memory.
. benchmarks/gpu_calls/lib.sh
machine
CE="python3 benchmarks/cpu_experts.py --threads 14 --pin --group-size 32 --formats int4 --seconds 1 --gb 1.5 --gap-us 58 --right 6 --kernels c"
for r in 1 2; do
  for p in small huge shared; do step c_${p}_$r 90 $CE --pages $p; done
done
peer_gguf
SHM=/sys/kernel/mm/transparent_hugepage/shmem_enabled
shmem() { echo $1 > $SHM 2>> $L/steps.txt; echo "shmem_enabled set to $1: $(cat $SHM)" >> $L/steps.txt; }
# mem_step NAME SECONDS CMD...: step, sampling /proc/meminfo's huge pages into $L/NAME.mem meanwhile
mem_step() {
  ( while sleep 2; do echo "$(date +%s) $(grep -h 'ShmemHugePages\|ShmemPmdMapped\|AnonHugePages' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"; done ) > $L/$1.mem &
  local sampler=$!
  step "$@"
  kill $sampler
}
for r in 1 2; do
  shmem never; mem_step n_$r $([ $r = 1 ] && echo 170 || echo 80) $PB --decode-tokens 256 --json $L/n_$r.json
  shmem advise; mem_step a_$r 80 $PB --decode-tokens 256 --json $L/a_$r.json
done
shmem never
finish
for s in c_small_1 c_huge_1 c_shared_1 c_small_2 c_huge_2 c_shared_2; do echo "== $s"; grep "DRAM read\|layers,\|in cache\|M=1\|M=8" $L/$s.log | cut -c1-230; done
for s in n_1 a_1 n_2 a_2; do echo "== $s"; grep "^| qwen\|pool us\|ms per token" $L/$s.log | cut -c1-240 | head -4; tail -n 2 $L/$s.mem; done
