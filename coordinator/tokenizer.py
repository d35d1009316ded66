"""Text in and out: the model's tokenizer.json, its chat template rendered the way transformers
renders it (sandboxed Jinja2, trim_blocks/lstrip_blocks, tojson, raise_exception), and incremental
detokenisation that never emits half of a multi-byte character."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    pass


class TextCodec:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        if d.is_file() and d.suffix == ".gguf":  # everything from the GGUF metadata
            from ..shared.gguf_source import gguf_tokenizer

            self.tokenizer, self.special, self.chat_template = gguf_tokenizer(d)
            self._compiled = None
            return
        path = d / "tokenizer.json"
        self.tokenizer: Tokenizer | None = None
        if path.exists():
            try:
                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:
                raise TokenizerError(f"{path} is not a readable tokenizer: {e}") from None
        cfg = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{cfg_path} is unreadable: {e}") from None
        self.special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template = template
        self._compiled = None

    # --- encoding ---
    def _need(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer.json: send prompt_ids instead of text")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need().encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (tokenizer_config.json chat_template)")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
                x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template does not compile: {e}") from None
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # transformers tokenizes a rendered template without adding special tokens again.
        return self._need().encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""


def _raise(msg):
    raise jinja2.TemplateError(msg)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Detokenizer:
    """Streams text for a growing list of ids. Decoding a window that starts a few tokens back
    keeps byte-level merges right; text ending in U+FFFD is an incomplete character: held back."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids whose text has been emitted

    def add(self, ids: list[int]) -> str:
        if self.codec.tokenizer is None:
            self.ids += ids
            return ""
        self.ids += ids
        before = self.codec.decode(self.ids[self.prefix : self.read])
        after = self.codec.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        if self.codec.tokenizer is None or self.read == len(self.ids):
            return ""
        before = self.codec.decode(self.ids[self.prefix : self.read])
        after = self.codec.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
