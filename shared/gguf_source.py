"""A GGUF file (llama.cpp's format, read with the `gguf` package) as a weight source with Hugging Face
tensor names, so every family reads it exactly as it reads a safetensors folder.

llama.cpp's converter (convert_hf_to_gguf.py) renames tensors (blk.N.attn_q.weight, ...), which the
`gguf` package's TensorNameMap records per architecture; we invert that map. For the three
architectures served from GGUF it permutes no Q/K rows (Qwen3-MoE uses NeoX rope, DeepSeek-V2 and
gpt-oss keep HF order), so nothing is undone there. Routed experts are stacked per layer
(ffn_{gate,up,down}_exps [E, rows, cols], rows and cols in HF order): Qwen3-MoE and DeepSeek-V2 are
presented per expert; gpt-oss as its fused HF tensors (gate and up columns interleaved again).
DeepSeek-V2's kv_b_proj is one tensor (attn_kv_b) in older files; the converter now writes it split
per head into attn_k_b (transposed) and attn_v_b for llama.cpp's absorbed MLA, which we join again.
Weights are dequantized one expert (or one tensor) at a time with gguf.quants.dequantize.

The file's metadata also yields an HF-style config dict (gguf_config) and, in the coordinator, the
tokenizer and chat template (coordinator/tokenizer.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from .models.family import ConfigError, WeightError

ARCHS = {"qwen3moe": "Qwen3MoeForCausalLM", "deepseek2": "DeepseekV2ForCausalLM", "gpt-oss": "GptOssForCausalLM"}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
_EXPERT_PARTS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


class GGUFError(WeightError):
    """The GGUF file cannot be served; the text says why."""


@functools.cache
def _reader_class():
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """GGUFReader slicing a plain ndarray view of the mapped file instead of its np.memmap:
        memmap's slicing runs Python code (about 10 us a slice), and the reader slices about ten
        times per token of the vocabulary, which for a 150K-token one took most of a minute per
        open. Tensor data are then plain read-only views of the same mapping."""

        def __init__(self, path: str):
            self._plain = np.memmap(path, mode="r").view(np.ndarray)
            super().__init__(path)

        def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
            count = int(count)
            arr = self._plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def _open(path: Path):
    """(reader, architecture) of a GGUF file, parsed once per process while the file stays as it was:
    the coordinator reads its config, tokenizer and tensors and a worker its config and tensors,
    and each parse walks the whole vocabulary (about 1.2 s for 150K tokens on one core)."""
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    st = path.stat()
    return _open_parsed(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_parsed(path: Path, size: int, mtime_ns: int):
    try:
        reader = _reader_class()(str(path))
    except Exception as e:  # the reader raises assorted errors on a truncated or corrupt file
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}".splitlines()[0]) from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    return reader, arch


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_config(path: str | os.PathLike, opened=None) -> dict:
    """An HF-style config.json dict from the GGUF metadata (llama.cpp's key names). `opened`: the
    file's (reader, arch) where the caller has it open already (parsing a file's vocabulary takes
    seconds)."""
    reader, arch = opened or _open(Path(path))

    def get(key, default=None, required=False):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise GGUFError(f"{path}: metadata lacks {arch}.{key}")
        return v

    embd = {t.name: t for t in reader.tensors}.get("token_embd.weight")
    vocab = int(embd.shape[1]) if embd is not None else len(_field(reader, "tokenizer.ggml.tokens", []))
    heads = int(get("attention.head_count", required=True))
    cfg = {
        "architectures": [ARCHS[arch]],
        "vocab_size": vocab,
        "hidden_size": int(get("embedding_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "num_experts_per_tok": int(get("expert_used_count", required=True)),
        "moe_intermediate_size": int(get("expert_feed_forward_length", required=True)),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if get("feed_forward_length") is not None:
        cfg["intermediate_size"] = int(get("feed_forward_length"))
    if arch == "qwen3moe":
        cfg |= {"num_experts": int(get("expert_count", required=True)), "head_dim": int(get("attention.key_length", required=True)),
                # llama.cpp always renormalises Qwen3-MoE's top-k weights unless the file says otherwise
                "norm_topk_prob": bool(get("expert_weights_norm", True))}
    elif arch == "deepseek2":
        rope = int(get("rope.dimension_count", required=True))
        q_lora = int(get("attention.q_lora_rank", 0) or 0)
        # Files converted for llama.cpp's absorbed MLA give the latent's sizes as key/value_length and
        # the per-head sizes as *_mla; older files have only the per-head sizes.
        key_length = int(get("attention.key_length_mla") or get("attention.key_length", required=True))
        value_length = int(get("attention.value_length_mla") or get("attention.value_length", required=True))
        groups = int(get("expert_group_count", 1) or 1)
        cfg |= {
            "n_routed_experts": int(get("expert_count", required=True)),
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": key_length - rope,
            "v_head_dim": value_length,
            "kv_lora_rank": int(get("attention.kv_lora_rank", required=True)),
            "q_lora_rank": q_lora or None,
            "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
            "n_shared_experts": int(get("expert_shared_count", 0)),
            "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(get("expert_weights_norm", False)),
            "n_group": groups, "topk_group": int(get("expert_group_used_count", groups) or groups),
            "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
        }
    else:
        cfg |= {"num_local_experts": int(get("expert_count", required=True)), "intermediate_size": cfg["moe_intermediate_size"],
                "head_dim": int(get("attention.key_length", required=True)), "sliding_window": get("attention.sliding_window"),
                "attention_bias": True}
    scaling = get("rope.scaling.type")
    if scaling == "yarn":
        params = {"rope_type": "yarn", "rope_theta": cfg["rope_theta"], "factor": float(get("rope.scaling.factor", required=True)),
                  "original_max_position_embeddings": int(get("rope.scaling.original_context_length", required=True))}
        log_mul = get("rope.scaling.yarn_log_multiplier")
        if log_mul:  # llama.cpp stores 0.1 * mscale_all_dim (DeepSeek)
            params["mscale"] = params["mscale_all_dim"] = float(log_mul) / 0.1
        if arch == "gpt-oss":
            params |= {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
        cfg["rope_parameters"] = params
    elif scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    return cfg


class GGUFSource:
    """The interface of weights.SafetensorsSource (names / shape / get / check / source_files) over a
    GGUF file. `experts_only` presents only the routed experts (a GGUF supplying the expert cache
    next to a Hugging Face folder for everything else)."""

    def __init__(self, path: str | os.PathLike, experts_only: bool = False):
        from gguf import get_tensor_name_map
        from gguf.constants import MODEL_ARCH_NAMES

        self.path = Path(path)
        self._reader, self.arch = _open(self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise GGUFError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                f"which is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        cfg = gguf_config(self.path, (self._reader, self.arch))
        n_layers = cfg["num_hidden_layers"]
        arch_enum = next(a for a, n in MODEL_ARCH_NAMES.items() if n == self.arch)
        tmap = get_tensor_name_map(arch_enum, n_layers)
        from .models.registry import family_for

        try:
            family = family_for(cfg)
        except ConfigError as e:
            raise GGUFError(f"{self.path}: {e}") from None
        # HF name -> how to read it: ("plain", gguf name) | ("expert", gguf name, e) | ("fused", layer, part)
        # | ("kv_b", layer)
        self._map: dict[str, tuple] = {}
        for layer in range(n_layers):
            if family.is_moe(layer):
                self._map_experts(family, layer)
        if not experts_only:
            wanted = dict(family.global_tensors())
            for layer in range(n_layers):
                wanted |= family.layer_tensors(layer)
            for hf in wanted:
                g = self._gguf_name(tmap, hf)
                if hf.endswith("self_attn.kv_b_proj.weight") and g not in self._tensors:
                    self._map[hf] = ("kv_b", int(hf.split(".")[2]))
                elif g is not None:
                    self._map[hf] = ("plain", g)

    def _gguf_name(self, tmap, hf: str) -> str | None:
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:  # dense MLP of an MoE architecture: the map lists only the generic names
            for part in ("gate", "up", "down"):
                if hf.endswith(f".mlp.{part}_proj.weight"):
                    g = f"blk.{hf.split('.')[2]}.ffn_{part}.weight"
        if g is not None and g not in self._tensors and g + ".weight" in self._tensors:
            g += ".weight"  # llama.cpp names gpt-oss's sinks attn_sinks.weight
        return g

    def _map_experts(self, family, layer: int) -> None:
        if self.arch == "gpt-oss":
            for name in family.expert_tensors(layer):
                self._map[name] = ("fused", layer, name.rsplit(".", 1)[1])
            return
        for e in range(family.experts(layer).num):
            for part, g in _EXPERT_PARTS.items():
                self._map[f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"] = ("expert", f"blk.{layer}.{g}.weight", e)

    # --- the SafetensorsSource interface ---
    def names(self) -> list[str]:
        return [n for n in self._map if self._present(n)]

    def _present(self, name: str) -> bool:
        return all(g in self._tensors for g in self._parts(name))

    def _parts(self, name: str) -> list[str]:
        """The GGUF tensors an HF tensor is made of."""
        how = self._map[name]
        if how[0] == "fused":
            kind = "bias" if how[2].endswith("_bias") else "weight"
            parts = ("down",) if how[2].startswith("down") else ("gate", "up")
            return [f"blk.{how[1]}.{_EXPERT_PARTS[p]}.{kind}" for p in parts]
        if how[0] == "kv_b":
            return [f"blk.{how[1]}.attn_k_b.weight", f"blk.{how[1]}.attn_v_b.weight"]
        return [how[1]]

    def _shape(self, gname: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self._tensors[gname].shape))

    def __contains__(self, name: str) -> bool:
        return name in self._map and self._present(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the GGUF shapes alone: a check of the whole file reads no tensor data."""
        how, parts = self._map[name], [self._shape(g) for g in self._parts(name)]
        if how[0] == "plain":
            return parts[0]
        if how[0] == "expert":
            return parts[0][1:]
        if how[0] == "kv_b":  # k_b [heads, kv_lora, nope], v_b [heads, v, kv_lora]
            (heads, rank, nope), (_, v, _) = parts
            return heads * (nope + v), rank
        if how[2].endswith("_bias"):
            return parts[0][0], parts[0][1] * len(parts)
        E, rows, cols = parts[0]
        return (E, cols, rows * len(parts))  # [E, rows, cols] -> HF's [E, in, out] (gate and up fused)

    def _dequant(self, gname: str, index: int | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[gname]
        data = t.data if index is None else t.data[index]
        shape = tuple(int(s) for s in reversed(t.shape))
        if index is not None:
            shape = shape[1:]
        kind = t.tensor_type.name
        try:
            if kind in ("F32", "F16"):
                # float tensors keep their own dtype, as a safetensors source gives them: the caller's
                # cast (to the device's dtype, on every core) is the only pass over them, where a
                # float32 round trip took two more (a 48-layer model's 3 GB of F16 attention and
                # embeddings: 8.9 s of a GPU worker's start on a 16-core host)
                return torch.from_numpy(np.array(data)).reshape(shape)  # a copy: the file is mapped read-only
            if kind == "BF16":  # stored as raw bytes: the same bits as torch's bfloat16
                return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).reshape(shape)
            arr = dequantize(np.asarray(data), t.tensor_type)
        except (ValueError, IndexError) as e:
            raise GGUFError(f"{self.path}: tensor {gname} cannot be read (truncated file?): {e}") from None
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)  # a copy: the file is mapped read-only

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self:
            raise WeightError(f"tensor {name} is not in {self.path}")
        how = self._map[name]
        if how[0] == "plain":
            t = self._dequant(how[1])
        elif how[0] == "expert":
            t = self._dequant(how[1], how[2])
        elif how[0] == "kv_b":
            k_b, v_b = (self._dequant(g) for g in self._parts(name))
            t = torch.cat([k_b.transpose(1, 2), v_b], dim=1).flatten(0, 1)
        else:
            t = self._fused(name)
        return t if dtype is None else t.to(dtype)

    def _fused(self, name: str) -> torch.Tensor:
        """gpt-oss's HF expert tensors from llama.cpp's split ones: gate and up interleaved again
        (gate in the even, up in the odd positions), weights as [E, in, out]."""
        parts = [self._dequant(g) for g in self._parts(name)]
        if name.endswith("_bias"):
            return torch.stack(parts, dim=-1).flatten(-2)
        return torch.stack(parts, dim=2).flatten(1, 2).transpose(1, 2).contiguous()

    def routed_experts(self, layer: int, part: str, kind: str = "weight") -> tuple[np.ndarray, str] | None:
        """The raw data of `layer`'s stacked routed experts' `part` (gate, up or down) and its GGUF
        type name, or None where the file holds no such tensor: [E, rows, cols] for a float type,
        [E, rows, row bytes] of blocks for a quantized one, each expert's rows and columns as
        load_expert gives them (the three architectures store them so). The converter reads these
        a whole block at a time (coordinator/gguf_blocks.py) instead of expert by expert."""
        t = self._tensors.get(f"blk.{layer}.{_EXPERT_PARTS[part]}.{kind}")
        return None if t is None else (t.data, t.tensor_type.name)

    def source_files(self) -> list[Path]:
        return [self.path]

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        for name, shape in expected.items():
            if name not in self:
                raise WeightError(f"tensor {name} (shape {list(shape)}) is missing from {self.path}")
            got = self.shape(name)
            if tuple(got) != tuple(shape):
                raise WeightError(f"tensor {name} in {self.path.name} has shape {list(got)}, the config implies {list(shape)}")


class CombinedSource:
    """A Hugging Face folder with its routed experts taken from a GGUF file instead."""

    def __init__(self, hf, experts: GGUFSource):
        self.hf, self.experts = hf, experts

    def _src(self, name: str):
        return self.experts if name in self.experts else self.hf

    def names(self) -> list[str]:
        return list(dict.fromkeys(self.experts.names() + self.hf.names()))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._src(name).shape(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._src(name).get(name, dtype)

    def routed_experts(self, layer: int, part: str, kind: str = "weight") -> tuple[np.ndarray, str] | None:
        return self.experts.routed_experts(layer, part, kind)

    def source_files(self) -> list[Path]:
        return self.hf.source_files() + self.experts.source_files()

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        # Expert tensors the model does not name would be ignored while the model's own are read instead.
        foreign = [n for n in self.experts.names() if n not in expected]
        if foreign:
            raise GGUFError(f"{self.experts.path}: routed-expert tensor {foreign[0]} is not one the model has "
                            f"(its experts are stored another way, e.g. MXFP4, or the GGUF is of another model)")
        self.experts.check({n: s for n, s in expected.items() if n in self.experts})
        self.hf.check({n: s for n, s in expected.items() if n not in self.experts})


# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names (as in the models' tokenizer.json).
_PRE_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def gguf_tokenizer(path: str | os.PathLike):
    """(tokenizers.Tokenizer or None, special token strings, chat template) from the GGUF metadata:
    a byte-level BPE (tokenizer.ggml.model "gpt2") from tokenizer.ggml.tokens / merges, the control
    tokens as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    reader, _ = _open(Path(path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    template = _field(reader, "tokenizer.chat_template")
    special = {k: None for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    if tokens is None:
        return None, special, template
    for k in special:
        i = _field(reader, f"tokenizer.ggml.{k.removesuffix('_token')}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            special[k] = tokens[int(i)]
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE, 'gpt2', only)")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in ("default", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: default, {', '.join(_PRE_SPLITS)})")
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t == 3])
    return tok, special, template
