"""toy/tokenizer.py: the toy vocabulary, round trips, the chat template, saved folders, lengths."""

import json
import string

import pytest
from transformers import AutoTokenizer

from ttrl_jax.data import toy_task as task
from ttrl_jax.toy import tokenizer as toy_tokenizer


def _chat(tokenizer, question, response=None):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return prompt if response is None else prompt + response + toy_tokenizer.IM_END


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer.build_tokenizer()


def test_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == toy_tokenizer.VOCAB_SIZE == 128
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    ids = tokenizer.convert_tokens_to_ids(list(toy_tokenizer.SPECIAL_TOKENS))
    assert ids == [125, 126, 127]
    for text in ["0", "7", "\\boxed", " *", "assistant"]:
        assert len(tokenizer(text)["input_ids"]) == 1, text


def test_round_trip(tokenizer):
    ascii_text = string.digits + string.ascii_letters + string.punctuation + " \n"
    texts = [ascii_text, "x's  3 .\n\n  end "]
    for ex in task.pretrain_examples(5, 20, slip_prob=0.5):
        texts += [ex["prompt"], ex["response"], _chat(tokenizer, ex["prompt"], ex["response"])]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nPut the final answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "assistant", "Ċ"]


@pytest.mark.parametrize("with_model_config", [False, True])
def test_saved_folder_loads_with_auto_tokenizer(tmp_path, tokenizer, with_model_config):
    toy_tokenizer.save_tokenizer(tmp_path)
    if with_model_config:  # a qwen2 model folder: recent transformers pick Qwen2's class
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert len(loaded) == 128
    ex = task.pretrain_examples(2, 1, min_steps=5, max_steps=5)[0]
    assert _chat(loaded, ex["prompt"]) == _chat(tokenizer, ex["prompt"])
    full = _chat(tokenizer, ex["prompt"], ex["response"])
    assert loaded(full)["input_ids"] == tokenizer(full)["input_ids"]
    assert loaded.decode(loaded(full)["input_ids"]) == full


def test_token_lengths_within_budget(tokenizer):
    for n_steps, max_full in [(5, 150), (6, 160)]:
        for ex in task.pretrain_examples(6, 100, min_steps=n_steps, max_steps=n_steps):
            prompt = _chat(tokenizer, ex["prompt"])
            full = _chat(tokenizer, ex["prompt"], ex["response"])
            assert len(tokenizer(prompt)["input_ids"]) <= 100
            assert len(tokenizer(full)["input_ids"]) <= max_full
