"""Write a tiny random Qwen3-MoE model with a trained byte-level BPE tokenizer and a chat template
to the folder given on the command line (the demo's stand-in until real weights are given)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import tiny_models  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

out = Path(sys.argv[1])
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
corpus = [Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()] * 5
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tiny_models.build(out, "qwen3", vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("<|im_end|>"))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
fast.chat_template = TEMPLATE
fast.save_pretrained(out)
print(f"demo model written to {out}", file=sys.stderr)
