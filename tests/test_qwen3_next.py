"""Qwen3-Next: the gated delta rule in both forms against transformers' pure-torch path, the
recurrent state's life in the cache, and the whole runtime against transformers in float32."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm

LONG = [(7 * i + 3) % 150 + 1 for i in range(70)]  # > 64 tokens: more than one delta-rule chunk
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], LONG]
PP1 = ("--devices", "cpu", "--cpu-workers", "1")
PP2 = ("--devices", "cpu,cpu", "--cpu-workers", "2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3next")
    return {name: tm.build(root / name, "qwen3_next", **over) for name, over in tm.QWEN3_NEXT_CONFIGS.items()}


def _delta_inputs(T, H=3, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, H, dk, generator=g), torch.randn(T, H, dk, generator=g)
    v = torch.randn(T, H, dv, generator=g)
    decay = -torch.rand(T, H, generator=g) * 2
    beta = torch.rand(T, H, generator=g)
    state = torch.randn(H, dk, dv, generator=g) * 0.3
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T", [1, 5, 70])
def test_delta_rule_forms_match_transformers(T):
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    from krasis.shared.models.qwen3_next import gated_delta_chunked, gated_delta_recurrent, l2norm

    q, k, v, decay, beta, state = _delta_inputs(T)
    want, want_state = m.torch_recurrent_gated_delta_rule(
        q[None], k[None], v[None], g=decay[None], beta=beta[None], initial_state=state[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    qn, kn = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    for form in (gated_delta_recurrent, gated_delta_chunked, lambda *a: gated_delta_chunked(*a, chunk=4)):
        out, new = form(qn, kn, v, decay, beta, state.clone())
        torch.testing.assert_close(out, want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(new, want_state[0], atol=1e-4, rtol=1e-4)
    chunk_ref, chunk_state = m.torch_chunk_gated_delta_rule(
        q[None], k[None], v[None], g=decay[None], beta=beta[None], initial_state=state[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, new = gated_delta_chunked(qn, kn, v, decay, beta, state.clone())
    torch.testing.assert_close(out, chunk_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, chunk_state[0], atol=1e-5, rtol=1e-5)


def test_recurrent_state_checked_and_freed():
    from krasis.gpu_worker.kv_cache import ContextOverflow, KVCache
    from krasis.shared.protocol import SeqSlice

    kv = KVCache(torch.device("cpu"), torch.float32, max_context=16)
    made = []

    def init():
        made.append(1)
        return [torch.zeros(3, 4)]

    (a,) = kv.state(2, SeqSlice(seq=7, start=0, n=5), init)
    a.fill_(1.0)
    (b,) = kv.state(2, SeqSlice(seq=7, start=5, n=1), init)
    assert b is a and len(made) == 1 and kv.nbytes() == 48
    with pytest.raises(ValueError, match="state holds 6"):
        kv.state(2, SeqSlice(seq=7, start=3, n=1), init)
    with pytest.raises(ContextOverflow):
        kv.state(2, SeqSlice(seq=7, start=6, n=11), init)
    kv.free(7)
    assert kv.sequences() == 0 and kv.nbytes() == 0
    (c,) = kv.state(2, SeqSlice(seq=7, start=0, n=1), init)
    assert len(made) == 2 and float(c.abs().sum()) == 0.0


def _check_service(path, topology, prompts, *extra):
    ref = tm.reference_model(path)
    with tm.Service(path, "--dtype", "float32", *topology, *extra) as svc:
        for ids in prompts:
            got = svc.client.complete(prompt_ids=ids, max_new_tokens=32, prompt_logits=True, ignore_eos=True)
            assert got.token_ids == tm.reference_greedy(ref, ids, 32)
            want = tm.reference_logits(ref, ids)
            assert float((torch.from_numpy(got.prompt_logits) - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("config,topology,extra", [
    ("qn-base", PP2, ()),
    ("qn-dense-bias-tied", PP1, ()),
    # prompt chunks of 5 tokens: conv and SSM state carried from chunk to chunk
    ("qn-sparse-step", PP2, ("--prefill-chunk", "5")),
])
def test_exact_against_transformers(models, config, topology, extra):
    _check_service(models[config], topology, PROMPTS, *extra)
