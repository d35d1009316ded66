"""Operating a service: a --config file (flags win), API keys on the HTTP API, Prometheus metrics
that count what was served, the pre-flight check, and the OpenAI additions (logprobs against
transformers' log_softmax, n choices sharing one prefill, several prompts in one request) through
the official `openai` client, streaming and not."""

from __future__ import annotations

import json
import socket
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import tiny_models as tm
from test_runtime import text_model  # noqa: F401  (a tiny model with a tokenizer and a chat template)

MODEL, KEY = "tiny-moe", "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:  # a free port; serve binds it a moment later
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# On a GPU machine the same tests run on CUDA too (the logprobs from the device's sampler, the fork of
# a CUDA cache, decode as CUDA graphs): python -m pytest -q tests/test_operating.py -k cuda
CUDA = pytest.param("cuda:0", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.fixture(scope="module", params=["cpu", CUDA])
def svc(request, text_model, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("operating")
    http, metrics = _free_port(), _free_port()
    (d / "keys").write_text(f"# the service's keys\n\nsk-other\n{KEY}\n")
    # the file sets --max-batch 2 and the command line 8: n = 3 must be accepted (flags win)
    (d / "krasis.toml").write_text(f'dtype = "float32"\nserved_model_name = "{MODEL}"\nhttp = "127.0.0.1:{http}"\n'
                                   f'max-batch = 2\nmetrics = "127.0.0.1:{metrics}"\n')
    with tm.Service(text_model, "--config", d / "krasis.toml", "--max-batch", 8, "--api-key-file", d / "keys",
                    "--devices", request.param) as service:
        service.url, service.metrics_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics"
        service.oai = openai.OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
        service.config = d / "krasis.toml"
        yield service


def cli(*args):
    """krasis-coord in this process (the commands tested here start no workers): exit code, stdout, stderr."""
    from krasis.coordinator.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def scrape(url: str) -> dict:
    """{(name, labels): value} of every sample, parsed with prometheus_client's parser."""
    with urllib.request.urlopen(url) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_config_file_and_flags(svc, text_model):  # noqa: F811
    assert [m.id for m in svc.oai.models.list().data] == [MODEL]  # served_model_name came from the file
    code, out, _ = cli("serve", text_model, "--config", svc.config, "--max-batch", 3, "--print-config")
    cfg = tomllib.loads(out)
    assert cfg["max-batch"] == 3 and cfg["dtype"] == "float32" and cfg["served-model-name"] == MODEL
    assert cfg["model"] == str(text_model) and "api-key" not in cfg
    # the systemd unit's example config is one serve takes
    deploy = Path(__file__).parents[1] / "deploy" / "krasis.toml"
    code, out, _ = cli("serve", "--config", deploy, "--print-config")
    assert code == 0 and tomllib.loads(out)["cpu-bits"] == "4"
    bad = svc.config.with_name("bad.toml")
    bad.write_text("cpu-wrokers = 2\n")
    code, _, err = cli("serve", text_model, "--config", bad)
    assert code == 2 and "cpu-wrokers" in err


def test_api_keys(svc):
    def status(path: str, key: str | None) -> tuple[int, dict | None]:
        req = urllib.request.Request(svc.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, None
        except urllib.error.HTTPError as e:
            import json

            return e.code, json.loads(e.read())

    for key in (None, "sk-wrong"):
        code, body = status("/v1/models", key)
        assert code == 401 and body["error"]["code"] == "invalid_api_key" and body["error"]["message"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert status("/v1/models", "sk-other")[0] == 200  # any key of the file
    assert status("/health", None)[0] == 200 and status("/metrics", None)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=svc.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_metrics_count_what_was_served(svc):
    before = scrape(svc.url + "/metrics")
    http = [svc.oai.completions.create(model=MODEL, prompt=p, max_tokens=k, temperature=0)
            for p, k in [("The quick", 3), ("Mixture of experts", 5)]]
    zmq = svc.client.complete(prompt="brown fox", max_new_tokens=4)
    after, other_port = scrape(svc.url + "/metrics"), scrape(svc.metrics_url)
    d = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - \
        before.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert d("krasis_requests_total", frontend="http", finish_reason="length") == 2
    assert d("krasis_requests_total", frontend="zmq", finish_reason="length") == 1
    completion = sum(r.usage.completion_tokens for r in http) + zmq.done.completion_tokens
    assert completion == 3 + 5 + 4
    assert d("krasis_generated_tokens_total") == completion
    assert d("krasis_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in http) + zmq.done.prompt_tokens
    assert d("krasis_time_to_first_token_seconds_count") == 3
    assert d("krasis_inter_token_latency_seconds_count") == completion - 3
    assert d("krasis_time_to_first_token_seconds_sum") > 0
    assert after[("krasis_queue_length", ())] == after[("krasis_running_requests", ())] == 0
    assert after[("krasis_kv_cache_usage_ratio", ())] == 0
    assert after[("krasis_worker_restarts_total", ())] == after[("krasis_replays_total", ())] == 0
    assert after[("krasis_worker_restart_seconds_total", ())] == 0
    # pure_cpu: the pool ran every routed choice of decode, one layer call per MoE layer and step
    assert after[("krasis_cpu_pool_routed_share", ())] == 1 and after[("krasis_hot_expert_hit_rate", ())] == 0
    assert d("krasis_cpu_pool_layer_seconds_count", node="0") == 3 * (completion - 3)
    assert other_port[("krasis_requests_total", (("finish_reason", "length"), ("frontend", "http")))] == \
        after[("krasis_requests_total", (("finish_reason", "length"), ("frontend", "http")))]


def _reference_logprobs(ref, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax, in float32, of transformers' logits at each generated token's position."""
    logits = tm.reference_logits(ref, prompt_ids + generated[:-1])[len(prompt_ids) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def test_status_shows_the_running_service_and_exits_by_its_health(svc):
    health, stats = svc.client.health(), svc.client.stats().stats
    code, out, _ = cli("status", "--connect", svc.endpoint)
    assert code == 0 and out.startswith(f"{svc.endpoint}: ok")
    for w in health.workers:  # a line per worker, with its process
        assert f"{w['role']} {w['rank']}  pid {w['pid']}" in out
    assert f"{stats['completed']} completed" in out and "restarts: 0" in out
    code, out, _ = cli("status", "--connect", svc.endpoint, "--json")
    got = json.loads(out)
    assert code == 0 and got["health"]["status"] == "ok" and got["health"]["workers"] == health.workers
    assert got["stats"]["workers"] == stats["workers"] and got["stats"]["restarts"] == 0
    # nothing at the endpoint: exit 2 within the timeout, for a monitor
    code, _, err = cli("status", "--connect", "ipc://@krasis-test-nobody", "--timeout", "0.3")
    assert code == 2 and "no service answered" in err


def test_logprobs_are_the_models_log_softmax(svc, text_model):  # noqa: F811
    from transformers import AutoTokenizer

    ref, tok = tm.reference_model(text_model), AutoTokenizer.from_pretrained(text_model)
    messages = [{"role": "user", "content": "Where do experts run?"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    gen = svc.client.complete(messages=messages, max_new_tokens=5, ignore_eos=True).token_ids
    want = _reference_logprobs(ref, chat_ids, gen)
    args = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                extra_body={"ignore_eos": True})
    whole = svc.oai.chat.completions.create(**args).choices[0].logprobs.content
    streamed = [c for ch in svc.oai.chat.completions.create(**args, stream=True)
                if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    for content in (whole, streamed):
        assert [c.token for c in content] == [tok.decode([t]) for t in gen]
        got = torch.tensor([c.logprob for c in content])
        torch.testing.assert_close(got, want[torch.arange(len(gen)), torch.tensor(gen)], rtol=1e-4, atol=1e-4)
        for c, row in zip(content, want):
            top = row.topk(3)
            assert [t.token for t in c.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
            torch.testing.assert_close(torch.tensor([t.logprob for t in c.top_logprobs]), top.values, rtol=1e-4, atol=1e-4)

    # completions' logprobs: N of a sampled request are still the model's, not the tempered distribution's
    prompt_ids = tok("The quick brown fox")["input_ids"]
    gen = svc.client.complete(prompt_ids=prompt_ids, max_new_tokens=4, temperature=2.0, seed=3, ignore_eos=True).token_ids
    want = _reference_logprobs(ref, prompt_ids, gen)
    lp = svc.oai.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=4, temperature=2.0, seed=3, logprobs=2,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in gen]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), want[torch.arange(len(gen)), torch.tensor(gen)],
                               rtol=1e-4, atol=1e-4)
    assert all(len(alts) == 2 and max(alts.values()) == pytest.approx(float(row.max()), abs=1e-4)
               for alts, row in zip(lp.top_logprobs, want))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(gen))]


def test_n_choices_share_one_prefill(svc):
    prompt, args = "Mixture of experts", dict(max_tokens=6, temperature=1.0, seed=11)
    # each choice is what a request of its own with seed + i gives: the forked cache is the prompt's
    alone = [svc.client.complete(prompt=prompt, max_new_tokens=6, temperature=1.0, seed=11 + i).text for i in range(3)]
    assert len(set(alone)) > 1  # the choices differ, so the comparison below can tell them apart
    before = svc.client.stats().stats["prompt_tokens"]
    reply = svc.oai.completions.create(model=MODEL, prompt=prompt, n=3, **args)
    assert [c.index for c in reply.choices] == [0, 1, 2] and [c.text for c in reply.choices] == alone
    prompt_len = reply.usage.prompt_tokens
    assert svc.client.stats().stats["prompt_tokens"] - before == prompt_len  # one prefill for the three
    assert reply.usage.completion_tokens == 18

    texts = {}
    for ch in svc.oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], n=2,
                                              stream=True, **args):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    whole = svc.oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], n=2, **args)
    assert texts == {c.index: c.message.content for c in whole.choices} and len(texts) == 2


def test_several_prompts_in_one_request(svc):
    prompts = ["The quick brown fox", "Mixture of"]
    alone = [svc.client.complete(prompt=p, max_new_tokens=5).text for p in prompts]
    reply = svc.oai.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0)
    # choice j of prompt i at index i * n + j, as OpenAI numbers them
    assert [(c.index, c.text) for c in reply.choices] == [(0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    assert reply.usage.completion_tokens == 20
    texts = {}
    for ch in svc.oai.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: alone[0], 1: alone[1]}


def test_check_table_and_exit_code(text_model):  # noqa: F811
    code, out, _ = cli("check", text_model, "--cpu-workers", 1)
    rows = {line.split("  ")[0]: line for line in out.splitlines()[1:]}
    assert {"RAM", "disk", "memlock limit", "transparent hugepages", "CPU frequency governor", "NUMA and --cpu-workers",
            "pool kernel"} <= set(rows)
    assert code == 0 and " fail " not in out
    # more pool processes than this machine has cores cannot run: a fail line with its fix, exit 1
    cores = len(__import__("os").sched_getaffinity(0))
    code, out, _ = cli("check", text_model, "--cpu-workers", cores + 1)
    assert code == 1
    line = next(l for l in out.splitlines() if l.startswith("NUMA"))
    assert " fail " in line and f"--cpu-workers at most {cores}" in line


def test_serve_refuses_what_will_not_fit_in_ram(tmp_path):
    # Qwen3-235B-A22B's shape: ~450 GB of BF16 routed experts, more than any CI machine has. Only its
    # config.json exists: the refusal comes before anything is read or loaded.
    tm.qwen3_config(num_hidden_layers=94, num_experts=128, num_experts_per_tok=8, hidden_size=4096,
                    moe_intermediate_size=1536, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                    vocab_size=151936, architectures=["Qwen3MoeForCausalLM"]).save_pretrained(tmp_path)
    code, _, err = cli("serve", tmp_path)
    assert code == 1 and "not enough RAM" in err and "--cpu-bits 4" in err
    code, out, _ = cli("check", tmp_path)
    assert code == 1 and " fail " in next(line for line in out.splitlines() if line.startswith("RAM"))


def test_check_vram_against_the_budget_and_the_plan(text_model, monkeypatch):  # noqa: F811
    from krasis.coordinator.check import check_vram
    from krasis.coordinator.processes import RuntimeOptions
    from krasis.shared.weights import load_family

    # a GPU of 80 GB with 70 GB free, as torch would report it (this machine need not have one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70e9, 80e9))
    family = load_family(text_model)

    def line(budget=None, model=text_model):
        [got] = check_vram(model, family if model else None, RuntimeOptions(devices=["cuda:0"], vram_budget=budget))
        return got

    assert line(60).status == "ok" and "persistent prefill" in line(60).found
    assert line(90).status == "fail" and "--vram-budget at most 80.0" in line(90).fix
    assert line(None).status == "warn" and "--vram-budget 66.5" in line(None).fix  # others hold 10 GB
    tiny = line(0.001)  # less than the stage's activations: the worker's own refusal, before loading
    assert tiny.status == "fail" and "short for layers 0-" in tiny.found
    assert line(0.001, model=None).status == "ok"  # without MODEL only the budget is checked
