"""The VRAM plan of one GPU worker: what `--vram-budget` GB per GPU must hold, worked out from
shapes before anything is allocated, and refused with the shortfall when it cannot fit.

    fixed  = weights (this stage's non-routed tensors; --attn-bits 8's at a byte a weight)
           + KV cache (one sequence of --max-context)
           + staging (what the prefill and decode strategies keep for experts, and the host share's
             slots: host_share.py)
           + activations (one --prefill-chunk through the largest layer, routed experts included)
    spare  = budget - fixed, for the hot-expert cache (hcs_prefill, hcs_hybrid) and the lru cache;
             else, with layer_grouped prefill, for whole layers kept resident (streamed never)

Activations count the step's hidden states, attention projections, the MoE rows sorted by expert and
the bf16 dequantization of the active experts of one layer (all of them, the worst case of a long
chunk); prompt logits are one row per step (requests that ask for every prompt row's logits are
exactness checks, not served prompts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..shared.expert_store import StoreLayout
from ..shared.quant import dense_names
from ..shared.strategy_names import POOL_DECODE
from ..shared.models.family import ConfigError, ModelFamily

GB = 1e9


class VramBudgetError(ConfigError):
    pass


@dataclass
class VramPlan:
    budget: float | None  # bytes, None: no limit given
    weights: int
    kv: int
    staging: int
    activations: int
    hot: int  # bytes for hot experts
    lru: int  # bytes for lru decode slots
    resident: int = 0  # bytes for layer_grouped's resident layers (copied once, never streamed)
    kept: int = 0  # how many layers those are (LayerGrouped spreads them over the stage)
    # bytes for a layer's other projection dequantized too, so that a step of several chunks
    # dequantizes each layer once (prefill_strategies.PrefillStrategy): the first claim on what is
    # spare (at 10K tokens in 4096-token chunks it saves more than a resident layer's copy); 0: none
    dequant_once: int = 0

    def total(self) -> int:
        return (self.weights + self.kv + self.staging + self.activations + self.hot + self.lru + self.resident
                + self.dequant_once)

    def report(self) -> dict:
        return {k: (round(v / 2**20, 1) if v is not None else None) for k, v in asdict(self).items() if k != "kept"} | {
            "total": round(self.total() / 2**20, 1)
        }


def kv_bytes_per_token(family: ModelFamily, layer: int, kv_dtype: str, dtype_bytes: int) -> int:
    """Bytes the cache keeps per token of one layer: K and V per KV head (GQA), or the latent and
    the rope key (MLA). FP8 keeps one byte per value and a float32 scale per cached row."""
    if hasattr(family, "kv_lora_rank"):
        widths = [family.kv_lora_rank, family.qk_rope]
    else:
        widths = [family.num_kv_heads * family.head_dim] * 2
    if kv_dtype == "fp8":
        return sum(widths) + 4 * len(widths)
    return sum(widths) * dtype_bytes


def layer_expert_bytes(layout: StoreLayout, layer: int) -> int:
    return sum(e.nbytes for n in range(layout.nodes) for (lay, _), e in layout.entries[n].items() if lay == layer)


def plan(
    family: ModelFamily,
    layout: StoreLayout,
    layers: tuple[int, int],
    first: bool,
    last: bool,
    dtype_bytes: int,
    kv_dtype: str,
    max_context: int,
    prefill_chunk: int,
    prefill: str,
    decode: str,
    budget_gb: float | None,
    device_total: int | None,
    int8_dense: bool = False,
    share_most: int = 0,
) -> VramPlan:
    from .host_share import staging_bytes
    from .prefill_strategies import parse_prefill, spread, stream_groups

    a, b = layers
    moe = [i for i in range(a, b) if i in layout.shapes]
    g = family.global_tensors()
    shapes = {n: s for i in range(a, b) for n, s in family.layer_tensors(i).items()}
    if first:
        shapes["model.embed_tokens.weight"] = g["model.embed_tokens.weight"]
    if last:
        shapes |= {n: g[n] for n in ("model.norm.weight", "lm_head.weight") if n in g}
    # --attn-bits 8 (int8_dense): the projections it quantizes take a byte a weight and a bf16 scale a row
    int8 = {n for names in dense_names(family) for n in names} if int8_dense else set()
    weights = sum(_numel(s) + 2 * s[0] if n in int8 else _numel(s) * dtype_bytes for n, s in shapes.items())
    kv = max_context * sum(kv_bytes_per_token(family, i, kv_dtype, dtype_bytes) for i in range(a, b))

    per_layer = [layer_expert_bytes(layout, i) for i in moe]
    biggest = max(per_layer, default=0)
    kind, n = parse_prefill(prefill)
    size = dict(zip(moe, per_layer))
    # the host share's slots at its highest level (share_most, in 256ths)
    share = max((staging_bytes(layout.fmt, layout.shapes[i], share_most) for i in moe), default=0)

    def staging_for(kept: int) -> int:
        """What the prefill and decode strategies stage with `kept` layers resident: layer_grouped's
        two slots hold its largest group, and resident layers cut the streamed runs into shorter ones."""
        if kind == "persistent":
            out = sum(per_layer)
        elif kind == "layer_grouped":
            groups = stream_groups(moe, set(spread(moe, kept)), n)
            out = 2 * max((sum(size[i] for i in grp) for grp in groups), default=0)
        else:  # chunked, active_only, hcs_prefill: one layer's worth
            out = biggest
        return out + (biggest if decode == "compact" else 0) + share

    staging = staging_for(0)

    H, T = family.hidden_size, prefill_chunk
    # a prefill step holds whole prompts, up to max_context tokens: its hidden states, each layer's
    # residual and normed input, live for the whole step (stage.py: _layer)
    act = 3 * max(max_context, T) * H * dtype_bytes
    act += 8 * T * H * dtype_bytes + 4 * T * H  # one chunk's norms, projections, float32 expert sum
    act += 4 * T * max((_numel(s) for i in range(a, b) for s in family.layer_tensors(i).values() if len(s) == 2), default=0) // H * dtype_bytes
    if moe:
        es = layout.shapes[moe[0]]
        rows = T * es.top_k
        act += rows * (2 * H + 3 * es.inter) * dtype_bytes
        act += es.num * 2 * es.inter * H * dtype_bytes  # the larger projection of a layer, dequantized
    if T < max_context:
        act += T * max_context  # a chunk past the first attends through a boolean mask

    fixed = weights + kv + staging + act
    budget = budget_gb * GB if budget_gb is not None else device_total
    hot = lru = 0
    experts = sum(per_layer)
    wants_hot = kind == "hcs_prefill" or decode == "hcs_hybrid"
    if budget is not None and fixed > budget:
        raise VramBudgetError(
            f"--vram-budget {budget / GB:.2f} GB is {(fixed - budget) / GB:.2f} GB short for layers {a}-{b - 1}: "
            f"weights {weights / GB:.2f} + KV {kv / GB:.2f} + staging ({prefill}/{decode}) {staging / GB:.2f} "
            f"+ activations {act / GB:.2f} = {fixed / GB:.2f} GB"
        )
    once = es.num * es.inter * H * dtype_bytes if moe else 0
    dequant_once = once if budget is None or budget - fixed >= once else 0
    fixed += dequant_once
    spare = (budget - fixed) if budget is not None else None
    # layer_grouped keeps whole layers resident in what no decode cache wants, so a prefill step
    # streams only the others (gpu_worker/prefill_strategies.py: LayerGrouped)
    keeps = kind == "layer_grouped" and not wants_hot and decode != "lru" and biggest > 0
    if spare is None:
        # No limit and no device size (a CPU device): half the experts hot, a quarter in the lru
        # cache, half the layers resident, so both the device and the pool share of every strategy,
        # and both the resident and the streamed layers, are exercised.
        hot = experts // 2 if wants_hot else 0
        lru = experts // 4 if decode == "lru" else 0
        kept = len(moe) // 2 if keeps else 0
    else:
        if wants_hot:
            hot = min(experts, int(spare if decode != "lru" else spare / 2))
        if decode == "lru":
            lru = min(experts, int(spare - hot))
        # the most layers whose bytes, with the (smaller) staging they leave, fit the spare and the
        # staging planned without them: two slots of N layers once sat idle beside resident layers
        # that had cut every streamed run to one or two layers
        room = spare + staging
        kept = next((k for k in range(len(moe), 0, -1) if k * biggest + staging_for(k) <= room), 0) if keeps else 0
    staging, resident = staging_for(kept), kept * biggest
    return VramPlan(budget=budget, weights=weights, kv=kv, staging=staging, activations=act, hot=hot, lru=lru,
                    resident=resident, kept=kept, dequant_once=dequant_once)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# What a GPU worker prefills with when no strategy is named (and `optimize` stored none): every
# expert resident if they fit, else one layer at a time streamed once per step, double-buffered,
# else one layer at a time without overlap. Groups of one stage the least, so the most layers stay
# resident, and their copies still overlap compute: against groups of four at --vram-budget 16 on
# the peer GGUF, 28 resident layers instead of 22, the same 10K prefill, 512-token prefill and
# decode +29% (BENCHMARKS.md, session 23). A larger N fits no budget that N = 1 does not.
AUTO_PREFILL = ("persistent", "layer_grouped_1", "chunked")


def stage_plan(family: ModelFamily, layout: StoreLayout, spec: dict, dtype_bytes: int,
               device_total: int | None) -> tuple[str, VramPlan]:
    """A GPU worker's prefill strategy and VRAM plan from its spec (coordinator/processes.py):
    the strategy named there, or the first of AUTO_PREFILL that fits; VramBudgetError if it does not."""
    from .host_share import share_most

    a, b = spec["layers"]
    decode = spec.get("decode_strategy") or "pure_cpu"

    def plan_for(prefill: str) -> VramPlan:
        return plan(
            family, layout, (a, b), spec["rank"] == 0, spec["rank"] == spec["world"] - 1, dtype_bytes,
            spec.get("kv_dtype") or "bf16", spec["max_context"], spec.get("prefill_chunk") or 4096, prefill,
            decode, spec.get("vram_budget"), device_total,
            int8_dense=bool(spec.get("dense_cache")),
            share_most=share_most(spec.get("pcie_share"), decode in POOL_DECODE, device_total is not None),
        )

    prefill = spec.get("prefill_strategy")
    return (prefill, plan_for(prefill)) if prefill else auto_prefill(plan_for)


def auto_prefill(plan_for) -> tuple[str, VramPlan]:
    """The first of AUTO_PREFILL whose plan fits (`plan_for(name)` -> VramPlan, or VramBudgetError);
    the last one's error when none does."""
    for name in AUTO_PREFILL[:-1]:
        try:
            return name, plan_for(name)
        except VramBudgetError:
            pass
    return AUTO_PREFILL[-1], plan_for(AUTO_PREFILL[-1])

