"""Which routed-expert strategies a GPU worker runs, sized by its VRAM plan.

Spec keys read (coordinator/processes.py documents the spec): prefill_strategy (null: the first
of vram_budget.AUTO_PREFILL that fits), decode_strategy, stream_decode (decode_route.py),
resident_decode, pcie_share (null: auto), vram_budget (GB or null), kv_dtype, prefill_chunk, max_context,
hcs_path.
"""

from __future__ import annotations

import torch

from ..shared.expert_store import ExpertStore
from ..shared.models.family import ModelFamily
from .decode_route import DecodeRoute, touched_share
from .decode_split import SplitStep, streamable
from .decode_strategies import make_decode
from .dma import CopyEngine, HostExperts
from .hcs import Counts, HotSet
from .host_share import HostShare, ShareTuner, share_most
from .prefill_strategies import make_prefill
from .vram_budget import stage_plan


class StageExperts:
    def __init__(self, spec: dict, family: ModelFamily, store: ExpertStore, device: torch.device, dtype: torch.dtype, pool):
        a, b = spec["layers"]
        decode = spec.get("decode_strategy") or "pure_cpu"
        total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
        prefill, self.plan = stage_plan(family, store.layout, spec, torch.empty((), dtype=dtype).element_size(), total)
        self.host = HostExperts(store, range(a, b), device)
        self.engine = CopyEngine(device)
        act = getattr(family, "expert_act", "silu")
        self.counts = Counts({i: store.layout.shapes[i].num for i in self.host.layers}, spec.get("hcs_path"), device)
        hot = None
        per_expert = self.host.expert_nbytes(self.host.layers[0]) if self.host.layers else 0
        if prefill == "hcs_prefill" or decode == "hcs_hybrid":
            # a stage without MoE layers gets an empty set: the strategies need no special case
            hot = HotSet(self.host, self.counts, self.plan.hot // per_expert if per_expert else 0, self.engine)
        lru_slots = self.plan.lru // per_expert if per_expert else 0
        self.prefill = make_prefill(prefill, self.host, self.engine, act, self.counts, hot, self.plan.kept)
        self.prefill.dequant_once = self.plan.dequant_once > 0
        self.decode = make_decode(decode, pool, self.host, self.engine, act, hot, lru_slots)
        self.hot = hot
        # auto: on a GPU, where the layers the prefill strategy keeps are VRAM that decode would
        # otherwise leave idle; on a CPU device the pool is the thing tested, so off unless asked
        resident = spec.get("resident_decode") or "auto"
        if resident not in ("auto", "on", "off"):
            raise ValueError(f"resident_decode {resident!r} is not one of auto, on, off")
        if self.decode.takes_resident and (resident == "on" or (resident == "auto" and device.type == "cuda")):
            self.decode.resident = dict(self.prefill.resident_blocks())  # its own: hcs_hybrid adds to it
            self.decode.resident_on = True
        # the device's share of the pool's choices (pure_cpu, hcs_hybrid): auto measures it on a GPU
        share = spec.get("pcie_share")
        most = share_most(share, self.decode.takes_resident, device.type == "cuda")
        self.share_tuner = None
        if most and self.host.layers:
            self.share_tuner = ShareTuner(None if share is None else most)
            self.decode.host_share = HostShare(self.host, most)
        mode = spec.get("stream_decode") or "auto"
        layers = streamable(self.prefill)
        # a split step where the prefill strategy can stream part of a step's layers (decode_split.py)
        stream = (lambda n: SplitStep(self.decode, self.prefill, n)) if layers else (lambda n: self.prefill)
        self.route = DecodeRoute(self.decode, stream, "off" if mode == "auto" and device.type != "cuda" else mode,
                                 self._stream_pays, max(layers, 1))
        if hot is not None:
            hot.ensure()  # from the counts an earlier run saved, if any: the last run's hot set
            self.decode.begin()  # hcs_hybrid takes the layers it holds whole as resident (so info() says so)

    def pick(self, tokens: int):
        """(the runner of a decode step of `tokens` tokens, the host share's level it runs at, or None
        where the device takes no share)."""
        runner = self.route.pick(tokens)
        if self.share_tuner is None:
            return runner, None
        level = self.share_tuner.pick(tokens)
        self.decode.host_share.use(level)
        return runner, level

    def record(self, runner, level: int | None, tokens: int, seconds: float) -> None:
        """A decode step `pick` chose took `seconds` on the device."""
        self.route.record(runner, tokens, seconds)
        if level is not None and runner is self.decode:
            self.share_tuner.record(tokens, level, seconds)

    def _stream_pays(self, tokens: int) -> bool:
        """decode_route.py's rule: the pool would read at least half the bytes the prefill strategy
        streams (one whose copies follow the routing copies about what the pool would read). Layers
        that decode runs on the device cost neither runner a read."""
        streamed = self.prefill.streamed_bytes()
        if streamed is None:
            return True
        touched = sum(touched_share(tokens, self.host.shape(i).top_k, self.host.shape(i).num) * self.host.layer_bytes(i)
                      for i in self.host.layers if i not in self.decode.resident)
        return touched > 0 and touched >= streamed / 2  # none: every layer is on the device already

    def held(self) -> dict:
        """What of info() changes while serving: the hot set, built once counts exist (a first run's
        first prompt), the layers decode then runs on the device (hcs_hybrid's whole-hot ones), and
        the runner the decode route chose for each batch size it measured."""
        return {"hot_experts": len(self.hot.members) if self.hot is not None else 0,
                "decode_resident_layers": len(self.decode.resident),
                # batch-size bucket -> the runner its step times chose (decode_route.py)
                "decode_route": {str(b): self.route.describe(n) for b, n in sorted(self.route.choice.items())},
                # batch-size bucket -> the share of the pool's experts the device takes (host_share.py)
                "host_share": self.share_tuner.describe() if self.share_tuner is not None else None}

    def info(self) -> dict:
        out = {
            "prefill_strategy": self.prefill.name, "decode_strategy": self.decode.name, "stream_decode": self.route.mode,
            "vram_plan_mb": self.plan.report(),
            "prefill_resident_layers": self.prefill.resident_layers(),
            "prefill_streamed_bytes": self.prefill.streamed_bytes(),
            **self.held(),
        }
        if self.host.device.type == "cuda":
            out["vram_mb"] = round(torch.cuda.memory_reserved(self.host.device) / 2**20, 1)
        return out

    def close(self) -> None:
        self.counts.save()
        self.decode.close()
