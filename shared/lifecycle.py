"""Child-process hygiene: a worker dies with the coordinator that started it, whatever way that
coordinator ends (SIGKILL included), so no worker is ever orphaned."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_TIMERSLACK = 29
# What a worker started before its spec did first (coordinator/processes.py: run_prestarted): when
# its imports ended ("preload") and its spec came ("spec"); StartupMarks reports them after "exec".
PRESTART_MARKS: list[list] = []


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between fork and prctl: then we were re-parented already.
    if os.getppid() != parent_pid:
        os._exit(1)


def name_process(name: str) -> None:
    """This process's name as ps -o comm, top and the journal show it (15 bytes at most): a worker
    forked by the zygote (coordinator/processes.py: Zygote) has the zygote's command line, so its
    name is what tells them apart."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15])


def worker_start(spec: dict, name: str) -> None:
    """What every worker does first with its spec: die with its parent, take its name, its cores
    (none: any) and its thread count."""
    die_with_parent(spec["parent_pid"])
    name_process(name)
    if spec.get("cores"):
        os.sched_setaffinity(0, spec["cores"])
    limit_threads(spec["threads"])


def run_then_exit(main) -> None:
    """Run a process's `main` (a worker's, the coordinator's CLI), then end the process with its exit
    status at once (os._exit, as multiprocessing ends its children), stdio and logging flushed
    first. The interpreter's own finalization (a full garbage collection and module teardown over
    torch's objects) took 0.5-1.4 s of CPU a worker after its work was done, and ~0.7 s of the
    coordinator's: on the 2-core machine, most of a service's stop (py-spy: gc_collect_main). Each
    main releases what it holds itself before it returns (sockets, ZeroMQ contexts, pinned memory,
    its workers, files written through `with`); the store and mailboxes are memfds that go with the
    process. An exception other than SystemExit takes Python's usual way out, traceback and all."""
    import logging

    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # as Python reports sys.exit("message")
            print(e.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(code)


def limit_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def fine_timers() -> None:
    """Let this thread's short sleeps end on time: Linux lets a sleep overrun by the thread's timer
    slack, 50 us by default, which a GPU worker polling for its decode step (gpu_worker/pool_client.py)
    would add to every token."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000)  # ns


def started_at() -> float:
    """When this process was exec'd, wall clock (to the kernel's clock tick): /proc gives its start
    in ticks after boot."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")


class StartupMarks:
    """When this process finished each phase of its start (wall clock), from its exec on: a worker's
    Ready message carries them, for benchmarks/startup.py to lay a start out by phase."""

    def __init__(self):
        self.marks = [["exec", started_at()], *PRESTART_MARKS]

    def __call__(self, phase: str) -> None:
        self.marks.append([phase, time.time()])
