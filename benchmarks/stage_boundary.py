"""What a pipeline stage boundary over tcp costs against ipc (issue 16), per decode token and for a
10K-token prefill.

    python benchmarks/stage_boundary.py [--hidden 4096] [--model DIR | --synth SHAPE --layers N]
                                        [--device cuda:0] [--prompt-tokens 10000]

On the GPU machine, two agents on its one GPU:
    python benchmarks/stage_boundary.py --synth qwen3-30b-a3b --layers 8 --device cuda:0 --vram-budget 60

1. The boundary alone: the message one stage sends the next (shared/protocol.py Step with its
   `hidden` tensor, bf16) for one decode token ([1, hidden]) and for a prefill ([prompt, hidden]),
   PUSH to PULL over ipc, tcp on 127.0.0.1, and tcp with CURVE, timed one way (a ping-pong of
   the same message, halved; the median of many for decode).
2. End to end (with --model): `krasis-coord generate` of a --prompt-tokens prompt and 32 decode
   tokens on two stages, once as one process tree (`--devices D,D`: ipc between the stages) and once
   as two host agents on 127.0.0.1, each pinned to half of the cores (`krasis-coord host --devices D`
   each: tcp between the stages, and into stage 0 and back through the agent's relay), without and
   with CURVE. The difference is what the hosts' wiring
   costs per decode token and for the prefill. Two agents can share one GPU (--device cuda:0).
   --synth writes a random-weight model of a real shape (coordinator/synth.py) with INT4 experts
   into /tmp/krasis-synth and runs it with --gpu-bits 4 --cpu-bits 4.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import zmq

from krasis.coordinator.hosts import free_agent_port
from krasis.shared import protocol as P
from krasis.shared.keys import Curve, keygen


def _echo(ends: tuple[str, str], keys: str | None, n: int) -> None:
    """The next stage: receive each message on ends[0], decode it, send it back to ends[1]."""
    ctx = zmq.Context()
    curve = Curve(ctx, keys)
    inbound, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    curve.bind(inbound, ends[0])
    curve.connect(back, ends[1])
    for _ in range(n):
        back.send_multipart(P.encode(P.decode(inbound.recv_multipart(copy=False))), copy=False)
    back.close(linger=5000)
    inbound.close(0)
    curve.close()
    ctx.term()


def boundary(ends: tuple[str, str], keys: str | None, rows: int, hidden: int, repeats: int) -> tuple[float, float]:
    """(Least, median) one-way seconds of a Step carrying [rows, hidden] bf16 from a PUSH to a PULL
    in another process (sent to ends[0], echoed back to ends[1]), encoding and decoding included.
    The least is the path's own cost; the median adds what the scheduler makes it wait on a busy
    machine."""
    echo = multiprocessing.get_context("fork").Process(target=_echo, args=(ends, keys, repeats + 1))
    echo.start()  # before this process opens a context: a forked child must not inherit one
    ctx = zmq.Context()
    curve = Curve(ctx, keys)
    inbound, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    curve.bind(inbound, ends[1])
    curve.connect(out, ends[0])
    msg = P.Step(step=0, slices=[P.SeqSlice(seq=0, start=0, n=rows)], decode=rows == 1)
    msg.tensors = {"hidden": torch.randn(rows, hidden).to(torch.bfloat16)}
    times = []
    for _ in range(repeats + 1):  # the first warms the connection
        t0 = time.perf_counter()
        out.send_multipart(P.encode(msg), copy=False)
        P.decode(inbound.recv_multipart(copy=False))
        times.append((time.perf_counter() - t0) / 2)
    echo.join(30)
    for s in (inbound, out):
        s.close(0)
    curve.close()
    ctx.term()
    return min(times[1:]), statistics.median(times[1:])


def generate(model: str, prompt: int, extra: list[str]) -> dict:
    ids = ",".join(str(3 + i % 100) for i in range(prompt))
    cmd = [sys.executable, "-m", "krasis.coordinator", "generate", model, "--prompt-ids", ids, "--max-new-tokens", "32",
           "--max-context", str(prompt + 64), "--prefill-chunk", str(prompt), "--json", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"generate failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def over_hosts(model: str, device: str, prompt: int, run_args: list[str], keys: str | None) -> dict:
    """generate on two host agents on 127.0.0.1, one stage each."""
    key_args = ["--keys", keys] if keys else []
    cores = sorted(os.sched_getaffinity(0))
    # each agent on its own half of the cores, as on a machine of its own: two agents that each
    # sized their threads for the whole machine would measure oversubscription, not the wiring
    halves = [cores[: len(cores) // 2] or cores, cores[len(cores) // 2:]]
    agents = []
    try:
        for half in halves:
            port = free_agent_port()
            agents.append((port, subprocess.Popen(
                [sys.executable, "-m", "krasis.coordinator", "host", "--listen", f"tcp://127.0.0.1:{port}",
                 "--devices", device, "--cpu-workers", "1", *key_args], stderr=subprocess.DEVNULL,
                preexec_fn=lambda half=half: os.sched_setaffinity(0, half))))
        deadline = time.monotonic() + 120
        for port, proc in agents:  # an agent is up once its control port takes connections
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("a host agent did not start")
                time.sleep(0.2)
        hosts = ",".join(f"tcp://127.0.0.1:{p}" for p, _ in agents)
        return generate(model, prompt, ["--hosts", hosts, *key_args, *run_args])
    finally:
        for _, proc in agents:
            proc.terminate()
            proc.wait(30)


def end_to_end(model: str, device: str, prompt: int, run_args: list[str], keys: str) -> dict:
    return {"ipc": generate(model, prompt, ["--devices", f"{device},{device}", "--cpu-workers", "1", *run_args]),
            "tcp": over_hosts(model, device, prompt, run_args, None),
            "tcp + CURVE": over_hosts(model, device, prompt, run_args, keys)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096, help="Activation width (Qwen3-235B-A22B: 4096).")
    ap.add_argument("--prompt-tokens", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=2000, help="Decode-size messages timed.")
    ap.add_argument("--model", help="Also run the end-to-end comparison on this model.")
    ap.add_argument("--synth", help="Instead of --model: a synthetic model of this shape (krasis-coord synth --shape).")
    ap.add_argument("--layers", type=int, default=8, help="Layers of the --synth model.")
    ap.add_argument("--device", default="cpu", help="Each stage's device in the end-to-end run.")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--vram-budget", help="GB per stage: two stages share one GPU here, so give each under half.")
    args = ap.parse_args()

    keys = os.path.join(tempfile.mkdtemp(), "keys")
    keygen(keys)
    print(f"boundary alone: a Step with hidden [rows, {args.hidden}] bf16, one way, least / median")
    print("| path | decode: 1 row, us | prefill: %d rows, ms | prefill GB/s (least) |" % args.prompt_tokens)
    print("|---|---|---|---|")
    tcp = [f"tcp://127.0.0.1:{free_agent_port() + i}" for i in range(2)]
    paths = (("ipc", (f"ipc://@krasis-bench-{os.getpid()}-a", f"ipc://@krasis-bench-{os.getpid()}-b"), None),
             ("tcp", tuple(tcp), None), ("tcp + CURVE", tuple(tcp), keys))
    for name, ends, k in paths:
        dec = boundary(ends, k, 1, args.hidden, args.repeats)
        pre = boundary(ends, k, args.prompt_tokens, args.hidden, 5)
        gb = args.prompt_tokens * args.hidden * 2 / pre[0] / 1e9
        print(f"| {name} | {dec[0] * 1e6:.0f} / {dec[1] * 1e6:.0f} | {pre[0] * 1e3:.1f} / {pre[1] * 1e3:.1f} | {gb:.2f} |")
    run_args = ["--dtype", args.dtype, *(["--vram-budget", args.vram_budget] if args.vram_budget else [])]
    if args.synth:
        from pathlib import Path

        from krasis.coordinator.synth import synth

        args.model = str(Path("/tmp/krasis-synth") / f"{args.synth}-{args.layers}")
        if not Path(args.model).exists():
            synth(args.synth, args.model, layers=args.layers, expert_bits=4)
        run_args += ["--gpu-bits", "4", "--cpu-bits", "4"]
    if args.model:
        res = end_to_end(args.model, args.device, args.prompt_tokens, run_args, keys)
        print(f"\nend to end: {args.model}, two stages on {args.device}, {args.prompt_tokens}-token prompt, 32 tokens")
        print("| stages | prefill s | decode ms/token |")
        print("|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {args.prompt_tokens / r['prefill_tok_s']:.2f} | {1e3 / r['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
