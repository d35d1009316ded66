"""Why a decode step replayed from a CUDA graph and the same step run eagerly give different greedy
tokens (tests/test_decode_graphs.py::test_graphs_replay_the_eager_steps[deepseek-pp1-fp8]).

The tiny DeepSeek-V2 model is built as that test builds it (tests/tiny_models.py, seed 5) and
served with the test's options, several times:

    graph A, graph B, eager A, eager B     the test's own options (--stream-decode auto, the default)
    graph, eager                           the same with --stream-decode off

Each run sends the test's four solo prompts (20 greedy tokens each, with the top-2 logprobs of
every token) and then the 4th prompt again in the same service; optionally the test's batched
requests too. After each prompt it reads the CPU pool's call count from the stats: a decode step
served by the pool costs one call per MoE layer, so calls below (tokens - 1) x MoE layers mean
that some decode steps of that prompt ran their routed experts elsewhere: the decode route
(gpu_worker/decode_route.py) sent them to the prefill strategy on the GPU, whose experts are of
--gpu-bits (16: float32, dense), not the pool's INT4 (--cpu-bits 4). It also collects the route's
log lines ("decode steps of up to N tokens: ...", with the two runners' median step times).

What it tells apart:
  * the decode route (a timing-driven choice of a different set of expert weights per step): the
    runs differ only with --stream-decode auto, where their pool call counts differ too, and the
    logprobs are bit-identical up to the divergence;
  * a graph/eager rounding difference (cuBLAS or Triton choosing other kernels under capture): the
    pinned pair's logprobs differ by ~1e-6 from early on and the divergence is a near-tie (top-2
    margin ~1e-5);
  * a race (a buffer overwritten before a replay reads it) or state carried between requests: large
    logprob jumps at single steps, graph A != graph B or eager A != eager B with the route pinned,
    or the repeated 4th prompt differing from its first run in the same service.

    python benchmarks/graph_divergence.py [--family deepseek] [--case pp1-fp8] [--repeats 2]
                                          [--no-batched] [--no-logprobs] [--keep]

Needs CUDA (prints why and exits 0 elsewhere). About 6 service starts: 1-2 minutes on an H100.
Always exits 0; the conclusions are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEW_TOKENS = 20
# the test's prompts (tests/test_decode_graphs.py: _serve)
PROMPTS = [[(7 * i + 3 * j) % 150 + 1 for j in range(5 + 2 * i)] for i in range(4)]
BASE = ("--dtype", "float32", "--cpu-bits", "4", "--max-batch", "4")
CASES = {
    "pp1-fp8": ("--devices", "cuda:0", "--kv-dtype", "fp8", "--resident-decode", "off"),
    "pp2-bf16-resident": ("--devices", "cuda:0,cuda:0", "--kv-dtype", "bf16"),
}
# The deepseek seed-5 model's greedy tokens for PROMPTS with every decode step through the CPU pool
# (INT4 experts) and with every decode step through the prefill strategy's float32 experts
# (--stream-decode always), measured on the CPU device (--devices cpu, same options otherwise).
# The failing test's two sequences for the 4th prompt were exactly these two tails: eager ...63, 64
# (the pool's), graph ...91, 16 (the float32 experts').
REFERENCE = {
    "pool-only": [[85, 71, 71, 85, 71, 85, 149, 113, 42, 113, 136, 113, 147, 147, 147, 147, 147, 68, 2, 2],
                  [32, 153, 122, 122, 8, 152, 64, 153, 122, 81, 135, 153, 86, 86, 86, 86, 86, 138, 138, 138],
                  [157, 28, 76, 47, 134, 134, 134, 134, 28, 76, 28, 76, 77, 28, 76, 77, 76, 77, 28, 76],
                  [143] * 11 + [158] * 7 + [63, 64]],
    "float32-experts-only": [[85, 71, 71, 71, 85, 71, 85, 113, 42, 113, 98, 147, 42, 113, 147, 147, 147, 68, 2, 2],
                             [32, 153, 122, 122, 8, 152, 64, 153, 122, 81, 135, 153, 86, 86, 86, 86, 86, 138, 138, 138],
                             [157, 28, 76, 47, 134, 134, 134, 134, 28, 76, 28, 76, 77, 28, 76, 77, 76, 77, 28, 76],
                             [143] * 11 + [158] * 7 + [91, 16]],
}
ROUTE_LINE = re.compile(r"decode steps of up to \d+ tokens?: .*")
TINY = 1e-4  # a logprob difference below this is rounding, not a different computation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--family", default="deepseek", choices=["deepseek", "qwen3"], help="tiny model family (default deepseek)")
    p.add_argument("--seed", type=int, default=5, help="tiny model seed (the test's: 5)")
    p.add_argument("--case", default="pp1-fp8", choices=sorted(CASES), help="the test's option set (default pp1-fp8)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode with the test's options (default 2)")
    p.add_argument("--off-repeats", type=int, default=1, help="runs per mode with --stream-decode off (default 1)")
    p.add_argument("--no-batched", action="store_true", help="skip the test's batched requests (2 and 4 together)")
    p.add_argument("--no-logprobs", action="store_true", help="request no logprobs (exactly the test's requests)")
    p.add_argument("--top", type=int, default=2, help="logprob alternatives per token (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary model folders")
    p.add_argument("--json", default=None, help="also write every run's record here (default $OUT/graph_divergence.json when $OUT is set)")
    return p.parse_args(argv)


# --- one service run ---------------------------------------------------------------------------


def pool_calls(client) -> int | None:
    """The CPU pool's calls so far (every pool process gets every request: the largest count)."""
    pools = client.stats().stats.get("cpu_pool") or []
    return max((int(p.get("calls", 0)) for p in pools), default=None)


def solo(client, prompt, logprobs: int | None):
    """One request, streamed: (tokens, [(chosen logprob, top ids, top logprobs)] or None, decode tok/s)."""
    from krasis.shared import protocol as P

    toks, lps, done = [], [], None
    extra = {} if logprobs is None else {"logprobs": logprobs}
    for ev in client.stream(None, prompt, None, False, max_new_tokens=NEW_TOKENS, ignore_eos=True, **extra):
        if isinstance(ev, P.Tokens):
            toks += ev.token_ids
            if ev.logprobs:
                lps += [(t.logprob, list(t.top_ids), list(t.top_logprobs)) for t in ev.logprobs]
        elif isinstance(ev, P.Done):
            done = ev
        elif isinstance(ev, P.Error):
            raise RuntimeError(f"service error: {ev.message}")
    return toks, (lps if len(lps) == len(toks) else None), (done.decode_tok_s if done else None)


def serve(tm, base: Path, tmp: Path, label: str, graphs: bool, extra: tuple, args) -> dict:
    rec = {"label": label, "graphs": graphs, "options": [*BASE, *extra], "tokens": [], "logprobs": [], "pool_calls": [],
           "decode_tok_s": [], "batched": None, "route_lines": [], "captures": [], "failed_lines": [], "error": None}
    model = shutil.copytree(base, tmp / label)  # every run from the same state, as the test does
    os.environ["KRASIS_CUDA_GRAPHS"] = "1" if graphs else "0"
    t0 = time.monotonic()
    svc = None
    try:
        svc = tm.Service(model, *BASE, *extra, startup_timeout=300)
        with svc:
            last = pool_calls(svc.client)
            for p in [*PROMPTS, PROMPTS[-1]]:  # the 4th prompt again: state carried between requests?
                toks, lps, tps = solo(svc.client, p, None if args.no_logprobs else args.top)
                now = pool_calls(svc.client)
                rec["tokens"].append(toks)
                rec["logprobs"].append(lps)
                rec["decode_tok_s"].append(tps)
                rec["pool_calls"].append(None if now is None or last is None else now - last)
                last = now
            if not args.no_batched:
                import asyncio

                from krasis.shared.client import AsyncClient

                async def together(ps):
                    async with AsyncClient(svc.endpoint) as c:
                        rs = await asyncio.gather(*(c.complete(prompt_ids=q, max_new_tokens=NEW_TOKENS, ignore_eos=True) for q in ps))
                        return [r.token_ids for r in rs]

                rec["batched"] = [asyncio.run(together(PROMPTS[:n])) for n in (2, 4)]
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        del os.environ["KRASIS_CUDA_GRAPHS"]
    log = getattr(svc, "stderr", "") or ""
    rec["route_lines"] = ROUTE_LINE.findall(log)
    rec["captures"] = re.findall(r"decode graphs for batch size (\d+)", log)
    rec["failed_lines"] = [line for line in log.splitlines() if "failed" in line or "Traceback" in line][:10]
    rec["seconds"] = round(time.monotonic() - t0, 1)
    print(f"  {label}: {rec['seconds']} s, pool calls per prompt {rec['pool_calls']}, "
          f"graphs captured for batch sizes {rec['captures'] or '-'}" + (f", ERROR {rec['error']}" if rec["error"] else ""),
          flush=True)
    for line in rec["route_lines"]:
        print(f"      route: {line}", flush=True)
    return rec


# --- comparisons -------------------------------------------------------------------------------


def first_diff(a: list[list[int]], b: list[list[int]]):
    """(prompt, token index) of the first difference, or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return i, j
        if len(x) != len(y):
            return i, min(len(x), len(y))
    return None


def margin(lp) -> float | None:
    """top-1 minus top-2 logprob of one token's record."""
    if lp is None or len(lp[2]) < 2:
        return None
    return lp[2][0] - lp[2][1]


def compare(a: dict, b: dict, prompts: int) -> dict:
    """Tokens and logprobs of runs a and b over their first `prompts` solo prompts."""
    ta, tb = a["tokens"][:prompts], b["tokens"][:prompts]
    out = {"pair": f"{a['label']} vs {b['label']}", "diff": first_diff(ta, tb), "max_dlp": None, "exact_lp": None,
           "first_dlp": None, "at": None, "pool_a": a["pool_calls"][:prompts], "pool_b": b["pool_calls"][:prompts]}
    la, lb = a["logprobs"][:prompts], b["logprobs"][:prompts]
    if all(x is not None for x in la + lb) and len(la) == len(lb) == prompts:
        stop = out["diff"] or (prompts, 0)
        deltas = []
        for i in range(prompts):
            n = min(len(la[i]), len(lb[i]))
            if i == stop[0]:
                n = min(n, stop[1] + 1)  # the diverging token's own distribution included
            elif i > stop[0]:
                break
            for j in range(n):
                d = max(abs(x - y) for x, y in zip([la[i][j][0], *la[i][j][2]], [lb[i][j][0], *lb[i][j][2]]))
                deltas.append(((i, j), d))
        if deltas:
            out["max_dlp"] = max(d for _, d in deltas)
            out["exact_lp"] = all(d == 0 for _, d in deltas)
            nz = [(ij, d) for ij, d in deltas if d != 0]
            out["first_dlp"] = nz[0] if nz else None
        if out["diff"] is not None:
            i, j = out["diff"]
            if j < len(la[i]) and j < len(lb[i]):
                out["at"] = {"a_top": list(zip(la[i][j][1], la[i][j][2])), "b_top": list(zip(lb[i][j][1], lb[i][j][2])),
                             "a_margin": margin(la[i][j]), "b_margin": margin(lb[i][j])}
    return out


def show(c: dict) -> None:
    print(f"  {c['pair']}:")
    if c["diff"] is None:
        print("      tokens identical")
    else:
        i, j = c["diff"]
        print(f"      tokens first differ at prompt {i} (0-based), token {j}")
    if c["max_dlp"] is not None:
        if c["exact_lp"]:
            print("      logprobs bit-identical up to there" if c["diff"] else "      logprobs bit-identical throughout")
        else:
            (fi, fj), fd = c["first_dlp"]
            print(f"      logprobs differ: max |d| {c['max_dlp']:.3g}, first at prompt {fi} token {fj} (|d| {fd:.3g})")
    if c["at"]:
        at = c["at"]
        print(f"      at the divergence: A top {fmt_top(at['a_top'])} margin {fmt(at['a_margin'])}; "
              f"B top {fmt_top(at['b_top'])} margin {fmt(at['b_margin'])}")
    if c["pool_a"] != c["pool_b"]:
        print(f"      pool calls per prompt differ: {c['pool_a']} vs {c['pool_b']}")


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def fmt_top(top) -> str:
    return "[" + ", ".join(f"{t}:{lp:.4f}" for t, lp in top) + "]"


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("graph_divergence: needs CUDA (decode graphs run only on a GPU); nothing to do here")
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tm
    from krasis.shared.weights import load_family

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; family {args.family}, case {args.case}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="graph_divergence-"))
    runs: list[dict] = []
    try:
        base = tm.build(tmp / f"{args.family}-base", args.family, seed=args.seed)
        fam = load_family(base)
        moe = sum(fam.is_moe(i) for i in range(fam.num_layers))
        every = (NEW_TOKENS - 1) * moe
        print(f"{fam.num_layers} layers, {moe} MoE: a prompt whose {NEW_TOKENS - 1} decode steps all go through the pool "
              f"costs it {every} calls", flush=True)
        extra = CASES[args.case]
        auto = {"graph": [], "eager": []}
        off = {"graph": [], "eager": []}
        print("runs with the test's options (--stream-decode auto):", flush=True)
        for r in range(args.repeats):
            for mode in ("graph", "eager"):
                auto[mode].append(serve(tm, base, tmp, f"{mode}-auto-{'AB'[r] if r < 2 else r}", mode == "graph", extra, args))
        print("runs with --stream-decode off:", flush=True)
        for r in range(args.off_repeats):
            for mode in ("graph", "eager"):
                off[mode].append(serve(tm, base, tmp, f"{mode}-off-{'AB'[r] if r < 2 else r}", mode == "graph",
                                       (*extra, "--stream-decode", "off"), args))
        runs = [*auto["graph"], *auto["eager"], *off["graph"], *off["eager"]]
        conclude(auto, off, every, args)
    except Exception:
        traceback.print_exc()
        print("graph_divergence: stopped early (see the traceback); conclusions from what ran:")
    finally:
        out = args.json or (os.path.join(os.environ["OUT"], "graph_divergence.json") if os.environ.get("OUT") else None)
        if out:
            try:
                Path(out).write_text(json.dumps(runs, indent=1, default=str))
                print(f"records: {out}")
            except OSError as e:
                print(f"could not write {out}: {e}")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def conclude(auto: dict, off: dict, every: int, args) -> None:
    n = len(PROMPTS)
    ok = lambda rs: [r for r in rs if r["error"] is None and len(r["tokens"]) >= n]  # noqa: E731
    ag, ae, og, oe = ok(auto["graph"]), ok(auto["eager"]), ok(off["graph"]), ok(off["eager"])
    print("\n=== comparisons (the 4 solo prompts) ===")
    pairs = {}
    for mode, g, e in (("auto", ag, ae), ("off", og, oe)):
        if g and e:
            pairs[f"{mode} graph/eager"] = compare(g[0], e[0], n)
        for name, rs in (("graph", g), ("eager", e)):
            if len(rs) > 1:
                pairs[f"{mode} {name}/{name}"] = compare(rs[0], rs[1], n)
    for c in pairs.values():
        show(c)

    print("\n=== the 4th prompt again, in the same service (state carried between requests?) ===")
    repeat_differs = []
    for r in [*ag, *ae, *og, *oe]:
        if len(r["tokens"]) > n:
            same = r["tokens"][n] == r["tokens"][n - 1]
            lp_same = r["logprobs"][n] == r["logprobs"][n - 1] if r["logprobs"][n] is not None else None
            print(f"  {r['label']}: tokens {'identical' if same else 'DIFFER'}"
                  + ("" if lp_same is None else f", logprobs {'identical' if lp_same else 'differ'}")
                  + f"; pool calls {r['pool_calls'][n - 1]} then {r['pool_calls'][n]}")
            if not same or lp_same is False:
                repeat_differs.append(r)

    if not args.no_batched:
        print("\n=== batched requests (2 and 4 together), as the test compares them ===")
        for a, b in ((ag, ae), (og, oe)):
            if a and b and a[0]["batched"] is not None and b[0]["batched"] is not None:
                print(f"  {a[0]['label']} vs {b[0]['label']}: {'identical' if a[0]['batched'] == b[0]['batched'] else 'DIFFER'}")

    print("\n=== where each run's decode steps ran ===")
    for r in [*ag, *ae, *og, *oe]:
        streamed = [None if c is None else (every - c) / max(every // (NEW_TOKENS - 1), 1) for c in r["pool_calls"]]
        print(f"  {r['label']}: pool calls per prompt {r['pool_calls']} (all through the pool: {every} each); "
              f"decode steps streamed to the GPU's prefill strategy per prompt ~{streamed}; "
              f"decode tok/s {[None if t is None else round(t) for t in r['decode_tok_s']]}")

    if args.family == "deepseek" and args.seed == 5:
        print("\n=== each prompt's tokens against the two references (CPU device: all pool / all float32 experts) ===")
        for r in [*ag, *ae, *og, *oe]:
            tags = []
            for i, toks in enumerate(r["tokens"][:n]):
                hit = [k for k, ref in REFERENCE.items() if ref[i] == toks]
                tags.append("both" if len(hit) == 2 else hit[0] if hit else "neither (mixed runners, or other numerics)")
            print(f"  {r['label']}: {tags}")

    print("\n=== conclusions ===")
    said = 0

    def say(text):
        nonlocal said
        said += 1
        print(f"{said}. {text}")

    a_ge, o_ge = pairs.get("auto graph/eager"), pairs.get("off graph/eager")
    pool_varies = any(r["pool_calls"][:n] != ag[0]["pool_calls"][:n] for r in [*ag, *ae]) if ag else False
    streamed_auto = any(c is not None and c < every for r in [*ag, *ae] for c in r["pool_calls"][:n])
    streamed_off = any(c is not None and c < every for r in [*og, *oe] for c in r["pool_calls"][:n])
    if streamed_auto:
        say("With --stream-decode auto (the test's default) some decode steps did NOT go through the CPU pool: the "
            "decode route (gpu_worker/decode_route.py) sent them to the prefill strategy on the GPU, whose routed experts "
            "are --gpu-bits 16 (float32) instead of the pool's --cpu-bits 4 INT4. Those steps compute a different model.")
    if pool_varies:
        say("The number of pool-served steps differs between runs with the same options: the route's choice depends on "
            "measured step times (graph replays are faster than eager steps), so graph and eager runs - or two runs of "
            "one mode - decode some steps with different expert weights.")
    if o_ge is not None:
        if o_ge["diff"] is None and o_ge["exact_lp"] in (True, None):
            say("With --stream-decode off, graph replay and eager steps agree" + (" bit for bit (tokens and logprobs)"
                if o_ge["exact_lp"] else " token for token") + ": the CUDA graphs replay the eager steps faithfully "
                "(no kernel/rounding difference under capture, no replay race, for this model and case).")
            if a_ge is not None and a_ge["diff"] is not None:
                say("=> the failing comparison is explained by the decode route, not by decode_graphs.py. Fix: pin "
                    "'--stream-decode', 'off' in tests/test_decode_graphs.py's _serve (the test compares the same steps in "
                    "two modes; the route makes them different steps), and consider not letting the route switch expert "
                    "precision (--gpu-bits != --cpu-bits) or stream for free through persistent when --resident-decode off.")
            elif a_ge is not None:
                say("The test-option runs agreed this time too: the route's timing decided alike in both modes (the failure "
                    "is intermittent); pool-call counts above show whether it streamed.")
        elif o_ge["diff"] is None:
            say(f"With --stream-decode off the tokens agree but logprobs differ slightly (max {fmt(o_ge['max_dlp'])}): "
                "graph and eager decode steps round differently somewhere (kernel choice under capture). Harmless "
                "unless a near-tie; see below.")
        else:
            i, j = o_ge["diff"]
            m = o_ge["at"] or {}
            near = [x for x in (m.get("a_margin"), m.get("b_margin")) if x is not None]
            if o_ge["exact_lp"]:
                say(f"With --stream-decode off graph and eager still diverge (prompt {i} token {j}) although every logprob "
                    "before it was bit-identical: a discrete switch, not rounding - something else picks different work per "
                    "step (check the route lines and pool calls above" + (", streamed steps even with off" if streamed_off else "")
                    + "), or a race that corrupted one step.")
            elif o_ge["max_dlp"] is not None and o_ge["max_dlp"] < TINY and near and min(near) < 10 * TINY:
                say(f"With --stream-decode off graph and eager differ by rounding only (max |dlogprob| {fmt(o_ge['max_dlp'])}, "
                    f"first at {o_ge['first_dlp'][0]}) and the divergence at prompt {i} token {j} is a near-tie (top-2 margin "
                    f"{fmt(min(near))}): cause (a), an op that rounds differently under graph capture; find it by dumping a "
                    "replayed and an eager step's layer outputs. The test then needs a tie-tolerant comparison.")
            else:
                say(f"With --stream-decode off graph and eager diverge at prompt {i} token {j} with logprobs differing by up "
                    f"to {fmt(o_ge['max_dlp'])} (first at {o_ge['first_dlp'][0] if o_ge['first_dlp'] else '-'}): more than "
                    "rounding - a race (a buffer read by a replay before it is written, or overwritten) or state carried "
                    "between steps; compare graph/graph and eager/eager below.")
    for key, what in (("off graph/graph", "graph"), ("off eager/eager", "eager")):
        c = pairs.get(key)
        if c is not None and (c["diff"] is not None or c["exact_lp"] is False):
            say(f"Two {what} runs with the route pinned differ ({'tokens' if c['diff'] else 'logprobs only'}): "
                "nondeterminism across processes that graphs do not cause (cause (c)): prefill or pool arithmetic varying "
                "from run to run.")
    for key, what in (("auto graph/graph", "graph"), ("auto eager/eager", "eager")):
        c = pairs.get(key)
        if c is not None and c["diff"] is not None:
            same_pool = c["pool_a"] == c["pool_b"]
            say(f"Two {what} runs with the test's options differ at {c['diff']}"
                + ("; their pool-call counts differ too: the route's choice varies run to run." if not same_pool else
                   "; their pool-call counts are the same, so the route alone does not explain it."))
    if repeat_differs:
        say("The 4th prompt repeated in the same service gave a different result in " + ", ".join(r["label"] for r in repeat_differs)
            + ": state carried between requests (cause (d)) - with --stream-decode auto that is the route's accumulated "
            "step times; with it off, something else (look at the logprobs).")
    if not said:
        say("No divergence and no streamed steps in these runs: the failure did not reproduce; rerun with --repeats 3.")
    bad = [r["label"] for r in [*auto["graph"], *auto["eager"], *off["graph"], *off["eager"]] if r["error"] or r["failed_lines"]]
    if bad:
        say(f"Runs with errors or 'failed' lines on stderr: {bad} (see their output above).")


if __name__ == "__main__":
    sys.exit(main())
