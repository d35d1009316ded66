"""Which layers each pipeline stage owns."""

from __future__ import annotations

from ..shared.models.family import ModelFamily


class PlanError(ValueError):
    pass


def split_layers(family: ModelFamily, stages: int, pp_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous [a, b) ranges, one per stage. Given `pp_layers` (layer counts), use them;
    otherwise minimise the most expensive stage (cost per layer from the family)."""
    n = family.num_layers
    if pp_layers is not None:
        if len(pp_layers) != stages:
            raise PlanError(f"--pp-layers has {len(pp_layers)} entries for {stages} device(s)")
        if any(c < 1 for c in pp_layers) or sum(pp_layers) != n:
            raise PlanError(f"--pp-layers {','.join(map(str, pp_layers))} must be positive and sum to {n} layers")
        counts = pp_layers
    else:
        if stages > n:
            raise PlanError(f"{stages} devices for {n} layers: at most one device per layer")
        counts = _balanced(family, stages)
    out, a = [], 0
    for c in counts:
        out.append((a, a + c))
        a += c
    return out


def _balanced(family: ModelFamily, stages: int) -> list[int]:
    costs = [family.layer_cost(i) for i in range(family.num_layers)]
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: smallest max-stage-cost splitting layers [0, i) into s stages; exact DP, n is small.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
