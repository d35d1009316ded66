"""Which runner takes a decode step: the decode strategy (the CPU pool, with the hot set where it is
hcs_hybrid), the prefill strategy (the experts of the layers not resident in VRAM streamed over
PCIe once, and the whole batch run on the device, as a prompt is), or a split of the two
(decode_split.py: some of those layers streamed, the rest through the pool, both links at once).

One token reads k of a layer's E experts, which the pool reads from DRAM in a fraction of a
millisecond. B tokens decoded together touch E·(1 - (1 - k/E)^B) of them (Qwen3-30B-A3B, 8 of 128:
~112 at B = 32), so the pool's share of a step grows with the batch while the stream's copies do
not: past some batch size, streaming layers is faster, and where both links are busy at once the
step is shorter still. Where that lies depends on PCIe and DRAM bandwidth, the hot set and the
layers kept resident, so it is measured, not modelled: per batch-size bucket (powers of two) the
route keeps the last step times of each runner it tried, named by how many of the streamable layers
it streams (0: the decode strategy; all of them: the whole stream). It tries the decode strategy,
then, where streaming could pay, the whole stream, then the split that would balance the two
(each end's step time says how fast its link serves a layer), then one halfway from that towards
the faster end, then the decode strategy again (its first samples come from the steps right after
the batch formed); it takes the fastest (a decided bucket changes runner only for one faster by
MARGIN), and tries the runner-up again every REVISIT steps of the bucket, as the hot set and the
machine's load change.

"Could pay": the pool would read at least half the bytes the stream copies (PCIe carries about
half of what DRAM reads on the machines measured: ../BENCHMARKS.md). On a CPU device nothing
crosses PCIe and `auto` keeps the decode strategy; `always` still sends every decode step through
the whole stream (tests compare the paths token for token).
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict, deque

log = logging.getLogger("krasis.gpu_worker")

MODES = ("auto", "off", "always")
SAMPLES = 3  # step times a runner needs in a bucket before the bucket is decided
KEEP = 8  # step times kept per runner and bucket (the median of these decides)
REVISIT = 256  # steps of a decided bucket between two tries of the runner-up
# A decided bucket changes runner only for one this much faster: where the two are within noise (a
# tiny model's 4-7 ms steps, eager), the choice would otherwise flip from step to step
MARGIN = 0.1


def bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: steps of similar size share their measurements."""
    return 1 << max(tokens - 1, 0).bit_length()


class StepTimes:
    """Recent decode step times per (batch-size bucket, option): the last KEEP of each, where an
    option's first step in a bucket is not kept (it builds that batch size's CUDA graphs, or fills a
    staging slot from cold). The decode route's options are its runners; the host share's tuner's
    are its levels (host_share.py)."""

    def __init__(self):
        self.times: dict[tuple[int, int], deque] = defaultdict(lambda: deque(maxlen=KEEP))
        self.seen: set[tuple[int, int]] = set()

    def add(self, key: tuple[int, int], seconds: float) -> None:
        if key in self.seen:
            self.times[key].append(seconds)
        self.seen.add(key)

    def measured(self, key: tuple[int, int]) -> bool:
        return len(self.times[key]) >= SAMPLES

    def median(self, key: tuple[int, int]) -> float:
        return statistics.median(self.times[key])

    def forget(self, key: tuple[int, int]) -> None:
        """To measure an option again: its times dropped."""
        self.times[key].clear()


def touched_share(tokens: int, top_k: int, num: int) -> float:
    """Expected share of a layer's experts that `tokens` tokens choose, for routing spread evenly."""
    return 1.0 - (1.0 - top_k / num) ** tokens


class DecodeRoute:
    """`decode`: the stage's decode strategy; `stream(n)`: the runner that streams n of the
    `layers` layers the prefill strategy streams and runs the rest through the decode strategy
    (layers=1 where it cannot split: stream(1) is the prefill strategy itself); `pays(tokens)`:
    whether streaming could be faster for a step of that many tokens (the module's rule); `mode`:
    auto, off (always the decode strategy), always (always the whole stream) or a number: that many
    layers streamed in every step (at most `layers`)."""

    def __init__(self, decode, stream, mode: str, pays, layers: int = 1):
        if mode not in MODES and not mode.isdigit():
            raise ValueError(f"stream_decode {mode!r} is not one of {', '.join(MODES)} or a number of layers")
        self.decode, self._stream, self.mode, self._pays, self.layers = decode, stream, mode, pays, layers
        self.runners = {0: decode}  # streamed layers -> runner, made when first tried
        self.pays: dict[int, bool] = {}  # bucket -> pays(bucket), asked once: it depends on the bucket only
        self.times = StepTimes()  # (bucket, streamed layers) -> recent step seconds
        self.steps: dict[int, int] = defaultdict(int)
        self.tries: dict[int, list[int]] = {}  # bucket -> the streamed-layer counts it tries, in order
        self.confirmed: set[int] = set()  # buckets whose decode strategy was measured again after the others
        self.choice: dict[int, int] = {}  # bucket -> the streamed layers its measurements chose (logged when it changes)

    def runner(self, n: int):
        if n not in self.runners:
            self.runners[n] = self._stream(n)
        return self.runners[n]

    def _measured(self, b: int, n: int) -> bool:
        return self.times.measured((b, n))

    def _median_ms(self, b: int, n: int) -> float:
        return self.times.median((b, n)) * 1e3

    def _next_try(self, b: int) -> int | None:
        """The streamed-layer count bucket b should measure next, or None once all are measured."""
        tries = self.tries.setdefault(b, [0, self.layers])
        for n in tries:
            if not self._measured(b, n):
                return n
        if self.layers > 1 and len(tries) < 4:
            ms = {n: self._median_ms(b, n) for n in tries}
            whole = self.layers
            if len(tries) == 2:
                # each end's time is about its link's time a layer times the layers: the split that
                # gives both links the same time
                n = round(whole * ms[0] / (ms[0] + ms[whole]))
            else:
                n = round((tries[2] + min((0, whole), key=ms.get)) / 2)
            tries.append(n)  # tried once at most, even where it rounds onto a count tried already
            if 0 < n < whole and n not in tries[:-1]:
                return n
            return self._next_try(b)
        if b not in self.confirmed:
            # the decode strategy ran the bucket's first steps, right after its batch formed (on a
            # GPU host, 39% slower than its steady state once: BENCHMARKS.md, session 22): its
            # samples are taken again, beside the others'
            self.confirmed.add(b)
            self.times.forget((b, 0))
            return 0
        return None

    def pick(self, tokens: int):
        if self.mode != "auto":
            fixed = {"off": 0, "always": self.layers}.get(self.mode)
            return self.runner(min(int(self.mode), self.layers) if fixed is None else fixed)
        b = bucket(tokens)
        self.steps[b] += 1
        if not self._measured(b, 0):
            return self.decode
        if b not in self.pays:
            self.pays[b] = self._pays(b)
        if not self.pays[b]:
            return self.decode
        n = self._next_try(b)
        if n is not None:
            return self.runner(n)
        ms = {n: self._median_ms(b, n) for n in set(self.tries[b]) if self._measured(b, n)}
        ranked = sorted(ms, key=ms.get)
        best, other = ranked[0], ranked[1]
        held = self.choice.get(b)
        if held in ms and held != best and ms[held] <= ms[best] * (1 + MARGIN):
            best, other = held, best  # within the margin: keep the runner the bucket has
        if held != best:
            self.choice[b] = best
            log.info("decode steps of up to %d tokens: %s (%s)", b, self.describe(best),
                     ", ".join(f"{self.describe(n)} {ms[n]:.2f} ms a step" for n in sorted(ms)))
        return self.runner(other if self.steps[b] % REVISIT == 0 else best)

    def describe(self, n: int) -> str:
        if n == 0:
            return "the decode strategy"
        if n == self.layers:
            return "streamed as a prefill"
        return f"{n} of {self.layers} streamed layers over PCIe, the rest by the decode strategy"

    def record(self, runner, tokens: int, seconds: float) -> None:
        """A decode step of `tokens` tokens that `runner` took ran `seconds` on the device."""
        self.times.add((bucket(tokens), next(n for n, r in self.runners.items() if r is runner)), seconds)
