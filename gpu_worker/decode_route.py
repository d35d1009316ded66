"""Which runner takes a decode step: the decode strategy (the CPU pool, with the hot set where it is
hcs_hybrid) or the prefill strategy (the experts of the layers not resident in VRAM streamed over
PCIe once, and the whole batch run on the device, as a prompt is).

One token reads k of a layer's E experts, which the pool reads from DRAM in a fraction of a
millisecond. B tokens decoded together touch E·(1 - (1 - k/E)^B) of them (Qwen3-30B-A3B, 8 of 128:
~112 at B = 32), so the pool's share of a step grows with the batch while the prefill strategy's
copies do not: past some batch size, streaming the layers once is the faster step. Where that
crossing lies depends on PCIe and DRAM bandwidth, the hot set and the layers kept resident, so it
is measured, not modelled: per batch-size bucket (powers of two) the route keeps the last step
times of each runner, tries streaming where it could pay, and takes the faster (a decided bucket
changes runner only for one faster by MARGIN); the slower is tried again every REVISIT steps of the
bucket, as the hot set and the machine's load change.

"Could pay": the pool would read at least half the bytes the stream copies (PCIe carries about
half of what DRAM reads on the machines measured: ../BENCHMARKS.md). On a CPU device nothing
crosses PCIe and `auto` keeps the decode strategy; `always` still sends every decode step through
the prefill strategy (tests compare the two paths token for token).
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict, deque

log = logging.getLogger("krasis.gpu_worker")

MODES = ("auto", "off", "always")
SAMPLES = 3  # step times a runner needs in a bucket before the bucket is decided
KEEP = 8  # step times kept per runner and bucket (the median of these decides)
REVISIT = 256  # steps of a decided bucket between two tries of the slower runner
# A decided bucket changes runner only for one this much faster: where the two are within noise (a
# tiny model's 4-7 ms steps, eager), the choice would otherwise flip from step to step
MARGIN = 0.1


def bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: steps of similar size share their measurements."""
    return 1 << max(tokens - 1, 0).bit_length()


def touched_share(tokens: int, top_k: int, num: int) -> float:
    """Expected share of a layer's experts that `tokens` tokens choose, for routing spread evenly."""
    return 1.0 - (1.0 - top_k / num) ** tokens


class DecodeRoute:
    """`decode`, `prefill`: the stage's strategies (gpu_worker/experts.py). `pays(tokens)`: whether
    streaming could be faster for a step of that many tokens (the module's rule); `mode`: auto,
    off (always the decode strategy) or always (always the prefill strategy)."""

    def __init__(self, decode, prefill, mode: str, pays):
        if mode not in MODES:
            raise ValueError(f"stream_decode {mode!r} is not one of {', '.join(MODES)}")
        self.decode, self.prefill, self.mode, self._pays = decode, prefill, mode, pays
        self.pays: dict[int, bool] = {}  # bucket -> pays(bucket), asked once: it depends on the bucket only
        # (bucket, runner) -> recent step seconds; a runner's first step in a bucket is not kept
        # (it builds that batch size's CUDA graphs, or fills a staging slot from cold)
        self.times: dict[tuple[int, str], deque] = defaultdict(lambda: deque(maxlen=KEEP))
        self.seen: set[tuple[int, str]] = set()
        self.steps: dict[int, int] = defaultdict(int)
        self.choice: dict[int, str] = {}  # bucket -> the runner its measurements chose (logged when it changes)

    def pick(self, tokens: int):
        if self.mode != "auto":
            return self.prefill if self.mode == "always" else self.decode
        b = bucket(tokens)
        self.steps[b] += 1
        if len(self.times[(b, "decode")]) < SAMPLES:
            return self.decode
        if b not in self.pays:
            self.pays[b] = self._pays(b)
        if not self.pays[b]:
            return self.decode
        if len(self.times[(b, "prefill")]) < SAMPLES:
            return self.prefill
        ms = {r: statistics.median(self.times[(b, r)]) * 1e3 for r in ("decode", "prefill")}
        best, other = sorted(ms, key=ms.get)
        held = self.choice.get(b)
        if held == other and ms[other] <= ms[best] * (1 + MARGIN):
            best, other = other, best  # within the margin: keep the runner the bucket has
        if held != best:
            self.choice[b] = best
            log.info("decode steps of up to %d tokens: %s (decode strategy %.2f ms a step, streamed %.2f ms)",
                     b, "the decode strategy" if best == "decode" else "streamed as a prefill", ms["decode"], ms["prefill"])
        return getattr(self, other if self.steps[b] % REVISIT == 0 else best)

    def record(self, runner, tokens: int, seconds: float) -> None:
        """A decode step of `tokens` tokens that `runner` took ran `seconds` on the device."""
        key = (bucket(tokens), "decode" if runner is self.decode else "prefill")
        if key in self.seen:
            self.times[key].append(seconds)
        self.seen.add(key)
