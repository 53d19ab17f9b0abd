"""data/prompts.py: chat-templated prompts, length limits, bucket padding, prompt templates."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ttrl_jax.data import prompts

DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


# Qwen-style: a default system turn when none is given; Qwen3's empty think block when
# enable_thinking is false.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def byte_tokenizer(chat_template=CHAT_TEMPLATE):
    """One token per UTF-8 byte plus three special tokens: lengths are easy to predict."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_build_prompts_uses_the_chat_template(tokenizer):
    items = [{"id": "q", "prompt": "What is 1+1?", "answer": "2", "source": "t"}]
    ids, kept, n_skipped = prompts.build_prompts(items, tokenizer, None, 1000, skip_long=False)
    text = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert kept == items and n_skipped == 0
    assert ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(ids[0]) == text


def test_build_prompts_with_a_system_prompt_and_thinking_off(tokenizer):
    items = [{"id": "q", "prompt": "Q?", "answer": None, "source": "t"}]
    ids, _, _ = prompts.build_prompts(
        items, tokenizer, "Be brief.", 1000, skip_long=False, enable_thinking=False
    )
    assert tokenizer.decode(ids[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_too_long_prompt_is_an_error_naming_item_length_and_fix(tokenizer):
    items = [{"id": "long-one", "prompt": "x" * 200, "answer": None, "source": "t"}]
    (ids,), _, _ = prompts.build_prompts(items, tokenizer, "", 10_000, skip_long=False)
    n = len(ids)
    with pytest.raises(ValueError) as err:
        prompts.build_prompts(items, tokenizer, "", n - 1, skip_long=False)
    msg = str(err.value)
    assert "'long-one'" in msg and f"{n} tokens" in msg and f"max_prompt_tokens={n - 1}" in msg
    assert "data.skip_long_prompts=true" in msg
    prompts.build_prompts(items, tokenizer, "", n, skip_long=False)  # exactly the budget is fine


def test_skip_long_counts_and_keeps_order(tokenizer):
    items = [
        {"id": str(i), "prompt": "y" * length, "answer": None, "source": "t"}
        for i, length in enumerate([5, 300, 10, 400, 1])
    ]
    ids, kept, n_skipped = prompts.build_prompts(items, tokenizer, None, 200, skip_long=True)
    assert n_skipped == 2
    assert [it["id"] for it in kept] == ["0", "2", "4"]
    assert len(ids) == 3 and all(len(x) <= 200 for x in ids)


def test_tokenizer_without_chat_template():
    with pytest.raises(ValueError, match="has no chat template"):
        prompts.build_prompts(
            [{"id": "q", "prompt": "Q", "answer": None, "source": "t"}],
            byte_tokenizer(chat_template=None),
            None,
            100,
            skip_long=False,
        )


def test_bucket_and_pad_left_pads_to_the_smallest_bucket():
    tokens_PT, mask_PT = prompts.bucket_and_pad([[5, 6, 7], [8], [1, 2, 3, 4, 5]], [4, 8, 16], 0)
    assert tokens_PT.dtype == np.int32 and mask_PT.dtype == np.bool_
    np.testing.assert_array_equal(
        tokens_PT,
        [[0, 0, 0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 8], [0, 0, 0, 1, 2, 3, 4, 5]],
    )
    np.testing.assert_array_equal(mask_PT, tokens_PT != 0)


def test_bucket_and_pad_exact_fit_and_pad_id():
    tokens_PT, mask_PT = prompts.bucket_and_pad([[3, 3, 3, 3], [4, 4]], [8, 4], pad_id=9)
    np.testing.assert_array_equal(tokens_PT, [[3, 3, 3, 3], [9, 9, 4, 4]])
    np.testing.assert_array_equal(mask_PT, [[1, 1, 1, 1], [0, 0, 1, 1]])


def test_bucket_and_pad_too_long():
    with pytest.raises(ValueError, match=r"has 9 tokens but the largest prompt bucket is 8"):
        prompts.bucket_and_pad([[1] * 9], [4, 8], 0)


def test_bucket_and_pad_rejects_empty():
    with pytest.raises(ValueError, match="at least one prompt"):
        prompts.bucket_and_pad([], [4], 0)
    with pytest.raises(ValueError, match="prompt 1 of the batch is empty"):
        prompts.bucket_and_pad([[1], []], [4], 0)


def test_prompt_template_wraps_the_question(tokenizer):
    suffix = "Let's think step by step and output the final answer within \\boxed{}."
    template = "{question}\n" + suffix
    text = prompts.chat_prompt_text("What is 2 + 3?", tokenizer, None, None, template)
    assert "What is 2 + 3?\n" + suffix in text
    items = [{"id": "a", "prompt": "What is 2 + 3?"}]
    ids, _, _ = prompts.build_prompts(items, tokenizer, None, 512, False, template="Q: {question}")
    assert "Q: What is 2 + 3?" in tokenizer.decode(ids[0])
