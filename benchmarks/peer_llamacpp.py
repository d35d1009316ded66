"""Same file, same run: llama.cpp's llama-bench and our `krasis-coord bench` on ONE GGUF of the
Qwen3-30B-A3B shape (Q4_0 routed experts, F16 attention; seeded random weights), on one GPU machine.

Phases, each small enough for one 10-minute call on the GPU machine, selected by flags (in this order
with --all):

    --fetch-source     (where PyPI works, not on the GPU machine) pip-downloads llama-cpp-python's
                       sdist, unpacks the llama.cpp it vendors and slims it into .peer/llama.cpp
                       (git-ignored): only what llama-bench with the CPU and CUDA backends needs
    --build            configures and builds llama-bench (CUDA for sm_90) in .peer/llama.cpp/build;
                       skipped when the binary is already there
    --gguf             writes the GGUF (gguf + numpy only), tensor by tensor
    --llama            llama-bench: hybrid (experts on the CPU) at -ub 4096 and larger ubatches, and
                       everything in VRAM; pp512, pp10000 and tg64
    --ours             krasis-coord bench on the same file, prompts of 512 and 10000 tokens
    --pool             krasis-coord bench with every layer's experts through the CPU pool
                       (`--resident-decode off`), 256 tokens after 512: issue 14's decode comparison
                       with llama.cpp's experts on the CPU (hybrid), and its fraction of the DRAM floor
    --table            the markdown table of both, with the ratios (also printed after --all)

Every phase writes its JSON and logs under --out; --table reads them back, so phases may run in
separate calls. On the GPU machine (no registry; gguf and pyzmq travel as wheels, see
../shared/device/README.md), after `--fetch-source` and `../shared/device/wheels.sh` here, with
PRE = the device README's pip lines (`python3 -m pip install ... .whl/*.whl && export
PYTHONPATH=/tmp/site && python3 -m pip install ... -e . &&`), and the records kept in /tmp/peer/out
(which lives as long as the machine stays warm) and copied to $OUT after each call:

    carry .peer/llama.cpp   python3 benchmarks/peer_llamacpp.py --build --out /tmp/peer/out; cp -r /tmp/peer/out $OUT/
    carry .whl              PRE python3 benchmarks/peer_llamacpp.py --gguf --llama --out /tmp/peer/out; cp -r /tmp/peer/out $OUT/
    carry .whl              PRE python3 benchmarks/peer_llamacpp.py --ours --table --out /tmp/peer/out; cp -r /tmp/peer/out $OUT/

(--configs and --prompts split --llama and --ours further if a call would pass 10 minutes.)

--build --portable builds on any machine with CUDA's nvcc (2 cores: ~80 minutes), so the GPU
machine's minutes go to measuring: it needs cuBLAS's headers and libraries in the CUDA folder (pip's
`nvidia-cublas` wheel of the toolkit's major version holds them) and, where no driver is installed,
a stub libcuda.so.1 in its lib64/stubs (`gcc -shared -Wl,-soname,libcuda.so.1 -x c /dev/null -o
libcuda.so`: only the library's name is linked; the GPU machine's driver provides it).
benchmarks/gpu_calls/peer.sh runs the other phases from such a build.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".peer" / "llama.cpp"
# Beside the source, not in it: carrying .peer/llama.cpp to the GPU machine carries no local build.
BUILD = {True: ROOT / ".peer" / "build-cuda", False: ROOT / ".peer" / "build-cpu"}
PROMPTS = (512, 10000)
DECODE = 64
# llama-bench's hybrid runs: the issue's -ub 4096, then larger ubatches (16384 with -b 16384: the
# whole 10K prompt in one ubatch, llama.cpp's best there); the best of them is "hybrid, best -ub".
HYBRID_UB = ((4096, 4096), (8192, 8192), (16384, 16384))
# What llama-bench needs from the vendored tree; everything else (docs, models, tests, examples,
# the other ggml backends, the server's web UI) stays behind.
KEEP = ["CMakeLists.txt", "cmake", "common", "ggml", "include", "src", "vendor", "tools/llama-bench", "LICENSE",
        "licenses"]
GGML_BACKENDS_KEPT = {"ggml-cpu", "ggml-cuda"}


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`, its stdout and stderr into `logfile` too; fail with the log's tail."""
    log(" ".join(map(str, cmd)))
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=f, text=True, **kw)
        f.write(p.stdout)
    if p.returncode:
        tail = "".join(open(logfile).readlines()[-30:])
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}); the end of {logfile}:\n{tail}")
    return p


# --- fetch-source ---------------------------------------------------------------------------------


def fetch_source(dest: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "-d", tmp, "llama-cpp-python"], out / "fetch.log")
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        if dest.exists():
            shutil.rmtree(dest)
        for rel in KEEP:
            if (src / rel).is_dir():
                shutil.copytree(src / rel, dest / rel, symlinks=True)
            elif (src / rel).exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, dest / rel)
        for d in (dest / "ggml" / "src").iterdir():
            if d.is_dir() and d.name.startswith("ggml-") and d.name not in GGML_BACKENDS_KEPT:
                shutil.rmtree(d)
        # The tools folder lists every tool; only llama-bench travels.
        (dest / "tools" / "CMakeLists.txt").write_text("llama_add_compile_flags()\nadd_subdirectory(llama-bench)\n")
        (dest / "SOURCE").write_text(f"{sdist.name}\n")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"{dest}: {size / 2**20:.1f} MiB from {sdist.name}")


# --- build ------------------------------------------------------------------------------------------


def bench_bin(cuda: bool) -> Path:
    return BUILD[cuda] / "bin" / "llama-bench"


def build(out: Path, cuda: bool, jobs: int, portable: bool) -> None:
    if bench_bin(cuda).exists():
        log(f"{bench_bin(cuda)} exists; not rebuilding")
        return
    if not (PEER / "CMakeLists.txt").exists():
        raise SystemExit(f"{PEER} is missing: run --fetch-source where PyPI works and carry .peer")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    backend = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"] if cuda else ["-DGGML_CUDA=OFF"]
    # Native tunes the CPU backend to the building machine; portable builds every CPU variant as a
    # library and llama.cpp loads the best one for the machine it runs on (its own release builds
    # do this), so a build made elsewhere runs the GPU host's CPU at its best too.
    cpu = (["-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"]
           if portable else ["-DGGML_NATIVE=ON"])
    run(["cmake", "-S", PEER, "-B", BUILD[cuda], *gen, *backend, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_APP=OFF", *cpu], out / "build.log")
    # With dynamic backends, llama-bench links none of them: build them all.
    target = [] if portable else ["--target", "llama-bench"]
    run(["cmake", "--build", BUILD[cuda], "-j", str(jobs), *target], out / "build.log")


# --- gguf ---------------------------------------------------------------------------------------------


def write_gguf(path: Path, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synth_gguf import QWEN3_30B_A3B, write_qwen3moe_gguf

    t0 = time.monotonic()
    size = write_qwen3moe_gguf(path, QWEN3_30B_A3B, expert_type="Q4_0", dense_type="F16", seed=seed)
    log(f"{path}: {size / 1e9:.1f} GB in {time.monotonic() - t0:.0f} s")


# --- llama ----------------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Cores, not hardware threads: what llama.cpp's decode runs best with."""
    try:
        pairs = set()
        for cpu in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology"):
            pkg = open(f"{cpu}/physical_package_id").read().strip()
            core = open(f"{cpu}/core_id").read().strip()
            pairs.add((pkg, core))
        return len(pairs) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


def llama_configs(threads: int) -> dict[str, list[str]]:
    base = ["-p", ",".join(map(str, PROMPTS)), "-n", str(DECODE), "-t", str(threads), "-fa", "1", "-r", "2",
            "-o", "json"]
    cfg = {f"hybrid_ub{ub}": ["-ngl", "99", "--n-cpu-moe", "48", "-b", str(b), "-ub", str(ub), *base]
           for b, ub in HYBRID_UB}
    cfg["vram"] = ["-ngl", "99", "-b", "4096", "-ub", "4096", *base]
    return cfg


def run_llama(gguf: Path, out: Path, cuda: bool, only: list[str] | None) -> None:
    exe = bench_bin(cuda)
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: run --build first")
    for name, args in llama_configs(physical_cores()).items():
        if only and name not in only:
            continue
        cmd = [exe, "-m", gguf, *args]
        p = run(cmd, out / f"llama_{name}.log")
        rows = json.loads(p.stdout)
        record(out / f"llama_{name}.json", cmd, rows)


# --- ours -----------------------------------------------------------------------------------------------

OUR_OPTS = ["--devices", "cuda:0", "--vram-budget", "16", "--gpu-bits", "4", "--cpu-bits", "4", "--group-size", "32",
            "--runs", "2"]


def _bench(gguf: Path, out: Path, name: str, args: list[str]) -> tuple[list, list[dict], float]:
    """One krasis-coord bench on gguf with OUR_OPTS then args: (its command, its rows, seconds)."""
    res = out / f"{name}.result.json"
    cmd = [sys.executable, "-m", "krasis.coordinator", "bench", gguf, *OUR_OPTS, *args, "--json", res]
    t0 = time.monotonic()
    run(cmd, out / f"{name}.log")
    rows = json.loads(res.read_text())
    return cmd, rows if isinstance(rows, list) else [rows], time.monotonic() - t0


def run_ours(gguf: Path, out: Path, prompts: list[int]) -> None:
    """One bench, one start of the processes (and one conversion of the GGUF), a row per prompt."""
    cmd, rows, wall = _bench(gguf, out, "ours", ["--prompt-lens", ",".join(map(str, prompts)),
                                                 "--decode-tokens", str(DECODE)])
    for n, row in zip(prompts, rows):
        record(out / f"ours_p{n}.json", cmd, row, wall_s=wall)


# The pool's decode over more tokens than llama-bench's: the host share's tuner (--pcie-share auto)
# spends a run's first steps trying its levels (gpu_worker/host_share.py)
POOL_DECODE = 256


def run_pool(gguf: Path, out: Path) -> None:
    """Every layer's routed experts through the CPU pool, as llama.cpp's hybrid runs them on its CPU."""
    cmd, rows, wall = _bench(gguf, out, "ours_pool", ["--prompt-lens", str(PROMPTS[0]), "--resident-decode", "off",
                                                      "--decode-tokens", str(POOL_DECODE)])
    record(out / "ours_pool.json", cmd, rows[0], wall_s=wall)


# --- records and the table --------------------------------------------------------------------------------


def device() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        gpu = "no GPU"
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{gpu}; {cpu}, {physical_cores()} cores"


def record(path: Path, cmd: list, result, **extra) -> None:
    path.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                "device": device(), "command": " ".join(map(str, cmd)), "result": result, **extra},
                               indent=1))


def _llama_rate(rows: list[dict], n_prompt: int, n_gen: int) -> float | None:
    for r in rows:
        if r.get("n_prompt") == n_prompt and r.get("n_gen") == n_gen:
            return float(r["avg_ts"])
    return None


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def table(out: Path) -> str:
    recs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.stem.endswith(".result")}
    llama = {k.removeprefix("llama_"): v for k, v in recs.items() if k.startswith("llama_")}
    ours = {k: v for k, v in recs.items() if k.removeprefix("ours_p").isdigit()}  # a row per prompt length
    rows = []  # (measure, llama.cpp name, llama.cpp value, ours value)

    def rate(config, n_prompt, n_gen):
        return _llama_rate(llama.get(config, {}).get("result", []), n_prompt, n_gen)

    def best_hybrid(n_prompt, n_gen):
        """(the best hybrid rate, its configuration, how many configurations ran): a call that ran
        only -ub 4096 says so rather than calling it the best of several."""
        vals = [(rate(k, n_prompt, n_gen), k) for k in llama if k.startswith("hybrid")]
        vals = [v for v in vals if v[0] is not None]
        return (*max(vals), len(vals)) if vals else (None, None, 0)

    # llama-bench's prompts, then any other length ours ran (issue 14's 2K/32K/64K: ours alone)
    lengths = [*PROMPTS, *sorted({int(k.removeprefix("ours_p")) for k in ours} - set(PROMPTS))]
    for n in lengths:
        o = ours.get(f"ours_p{n}", {}).get("result", {})
        if n not in PROMPTS:
            rows.append((f"prefill {n} tokens (tok/s)", "—", None, o.get("prefill_tok_s")))
            continue
        h4096 = rate("hybrid_ub4096", n, 0)
        best, which, ran = best_hybrid(n, 0)
        rows.append((f"prefill {n} tokens (tok/s)", "hybrid -ub 4096", h4096, o.get("prefill_tok_s")))
        rows.append((f"prefill {n} tokens (tok/s)", f"hybrid best of {ran} ({which or '—'})", best, o.get("prefill_tok_s")))
        rows.append((f"prefill {n} tokens (tok/s)", "all in VRAM", rate("vram", n, 0), o.get("prefill_tok_s")))
    o = ours.get(f"ours_p{PROMPTS[0]}", {}).get("result", {})
    rows.append((f"decode {DECODE} tokens (tok/s)", "hybrid -ub 4096", rate("hybrid_ub4096", 0, DECODE),
                 o.get("decode_tok_s")))
    rows.append((f"decode {DECODE} tokens (tok/s)", "all in VRAM", rate("vram", 0, DECODE), o.get("decode_tok_s")))
    pool = recs.get("ours_pool", {}).get("result")
    if pool:
        rows.append((f"decode, every layer's experts on the CPU (ours: `--resident-decode off`, {POOL_DECODE} tokens, "
                     f"{pool['decode_fraction']:.0%} of its run's DRAM floor of {pool['decode_floor_tok_s']:.1f})",
                     "hybrid -ub 4096", rate("hybrid_ub4096", 0, DECODE), pool["decode_tok_s"]))
    lines = ["| measure | llama.cpp | llama.cpp tok/s | ours tok/s | ours / llama.cpp |", "|---|---|---|---|---|"]
    for what, name, theirs, mine in rows:
        ratio = f"{mine / theirs:.2f}x" if theirs and mine else "—"
        lines.append(f"| {what} | {name} | {_fmt(theirs)} | {_fmt(mine)} | {ratio} |")
    lines.append("")
    for k, v in recs.items():
        lines.append(f"- `{k}`: {v['date']}, {v['device']}: `{v['command']}`")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch-source", action="store_true", help="download and slim llama.cpp into .peer/llama.cpp")
    ap.add_argument("--build", action="store_true", help="build llama-bench (skipped when it exists)")
    ap.add_argument("--cpu-only", action="store_true", help="build and run llama-bench without CUDA "
                    "(to check the slimmed tree and the GGUF where there is no GPU)")
    ap.add_argument("--portable", action="store_true", help="with --build: every CPU variant as a loadable "
                    "library, picked at run time (to build here and carry .peer/build-cuda/bin to the GPU host)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="build jobs (default: every core)")
    ap.add_argument("--gguf", action="store_true", help="write the GGUF (skipped when it exists)")
    ap.add_argument("--llama", action="store_true", help="run llama-bench")
    ap.add_argument("--configs", type=lambda v: v.split(","), help="with --llama: only these of "
                    f"{', '.join(llama_configs(1))} (each can take minutes: split them over calls)")
    ap.add_argument("--ours", action="store_true", help="run krasis-coord bench")
    ap.add_argument("--prompts", type=lambda v: [int(x) for x in v.split(",")], default=list(PROMPTS),
                    help="with --ours: these prompt lengths (default: 512,10000; one bench each)")
    ap.add_argument("--pool", action="store_true", help="run krasis-coord bench with every layer through the CPU pool")
    ap.add_argument("--table", action="store_true", help="print the table from --out's records")
    ap.add_argument("--all", action="store_true", help="--build --gguf --llama --ours --pool --table")
    ap.add_argument("--file", type=Path, default=Path("/tmp/peer/qwen3-30b-a3b-q4_0.gguf"),
                    help="the GGUF both run (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("peer_out"), help="records and logs (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not any((a.fetch_source, a.build, a.gguf, a.llama, a.ours, a.pool, a.table, a.all)):
        ap.error("choose a phase: --fetch-source, --build, --gguf, --llama, --ours, --pool, --table or --all")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.fetch_source:
        fetch_source(PEER, a.out)
    if a.build or a.all:
        build(a.out, cuda=not a.cpu_only, jobs=a.jobs, portable=a.portable)
    if a.gguf or a.all:
        if a.file.exists():
            log(f"{a.file} exists; not rewriting it")
        else:
            a.file.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(a.file, a.seed)
    if a.llama or a.all:
        run_llama(a.file, a.out, cuda=not a.cpu_only, only=a.configs)
    if a.ours or a.all:
        run_ours(a.file, a.out, a.prompts)
    if a.pool or a.all:
        run_pool(a.file, a.out)
    if a.table or a.all:
        print(table(a.out))


if __name__ == "__main__":
    main()
