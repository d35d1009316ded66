"""A decode step split between the PCIe stream and the CPU pool.

At a large batch a step's tokens touch most of every layer's experts (decode_route.py), so the pool
(reading the chosen experts from DRAM) and the stream (the prefill strategy copying a layer's
experts over PCIe: prefill_strategies.LayerGrouped) each take about a layer's bytes over their link
for every layer they serve. Run alone, either leaves the other link idle. A split step streams the
first `streamed` of those layers' share in every group and gives the rest to the decode strategy:

    group g:   copy(first layers of g)  ->  GPU: first layers of g  |  pool: the rest of g
                                            copy(first layers of g + 1) runs meanwhile

so the next group's copy crosses PCIe while the pool works through this group's later layers, and
a step costs about the larger of the two links' shares instead of one link's whole. The layers the
decode strategy holds (resident ones, hcs_hybrid's whole-hot ones) stay with it. How many layers
to stream is measured per batch size (decode_route.py): it depends on PCIe against DRAM, on the
batch, and on what the GPU's own turn costs.

The streamed layers' experts are computed as the resident ones are (decode_strategies.OnDevice),
with the GPU's weights; the step runs eagerly (its copies wait on events between layers).
"""

from __future__ import annotations

from .decode_strategies import DecodeStrategy, OnDevice
from .moe_gpu import RoutedExperts
from .prefill_strategies import LayerGrouped


def parts(groups: list[list[int]], streamed: int) -> dict[int, int]:
    """group -> how many of its first layers a step streams: `streamed` layers in all, spread over
    the groups in proportion to their sizes (so each group's copy overlaps pool work)."""
    total = sum(len(g) for g in groups)
    out, taken, seen = {}, 0, 0
    for g, grp in enumerate(groups):
        seen += len(grp)
        want = round(streamed * seen / total) if total else 0
        out[g], taken = want - taken, want
    return out


def streamable(prefill) -> int:
    """How many layers a split step can stream: those the prefill strategy streams (0: it cannot
    split, as only layer_grouped's whole-layer copies can)."""
    return sum(len(g) for g in prefill.groups) if isinstance(prefill, LayerGrouped) else 0


class SplitStep(RoutedExperts):
    """`streamed` of the prefill strategy's streamed layers on the device, the rest of the step
    through the decode strategy."""

    graphable = False

    def __init__(self, decode: DecodeStrategy, prefill: LayerGrouped, streamed: int):
        self.decode, self.prefill, self.streamed = decode, prefill, streamed
        self.parts = parts(prefill.groups, streamed)
        self.name = f"split_{streamed}"

    def begin(self):
        self.decode.begin()
        self.prefill.begin(self.parts)

    def _mine(self, layer: int) -> bool:
        return layer not in self.decode.resident and self.prefill.streams(layer)

    def submit(self, layer, x, ids, weights):
        if not self._mine(layer):
            return None, self.decode.submit(layer, x, ids, weights)
        blocks = self.prefill.blocks(layer, [ids])
        return x.dtype, OnDevice(blocks, x, ids, weights, self.prefill.host.fmt, self.prefill.act)

    def collect(self, pending):
        dtype, out = pending
        return self.decode.collect(out) if dtype is None else out().to(dtype)

    def collect_add(self, pending, h):
        dtype, out = pending
        return self.decode.collect_add(out, h) if dtype is None else out(residual=h)

    def layer_end(self, layer):
        self.prefill.layer_end(layer)  # a streamed group's slot is released after its last layer

    def end(self, done=None, interrupt=None) -> bool:
        return self.decode.end(done, interrupt)
