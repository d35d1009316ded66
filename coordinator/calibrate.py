"""`krasis-coord calibrate MODEL --text FILE`: gather the hot-expert counts (docs/strategies.md,
HCS) from representative text before serving, instead of from the first users' prompts.

The text is tokenized with the model's tokenizer and sent through prefill in prompts of up to
`--prefill-chunk` tokens, each generating one token; every prefill strategy counts the router's
choices, and the GPU workers merge the counts into the model's `hcs_counts.json` when they stop.
The next start builds its hot set from them.

From the same counts (what this text added to them) it reports how the routers spread the text's
choices, per MoE layer, against the targets of trained routers (docs/routing.md,
shared/routing_stats.py), and saves them beside the counts (`routing_stats.json`).
"""

from __future__ import annotations

import json

from ..shared import protocol as P
from .processes import RuntimeOptions


async def _calibrate(model: str, opts: RuntimeOptions, ids: list[int], progress, prestarted) -> int:
    from .engine import Engine

    engine = Engine(model, opts, prestarted=prestarted)
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


def _saved(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def routing_report(family, before: dict, after: dict) -> dict:
    """Per MoE layer, the routing figures of what the counts gained between two saves of
    hcs_counts.json; and over the layers, the mean of each figure and the worst layer's."""
    import torch

    from ..shared.routing_stats import failures, layer_stats

    layers = {}
    for key, counts in sorted(after.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        gained = torch.tensor(counts) - torch.tensor(before.get("layers", {}).get(key, [0] * len(counts)))
        if int(gained.sum()) == 0:
            continue
        ov, n = (a - b for a, b in zip(after.get("pairs", {}).get(key, [0, 0]), before.get("pairs", {}).get(key, [0, 0])))
        layers[key] = layer_stats(gained, family.experts(int(key)).top_k, ov, n)
    if not layers:
        return {"layers": {}}
    figures = list(next(iter(layers.values())))
    mean = {f: sum(st[f] for st in layers.values()) / len(layers) for f in figures}
    worse = {"max_mean": max, "cv": max, "entropy": min, "overlap": max, "chance": max, "locality": min}
    worst = {f: worse[f](st[f] for st in layers.values()) for f in figures}
    failing = {k: fs for k, st in layers.items() if (fs := failures(st))}
    return {"layers": layers, "mean": mean, "worst": worst, "failing": failing}


def report_lines(rep: dict) -> list[str]:
    if not rep["layers"]:
        return ["routing: no choices were counted"]
    m, w = rep["mean"], rep["worst"]
    lines = [f"routing over {len(rep['layers'])} MoE layers (mean, worst layer):",
             f"  load max/mean {m['max_mean']:.2f} ({w['max_mean']:.2f}), CV {m['cv']:.2f} ({w['cv']:.2f}), "
             f"entropy {m['entropy']:.3f} ({w['entropy']:.3f})"]
    if "locality" in m:
        lines.append(f"  consecutive tokens share {m['overlap']:.2f} choices against {m['chance']:.2f} by chance: "
                     f"locality {m['locality']:.2f} ({w['locality']:.2f})")
    lines.append(f"  {len(rep['failing'])} layer(s) outside the targets of trained routers (docs/routing.md)"
                 + "".join(f"\n    layer {k}: {', '.join(fs)}" for k, fs in list(rep["failing"].items())[:8]))
    return lines


def calibrate(model: str, opts: RuntimeOptions, text: str, progress=lambda n: None, prestarted=None) -> dict:
    """Prefill `text` through the model; returns the tokens sent, where the counts are kept and the
    routing figures of the text (saved beside the counts). `prestarted`: as bench.run_benches's."""
    from ..shared.weights import load_family
    from .state import state_path
    from .tokenizer import TextCodec

    ids = TextCodec(model).encode(text)
    if not ids:
        raise ValueError("the calibration text encodes to no tokens")
    from .engine import run

    path = state_path(model, "hcs_counts.json")
    before = _saved(path)
    n = run(_calibrate(model, opts, ids, progress, prestarted))
    after = _saved(path)
    rep = routing_report(load_family(model), before, after)
    stats = state_path(model, "routing_stats.json")
    stats.write_text(json.dumps({"tokens": n, **rep}, indent=1))
    return {"tokens": n, "counts": str(path), "layers": len(after.get("layers", {})), "routing": rep,
            "routing_path": str(stats)}
