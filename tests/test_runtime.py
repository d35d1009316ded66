"""The runtime end to end: real coordinator, GPU-worker and CPU-pool processes against Hugging Face
transformers running the same weights in float32."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

import tiny_models as tm
from krasis.shared.client import AsyncClient

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 8, 45, 90, 45, 23, 53, 60, 28, 74]]
TOPOLOGIES = {
    "pp1-pool1": ("--devices", "cpu", "--cpu-workers", "1"),
    "pp2-pool2": ("--devices", "cpu,cpu", "--cpu-workers", "2"),
}
CONFIGS = [("qwen3", k, v) for k, v in tm.QWEN3_CONFIGS.items()] + [("deepseek", k, v) for k, v in tm.DEEPSEEK_CONFIGS.items()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: tm.build(root / name, fam, **over) for fam, name, over in CONFIGS}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("config", [c[1] for c in CONFIGS])
def test_exact_against_transformers(models, config, topology):
    path = models[config]
    ref = tm.reference_model(path)
    with tm.Service(path, "--dtype", "float32", *TOPOLOGIES[topology]) as svc:
        for ids in PROMPTS:
            want = tm.reference_greedy(ref, ids, 32)
            got = svc.client.complete(prompt_ids=ids, max_new_tokens=32, prompt_logits=True, ignore_eos=True)
            assert got.token_ids == want
            assert got.done.finish_reason == "length" and got.done.completion_tokens == 32
            ref_logits = tm.reference_logits(ref, ids)
            logits = torch.from_numpy(got.prompt_logits)  # the client decodes into numpy
            assert logits.shape == ref_logits.shape
            assert rel_err(logits, ref_logits) < 1e-4


def test_sampling_on_the_last_stage_follows_the_seed(models):
    """Sampled requests draw each token on the last stage (shared/sampling.py) with u from the
    request's seeded generator on the coordinator: the tokens are those a Sampler with the same seed
    picks, token by token, from transformers' logits of the same sequence."""
    from krasis.shared import protocol as P
    from krasis.shared.sampling import Sampler

    path = models["qwen3-base"]
    ref = tm.reference_model(path)
    params = dict(temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    with tm.Service(path, "--dtype", "float32", "--devices", "cpu,cpu") as svc:
        got = svc.client.complete(prompt_ids=PROMPTS[1], max_new_tokens=16, ignore_eos=True, **params).token_ids
    sampler, want = Sampler(P.SamplingParams(**params)), []
    for _ in range(16):
        want.append(sampler(tm.reference_logits(ref, PROMPTS[1] + want)[-1]))
    assert got == want and len(set(want)) > 4  # a draw, not greedy


def test_uneven_pp_split_and_generate_cli(models):
    """--pp-layers overrides the balanced split; `generate --json` reports ids, text and timings."""
    path = models["qwen3-norm-tied-dense"]  # 4 layers
    want = tm.reference_greedy(tm.reference_model(path), PROMPTS[0], 32)
    out = tm.generate_json(path, PROMPTS[0], 32, "--devices", "cpu,cpu", "--pp-layers", "3,1")
    assert out["token_ids"] == want
    for key in ("text", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert key in out
    assert out["ttft_s"] > 0 and out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


# --- text in and out ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return tm.build_with_tokenizer(tmp_path_factory.mktemp("textmodel"), "qwen3")


def test_text_prompt_and_chat_template(text_model):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(text_model)
    ref = tm.reference_model(text_model)
    prompt = "The quick brown fox ✓"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do experts run?"}]
    prompt_ids = hf_tok(prompt)["input_ids"]
    chat_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with tm.Service(text_model, "--dtype", "float32") as svc:
        plain = svc.client.complete(prompt=prompt, max_new_tokens=24, ignore_eos=True)
        chat = svc.client.complete(messages=messages, max_new_tokens=24, ignore_eos=True)
    assert plain.done.prompt_tokens == len(prompt_ids)
    assert plain.token_ids == tm.reference_greedy(ref, prompt_ids, 24)
    assert plain.text == hf_tok.decode(plain.token_ids, skip_special_tokens=True)
    assert chat.done.prompt_tokens == len(chat_ids)
    assert chat.token_ids == tm.reference_greedy(ref, chat_ids, 24)
    assert chat.text == hf_tok.decode(chat.token_ids, skip_special_tokens=True)


def test_stop_strings_stop_ids_and_eos(text_model, tmp_path):
    with tm.Service(text_model, "--dtype", "float32") as svc:
        full = svc.client.complete(prompt="Mixture of", max_new_tokens=32, ignore_eos=True)
        text = full.text
        # a stop string from the middle of what greedy decoding produces alone
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), "greedy text too short for the test"
        cut = svc.client.complete(prompt="Mixture of", max_new_tokens=32, stop=[stop])
        assert cut.done.finish_reason == "stop"
        assert cut.text == text[: text.find(stop)]
        stop_id = full.token_ids[5]
        first = full.token_ids.index(stop_id)
        by_id = svc.client.complete(prompt="Mixture of", max_new_tokens=32, stop_token_ids=[stop_id])
        assert by_id.done.finish_reason == "stop" and by_id.token_ids == full.token_ids[: first + 1]
    # EOS from the model's config ends generation at its first occurrence
    eos_model = tmp_path / "eos"
    eos_model.mkdir()
    for f in text_model.iterdir():
        (eos_model / f.name).symlink_to(f)
    cfg = json.loads((text_model / "config.json").read_text())
    cfg["eos_token_id"] = full.token_ids[3]
    (eos_model / "config.json").unlink()
    (eos_model / "config.json").write_text(json.dumps(cfg))
    with tm.Service(eos_model, "--dtype", "float32") as svc:
        got = svc.client.complete(prompt="Mixture of", max_new_tokens=32)
    first = full.token_ids.index(full.token_ids[3])
    assert got.done.finish_reason == "eos" and got.token_ids == full.token_ids[: first + 1]


# --- many clients at once ----------------------------------------------------------------------


def test_concurrent_requests_match_solo_runs(models):
    path = models["dsv2-qlora-group-yarn"]
    requests = []
    for i in range(10):
        ids = [(7 * i + 3 * j) % 150 + 1 for j in range(4 + i)]
        sampling = dict(max_new_tokens=12 + i, ignore_eos=True)
        if i % 3 == 1:
            sampling.update(temperature=0.9, top_k=20, top_p=0.9, seed=100 + i)
        requests.append((ids, sampling))
    with tm.Service(path, "--dtype", "float32", "--devices", "cpu,cpu", "--cpu-workers", "2") as svc:
        solo = [svc.client.complete(prompt_ids=ids, **s).token_ids for ids, s in requests]

        async def together():
            async with AsyncClient(svc.endpoint) as c:
                return await asyncio.gather(*(c.complete(prompt_ids=ids, **s) for ids, s in requests))

        both = asyncio.run(together())
        stats = svc.client.stats().stats
    assert [r.token_ids for r in both] == solo
    assert stats["completed"] >= 2 * len(requests) and stats["errors"] == 0


def test_cancel_frees_the_request_and_service_keeps_serving(models):
    from krasis.shared import protocol as P

    path = models["qwen3-base"]
    with tm.Service(path, "--dtype", "float32", "--max-context", "512") as svc:
        c = svc.client
        stream = c.stream(prompt_ids=[1, 2, 3], max_new_tokens=400, ignore_eos=True)
        first = next(stream)
        assert isinstance(first, P.Tokens)
        c.send(P.Cancel(id=first.id))
        events = list(stream)
        assert isinstance(events[-1], P.Done) and events[-1].finish_reason == "cancelled"
        assert events[-1].completion_tokens < 400
        after = c.complete(prompt_ids=[1, 2, 3], max_new_tokens=5)
        assert after.done.completion_tokens == 5
        assert c.stats().stats["running"] == 0


def test_profiling_writes_tables_and_host_phases(models, tmp_path, monkeypatch):
    """KRASIS_PROFILE (gpu_worker/profiling.py): the profiled window's operator table, and the host's
    time by phase for the decode steps after it, written when the worker shuts down."""
    monkeypatch.setenv("KRASIS_PROFILE", str(tmp_path / "prof"))
    monkeypatch.setenv("KRASIS_PROFILE_STEPS", "1,2-3")
    out = tm.generate_json(models["qwen3-base"], PROMPTS[0], 8, "--devices", "cpu", "--cpu-workers", "1")
    assert len(out["token_ids"]) == 8
    assert "decode steps 2..3" in (tmp_path / "prof" / "stage0-decode.txt").read_text()
    text = (tmp_path / "prof" / "stage0-phases.txt").read_text()
    # 7 decode steps follow the prompt's: 0 (warm-up) and 1 are not timed, 2-3 are profiled, 4-6 timed
    assert "(3 steps)" in text
    rows = {name.strip(): float(us) for name, us in (line.rsplit(None, 1) for line in text.splitlines()[1:])}
    assert list(rows) == ["idle", "decode msg", "prep", "enqueue", "sample", "gpu wait", "reply"]
    assert all(us >= 0 for us in rows.values()) and rows["enqueue"] > 0
