"""Tiny random-weight models, built with transformers at test time and saved in HF layout, plus
helpers to run krasis-coord against them and to get the transformers reference."""

from __future__ import annotations

import json
import os
import re
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


QWEN3_NEXT_CONFIGS = {
    "qn-base": dict(),  # 3 linear + 1 full layer, 2 key heads serving 4 value heads, rotary on 1/4 of the head
    "qn-dense-bias-tied": dict(mlp_only_layers=[1], attention_bias=True, partial_rotary_factor=0.5,
                               full_attention_interval=2, linear_num_value_heads=2, linear_conv_kernel_dim=3,
                               norm_topk_prob=False, tie_word_embeddings=True),
    "qn-sparse-step": dict(decoder_sparse_step=2, rope_theta=500000.0,
                           layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"]),
}
GPT_OSS_CONFIGS = {
    "go-base": dict(sliding_window=5),  # sliding, full, sliding; YaRN rope
    "go-mha-nobias-default-rope": dict(attention_bias=False, num_key_value_heads=4, num_experts_per_tok=3,
                                       sliding_window=3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
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


def qwen3_next_config(**over):
    from transformers import Qwen3NextConfig

    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                shared_expert_intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=512,
                eos_token_id=None, bos_token_id=None)
    base.update(over)
    return Qwen3NextConfig(**base)


def gpt_oss_config(**over):
    from transformers import GptOssConfig

    base = dict(vocab_size=160, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                max_position_embeddings=512, eos_token_id=None, bos_token_id=None)
    base.update(over)
    return GptOssConfig(**base)


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


FAMILIES = {  # family -> (transformers class name, config builder)
    "qwen3": ("Qwen3MoeForCausalLM", qwen3_config),
    "deepseek": ("DeepseekV2ForCausalLM", deepseek_config),
    "qwen3_next": ("Qwen3NextForCausalLM", qwen3_next_config),
    "gpt_oss": ("GptOssForCausalLM", gpt_oss_config),
}


def random_model(family: str, seed: int = 0, **over):
    """A random model of `family` (a FAMILIES key) with config overrides. Weights get a larger spread
    than the init default so greedy decoding is not degenerate; norms keep their init, except that
    Qwen3-Next's (1 + w) norms get w around 0 and its gated norm weights around 1; gpt-oss's sinks
    are large enough to matter."""
    import transformers

    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config(**over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "qwen3_next" and name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.1)
            elif family == "qwen3_next" and "norm" in name:
                p.normal_(0.0, 0.1)
            elif "sinks" in name:
                p.normal_(0, 1.0)
            elif "norm" not in name and not name.endswith(("A_log", "dt_bias")):
                p.normal_(0, 0.08)
    return model.eval()


def build(path: Path, family: str, seed: int = 0, **over) -> Path:
    """Save random_model(family, seed, **over) to `path`."""
    random_model(family, seed, **over).save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route tokens to experts.",
    "Prefill runs on the GPU while decode runs the routed experts on the CPU, übergrößen ✓ café.",
    "def main():\n    print('hello world')\n",
] * 20


def text_tokenizer():
    """A byte-level BPE tokenizer trained on a small corpus (multi-byte characters included), with
    ChatML special tokens and chat template, as transformers' PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_with_tokenizer(path: Path, family: str, **over) -> Path:
    """build() with a vocabulary of text_tokenizer()'s size, and that tokenizer saved beside it."""
    fast = text_tokenizer()
    build(path, family, vocab_size=len(fast), eos_token_id=None, **over)
    fast.save_pretrained(path)
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


# What the runtime quantizes (docs/quantization.md), by checkpoint name, independently of its own
# choice: routed experts (per expert, or gpt-oss's fused [E, in, out] tensors) get the expert scheme,
# and with --attn-bits 8 every attention / linear-attention / shared-expert / dense-MLP projection and
# an untied lm_head gets INT8 per output channel. Routers, norms, convolutions and embeddings stay.
EXPERT = re.compile(r"\.mlp\.experts\.(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)$")
DENSE = re.compile(r"(\.(self_attn|linear_attn)\.\w*_proj\w*|\.mlp\.(shared_experts?\.)?(gate|up|down)_proj)\.weight$"
                   r"|^lm_head\.weight$")


def fake_quantized(state: dict[str, torch.Tensor], expert_bits: int, attn_bits: int, group: int) -> dict[str, torch.Tensor]:
    """`state` with the weights the runtime quantizes replaced by what it computes with."""
    from krasis.shared.quant import fake_quantize

    out = dict(state)
    for name, w in state.items():
        if EXPERT.search(name) and expert_bits != 16:
            # groups run along each expert's input dimension: the last one of [out, in], the middle of [E, in, out]
            out[name] = (fake_quantize(w.transpose(1, 2), expert_bits, group).transpose(1, 2).contiguous() if w.dim() == 3
                         else fake_quantize(w, expert_bits, group))
        elif DENSE.search(name) and attn_bits == 8:
            out[name] = fake_quantize(w, 8, w.shape[-1])
    return out


def fake_quant_copy(src: Path, dst: Path, expert_bits: int, attn_bits: int, group: int):
    """A copy of the model folder holding fake_quantized weights, loaded in transformers."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    hits = {"expert": 0, "dense": 0}
    for f in src.glob("*.safetensors"):
        state = load_file(f)
        hits["expert"] += sum(bool(EXPERT.search(n)) for n in state)
        hits["dense"] += sum(bool(DENSE.search(n)) for n in state)
        save_file(fake_quantized(state, expert_bits, attn_bits, group), dst / f.name, metadata={"format": "pt"})
    assert hits["expert"] > 0 and (attn_bits == 16 or hits["dense"] > 0)
    return reference_model(dst)


def greedy_two_phase(prefill_model, decode_model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens with the prompt run by one model and every decode step by another, sharing
    the cache: the runtime's prefill-on-GPU / decode-on-CPU split with different precisions."""
    with torch.no_grad():
        out = prefill_model(torch.tensor([prompt_ids]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        for _ in range(n - 1):
            out = decode_model(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


def krasis(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the krasis-coord CLI in a subprocess (the real processes, exactly as a user would)."""
    cmd = [sys.executable, "-m", "krasis.coordinator", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"krasis-coord {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


# The head of an interpreted check script that compares e4m3 bits: Triton's interpreter converts
# float32 to e4m3 without rounding to nearest even as CUDA's cvt.rn (and torch's cast, which stands
# in for it here) do. Harmless where the kernels run compiled.
E4M3_RNE = r"""
import numpy as _np
import torch as _torch
import triton.language as _tl
from triton.runtime import interpreter as _interpreter

_cast = _interpreter.InterpreterBuilder.create_fp_to_fp
def _cast_rne(self, src, dst_type, rounding_mode):
    if src.dtype.scalar == _tl.float32 and dst_type.scalar == _tl.float8e4nv:
        a = _torch.from_numpy(_np.array(src.data, dtype=_np.float32)).to(_torch.float8_e4m3fn)
        return _interpreter.TensorHandle(a.view(_torch.uint8).numpy(), _tl.float8e4nv)
    return _cast(self, src, dst_type, rounding_mode)
_interpreter.InterpreterBuilder.create_fp_to_fp = _cast_rne
"""


def run_interpreted(check: str) -> None:
    """Run a Triton check script (it prints "ok" when every comparison holds) in a fresh Python with
    TRITON_INTERPRET=1: Triton reads the variable when it is first imported, so the kernels run on
    the CPU only in a process of their own."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def generate_json(model_dir: Path, prompt_ids: list[int], n: int, *extra: str) -> dict:
    p = krasis("generate", model_dir, "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", n,
               "--dtype", "float32", "--json", *extra)
    return json.loads(p.stdout.strip().splitlines()[-1])


class Service:
    """`krasis-coord serve` in a subprocess on a private ipc endpoint, for the duration of a with-block.
    Stops it with SIGTERM on exit and checks that every process it started is gone."""

    def __init__(self, model_dir: Path, *extra: str, startup_timeout: float = 180, endpoint: str | None = None,
                 keys: Path | None = None):
        import uuid

        self.endpoint = endpoint or f"ipc://@krasis-test-{uuid.uuid4().hex[:10]}"
        self.keys = keys  # the client's keys folder, for a tcp endpoint served with --keys
        self.args = ["serve", str(model_dir), "--zmq", self.endpoint, *map(str, extra)]
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "Service":
        import time

        from krasis.shared.client import Client

        self.proc = subprocess.Popen([sys.executable, "-m", "krasis.coordinator", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.client = Client(self.endpoint, timeout_s=120, keys=self.keys)
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

                self.client = C(self.endpoint, timeout_s=120, keys=self.keys)
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("serve did not become healthy in time")
        self.client.sock.setsockopt(__import__("zmq").RCVTIMEO, 120_000)
        self.worker_pids = [w["pid"] for w in h.workers]
        return self

    def greedy(self, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor, int, dict]:
        """One request's n greedy tokens, their logprobs, the CPU pool requests it made, and the
        service's stats after it."""
        from krasis.shared import protocol as P

        before = sum(p["calls"] for p in self.client.stats().stats["cpu_pool"])
        tokens, logprobs = [], []
        for ev in self.client.stream(None, prompt_ids, None, False, max_new_tokens=n, ignore_eos=True, logprobs=0):
            if isinstance(ev, P.Tokens):
                tokens += ev.token_ids
                logprobs += [t.logprob for t in ev.logprobs]
        stats = self.client.stats().stats
        return tokens, torch.tensor(logprobs), sum(p["calls"] for p in stats["cpu_pool"]) - before, stats

    def __exit__(self, *exc):
        self.client.close()
        terminate(self.proc, "serve")
        self.stderr = self.proc.stderr.read()
        wait_gone(self.worker_pids)


def terminate(proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """SIGTERM, and fail (after a kill) if it has not exited within `timeout`."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{what} did not stop within {timeout:g} s of SIGTERM") from None


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def comm(pid: int) -> str | None:
    """A process's name (ps -o comm), None once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def wait_gone(pids: list[int], timeout: float = 15) -> None:
    import time

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"worker processes still alive: {[p for p in pids if alive(p)]}")
        time.sleep(0.1)
