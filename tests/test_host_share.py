"""The device's host share of the pool's decode work (gpu_worker/host_share.py): which of a layer's
choices the device reads from host memory itself. split_reference's properties (every choice goes to
exactly one side, an expert to one side for every token, the device takes (n * s256 + 128) // 256 of
the n distinct experts, those the guess did not name first); the Triton kernel equal to it under
Triton's interpreter. Decode with a host share against transformers is one of test_strategies.py's
cases, and bench's count of the pool's share of the choices is test_strategies.py's too."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from krasis.gpu_worker.decode_route import REVISIT
from krasis.gpu_worker.host_share import ShareTuner, split_reference

CASES = r"""
import torch

def cases():
    g = torch.Generator().manual_seed(7)
    for num, m, k in ((8, 1, 2), (64, 3, 6), (128, 1, 8), (128, 32, 8), (160, 5, 8), (128, 40, 8)):
        for masked in (False, True):  # hcs_hybrid posts its hot choices as -1
            ids = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(m)])
            if masked:
                ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, -1, ids)
            guess = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(m)])
            for s256 in (0, 1, 64, 77, 128, 200, 256):
                for g_ in (None, guess):
                    for cap in (num, 3):  # the staging holds every expert, or fewer than the share
                        yield ids, g_, s256, int(torch.randint(0, 1000, (1,), generator=g)), num, cap
"""


def _cases():
    scope: dict = {}
    exec(CASES, scope)
    return scope["cases"]()


def test_split_takes_whole_experts_unguessed_first():
    for ids, guess, s256, salt, num, cap in _cases():
        mine, pool, slots, lookup, count = split_reference(ids, guess, s256, salt, num, cap)
        assert mine.shape == pool.shape == ids.shape
        # every choice on exactly one side, the no-one's (-1) on neither
        assert torch.equal(torch.where(mine >= 0, mine, pool), ids)
        assert not ((mine >= 0) & (pool >= 0)).any()
        taken, left = set(mine[mine >= 0].tolist()), set(pool[pool >= 0].tolist())
        assert not taken & left  # an expert's tokens all on one side: no expert read twice
        chosen = taken | left
        assert len(taken) == int(count) == min((len(chosen) * s256 + 128) // 256, cap)
        # the staging: each taken expert in one slot, the slots past the count empty, lookup their inverse
        assert slots.shape == (cap,) and set(slots[: int(count)].tolist()) == taken
        assert (slots[int(count):] == -1).all()
        assert torch.equal(lookup[slots[: int(count)]], torch.arange(int(count)))
        assert int((lookup >= 0).sum()) == len(taken)
        if guess is not None:
            named = set(guess.reshape(-1).tolist())
            if taken & named:  # a guessed expert taken only once every unguessed one is
                assert chosen - named <= taken


def test_split_moves_with_the_layer():
    """The rotation by layer spreads the device's share over the experts: a fixed choice of every
    expert, over salts, lands on the device for some layers and on the pool for others."""
    ids = torch.arange(8).reshape(1, 8)
    seen = set()
    for salt in range(128):
        mine = split_reference(ids, None, 64, salt, 128).mine
        seen |= set(mine[mine >= 0].tolist())
    assert seen == set(range(8))


def _run(tuner: ShareTuner, cost, steps: int, tokens: int = 1) -> list[int]:
    """The levels `steps` decode steps ran at, each timed by cost(level) and recorded one step late
    (a worker launches the next step before it waits for this one)."""
    levels, late = [], None
    for _ in range(steps):
        level = tuner.pick(tokens)
        levels.append(level)
        if late is not None:
            tuner.record(tokens, *late)
        late = (level, cost(level))
    return levels


def test_tuner_climbs_to_the_fastest_share_and_follows_a_change():
    fastest = {"at": 96}
    cost = lambda level: 1e-3 * (1 + abs(level - fastest["at"]) / 256)  # noqa: E731
    tuner = ShareTuner()
    levels = _run(tuner, cost, 60)
    assert levels[0] == 0 and levels[-1] == 96  # climbed from none, past 96 once, and settled there
    assert max(levels) == 128 and tuner.describe() == {"1": 96 / 256}
    assert tuner.pick(32) == 0  # another batch size climbs on its own
    # the machine changes: a neighbour tried every REVISIT steps, alternately above and below
    fastest["at"] = 64
    levels = _run(tuner, cost, 2 * REVISIT + 20)
    assert levels[-1] == 64 and tuner.describe()["1"] == 64 / 256
    # a step of no share at all as fast as the rest: the climb stops at none
    flat = ShareTuner()
    assert set(_run(flat, lambda level: 1e-3, 40)[-10:]) == {0}


def test_tuner_measures_none_again_after_the_climb():
    """A batch's first steps run slow (graphs, the pool's lookahead learning the layers): none, measured
    first, would lose to any share; measured again after the climb, it keeps a share that is no faster."""
    step = {"n": 0}

    def cost(level):
        step["n"] += 1
        return 1e-3 * (2 if step["n"] <= 6 else 1)

    tuner = ShareTuner()
    levels = _run(tuner, cost, 40)
    assert max(levels) == 96 and levels[-1] == 0, levels  # climbed on the slow start, then took none again


def test_tuner_climbs_past_one_slower_level():
    """One-token steps are noisy: a level no faster than none does not end the climb if the next one
    is faster; two in a row do."""
    cost = {0: 1.0, 32: 1.01, 64: 0.8, 96: 0.9, 128: 0.95}
    tuner = ShareTuner()
    levels = _run(tuner, lambda level: 1e-3 * cost[level], 60)
    assert levels[-1] == 64 and tuner.describe() == {"1": 0.25}
    assert 128 in levels  # the climb went on after 96's miss, 64 having gained
    slow = ShareTuner()
    levels = _run(slow, lambda level: 1e-3 * (1 + level / 256), 60)
    assert max(levels) == 64 and levels[-1] == 0  # 32 and 64 both slower: stopped there


@pytest.mark.parametrize("drift", [0.01, -0.002])
def test_tuner_is_not_fooled_by_a_drifting_host(drift):
    """Every level equally fast on a host that slows down (or speeds up) as it is measured: a level
    measured later looks slower (or faster), so comparing one climb's medians, or none measured again
    against them, would keep a share; the last look takes none and the climb's best in turn, step by
    step, and keeps none."""
    step = {"n": 0}

    def cost(level):
        step["n"] += 1
        return 1e-3 * (1 + drift * step["n"])

    tuner = ShareTuner()
    levels = _run(tuner, cost, 60)
    assert levels[-1] == 0 and tuner.describe() == {"1": 0.0}, levels
    assert len(set(levels[-30:])) == 1  # decided, not still alternating


def test_fixed_share_is_never_tuned():
    tuner = ShareTuner(64)
    assert set(_run(tuner, lambda level: 1e-3 * (1 + level), 50)) == {64}
    assert tuner.describe() == {"all": 0.25}


def test_staged_block_holds_the_split_experts(tmp_path):
    """HostShare.staged_block: the device's experts of a split copied from a two-node store into the
    staging, each in its slot, bit for bit; the products' lookup is the split's."""
    from krasis.gpu_worker.dma import HostExperts
    from krasis.gpu_worker.host_share import HostShare
    from krasis.shared.expert_store import ExpertFormat, ExpertStore, StoreLayout
    from krasis.shared.weights import load_family

    family = load_family(tm.build(tmp_path / "m", "qwen3", num_experts=16, num_hidden_layers=2))
    layout = StoreLayout(family, 2, ExpertFormat("int4", torch.bfloat16, 16))
    store = ExpertStore(layout, ExpertStore.create_segments(layout))
    for node in range(2):  # any bytes: the copy is what is tested
        seg = store.segment(node)
        seg.copy_(torch.randint(0, 256, seg.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(node)))
    host = HostExperts(store, range(family.num_layers), torch.device("cpu"))
    share = HostShare(host, most=128)
    layer = host.layers[0]
    assert share.caps[layer] == 8  # half of 16 experts
    # the VRAM plan counts the staging it allocates
    from krasis.gpu_worker.vram_budget import plan

    def planned(most):
        return plan(family, layout, (0, family.num_layers), True, True, 2, "bf16", 64, 64, "chunked", "pure_cpu", None,
                    None, share_most=most).staging

    assert planned(128) - planned(0) == share.nbytes >= 8 * host.expert_nbytes(layer)
    share.use(128)
    ids = torch.tensor([[3, 9], [12, 3], [0, 15]])
    s = share.split(layer, ids, None)
    tensors, lookup = share.staged_block(layer, s)
    assert lookup is s.lookup and int(s.count) == 3  # half of 5, rounded
    for slot in range(int(s.count)):
        e = int(s.slots[slot])
        for t, rows in host.host_blocks(layer):
            if rows[e] >= 0:
                for name, v in t.items():  # as bytes: random ones hold NaNs
                    assert torch.equal(tensors[name][slot].reshape(-1).view(torch.uint8),
                                       v[rows[e]].reshape(-1).view(torch.uint8)), (name, e)


# the kernels against the references: on the CPU under Triton's interpreter here, on CUDA where a GPU
# call runs it (`python -c "import test_host_share as t; exec(t.CHECK)"` from tests/)
CHECK = CASES + r"""
import os
from krasis.gpu_worker.host_share import gather_reference, split_reference
from krasis.gpu_worker.host_share_kernel import gather_triton, split_triton

dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
n = 0
for ids, guess, s256, salt, num, cap in cases():
    want = split_reference(ids, guess, s256, salt, num, cap)
    level = torch.tensor([s256], dtype=torch.int32, device=dev)
    got = split_triton(ids.to(dev), None if guess is None else guess.to(dev), level, salt, num, cap)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (ids, guess, s256, salt, num, cap, got, want)
    n += 1
assert n > 100
# gather: rows of whole words and of odd bytes, from a block holding some of the experts
g = torch.Generator().manual_seed(3)
for dtype, shape in ((torch.uint8, (12, 5, 7)), (torch.bfloat16, (12, 3, 4)), (torch.uint8, (12, 3000, 8))):
    size = torch.empty((), dtype=dtype).element_size()
    src = torch.randint(0, 255, (*shape[:-1], shape[-1] * size), generator=g, dtype=torch.uint8).view(dtype)
    rows = torch.tensor([-1, 0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9])  # experts 0 and 3 in another block
    for count in (0, 1, 4):
        slots = torch.tensor([4, 0, 11, 6, -1, -1])
        want = torch.zeros((6, *shape[1:]), dtype=dtype)
        gather_reference(src, want, slots, rows, torch.tensor([count], dtype=torch.int32))
        got = torch.zeros_like(want, device=dev)
        gather_triton(src.to(dev), got, slots.to(dev), rows.to(dev), torch.tensor([count], dtype=torch.int32, device=dev))
        raw = lambda t: t.reshape(-1).view(torch.uint8)  # random bytes hold NaNs
        assert torch.equal(raw(got.cpu()), raw(want)), (dtype, shape, count)
        assert count < 4 or torch.equal(raw(want[2]), raw(src[9]))
print("ok")
"""


def test_kernels_match_references():
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject's test extra)")
    tm.run_interpreted(CHECK)
