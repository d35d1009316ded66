"""Small per-model files beside the weight caches: the strategies `optimize` stored (strategy.json),
the hot-expert counts and routing statistics `calibrate` wrote. A module of its own because the
engine reads them, and optimize.py, which writes the first, runs the engine through bench.py."""

from __future__ import annotations

import json
from pathlib import Path

from .convert import cache_dir

WINNER_FILE = "strategy.json"


def state_path(model_dir, name: str) -> Path:
    """A small per-model file beside the weight caches."""
    return cache_dir(model_dir) / name


def stored_winner(model_dir) -> dict:
    p = state_path(model_dir, WINNER_FILE)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
