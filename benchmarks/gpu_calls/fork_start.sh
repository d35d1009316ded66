# Session 33 (ran at 03d599b, where the coordinator forked its workers once the workers' modules were
# imported; since b0e4c95 a zygote process forks them: coordinator/processes.py) against session 32's tree (.old at 2823f81), where each
# worker imported torch itself, interleaved: benchmarks/startup.py on the peer GGUF with the issue's
# options (warm caches: s0 builds them), three starts a step; then `generate` in both trees, whose
# tokens must agree (a forked worker runs CUDA as an exec'd one does).
. benchmarks/gpu_calls/lib.sh
machine
peer_gguf
S="python3 benchmarks/startup.py $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --prompt-ids 1,2,3"
step s0 150 $S --runs 1
for r in 1 2; do
  old_step o$r 80 $S --runs 3
  step n$r 80 $S --runs 3
done
GEN="python3 -m krasis.coordinator generate $G --devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --prompt-ids 1,2,3,4,5 --max-new-tokens 16 --json"
old_step go 60 $GEN
step gn 60 $GEN
finish
for s in o1 n1 o2 n2; do echo "== $s"; tail -n 14 $L/$s.log | cut -c1-160; done
echo "== tokens"; tail -n 1 $L/go.log | cut -c1-200; tail -n 1 $L/gn.log | cut -c1-200
