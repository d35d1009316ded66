"""`krasis-coord calibrate MODEL --text FILE`: gather the hot-expert counts (docs/strategies.md,
HCS) from representative text before serving, instead of from the first users' prompts.

The text is tokenized with the model's tokenizer and sent through prefill in prompts of up to
`--prefill-chunk` tokens, each generating one token; every prefill strategy counts the router's
choices, and the GPU workers merge the counts into the model's `hcs_counts.json` when they stop.
The next start builds its hot set from them.
"""

from __future__ import annotations

import json

from ..shared import protocol as P
from .processes import RuntimeOptions


async def _calibrate(model: str, opts: RuntimeOptions, ids: list[int], progress) -> int:
    from .engine import Engine

    engine = Engine(model, opts)
    try:
        await engine.start()
        step = max(1, min(opts.prefill_chunk, opts.max_context - 1))
        for i, a in enumerate(range(0, len(ids), step)):
            gen = P.Generate(id=f"calibrate{i}", prompt_ids=ids[a : a + step],
                             sampling=P.SamplingParams(max_new_tokens=1, ignore_eos=True))
            async for ev in engine.generate(gen):
                if isinstance(ev, P.Error):
                    raise RuntimeError(ev.message)
            progress(min(step, len(ids) - a))
    finally:
        await engine.close()  # the workers save the counts as they stop
    return len(ids)


def calibrate(model: str, opts: RuntimeOptions, text: str, progress=lambda n: None) -> dict:
    """Prefill `text` through the model; returns the tokens sent and where the counts are kept."""
    from .optimize import state_path
    from .tokenizer import TextCodec

    ids = TextCodec(model).encode(text)
    if not ids:
        raise ValueError("the calibration text encodes to no tokens")
    from .engine import run

    n = run(_calibrate(model, opts, ids, progress))
    path = state_path(model, "hcs_counts.json")
    layers = json.loads(path.read_text())["layers"] if path.exists() else {}
    return {"tokens": n, "counts": str(path), "layers": len(layers)}
