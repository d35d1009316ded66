"""What every model family provides to the workers (the families by `architectures` name: registry.py).

A family knows its config switches, the names and shapes of its tensors (so a checkpoint is checked
before anything runs), how to build one decoder layer's GPU-resident part (attention, norms, router,
shared or dense MLP), and how its routed experts are laid out. The routed experts themselves are not
part of a layer object: they live in the expert store (shared memory) and are run by whoever the
strategy says (the GPU worker in prefill, the CPU pool in decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..protocol import SeqSlice
from .layers import add_rms_norm, rms_norm

Getter = Callable[[str], torch.Tensor]


class ConfigError(ValueError):
    """The model's config.json cannot be served; the text says why."""


class WeightError(ValueError):
    """The checkpoint does not match the config; the text names the tensor and file. Here beside
    ConfigError, not in weights.py, which raises it too: gguf_source.py's errors derive from it, and
    weights.py imports gguf_source.py."""


@dataclass(frozen=True)
class ExpertShape:
    """Routed experts of one MoE layer: `num` experts of SwiGLU type with hidden size `hidden`
    and intermediate size `inter`. `act` names the gated activation ("silu" or "gptoss");
    `bias` says whether the projections carry biases."""

    num: int
    top_k: int
    hidden: int
    inter: int
    act: str = "silu"
    bias: bool = False


class DecoderLayer:
    """One layer's non-routed part. The worker runs, per layer:

        h = h + attention(input_norm(h))      }  add_post_norm(h, norm_attention(h))
        x = post_norm(h)                      }
        h = h + (experts(x, route(x)) + shared(x))      for MoE layers
        h = h + dense(x)                                 for dense layers
    """

    index: int
    is_moe: bool
    # Whether a decode step through this layer may be captured as CUDA graphs: everything but the
    # KV cache's attention is the same device work at every step of a batch size.
    graphable = True

    # Most families: plain RMSNorm with weights ln1 / ln2 and the family's epsilon.
    def input_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.ln1, self.f.rms_norm_eps)

    def post_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.ln2, self.f.rms_norm_eps)

    def add_post_norm(self, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + a, post_norm(h + a)): the attention's residual add and the norm after it, in one pass."""
        return add_rms_norm(h, a, self.ln2, self.f.rms_norm_eps)

    def norm_attention(self, h: torch.Tensor, slices: list[SeqSlice], positions: torch.Tensor, kv) -> torch.Tensor:
        """attention(input_norm(h)); families whose first product allows it take the norm into it."""
        return self.attention(self.input_norm(h), slices, positions, kv)

    def add_post_norm_route(self, h: torch.Tensor, a: torch.Tensor):
        """A MoE layer's (h + a, x = post_norm(h + a), route(x)); families whose router allows it
        run the three as one kernel in decode."""
        h, x = self.add_post_norm(h, a)
        return h, x, self.route(x)

    def attention(self, x: torch.Tensor, slices: list[SeqSlice], positions: torch.Tensor, kv) -> torch.Tensor:
        raise NotImplementedError

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids int64 [T, k], weights float32 [T, k])."""
        raise NotImplementedError

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this layer holds (its weights), in attribute order, through tuples, lists and
        objects that hold tensors themselves (an INT8 QuantLinear's rows and scales, a rotary's
        frequencies), each storage once; not the family's (`f`), which are every layer's, nor what
        private attributes cache (a rotary's tables of the last step's positions)."""
        out, seen, objects = [], set(), set()

        def walk(v):
            if isinstance(v, torch.Tensor):
                if (v.device, v.data_ptr()) not in seen:
                    seen.add((v.device, v.data_ptr()))
                    out.append(v)
            elif isinstance(v, (tuple, list)):
                for item in v:
                    walk(item)
            elif hasattr(v, "__dict__") and not isinstance(v, type) and id(v) not in objects:
                objects.add(id(v))
                for name, item in vars(v).items():
                    if not name.startswith("_"):
                        walk(item)

        for name, v in vars(self).items():
            if name != "f" and not name.startswith("_"):
                walk(v)
        return out


class ModelFamily:
    architectures: tuple[str, ...] = ()

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.hidden_size = self._req("hidden_size", int)
        self.vocab_size = self._req("vocab_size", int)
        self.num_layers = self._req("num_hidden_layers", int)
        self.rms_norm_eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.max_position_embeddings = int(cfg.get("max_position_embeddings", 4096))

    def _req(self, key: str, kind: type):
        if key not in self.cfg or self.cfg[key] is None:
            raise ConfigError(f"config.json lacks '{key}'")
        try:
            return kind(self.cfg[key])
        except (TypeError, ValueError):
            raise ConfigError(f"config.json '{key}' = {self.cfg[key]!r} is not {kind.__name__}") from None

    # --- structure ---
    def is_moe(self, layer: int) -> bool:
        raise NotImplementedError

    def experts(self, layer: int) -> ExpertShape:
        raise NotImplementedError

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Non-routed tensors of a layer: HF name -> shape."""
        raise NotImplementedError

    def expert_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """HF names and shapes of all routed-expert tensors of a MoE layer (the per-expert layout
        gate_proj / up_proj / down_proj that Qwen3 and DeepSeek checkpoints use)."""
        es, out = self.experts(layer), {}
        for e in range(es.num):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            out[p + "gate_proj.weight"] = (es.inter, es.hidden)
            out[p + "up_proj.weight"] = (es.inter, es.hidden)
            out[p + "down_proj.weight"] = (es.hidden, es.inter)
        return out

    def router_names(self, layer: int) -> tuple[str, str | None]:
        """HF names of a MoE layer's router weight [E, H] and of the bias its logits get before the
        top-k (None: no bias); the CPU pool guesses the next layer's experts with them
        (cpu_worker/lookahead.py)."""
        return f"model.layers.{layer}.mlp.gate.weight", None

    def load_expert(self, get: Getter, layer: int, e: int) -> dict[str, torch.Tensor]:
        """One routed expert as {'gate': [I, H], 'up': [I, H], 'down': [H, I]} (plus 'gate_bias',
        'up_bias', 'down_bias' when ExpertShape.bias), whatever the checkpoint's layout."""
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return {"gate": get(p + "gate_proj.weight"), "up": get(p + "up_proj.weight"), "down": get(p + "down_proj.weight")}

    def global_tensors(self) -> dict[str, tuple[int, ...]]:
        t = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            t["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return t

    def final_norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The norm before the LM head (model.norm.weight)."""
        from .layers import rms_norm

        return rms_norm(h, weight, self.rms_norm_eps)

    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"

    def expected_tensors(self, dense: bool = True, routed: bool = True) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold: the non-routed ones, the routed experts, or both."""
        out = dict(self.global_tensors()) if dense else {}
        for i in range(self.num_layers):
            if dense:
                out.update(self.layer_tensors(i))
            if routed and self.is_moe(i):
                out.update(self.expert_tensors(i))
        return out

    def make_layer(self, layer: int, get: Getter) -> DecoderLayer:
        raise NotImplementedError

    def layer_cost(self, layer: int) -> float:
        """Relative cost of a layer, for balancing pipeline stages: parameters touched per token."""
        attn = sum(_numel(s) for s in self.layer_tensors(layer).values())
        if self.is_moe(layer):
            es = self.experts(layer)
            attn += 3 * es.hidden * es.inter * es.top_k
        return float(attn)

    def eos_token_ids(self) -> list[int]:
        """EOS ids from config.json and generation_config.json (loaded into the cfg by weights.py)."""
        ids: list[int] = []
        for key in ("eos_token_id", "_generation_eos_token_id"):
            eos = self.cfg.get(key)
            if eos is not None:
                ids += [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        return sorted(set(ids))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

