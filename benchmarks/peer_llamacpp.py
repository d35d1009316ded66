"""llama.cpp and us on one GGUF file in one run (issue 14, item 2), phase by phase so that each
phase fits one 10-minute call on the GPU machine.

    python benchmarks/peer_llamacpp.py --fetch-source            # here, where PyPI works
    python benchmarks/peer_llamacpp.py --build                    # GPU machine: llama-bench, sm_90
    python benchmarks/peer_llamacpp.py --gguf                     # the Qwen3-30B-A3B-shaped Q4_0 file
    python benchmarks/peer_llamacpp.py --llama                    # llama-bench on it
    python benchmarks/peer_llamacpp.py --ours                     # krasis-coord bench on it
    python benchmarks/peer_llamacpp.py --report                   # the table again, from --out
    (--all: build, gguf, llama, ours, in order)

--fetch-source downloads llama-cpp-python's sdist (`pip download --no-binary :all: --no-deps`),
takes the llama.cpp it vendors, and keeps what a CPU + CUDA build of llama-bench needs (CMake files,
include/, src/, common/, vendor/, ggml/ with its CPU and CUDA backends only, tools/llama-bench) in
.peer/llama.cpp (git-ignored; ~25 MB, small enough to travel to the GPU machine as a `carry` path).
tools/CMakeLists.txt is rewritten to add llama-bench alone.
--build configures with CUDA for sm_90 (or --cpu-only) into .peer/build, outside the carried source
so that later calls, which replace .peer/llama.cpp, keep it; it does nothing when the binary exists.
--gguf writes ONE file with benchmarks/qwen3_gguf.py (numpy + gguf only): the Qwen3-30B-A3B shape,
Q4_0 routed experts, F16 attention, seeded random weights; skipped when it exists.
--llama runs llama-bench (-o json, threads = physical cores, -p 512,10000 -n 64):
    hybrid at -ub 4096 (the issue's setting), a sweep of -ub for pp10000 to find its best, hybrid
    at that best, and everything in VRAM. Hybrid = -ngl 99 --n-cpu-moe LAYERS -fa 1. -b = -ub
    (llama.cpp clamps -ub to -b).
--ours runs `krasis-coord bench FILE --devices cuda:0 --vram-budget 16` plus --ours-args (default:
    the same bytes per weight as Q4_0, INT4 with groups of 32 on both sides), once per prompt
    length; the first call converts the file's experts into the cache beside it.
Every phase writes its JSON and logs into --out, and each call ends by printing the table of what
--out holds: both sides, the ratios (ours / llama.cpp), with date, device and command lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".peer"
KEEP = ["CMakeLists.txt", "LICENSE", "licenses", "cmake", "include", "src", "common", "vendor", "ggml", "tools/llama-bench"]
GGML_BACKENDS_KEPT = ("ggml-cpu", "ggml-cuda")
PROMPTS = (512, 10000)
DECODE = 64
UB_SWEEP = (1024, 2048, 4096, 8192, 16384)
OURS_ARGS = "--gpu-bits 4 --cpu-bits 4 --group-size 32"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path, capture: bool = False) -> subprocess.CompletedProcess:
    """Run cmd with its output appended to logfile (stdout returned instead when `capture`);
    exits with the log's tail when it fails."""
    log("$ " + shlex.join(cmd))
    with open(logfile, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else f, stderr=f if capture else subprocess.STDOUT, text=True)
    if p.returncode:
        tail = logfile.read_text().splitlines()[-30:]
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return p


# --- --fetch-source -----------------------------------------------------------------------------


def fetch_source(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        if dest.exists():
            shutil.rmtree(dest)
        for rel in KEEP:
            src, dst = vendored / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        for backend in (dest / "ggml" / "src").glob("ggml-*"):
            if backend.is_dir() and backend.name not in GGML_BACKENDS_KEPT:
                shutil.rmtree(backend)
        (dest / "tools" / "CMakeLists.txt").write_text(
            "# slimmed by benchmarks/peer_llamacpp.py --fetch-source: llama-bench only\n"
            "llama_add_compile_flags()\nadd_subdirectory(llama-bench)\n")
        (dest / "SOURCE").write_text(f"{sdist.name}\n")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: llama.cpp from {sdist.name}, {size / 2**20:.1f} MiB")


# --- --build ------------------------------------------------------------------------------------


def bench_binary(build: Path) -> Path:
    return build / "bin" / "llama-bench"


def build_llama(source: Path, build: Path, cpu_only: bool, out: Path) -> None:
    binary = bench_binary(build)
    if binary.exists():
        log(f"{binary} exists: not rebuilding (remove {build} to rebuild)")
        return
    if not (source / "CMakeLists.txt").exists():
        raise SystemExit(f"{source} holds no llama.cpp source: run --fetch-source where PyPI works and carry it")
    cuda = ["-DGGML_CUDA=OFF"] if cpu_only else ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    t = time.perf_counter()
    run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
         "-DLLAMA_BUILD_APP=OFF",
         "-DGGML_NATIVE=ON", *cuda], out / "build.log")
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", "llama-bench"], out / "build.log")
    log(f"built {binary} in {time.perf_counter() - t:.0f} s")


# --- --gguf -------------------------------------------------------------------------------------


def write_gguf(path: Path, layers: int | None, out: Path) -> None:
    if path.exists():
        log(f"{path} exists: not rewriting")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import qwen3_gguf

    shape = qwen3_gguf.SHAPE | ({"num_hidden_layers": layers} if layers else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    r = qwen3_gguf.write(tmp, shape, "Q4_0", seed=0, log=log)
    tmp.rename(path)
    (out / "gguf.json").write_text(json.dumps({"file": str(path), "shape": shape} | r, indent=1))
    log(f"{path}: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.0f} s")


# --- --llama ------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Cores, not hardware threads, among those this process may use."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        sib = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(sib.read_text().strip() if sib.exists() else str(cpu))
    return len(cores)


def gguf_layers(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.block_count"].contents())


def llama_bench(build: Path, model: Path, out: Path, label: str, args: list[str], prompts, decode: int, reps: int) -> list[dict]:
    cmd = [str(bench_binary(build)), "-m", str(model), "-t", str(physical_cores()), "-r", str(reps), "-o", "json",
           "-p", ",".join(map(str, prompts)), "-n", str(decode), *args]
    p = run(cmd, out / f"llama_{label}.log", capture=True)
    rows = json.loads(p.stdout)
    (out / f"llama_{label}.json").write_text(json.dumps({"command": shlex.join(cmd), "results": rows}, indent=1))
    return rows


def pp_rate(rows: list[dict], n: int) -> float | None:
    return next((r["avg_ts"] for r in rows if r["n_prompt"] == n and r["n_gen"] == 0), None)


def run_llama(build: Path, model: Path, out: Path, reps: int) -> None:
    if not bench_binary(build).exists():
        raise SystemExit(f"{bench_binary(build)} does not exist: run --build first")
    hybrid = ["-ngl", "99", "--n-cpu-moe", str(gguf_layers(model)), "-fa", "1"]
    llama_bench(build, model, out, "hybrid_ub4096", hybrid + ["-ub", "4096", "-b", "4096"], PROMPTS, DECODE, reps)
    sweep = {}
    for ub in UB_SWEEP:
        rows = llama_bench(build, model, out, f"sweep_ub{ub}", hybrid + ["-ub", str(ub), "-b", str(ub)], (PROMPTS[-1],), 0, 1)
        sweep[ub] = pp_rate(rows, PROMPTS[-1])
    best = max(sweep, key=lambda ub: sweep[ub] or 0)
    (out / "llama_sweep.json").write_text(json.dumps({"pp": PROMPTS[-1], "tok_s_by_ub": sweep, "best_ub": best}, indent=1))
    llama_bench(build, model, out, "hybrid_best", hybrid + ["-ub", str(best), "-b", str(best)], PROMPTS, DECODE, reps)
    llama_bench(build, model, out, "vram", ["-ngl", "99", "-fa", "1", "-ub", "4096", "-b", "4096"], PROMPTS, DECODE, reps)


# --- --ours -------------------------------------------------------------------------------------


def run_ours(model: Path, out: Path, extra: str, runs: int) -> None:
    coord = shutil.which("krasis-coord")
    base = [coord] if coord else [sys.executable, "-m", "krasis.coordinator"]
    for prompt in PROMPTS:
        js = out / f"ours_p{prompt}.json"
        cmd = [*base, "bench", str(model), "--devices", "cuda:0", "--vram-budget", "16", "--prompt-tokens", str(prompt),
               "--decode-tokens", str(DECODE), "--runs", str(runs), "--json", str(js), *shlex.split(extra)]
        t = time.perf_counter()
        run(cmd, out / f"ours_p{prompt}.log")
        res = json.loads(js.read_text())
        js.write_text(json.dumps({"command": shlex.join(cmd), "wall_s": time.perf_counter() - t, "result": res}, indent=1))


# --- the table ----------------------------------------------------------------------------------


def device_name() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpu = []
    return f"{gpu[0] if gpu else 'no GPU'}, {physical_cores()} cores ({platform.processor() or platform.machine()})"


def report(out: Path) -> str:
    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else None

    llama = {k: load(f"llama_{k}.json") for k in ("hybrid_ub4096", "hybrid_best", "vram")}
    ours = {p: load(f"ours_p{p}.json") for p in PROMPTS}
    sweep = load("llama_sweep.json")
    meta = load("meta.json") or {}

    def ll(kind, n_prompt, n_gen):
        d = llama[kind]
        if d is None:
            return None
        return next((r["avg_ts"] for r in d["results"] if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen), None)

    def our(prompt, key):
        d = ours[prompt]
        return None if d is None else d["result"].get(key)

    rows = [(f"prefill, {p:,} tokens (tok/s)", {k: ll(k, p, 0) for k in llama}, our(p, "prefill_tok_s")) for p in PROMPTS]
    rows.append((f"decode, {DECODE} tokens (tok/s; ours after a {PROMPTS[0]}-token prompt)",
                 {k: ll(k, 0, DECODE) for k in llama}, our(PROMPTS[0], "decode_tok_s")))
    best = f" (-ub {sweep['best_ub']})" if sweep else ""

    def f(v):
        return "—" if v is None else f"{v:,.1f}"

    def ratio(a, b):
        return "—" if a is None or not b else f"{a / b:.2f}x"

    lines = [f"Date: {meta.get('date', '?')}. Device: {meta.get('device', '?')}.", "",
             f"| | llama.cpp hybrid -ub 4096 | llama.cpp hybrid best{best} | llama.cpp all in VRAM | ours "
             "| ours / hybrid 4096 | ours / hybrid best |", "|---|---|---|---|---|---|---|"]
    for name, l, o in rows:
        lines.append(f"| {name} | {f(l['hybrid_ub4096'])} | {f(l['hybrid_best'])} | {f(l['vram'])} | {f(o)} "
                     f"| {ratio(o, l['hybrid_ub4096'])} | {ratio(o, l['hybrid_best'])} |")
    if sweep:
        lines += ["", f"llama.cpp hybrid pp{sweep['pp']} by -ub: "
                  + ", ".join(f"{ub}: {f(v)}" for ub, v in sweep["tok_s_by_ub"].items())]
    if ours[PROMPTS[0]] is not None:
        r = ours[PROMPTS[0]]["result"]
        lines.append(f"ours: prefill {r.get('prefill_strategy', '?')}, decode {r.get('decode_strategy', '?')}; the first "
                     f"--ours call includes converting the experts (wall {ours[PROMPTS[0]]['wall_s']:.0f} s)")
    lines += ["", "Commands:"]
    for d in [*llama.values(), *ours.values()]:
        if d is not None:
            lines.append(f"    {d['command']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    for phase in ("fetch-source", "build", "gguf", "llama", "ours", "all", "report"):
        p.add_argument(f"--{phase}", action="store_true")
    p.add_argument("--source", type=Path, default=PEER / "llama.cpp", help="slimmed llama.cpp source (default: .peer/llama.cpp)")
    p.add_argument("--build-dir", type=Path, default=PEER / "build", help="llama.cpp build (default: .peer/build)")
    p.add_argument("--cpu-only", action="store_true", help="build llama-bench without CUDA (to check the source)")
    p.add_argument("--model", type=Path, default=PEER / "model" / "qwen3-30b-a3b-q4_0.gguf")
    p.add_argument("--layers", type=int, help="decoder layers of the --gguf file (default: the model's 48)")
    p.add_argument("--out", type=Path, default=PEER / "results", help="JSON and logs (default: .peer/results)")
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions per test")
    p.add_argument("--runs", type=int, default=2, help="our bench's timed runs")
    p.add_argument("--ours-args", default=OURS_ARGS, help=f"extra `bench` options (default: {OURS_ARGS!r})")
    a = p.parse_args(argv)
    if a.fetch_source:
        fetch_source(a.source)
        return
    phases = [x for x in ("build", "gguf", "llama", "ours") if getattr(a, x) or a.all]
    if not phases and not a.report:
        p.error("name a phase: --fetch-source, --build, --gguf, --llama, --ours, --all or --report")
    a.out.mkdir(parents=True, exist_ok=True)
    meta_file = a.out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if phases and phases != ["build"]:
        meta |= {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name()}
        meta_file.write_text(json.dumps(meta, indent=1))
    if "build" in phases:
        build_llama(a.source, a.build_dir, a.cpu_only, a.out)
    if "gguf" in phases:
        write_gguf(a.model, a.layers, a.out)
    if "llama" in phases:
        run_llama(a.build_dir, a.model, a.out, a.reps)
    if "ours" in phases:
        run_ours(a.model, a.out, a.ours_args, a.runs)
    print(report(a.out))


if __name__ == "__main__":
    main()
