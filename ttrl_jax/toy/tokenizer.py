"""A 128-token byte-level BPE tokenizer for the toy task, built like Qwen2's.

Same pipeline as Qwen2 (NFC, Qwen2's pre-tokenizer split, byte-level BPE), same special
tokens and a Qwen2-style chat template, so the toy model goes through the same prompt,
stop-token and padding code as Qwen2.5-Math. The same pipeline matters for more than looks:
recent transformers load any folder whose config.json says `model_type: qwen2` with its
Qwen2 tokenizer class, which rebuilds that pipeline from the vocabulary and merges.

Vocabulary: the 95 printable ASCII characters and newline (so digits are single tokens, as
in Qwen2; other characters are dropped on encoding), hand-picked merges that make the
template's role names, `\\boxed`, the task's operators and ` apply` single tokens, and the
three special tokens.
"""

from __future__ import annotations

import json
import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # also the eos token: generation stops at the end of the assistant turn
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
VOCAB_SIZE = 128
DEFAULT_SYSTEM_PROMPT = "Put the final answer in \\boxed{}."

# Qwen2's pre-tokenizer split: letters with one optional leading non-letter, single digits,
# punctuation runs with an optional leading space, then whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
# Each word becomes one token through a chain of prefix merges; together they fill the
# vocabulary to exactly VOCAB_SIZE.
_MERGED_WORDS = ("system", "user", "assistant", "\\boxed", " +", " -", " *", " apply")

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "{%- set system = messages[0]['content'] %}\n"
    "{%- set turns = messages[1:] %}\n"
    "{%- else %}\n"
    "{%- set system = " + json.dumps(DEFAULT_SYSTEM_PROMPT) + " %}\n"
    "{%- set turns = messages %}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}\n"
    "{%- for message in turns %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_TO_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_level(text: str) -> str:
    """`text` in the byte-level alphabet (space -> 'Ġ', newline -> 'Ċ') that the vocab uses."""
    return "".join(piece for piece, _ in _TO_BYTE_LEVEL.pre_tokenize_str(text))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Alphabet plus one prefix-merge chain per word in _MERGED_WORDS."""
    tokens = [_byte_level(c) for c in _CHARS]
    merges = []
    for word in _MERGED_WORDS:
        prefix, *rest = _byte_level(word)
        for piece in rest:
            if prefix + piece not in tokens:
                merges.append((prefix, piece))
                tokens.append(prefix + piece)
            prefix += piece
    if len(tokens) + len(SPECIAL_TOKENS) != VOCAB_SIZE:
        raise AssertionError(
            f"Toy vocabulary has {len(tokens) + len(SPECIAL_TOKENS)} tokens, not {VOCAB_SIZE}; "
            "adjust _MERGED_WORDS."
        )
    return {token: i for i, token in enumerate(tokens)}, merges


def _build_backend() -> Tokenizer:
    """The `tokenizers` object; special tokens take the last ids, as in Qwen2."""
    vocab, merges = _vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            _TO_BYTE_LEVEL,
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer as a transformers tokenizer.

    Returns:
      A PreTrainedTokenizerFast with VOCAB_SIZE tokens, eos `<|im_end|>`, pad
      `<|endoftext|>`, no bos, and a Qwen2-style chat template whose default system prompt
      asks for the answer in `\\boxed{}`.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would turn "3 ." into "3." on decode
        model_max_length=1024,
    )


def save_tokenizer(path: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template inside) into `path`.

    Args:
      path: a directory, created if missing; `AutoTokenizer.from_pretrained(path)` loads it,
        also next to a qwen2 `config.json`.
    """
    # The template goes inside tokenizer_config.json, which every transformers version reads
    # (newer ones would otherwise write a separate chat_template.jinja).
    build_tokenizer().save_pretrained(path, save_jinja_files=False)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "Qwen2Tokenizer"  # what a qwen2 folder gets loaded with anyway
    config["chat_template"] = CHAT_TEMPLATE
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
