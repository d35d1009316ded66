"""`krasis-coord check [MODEL] [serve options]`: what the machine offers against what the run will
need, checked before minutes of loading, one line each with a fix for what is wrong.

A line is ok, warn (it will run, slower than it could) or fail (it will not run as asked); the
command exits 1 when a line fails. `serve` makes the RAM check itself and refuses before loading.
"""

from __future__ import annotations

import resource
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..shared.expert_store import StoreLayout
from ..shared.models.family import ConfigError
from .convert import cache_dir, expert_cache, expert_format
from .processes import RuntimeOptions, numa_cpus, pool_processes

GB = 1 << 30
# Each process (coordinator, GPU workers, pool processes) holds torch, the tokenizer and its buffers:
# 250-330 MB resident each, measured on the test models.
PROCESS_OVERHEAD = 320 << 20


@dataclass
class Line:
    check: str
    status: str  # ok | warn | fail | skip
    found: str
    fix: str = ""


def _dtype(opts: RuntimeOptions) -> torch.dtype:
    return getattr(torch, opts.dtype)


def _stores(family, opts: RuntimeOptions, pool: int) -> list[int]:
    """Bytes of each expert store the run puts in shared memory: the CPU pool's, and the GPU
    workers' own when their format differs (engine._start_group)."""
    cpu = expert_format(opts.cpu_bits, _dtype(opts), opts.group_size)
    gpu = expert_format(opts.gpu_bits, _dtype(opts), opts.group_size)
    out = [sum(StoreLayout(family, pool, cpu).sizes)]
    if gpu != cpu:
        out.append(sum(StoreLayout(family, 1, gpu).sizes))
    return out


def ram_needed(family, opts: RuntimeOptions) -> int:
    """Bytes of RAM the run holds: its expert stores, and each process's own."""
    pool = pool_processes(opts)
    return sum(_stores(family, opts, pool)) + PROCESS_OVERHEAD * (1 + pool + len(opts.devices))


def check_ram(family, opts: RuntimeOptions) -> Line:
    need, have = ram_needed(family, opts), psutil.virtual_memory().available
    found = f"needs {need / GB:.1f} GB (--cpu-bits {opts.cpu_bits}, --gpu-bits {opts.gpu_bits}), {have / GB:.1f} GB available"
    if need <= have:
        return Line("RAM", "ok", found)
    return Line("RAM", "fail", found, "use fewer bits (--cpu-bits 4 / --gpu-bits 4, the same for both keeps one "
                "copy), or stop what else holds memory")


def fits_in_ram(model: str, opts: RuntimeOptions) -> None:
    """ConfigError, before anything loads, when the run's RAM will not fit (serve's refusal)."""
    from ..shared.weights import load_family

    line = check_ram(load_family(model), opts)
    if line.status == "fail":
        raise ConfigError(f"not enough RAM: the run {line.found}; {line.fix} (`krasis-coord check` lists every check)")


def check_vram(model: str | None, family, opts: RuntimeOptions) -> list[Line]:
    """Per GPU: the budget against the device's free memory, and with MODEL, each stage's VRAM plan
    (what its worker computes at start: gpu_worker/vram_budget.py) against the budget."""
    from ..gpu_worker.vram_budget import VramBudgetError, stage_plan
    from .engine import strategy_spec
    from .plan import split_layers

    lines = []
    stages = split_layers(family, len(opts.devices), opts.pp_layers) if family is not None else None
    for rank, d in enumerate(opts.devices):
        dev = torch.device(d)
        if dev.type != "cuda":
            continue
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            lines.append(Line(f"VRAM {d}", "fail", "no such CUDA device", "fix --devices (see nvidia-smi)"))
            continue
        free, total = torch.cuda.mem_get_info(dev)
        budget = opts.vram_budget * 1e9 if opts.vram_budget else total
        found = f"budget {budget / 1e9:.1f} GB, {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB"
        if budget > total:
            lines.append(Line(f"VRAM {d}", "fail", found, f"--vram-budget at most {total / 1e9:.1f}"))
            continue
        need = 0.0
        if stages is not None:
            # dense_cache: whether the worker will get one (--attn-bits 8), not yet its path
            spec = dict(rank=rank, world=len(opts.devices), layers=list(stages[rank]), max_context=opts.max_context,
                        dense_cache=opts.attn_bits == 8, **strategy_spec(model, opts))
            layout = StoreLayout(family, 1, expert_format(opts.gpu_bits, _dtype(opts), opts.group_size))
            try:
                prefill, plan = stage_plan(family, layout, spec, _dtype(opts).itemsize, total)
            except VramBudgetError as e:
                lines.append(Line(f"VRAM {d}", "fail", f"{found}; {e}", "more GPUs, --gpu-bits 4, --attn-bits 8, a "
                                  "smaller --max-context or --prefill-chunk"))
                continue
            need = plan.total() - plan.hot - plan.lru  # the hot set and lru cache take what the budget leaves
            found += f"; the plan's fixed part {need / 1e9:.1f} GB ({prefill} prefill)"
        if need > free:
            lines.append(Line(f"VRAM {d}", "fail", found, f"stop the processes holding {(total - free) / 1e9:.1f} GB "
                              "(nvidia-smi)"))
        elif budget > free + GB:  # a CUDA context (this one's, each worker's) takes a few hundred MB
            lines.append(Line(f"VRAM {d}", "warn", found + ": the budget counts memory others hold",
                              f"--vram-budget {free / 1e9 * 0.95:.1f}, or stop the processes holding "
                              f"{(total - free) / 1e9:.1f} GB (nvidia-smi)"))
        else:
            lines.append(Line(f"VRAM {d}", "ok", found))
    return lines


def check_disk(model: str, family, opts: RuntimeOptions) -> Line:
    """Room for the quantized expert caches not built yet (convert.py writes them beside the model)."""
    folder = cache_dir(model, opts.cache_dir)
    need = 0
    for bits in {opts.cpu_bits, opts.gpu_bits} - {16}:
        fmt = expert_format(bits, _dtype(opts), opts.group_size)
        path, _ = expert_cache(folder, fmt)
        if opts.rebuild or not path.exists():
            need += sum(StoreLayout(family, 1, fmt).sizes)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    found = f"caches to build {need / GB:.1f} GB, {free / GB:.1f} GB free in {existing}"
    if need <= free:
        return Line("disk", "ok", found)
    return Line("disk", "fail", found, "free space there, or --cache-dir on a larger disk")


def check_memlock(family, opts: RuntimeOptions) -> Line:
    """Pinned host memory (the GPU workers' DMA sources and staging) counts against RLIMIT_MEMLOCK."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    found = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / GB:.2f} GB"
    if not any(d.startswith("cuda") for d in opts.devices):
        return Line("memlock limit", "ok", f"{found} (no GPU: nothing pinned)")
    fix = "ulimit -l unlimited, or LimitMEMLOCK=infinity in the systemd unit (deploy/krasis.service has it)"
    if soft == resource.RLIM_INFINITY:
        return Line("memlock limit", "ok", found)
    if family is None:
        return Line("memlock limit", "warn", found + " (give MODEL to compare with what it pins)", fix)
    pool = pool_processes(opts)
    # a GPU worker registers its whole expert store (gpu_worker/dma.py)
    need = max(_stores(family, opts, pool))
    found += f", {need / GB:.1f} GB to pin"
    return Line("memlock limit", "ok", found) if soft >= need else Line("memlock limit", "fail", found, fix)


def _sys(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_hugepages() -> Line:
    """The expert store asks for 2 MiB pages of shared memory (shared/expert_store.py: _huge_pages)."""
    shmem = _sys("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    if shmem is None:
        return Line("transparent hugepages", "skip", "not offered by this kernel")
    chosen = shmem[shmem.find("[") + 1 : shmem.find("]")] if "[" in shmem else shmem
    if chosen in ("advise", "always", "within_size"):
        return Line("transparent hugepages", "ok", f"shmem_enabled: {chosen}")
    return Line("transparent hugepages", "warn", f"shmem_enabled: {chosen} (the pool's reads walk 4 KiB pages)",
                "echo advise | sudo tee /sys/kernel/mm/transparent_hugepage/shmem_enabled")


def check_governor() -> Line:
    govs = {_sys(str(p)) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor")} - {None}
    if not govs:
        return Line("CPU frequency governor", "skip", "no cpufreq (a VM, or fixed frequency)")
    if govs == {"performance"}:
        return Line("CPU frequency governor", "ok", "performance")
    return Line("CPU frequency governor", "warn", ", ".join(sorted(govs)) + " (decode's latency varies with the clock)",
                "sudo cpupower frequency-set -g performance")


def check_numa(opts: RuntimeOptions) -> Line:
    nodes = numa_cpus(opts.numa_nodes)
    workers = opts.cpu_workers or len(nodes)
    found = f"{len(nodes)} node(s) of {', '.join(str(len(n)) for n in nodes)} core(s); {workers} pool process(es)"
    cores = sum(len(n) for n in nodes)
    if workers > cores:
        return Line("NUMA and --cpu-workers", "fail", found, f"--cpu-workers at most {cores}")
    if workers % len(nodes):
        return Line("NUMA and --cpu-workers", "warn", found + ": nodes get unequal shares",
                    f"--cpu-workers {len(nodes)} (one per node), or a multiple of it")
    return Line("NUMA and --cpu-workers", "ok", found)


def check_kernel() -> Line:
    """The CPU pool runs the C kernel, built here with the system compiler (cpu_worker/native.py),
    else the numba one."""
    from ..cpu_worker import native

    try:
        native.build()
    except (native.BuildError, OSError) as e:
        return Line("pool kernel", "warn", f"numba (the C kernel does not build: {e})",
                    "install a C compiler with OpenMP (apt install gcc), or set CC")
    flags = set(native._cpu().split())
    isa = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags
           else "AVX2" if "avx2" in flags else "portable C")
    status = "ok" if isa != "portable C" else "warn"
    return Line("pool kernel", status, f"C, {isa}", "" if status == "ok" else "a CPU with AVX2 runs the kernel's vector paths")


def check_pcie(opts: RuntimeOptions) -> list[Line]:
    """Each GPU's PCIe link: prefill streams the routed experts through it."""
    lines = []
    for d in dict.fromkeys(opts.devices):
        dev = torch.device(d)
        if dev.type != "cuda" or not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            continue
        p = torch.cuda.get_device_properties(dev)
        base = Path(f"/sys/bus/pci/devices/{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0")
        speed, width = _sys(base / "current_link_speed"), _sys(base / "current_link_width")
        top_speed, top_width = _sys(base / "max_link_speed"), _sys(base / "max_link_width")
        if speed is None or width is None:
            lines.append(Line(f"PCIe {d}", "skip", f"no link information at {base}"))
            continue
        found = f"{_gen(speed)} x{width} (the device's most: {_gen(top_speed)} x{top_width})"
        # an idle GPU lowers its link's speed, but not its width
        if top_width and width != top_width:
            lines.append(Line(f"PCIe {d}", "warn", found, "seat the GPU in a full-width slot (check the riser and the "
                              "BIOS's lane split)"))
        else:
            lines.append(Line(f"PCIe {d}", "ok", found))
    return lines


GT_S = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}


def _gen(speed: str | None) -> str:
    """sysfs's "16.0 GT/s PCIe" as "Gen4"."""
    if not speed:
        return "?"
    gen = GT_S.get(speed.split()[0])
    return f"Gen{gen}" if gen else speed


def check_ports(addrs: dict[str, tuple[str, int] | None]) -> list[Line]:
    lines = []
    for option, addr in addrs.items():
        if addr is None:
            continue
        try:
            with socket.create_server(addr):
                lines.append(Line(f"{option} port", "ok", f"{addr[0]}:{addr[1]} is free"))
        except OSError as e:
            lines.append(Line(f"{option} port", "fail", f"{addr[0]}:{addr[1]}: {e.strerror or e}",
                              f"another port, or stop what listens there (ss -ltnp 'sport = {addr[1]}')"))
    return lines


def run_checks(model: str | None, opts: RuntimeOptions, ports: dict) -> list[Line]:
    """Every check; the ones about the model's size only with MODEL."""
    family = None
    lines = []
    if model is not None:
        from ..shared.weights import load_family

        family = load_family(model)
        lines.append(check_ram(family, opts))
    lines += check_vram(model, family, opts)
    if family is not None:
        lines.append(check_disk(model, family, opts))
    lines += [check_memlock(family, opts), check_hugepages(), check_governor(), check_numa(opts), check_kernel(),
              *check_pcie(opts), *check_ports(ports)]
    return lines


def table(lines: list[Line]) -> str:
    head = Line("check", "status", "found", "fix")
    w = [max(len(getattr(x, f)) for x in [head, *lines]) for f in ("check", "status", "found")]
    row = lambda x: f"{x.check:<{w[0]}}  {x.status:<{w[1]}}  {x.found:<{w[2]}}  {x.fix}".rstrip()  # noqa: E731
    return "\n".join([row(head), *map(row, lines)])
