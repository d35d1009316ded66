"""Reading a Hugging Face model folder: config.json and safetensors shards, one tensor at a time.

Shards are memory-mapped by safetensors; `get` copies one tensor out, so the resident set while
loading or converting stays near the size of what the caller keeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .models.family import ConfigError, ModelFamily, WeightError
from .models.registry import family_for


def load_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir)
    if not path.exists():
        raise ConfigError(f"model folder {path} does not exist")
    if is_gguf(path):
        from .gguf_source import gguf_config

        return gguf_config(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder (a Hugging Face model folder is expected)")
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path} is unreadable: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path} is not a JSON object")
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            g = json.loads(gen.read_text())
            if g.get("eos_token_id") is not None:
                cfg.setdefault("_generation_eos_token_id", g["eos_token_id"])
        except (OSError, json.JSONDecodeError):
            pass
    return cfg


def is_gguf(path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".gguf"


def open_source(model, gguf=None):
    """The weights of `model` (a Hugging Face folder, or a .gguf file holding everything), with the
    routed experts read from the GGUF file `gguf` instead when one is given."""
    from .gguf_source import ARCHS, CombinedSource, GGUFError, GGUFSource

    source = GGUFSource(model) if is_gguf(model) else SafetensorsSource(model)
    if gguf is None:
        return source
    experts = GGUFSource(gguf, experts_only=True)
    archs = load_config(model).get("architectures") or []
    if ARCHS[experts.arch] not in archs:
        raise GGUFError(f"{gguf} holds a {experts.arch} model ({ARCHS[experts.arch]}); {model} is {', '.join(archs) or 'of no architecture'}")
    return CombinedSource(source, experts)


def load_family(model_dir) -> ModelFamily:
    return family_for(load_config(model_dir))


class SafetensorsSource:
    """Tensor name -> shard, from model.safetensors.index.json when present, else every
    *.safetensors in the folder."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        files: list[Path]
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise WeightError(f"{index} is unreadable: {e}") from None
            files = sorted({self.dir / f for f in weight_map.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"no *.safetensors files in {self.dir}")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except FileNotFoundError:
                raise WeightError(f"{f} is listed in the index but missing") from None
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise WeightError(f"{f} is not a readable safetensors file: {e}") from None
            self._handles[f] = h
            for name in h.keys():
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            f = self._where[name]
        except KeyError:
            raise WeightError(f"tensor {name} is not in the checkpoint ({self.dir})") from None
        t = self._handles[f].get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def source_files(self) -> list[Path]:
        """What the weights are read from, and the config that says what they mean."""
        return sorted(self._handles) + [self.dir / "config.json"]

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the config implies exists with its shape."""
        for name, shape in expected.items():
            if name not in self._where:
                raise WeightError(f"tensor {name} (shape {list(shape)}) is missing from the checkpoint in {self.dir}")
            got = self.shape(name)
            if tuple(got) != tuple(shape):
                raise WeightError(
                    f"tensor {name} in {self._where[name].name} has shape {list(got)}, the config implies {list(shape)}"
                )
