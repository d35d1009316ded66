"""The decode route (gpu_worker/decode_route.py): which runner takes a decode step, and a decode
step streamed as a prefill is token-identical to transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch

import tiny_models as tm
from krasis.gpu_worker.decode_route import KEEP, MARGIN, REVISIT, SAMPLES, DecodeRoute, bucket, touched_share
from krasis.shared.client import AsyncClient


class Runner:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def route(mode="auto", pays=lambda b: True, layers=1):
    """A route whose whole stream is named "prefill" and whose splits "split_N"."""
    return DecodeRoute(Runner("decode"), lambda n: Runner("prefill" if n == layers else f"split_{n}"), mode, pays, layers)


def drive(r: DecodeRoute, tokens: int, ms: dict, steps: int) -> list[str]:
    """`steps` decode steps of `tokens` tokens, each runner taking ms[its name]; the runners picked."""
    picked = []
    for _ in range(steps):
        runner = r.pick(tokens)
        picked.append(runner.name)
        r.record(runner, tokens, ms[runner.name] / 1e3)
    return picked


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_touched_share_matches_drawn_routing():
    # each token chooses k distinct experts of E uniformly: the share of experts some token chose
    g = torch.Generator().manual_seed(0)
    for k, num, tokens in ((8, 128, 1), (8, 128, 32), (6, 64, 4), (2, 8, 3)):
        draws = 400
        seen = 0
        for _ in range(draws):
            chosen = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(tokens)])
            seen += torch.unique(chosen).numel()
        assert abs(seen / draws / num - touched_share(tokens, k, num)) < 0.02


def test_fixed_modes():
    assert set(drive(route("off"), 32, {"decode": 9, "prefill": 1}, 20)) == {"decode"}
    assert set(drive(route("always"), 1, {"decode": 1, "prefill": 9}, 20)) == {"prefill"}
    with pytest.raises(ValueError):
        route("sometimes")


def test_auto_measures_both_then_takes_the_faster_and_revisits():
    r = route()
    picked = drive(r, 32, {"decode": 20, "prefill": 8}, REVISIT * 2)
    # the first step of each runner is not kept (graph capture, a cold staging slot)
    assert picked[: SAMPLES + 1] == ["decode"] * (SAMPLES + 1)
    assert picked[SAMPLES + 1 : 2 * (SAMPLES + 1)] == ["prefill"] * (SAMPLES + 1)
    # the decode strategy measured again (its first samples came right after the batch formed)
    assert picked[2 * (SAMPLES + 1) : 3 * SAMPLES + 2] == ["decode"] * SAMPLES
    rest = picked[3 * SAMPLES + 2:]
    assert rest.count("decode") == 2 and set(rest) == {"decode", "prefill"}  # one revisit per REVISIT steps
    assert r.choice == {32: 1}


def test_auto_measures_the_decode_strategy_again_before_deciding():
    # its first steps in a bucket were slow (right after the batch formed), then it is the faster
    r = route()
    slow = {"decode": 30, "prefill": 20}
    picked = drive(r, 32, slow, SAMPLES + 1) + drive(r, 32, {"decode": 10, "prefill": 20}, 50)
    assert r.choice == {32: 0} and picked[-1] == "decode"


def test_auto_follows_a_change_in_the_machine():
    # decode was faster; then the pool slows (another job on the CPUs): the revisits find it out
    r = route()
    assert drive(r, 16, {"decode": 5, "prefill": 8}, 50)[-1] == "decode"
    picked = drive(r, 16, {"decode": 30, "prefill": 8}, REVISIT * (KEEP + 1))
    assert picked[-1] == "prefill" and r.choice[16] == 1


def test_auto_keeps_its_runner_against_one_faster_only_by_noise():
    # the stream was chosen; then the pool becomes a little faster, within the margin: no switch (a
    # switch moves the step to other weights where --gpu-bits and --cpu-bits differ, and two runners
    # within noise of each other would alternate), until it is faster by more than the margin
    r = route()
    drive(r, 8, {"decode": 10, "prefill": 8}, 20)
    assert r.choice[8] == 1
    close = 8 / (1 + MARGIN / 2)
    assert drive(r, 8, {"decode": close, "prefill": 8}, REVISIT * (KEEP + 1)).count("decode") == KEEP + 1
    assert r.choice[8] == 1
    picked = drive(r, 8, {"decode": 8 / (1 + 2 * MARGIN), "prefill": 8}, REVISIT * (KEEP + 1))
    assert picked[-1] == "decode" and r.choice[8] == 0


def test_auto_finds_the_split_that_keeps_both_links_busy():
    """8 streamable layers; the pool takes 3 ms a layer, the stream 2, and the two overlap: a step
    streaming n layers takes max(2n, 3(8 - n)) ms. After the two ends (24 and 16 ms), the route tries
    the split that balances them (8 * 24 / 40 = 4.8: 5, 15 ms... max(10, 9) = 10), then halfway
    towards the faster end (6: 12 ms), and keeps the fastest, revisiting the runner-up."""
    def ms(n):
        return max(2 * n, 3 * (8 - n))

    r = route(layers=8)
    times = {"decode": ms(0), "prefill": ms(8)} | {f"split_{n}": ms(n) for n in range(1, 8)}
    picked = drive(r, 32, times, REVISIT * 2)
    tried = list(dict.fromkeys(picked))
    assert tried == ["decode", "prefill", "split_5", "split_6"]
    rest = picked[(SAMPLES + 1) * 4 + SAMPLES:]
    assert r.choice == {32: 5} and set(rest) == {"split_5", "split_6"}
    assert rest.count("split_6") == 2  # the runner-up, once every REVISIT steps
    # a fixed split: that many layers in every step, whatever the times
    assert set(drive(route("3", layers=8), 32, times, 10)) == {"split_3"}
    assert set(drive(route("30", layers=8), 32, times, 10)) == {"prefill"}


def test_auto_never_streams_where_it_cannot_pay_nor_mixes_buckets():
    r = route(pays=lambda b: b >= 16)
    assert set(drive(r, 2, {"decode": 50, "prefill": 1}, 40)) == {"decode"}
    assert "prefill" in drive(r, 20, {"decode": 50, "prefill": 1}, 40)
    # bucket 2's measurements are its own: bucket 32's are not used for it
    assert r.choice == {32: 1}


def test_streamed_decode_is_exact_and_leaves_the_pool_idle(tmp_path):
    """--stream-decode always: every decode step's experts go through the prefill strategy (on a
    CPU device, the store's own tensors), several sequences per step over two stages; the tokens
    are transformers' greedy ones, and the CPU pool is never called."""
    path = tm.build(tmp_path / "m", "qwen3", **tm.QWEN3_CONFIGS["qwen3-base"])
    ref = tm.reference_model(path)
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 8, 45], [5, 6, 7]]
    want = [tm.reference_greedy(ref, ids, 16) for ids in prompts]
    with tm.Service(path, "--dtype", "float32", "--devices", "cpu,cpu", "--cpu-workers", "1",
                    "--stream-decode", "always") as svc:

        async def together():
            async with AsyncClient(svc.endpoint) as c:
                return await asyncio.gather(*(c.complete(prompt_ids=ids, max_new_tokens=16, ignore_eos=True)
                                              for ids in prompts))

        got = asyncio.run(together())
        stats = svc.client.stats().stats
    assert [g.token_ids for g in got] == want
    assert [w["stream_decode"] for w in stats["workers"] if w["role"] == "gpu"] == ["always", "always"]
    assert sum(p["calls"] for p in stats["cpu_pool"]) == 0


def test_auto_streams_only_where_the_gpu_computes_with_the_pools_numbers():
    """A streamed step runs the GPU's experts (--gpu-bits), a pool step the pool's (--cpu-bits):
    where they differ, auto would make a request's tokens follow the machine's load."""
    from krasis.coordinator.engine import stream_decode
    from krasis.coordinator.processes import RuntimeOptions

    assert stream_decode(RuntimeOptions(gpu_bits=4, cpu_bits=4)) == "auto"
    assert stream_decode(RuntimeOptions(gpu_bits=16, cpu_bits=4)) == "off"
    assert stream_decode(RuntimeOptions(gpu_bits=16, cpu_bits=4, stream_decode="always")) == "always"
