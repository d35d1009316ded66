# Item 1: session 24's 10K prefill ran 62-68% of the one-pass floor on every tree it measured (session
# 23: 77.7-84.2%), the first runs on the GGUF of session 23's multi-threaded writer (whose tensors
# have the old writer's statistics). Host or file: both files, one call, this tree's runtime.
# .old (carried): a worktree at 16bfaa0, whose benchmarks/synth_gguf.py is the single-threaded writer
# (`git -C .old checkout --detach 16bfaa0`); ~190 s to write on a GPU host, the new one ~75.
# n0: the new file, o0: the old one; 10K and 512, two runs each (about 500 s in all: BUDGET=570).
# f0: the new file's 10K step under torch.profiler (KRASIS_PROFILE_STEPS) for the host's share.
. benchmarks/gpu_calls/lib.sh
machine
N=/tmp/peer/new.gguf; O=/tmp/peer/old.gguf; mkdir -p /tmp/peer
step gn 200 python3 benchmarks/peer_llamacpp.py --out /tmp/peer-out --gguf --file $N
step go 260 python3 .old/benchmarks/peer_llamacpp.py --out /tmp/peer-out --gguf --file $O
A="--devices cuda:0 --vram-budget 16 --gpu-bits 4 --cpu-bits 4 --group-size 32 --runs 2 --decode-tokens 16 --prompt-lens 10000,512"
step n0 110 python3 -m krasis.coordinator bench $N $A --json $L/n0.json
step o0 110 python3 -m krasis.coordinator bench $O $A --json $L/o0.json
KRASIS_PROFILE=$L/prof KRASIS_PROFILE_STEPS=1,0 step f0 90 python3 -m krasis.coordinator bench $N $A --json $L/f0.json
finish
for s in n0 o0 f0; do echo "== $s"; grep "^| qwen\|^| new\|^| old" $L/$s.log; done
ls $L/prof 2>/dev/null | head
