"""The model families by the `architectures` names of a config.json. A module of its own, above the
families: they subclass family.ModelFamily, so family.py cannot import them back to list them."""

from __future__ import annotations

from .deepseek_v2 import DeepseekV2
from .family import ConfigError, ModelFamily
from .gpt_oss import GptOss
from .qwen3_moe import Qwen3Moe
from .qwen3_next import Qwen3Next

FAMILIES: dict[str, type[ModelFamily]] = {
    a: cls for cls in (DeepseekV2, GptOss, Qwen3Moe, Qwen3Next) for a in cls.architectures
}


def family_for(cfg: dict) -> ModelFamily:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a](cfg)
    raise ConfigError(
        f"unsupported architecture {archs or cfg.get('model_type')!r} "
        f"(supported: {', '.join(sorted(FAMILIES))})"
    )
