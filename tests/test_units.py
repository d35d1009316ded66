"""In-process checks of the pieces the end-to-end tests rely on: the wire format, sampling,
pipeline planning and incremental detokenisation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tiny_models as tm
from krasis.coordinator.plan import PlanError, split_layers
from krasis.shared.sampling import Sampler
from krasis.shared import protocol as P
from krasis.shared.models.registry import family_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.float16])
def test_tensor_frames_round_trip(dtype):
    t = (torch.randn(3, 5, 7) * 50).to(dtype)
    msg = P.Step(step=3, slices=[P.SeqSlice(seq=1, start=0, n=3)], decode=False)
    msg.tensors = {"hidden": t, "empty": torch.empty(0, 4, dtype=dtype)}
    back = P.decode(P.encode(msg))
    assert isinstance(back, P.Step) and back.step == 3 and back.slices[0].n == 3
    assert back.tensors["hidden"].dtype == dtype and torch.equal(back.tensors["hidden"], t)
    assert back.tensors["empty"].shape == (0, 4)
    # decoded as numpy (the client's way, without torch): the same values, bfloat16 widened exactly
    arrays = P.decode(P.encode(msg), numpy=True).tensors
    assert isinstance(arrays["hidden"], np.ndarray) and arrays["empty"].shape == (0, 4)
    want = t.float() if dtype == torch.bfloat16 else t
    assert str(arrays["hidden"].dtype) == str(want.dtype).removeprefix("torch.")
    assert np.array_equal(arrays["hidden"], want.numpy())
    # and a numpy array sent: the bytes a tensor of its dtype sends
    if dtype != torch.bfloat16:
        again = P.Step(step=3, slices=[], decode=False, tensors={"hidden": t.numpy()})
        assert P.encode(again)[1:] == P.encode(P.Step(step=3, slices=[], decode=False, tensors={"hidden": t}))[1:]


def test_the_client_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, krasis.shared.client; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_frame_size_mismatch_is_refused():
    frames = P.encode(P.Logits(step=1, t_in=0.0, t_out=0.0, tensors={"logits": torch.zeros(2, 2)}))
    with pytest.raises(P.ProtocolError, match="needs 16"):
        P.decode([frames[0], b"123"])


def test_sampler_greedy_topk_topp_and_seed():
    logits = torch.randn(1000)
    assert Sampler(P.SamplingParams())(logits) == int(logits.argmax())
    assert Sampler(P.SamplingParams(temperature=5.0, top_k=1, seed=1))(logits) == int(logits.argmax())
    assert Sampler(P.SamplingParams(temperature=5.0, top_p=1e-6, seed=1))(logits) == int(logits.argmax())
    a = [Sampler(P.SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    s = Sampler(P.SamplingParams(temperature=1.0, seed=7))
    assert [s(logits) for _ in range(3)][0] == a[0]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    s = Sampler(P.SamplingParams(temperature=2.0, top_k=3, seed=3))
    assert {s(logits) for _ in range(200)} <= top3


def test_sample_treats_each_row_of_a_batch_as_its_own_draw():
    """The last stage samples a decode batch in one call: greedy rows are argmax, top_k=1 rows too,
    and a sampled row gets the token it would alone with the same u (rows never mix)."""
    from krasis.shared.sampling import sample

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    draws = [P.Draw(), P.Draw(temperature=0.8, u=0.3), P.Draw(temperature=5.0, top_k=1, u=0.9),
             P.Draw(temperature=1.0, top_p=0.5, u=0.99), P.Draw(temperature=2.0, top_k=7, u=0.0)]
    got = sample(logits, draws)
    alone = torch.cat([sample(logits[i : i + 1], [d]) for i, d in enumerate(draws)])
    assert torch.equal(got, alone)
    assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()
    assert got[4] == logits[4].argmax()  # u = 0 takes the most likely token
    # u walks the distribution from the most likely token down
    assert sample(logits[1:2], [P.Draw(temperature=0.8, u=0.999)]) != logits[1].argmax()


def test_sampler_matches_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    s = Sampler(P.SamplingParams(temperature=1.0, seed=11))
    n = 8000
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=4).float() / n
    assert torch.allclose(counts, torch.softmax(logits, 0), atol=0.02)
    # top_p=0.7 keeps the smallest prefix with mass >= 0.7: tokens 0 and 1 (0.64 + 0.24)
    s = Sampler(P.SamplingParams(temperature=1.0, top_p=0.7, seed=11))
    draws = torch.tensor([s(logits) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    p = torch.softmax(logits, 0)[:2]
    assert abs(float((draws == 0).float().mean()) - float(p[0] / p.sum())) < 0.04


def test_pipeline_split_balances_cost_and_honours_overrides():
    cfg = tm.deepseek_config(num_hidden_layers=6, first_k_dense_replace=2).to_dict()
    fam = family_for({**cfg, "architectures": ["DeepseekV2ForCausalLM"]})
    plan = split_layers(fam, 2)
    assert plan[0][0] == 0 and plan[-1][1] == 6 and plan[0][1] == plan[1][0]
    costs = [sum(fam.layer_cost(i) for i in range(a, b)) for a, b in plan]
    # no other single cut point gives a smaller maximum
    best = min(max(sum(fam.layer_cost(i) for i in range(c)), sum(fam.layer_cost(i) for i in range(c, 6))) for c in range(1, 6))
    assert max(costs) == best
    assert split_layers(fam, 2, [5, 1]) == [(0, 5), (5, 6)]
    with pytest.raises(PlanError, match="sum to 6"):
        split_layers(fam, 2, [2, 2])
    with pytest.raises(PlanError, match="2 entries for 3"):
        split_layers(fam, 3, [3, 3])


def test_detokenizer_streams_whole_characters(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from krasis.coordinator.tokenizer import Detokenizer, TextCodec

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec(tmp_path)
    text = "naïve ✓ 日本"
    ids = codec.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    d = Detokenizer(codec)
    pieces = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_reserve_cores_keeps_gpu_workers_off_the_pool():
    from krasis.coordinator.plan import PlanError
    from krasis.coordinator.processes import reserve_cores

    for nodes, world in (([list(range(16))], 1), ([list(range(8)), list(range(8, 16))], 2), ([[0, 1]], 1), ([list(range(6))], 2)):
        pool, front = reserve_cores(nodes, world)
        flat = [c for n in pool for c in n]
        assert sorted(flat + front) == sorted(c for n in nodes for c in n)  # nothing lost, nothing shared
        assert not set(flat) & set(front) and all(pool)
        if front:
            assert len(front) == world + 1 and len(flat) >= 3 * len(front)
    assert reserve_cores([list(range(16))], 1)[1] == [14, 15]
    assert reserve_cores([[0, 1]], 1)[1] == []  # a 2-core machine: the pool keeps both
    # --reserved-cores: exactly that many, from the end of the first node, even where the default keeps none
    assert reserve_cores([list(range(16))], 1, 1) == ([list(range(15))], [15])
    assert reserve_cores([list(range(16))], 1, 0) == ([list(range(16))], [])
    assert reserve_cores([[0, 1, 2], [3, 4]], 2, 2) == ([[0], [3, 4]], [1, 2])
    with pytest.raises(PlanError, match="--reserved-cores 3"):
        reserve_cores([[0, 1, 2], [3, 4]], 1, 3)


def test_mailbox_round_trip_errors_and_dead_pool():
    """The decode hop (shared/mailbox.py): a request reaches the other mapping intact, a pool's
    error comes back as PoolError with its text, and a waiter on a pool that is gone is told so."""
    from krasis.shared.mailbox import Mailboxes, PoolError, SlotShape, create

    shape = SlotShape(max_m=4, hidden=16, top_k=2)
    fd = create(shape, 2)
    gpu, pool = Mailboxes(fd, shape, 2).slot(1), Mailboxes(fd, shape, 2).slot(1)
    x, ids, w = torch.randn(3, 16).bfloat16(), torch.tensor([[1, 2], [3, -1], [0, 5]]), torch.rand(3, 2)
    gpu.write(x, ids, w)
    n = gpu.publish(7, 3, x.dtype)
    assert pool.request() == n
    layer, px, pids, pw, out = pool.take()
    assert layer == 7 and torch.equal(px, x) and torch.equal(pids, ids.int()) and torch.equal(pw, w)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    out.copy_(px.float() * 2)
    pool.answer(n)
    assert torch.equal(gpu.wait(n, lambda: True), x.float() * 2)
    gpu.write(x, ids, w)
    n = gpu.publish(7, 3, x.dtype)
    pool.answer(n, error="RuntimeError: boom")
    with pytest.raises(PoolError, match="boom"):
        gpu.wait(n, lambda: True)
    gpu.write(x, ids, w)
    n = gpu.publish(7, 3, x.dtype)
    with pytest.raises(PoolError, match="exited"):
        gpu.wait(n, lambda: False)
    os.close(fd)


def test_store_filled_flag():
    """A GPU worker started beside the pool waits, per slot, for the pool's word that the store is
    filled, and is told when the pool died first."""
    from krasis.shared.mailbox import Mailboxes, PoolError, SlotShape, create

    shape = SlotShape(max_m=1, hidden=8, top_k=1)
    fd = create(shape, 2)
    gpu, pool = Mailboxes(fd, shape, 2), Mailboxes(fd, shape, 2)
    with pytest.raises(PoolError, match="before filling"):
        gpu.slot(0).wait_filled(lambda: False)
    pool.slot(0).mark_filled()
    gpu.slot(0).wait_filled(lambda: False)  # filled: the pool's later fate is decode's business
    with pytest.raises(PoolError):
        gpu.slot(1).wait_filled(lambda: False)  # each slot's pool says so for itself
    os.close(fd)


def test_pool_client_refuses_what_a_slot_cannot_hold():
    """PoolClient checks a request before either path (the host's, here, or the GPU's kernels) writes it."""
    from krasis.gpu_worker.pool_client import PoolClient
    from krasis.shared.mailbox import PoolError, SlotShape, create

    shape = SlotShape(max_m=4, hidden=16, top_k=2)
    fd = create(shape, 1)
    client = PoolClient({"fd": fd, "shape": shape.to_spec(), "count": 1, "slots": [0], "pool_pids": [os.getpid()]},
                        torch.device("cpu"))
    with pytest.raises(PoolError, match="max-batch"):
        client.submit(0, torch.zeros(5, 16), torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2))
    with pytest.raises(PoolError, match="dtype"):
        client.submit(0, torch.zeros(2, 16, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))
    client.close()
    os.close(fd)
