"""The strategies' names (docs/strategies.md): parsed where the CLI reads them, so that a wrong one is
a usage error before any worker starts, and where a GPU worker builds them
(gpu_worker/prefill_strategies.py, decode_strategies.py). Torch-free, as the CLI's first imports are."""

from __future__ import annotations

import re

PREFILL_STRATEGIES = ("persistent", "layer_grouped_N", "chunked", "active_only", "hcs_prefill")
DECODE_STRATEGIES = ("pure_cpu", "hcs_hybrid", "compact", "lru")
POOL_DECODE = ("pure_cpu", "hcs_hybrid")  # those whose routed experts go to the CPU pool (the others' to the device)


class StrategyError(ValueError):
    pass


def parse_prefill(name: str) -> tuple[str, int]:
    """'layer_grouped_4' -> ('layer_grouped', 4); other names -> (name, 0)."""
    m = re.fullmatch(r"layer_grouped_(\d+)", name)
    if m:
        if int(m.group(1)) < 1:
            raise StrategyError("layer_grouped_N needs N >= 1")
        return "layer_grouped", int(m.group(1))
    if name not in PREFILL_STRATEGIES or name == "layer_grouped_N":
        raise StrategyError(f"unknown prefill strategy {name!r} (one of {', '.join(PREFILL_STRATEGIES)})")
    return name, 0


def check_decode(name: str) -> str:
    if name not in DECODE_STRATEGIES:
        raise StrategyError(f"unknown decode strategy {name!r} (one of {', '.join(DECODE_STRATEGIES)})")
    return name
