"""Tiny random-weight models, built with transformers at test time and saved in HF layout, plus
helpers to run krasis-coord against them and to get the transformers reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Each config covers switches of its family; sizes are small enough for a 2-core CI machine.
QWEN3_CONFIGS = {
    "qwen3-base": dict(),
    "qwen3-norm-tied-dense": dict(norm_topk_prob=True, tie_word_embeddings=True, mlp_only_layers=[1],
                                  rope_theta=500000.0, num_hidden_layers=4),
    "qwen3-sparse-step-bias": dict(decoder_sparse_step=2, attention_bias=True, num_key_value_heads=4),
}
DEEPSEEK_CONFIGS = {
    "dsv2-lite-like": dict(),  # q_lora_rank null, greedy, one dense layer, shared expert
    "dsv2-qlora-group-yarn": dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=256, first_k_dense_replace=0, n_shared_experts=2,
    ),
    "dsv2-normtopk-yarn-mscale": dict(
        norm_topk_prob=True, first_k_dense_replace=2, num_hidden_layers=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5},
        max_position_embeddings=256,
    ),
}


def qwen3_config(**over):
    from transformers import Qwen3MoeConfig

    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                max_position_embeddings=512, eos_token_id=None, bos_token_id=None)
    base.update(over)
    return Qwen3MoeConfig(**base)


def deepseek_config(**over):
    from transformers import DeepseekV2Config

    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=512,
                eos_token_id=None, bos_token_id=None)
    base.update(over)
    return DeepseekV2Config(**base)


def patch_deepseek_norm_topk(model) -> None:
    """transformers 5 ignores DeepSeek-V2's norm_topk_prob; DeepSeek's own code normalises the
    top-k weights instead of scaling them. Make the reference do what the checkpoint means."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    if not model.config.norm_topk_prob:
        return
    for mod in model.modules():
        if isinstance(mod, m.DeepseekV2TopkRouter):
            orig = mod.forward

            def forward(hidden_states, _orig=orig, _mod=mod):
                logits, w, idx = _orig(hidden_states)
                w = w / _mod.routed_scaling_factor
                return logits, w / (w.sum(dim=-1, keepdim=True) + 1e-20), idx

            mod.forward = forward


def build(path: Path, family: str, seed: int = 0, **over) -> Path:
    """Save a random model of `family` ("qwen3" or "deepseek") with config overrides to `path`.
    Weights get a larger spread than the init default so greedy decoding is not degenerate."""
    from transformers import DeepseekV2ForCausalLM, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3MoeForCausalLM(qwen3_config(**over))
    else:
        model = DeepseekV2ForCausalLM(deepseek_config(**over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path


def reference_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if model.config.model_type == "deepseek_v2":
        patch_deepseek_norm_topk(model)
    return model.eval()


def reference_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def reference_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].float()


def krasis(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the krasis-coord CLI in a subprocess (the real processes, exactly as a user would)."""
    cmd = [sys.executable, "-m", "krasis.coordinator", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"krasis-coord {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def generate_json(model_dir: Path, prompt_ids: list[int], n: int, *extra: str) -> dict:
    p = krasis("generate", model_dir, "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", n,
               "--dtype", "float32", "--json", *extra)
    return json.loads(p.stdout.strip().splitlines()[-1])


class Service:
    """`krasis-coord serve` in a subprocess on a private ipc endpoint, for the duration of a with-block.
    Stops it with SIGTERM on exit and checks that every process it started is gone."""

    def __init__(self, model_dir: Path, *extra: str, startup_timeout: float = 180):
        import uuid

        self.endpoint = f"ipc://@krasis-test-{uuid.uuid4().hex[:10]}"
        self.args = ["serve", str(model_dir), "--zmq", self.endpoint, *map(str, extra)]
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "Service":
        import time

        from krasis.shared.client import Client

        self.proc = subprocess.Popen([sys.executable, "-m", "krasis.coordinator", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.client = Client(self.endpoint, timeout_s=120)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited during start-up:\n{self.proc.stderr.read()[-3000:]}")
            self.client.sock.setsockopt(__import__("zmq").RCVTIMEO, 1000)
            try:
                h = self.client.health()
                if h.status == "ok":
                    break
            except TimeoutError:
                # DEALER queues the unanswered request; start over with a fresh socket
                self.client.close()
                from krasis.shared.client import Client as C

                self.client = C(self.endpoint, timeout_s=120)
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("serve did not become healthy in time")
        self.client.sock.setsockopt(__import__("zmq").RCVTIMEO, 120_000)
        self.worker_pids = [w["pid"] for w in h.workers]
        return self

    def __exit__(self, *exc):
        import signal

        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("serve did not stop within 30 s of SIGTERM")
        self.stderr = self.proc.stderr.read()
        wait_gone(self.worker_pids)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: list[int], timeout: float = 15) -> None:
    import time

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"worker processes still alive: {[p for p in pids if alive(p)]}")
        time.sleep(0.1)
