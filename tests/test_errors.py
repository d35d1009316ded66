"""Bad input gets a one-line error naming the problem; the service keeps serving everyone else."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from krasis.shared import protocol as P


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tm.build(tmp_path_factory.mktemp("m") / "qwen3", "qwen3")


def copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def cli_error(*args) -> str:
    p = tm.krasis(*args, check=False, timeout=120)
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:") or l.startswith("Error:")]
    assert lines, p.stderr
    return lines[-1]


def test_missing_folder(tmp_path):
    assert "does not exist" in cli_error("generate", tmp_path / "nope", "--prompt-ids", "1")
    # serve checks it after --print-config (a config file may name a model not there yet), before its workers
    assert "does not exist" in cli_error("serve", tmp_path / "nope", "--zmq", f"ipc://{tmp_path}/s")
    p = tm.krasis("serve", tmp_path / "nope", "--print-config", check=False)
    assert p.returncode == 0 and f'model = "{tmp_path / "nope"}"' in p.stdout


def test_folder_without_config(tmp_path):
    assert "config.json is missing" in cli_error("generate", tmp_path, "--prompt-ids", "1")


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json is unreadable" in cli_error("generate", tmp_path, "--prompt-ids", "1")


def test_unsupported_architecture(model, tmp_path):
    m = copy_model(model, tmp_path / "llama")
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    err = cli_error("generate", m, "--prompt-ids", "1")
    assert "unsupported architecture" in err and "LlamaForCausalLM" in err and "Qwen3MoeForCausalLM" in err


def test_missing_tensor_is_named(model, tmp_path):
    m = copy_model(model, tmp_path / "missing")
    t = load_file(m / "model.safetensors")
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, m / "model.safetensors")
    err = cli_error("generate", m, "--prompt-ids", "1")
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in err and "missing" in err


def test_wrong_shape_is_named(model, tmp_path):
    m = copy_model(model, tmp_path / "shape")
    t = load_file(m / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(t, m / "model.safetensors")
    err = cli_error("generate", m, "--prompt-ids", "1")
    assert "model.layers.0.self_attn.k_proj.weight" in err and "[16, 64]" in err and "[32, 64]" in err


def test_cli_option_errors(model):
    assert "temperature" in cli_error("generate", model, "--prompt-ids", "1", "--temperature", "-1")
    assert "--top-p" in cli_error("generate", model, "--prompt-ids", "1", "--top-p", "0")
    assert "--top-k" in cli_error("generate", model, "--prompt-ids", "1", "--top-k", "-1")
    assert "exactly one of" in cli_error("generate", model, "--prompt-ids", "1", "--prompt", "x")
    assert "--pp-layers" in cli_error("generate", model, "--prompt-ids", "1", "--devices", "cpu,cpu", "--pp-layers", "1,1")
    assert "CUDA is not available" in cli_error("generate", model, "--prompt-ids", "1", "--devices", "cuda:0") or torch.cuda.is_available()
    assert "--messages is not valid JSON" in cli_error("generate", model, "--messages", "[{")
    assert "integers" in cli_error("generate", model, "--prompt-ids", "1,x")


def test_prompt_longer_than_max_context_cli(model):
    err = cli_error("generate", model, "--prompt-ids", ",".join(["5"] * 40), "--max-context", "32")
    assert "prompt has 40 tokens" in err and "--max-context is 32" in err


def raw(svc, frames: list[bytes]) -> P.Message:
    svc.client.sock.send_multipart(frames)
    return svc.client.recv()


def test_malformed_client_messages_get_errors_and_service_keeps_serving(model):
    with tm.Service(model, "--dtype", "float32", "--max-context", "64") as svc:
        baseline = svc.client.complete(prompt_ids=[4, 5, 6], max_new_tokens=6).token_ids
        V = P.PROTOCOL_VERSION
        cases = [
            ([b"\xc1\xff garbage"], "not valid msgpack"),
            ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
            ([msgpack.packb({"v": 99, "type": "health"})], "protocol version 99"),
            ([msgpack.packb({"type": "health"})], "protocol version None"),
            ([msgpack.packb({"v": V, "type": "launch_missiles"})], "unknown message type 'launch_missiles'"),
            ([msgpack.packb({"v": V, "type": "generate", "prompt_ids": [1]})], "missing field 'id'"),
            ([msgpack.packb({"v": V, "type": "generate", "id": 7, "prompt_ids": [1]})], "generate.id"),
            ([msgpack.packb({"v": V, "type": "generate", "id": "a", "prompt_ids": ["x"]})], "generate.prompt_ids[0]"),
            ([msgpack.packb({"v": V, "type": "generate", "id": "a", "prompt_ids": [1],
                             "sampling": {"max_new_tokens": "ten"}})], "generate.sampling.max_new_tokens"),
            ([msgpack.packb({"v": V, "type": "generate", "id": "a", "prompt_ids": [1], "colour": 1})], "unknown field"),
            ([msgpack.packb({"v": V, "type": "health"}), b"extra"], "tensor frame"),
            ([msgpack.packb({"v": V, "type": "step", "step": 1, "slices": [], "decode": True})], "not a client request"),
        ]
        for frames, expect in cases:
            reply = raw(svc, frames)
            assert isinstance(reply, P.Error), (frames, reply)
            assert expect in reply.message, (expect, reply.message)
            assert "\n" not in reply.message
        semantic = [
            (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
            (dict(prompt_ids=[1], temperature=-0.5), "temperature must be >= 0"),
            (dict(prompt_ids=[1], top_p=1.5), "top_p must be in (0, 1]"),
            (dict(prompt_ids=[1], top_k=-1), "top_k must be >= 0"),
            (dict(prompt_ids=[]), "prompt_ids is empty"),
            (dict(prompt_ids=[1, 10_000]), "token id 10000 is outside the vocabulary"),
            (dict(prompt_ids=[3] * 80), "prompt has 80 tokens; --max-context is 64"),
            (dict(prompt="hi"), "no tokenizer.json"),
            (dict(messages=[{"role": "user"}]), "messages[0]"),
        ]
        for kwargs, expect in semantic:
            reply = list(svc.client.stream(**kwargs))[-1]
            assert isinstance(reply, P.Error) and expect in reply.message, (kwargs, reply)
        cancel = raw(svc, P.encode(P.Cancel(id="nobody")))
        assert isinstance(cancel, P.Error) and "no running request" in cancel.message
        assert svc.client.health().status == "ok"
        assert svc.client.complete(prompt_ids=[4, 5, 6], max_new_tokens=6).token_ids == baseline
