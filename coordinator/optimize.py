"""`krasis-coord optimize MODEL`: every prefill and every decode strategy on this machine and model,
`--runs` each, ranked as the reference's auto-optimiser reports them; the winners are stored per model
(`strategy.json` in the model's state folder) and used by `serve` and `generate` unless
--prefill-strategy / --decode-strategy say otherwise.
"""

from __future__ import annotations

import json

from ..shared.strategy_names import DECODE_STRATEGIES
from .processes import RuntimeOptions
from .state import WINNER_FILE, state_path


def prefill_candidates(moe_layers: int) -> list[str]:
    # groups of one are the default (they keep the most layers resident: gpu_worker/vram_budget.py,
    # AUTO_PREFILL); larger ones where the slice has more layers than a group
    groups = [n for n in (1, 2, 4) if n == 1 or n < moe_layers]
    return ["persistent", *(f"layer_grouped_{n}" for n in groups), "hcs_prefill", "chunked", "active_only"]


def rank(rows: list[dict], key: str) -> list[dict]:
    """Successful rows best first (higher `key`), failed ones (key None) last."""
    return sorted(rows, key=lambda r: (r[key] is None, -(r[key] or 0.0)))


def optimize(model: str, opts: RuntimeOptions, prompt_tokens: int, decode_tokens: int, runs: int, log=print,
             prestarted=None) -> dict:
    """Each strategy's bench, a start of the processes each (forked by `prestarted`'s zygote: bench.run_benches)."""
    from ..shared.weights import load_family

    family = load_family(model)
    moe = sum(family.is_moe(i) for i in range(family.num_layers))
    prefill_rows, decode_rows = [], []
    for name in prefill_candidates(moe):
        o = RuntimeOptions(**{**vars(opts), "prefill_strategy": name, "decode_strategy": "pure_cpu"})
        prefill_rows.append(_row(name, model, o, prompt_tokens, 2, runs, "prefill", log, prestarted))
    best_prefill = rank(prefill_rows, "prefill_tok_s")[0]["strategy"]
    for name in DECODE_STRATEGIES:
        o = RuntimeOptions(**{**vars(opts), "prefill_strategy": best_prefill, "decode_strategy": name})
        decode_rows.append(_row(name, model, o, min(prompt_tokens, 512), decode_tokens, runs, "decode", log, prestarted))
    prefill_rows, decode_rows = rank(prefill_rows, "prefill_tok_s"), rank(decode_rows, "decode_tok_s")
    if prefill_rows[0]["prefill_tok_s"] is None or decode_rows[0]["decode_tok_s"] is None:
        raise RuntimeError("optimize: no strategy ran; see the errors above")
    winner = {"prefill": prefill_rows[0]["strategy"], "decode": decode_rows[0]["strategy"],
              "devices": opts.devices, "vram_budget": opts.vram_budget}
    p = state_path(model, WINNER_FILE)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(winner, indent=1))
    return {"prefill": prefill_rows, "decode": decode_rows, "winner": winner, "path": str(p)}


def _row(name, model, opts, prompt_tokens, decode_tokens, runs, phase, log, prestarted) -> dict:
    from .bench import run_bench

    try:
        r = run_bench(model, opts, prompt_tokens, decode_tokens, runs, measure_floor=False, prestarted=prestarted)
        return {"strategy": name, "prefill_tok_s": r["prefill_tok_s"], "ttft_s": r["ttft_s"],
                "decode_tok_s": r["decode_tok_s"], "vram_mb": r["vram_mb"], "error": None}
    except Exception as e:  # a strategy that cannot run here (budget, memory) is ranked last, with why
        log(f"optimize: {phase} strategy {name} failed: {type(e).__name__}: {e}".splitlines()[0])
        return {"strategy": name, "prefill_tok_s": None, "ttft_s": None, "decode_tok_s": None, "vram_mb": "", "error": str(e)}


def tables(result: dict) -> str:
    def f(v, fmt):
        return "failed" if v is None else format(v, fmt)

    lines = ["**Prefill strategies** (ranked by tok/s):", "",
             "| Strategy | Avg tok/s | Avg TTFT (s) | VRAM (MB) |", "|----------|----------:|-------------:|----------:|"]
    for r in result["prefill"]:
        lines.append(f"| {r['strategy']} | {f(r['prefill_tok_s'], ',.1f')} | {f(r['ttft_s'], '.2f')} | {r['vram_mb']} |")
    lines += ["", "**Decode strategies** (ranked by tok/s):", "",
              "| Strategy | Avg tok/s | VRAM (MB) |", "|----------|----------:|----------:|"]
    for r in result["decode"]:
        lines.append(f"| {r['strategy']} | {f(r['decode_tok_s'], '.2f')} | {r['vram_mb']} |")
    w = result["winner"]
    lines += ["", f"**Winner**: {w['prefill']} prefill + {w['decode']} decode (stored in {result['path']})"]
    return "\n".join(lines)
