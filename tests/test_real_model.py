"""SmolLM2-135M-Instruct (a real pretrained model, from its 4-bit GGUF) against transformers:
the GGUF conversion (tensors, config, tokenizer, chat template), float32 logits of the full
forward and of prefill + cached decode, and greedy generation token for token."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from ttrl_jax.data import prompts
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model
from ttrl_jax.run import from_config
from ttrl_jax.sampling import sampler, token_draw

pytestmark = pytest.mark.slow

_forward = jax.jit(model.forward, static_argnums=0)

QUESTIONS = (
    "What is 7 + 8?",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Name the capital of France in one word.",
)
TEXTS = (
    *QUESTIONS,
    "Answer with a number only. 12 + 345 = 357, and 1,234.56 is not 1234!",
    "  two leading spaces\n\nnew lines\ttabs",
    "héllo wörld — naïve café 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "The final answer is \\boxed{42}.",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's thread pool spins against itself and other jobs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    """transformers' own GGUF loader and LlamaForCausalLM, float32, eager attention."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32,
        attn_implementation="eager",
    )  # fmt: skip
    return hf_model.eval()


@pytest.fixture(scope="module")
def ours(smollm2_folder):
    cfg, params = weights.load_hf(smollm2_folder)
    return cfg, params, weights.load_tokenizer(smollm2_folder)


def _chat_ids(tokenizer, questions):
    """The pipeline's prompt ids: each question as the user turn of the model's chat template."""
    items = [{"prompt": q, "answer": ""} for q in questions]
    return prompts.build_prompts(items, tokenizer, None, 256, skip_long=False)[0]


def _left_pad(ids, pad_id):
    return prompts.bucket_and_pad(ids, (max(len(x) for x in ids),), pad_id)


def _relative_diff(ours_BTV, ref_BTV, mask_BT):
    return np.abs(ours_BTV - ref_BTV)[mask_BT].max() / np.abs(ref_BTV[mask_BT]).max()


# ----------------------------------------------------------------------------- conversion


def test_converted_tensors_equal_transformers_gguf_loading(smollm2_folder, hf_gguf_model):
    ours_named = load_file(smollm2_folder / "model.safetensors")
    theirs = {k: v.numpy() for k, v in hf_gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours_named) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours_named[name], value, err_msg=name)
    hf = json.loads((smollm2_folder / "config.json").read_text())
    ref = hf_gguf_model.config
    for key in (
        "vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        assert hf[key] == getattr(ref, key), key
    assert hf["rope_theta"] == ref.rope_parameters["rope_theta"] == 1e5
    assert hf["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    generation = json.loads((smollm2_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_tokenizer_and_chat_template_equal_transformers_gguf_loading(smollm2_gguf, ours):
    cfg, _, tokenizer = ours
    ref = transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    )
    assert len(tokenizer) == len(ref) == cfg.vocab_size
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(ids) == text
    # Every digit is its own token, as in the original tokenizer.json (llama.cpp 'smollm').
    assert tokenizer.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == prompts.chat_prompt_text(QUESTIONS[0], tokenizer, None)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert from_config.stop_ids(cfg, (), tokenizer) == (2,)


# ----------------------------------------------------------------------------- logits


def test_forward_logits_match_transformers(ours, hf_gguf_model, hf_logits):
    cfg, params, tokenizer = ours
    tokens_BT, mask_BT = _left_pad(_chat_ids(tokenizer, QUESTIONS), tokenizer.pad_token_id)
    ref_BTV = hf_logits(hf_gguf_model, tokens_BT, mask_BT)
    ours_BTV, _ = _forward(cfg, params, tokens_BT, model.left_pad_positions(mask_BT), mask_BT)
    assert _relative_diff(np.asarray(ours_BTV), ref_BTV, mask_BT) <= 1e-4


def test_prefill_then_cached_decode_matches_transformers(ours, hf_gguf_model, hf_logits):
    cfg, params, tokenizer = ours
    ids = _chat_ids(tokenizer, QUESTIONS[:2])
    tokens_BT, mask_BT = _left_pad(ids, tokenizer.pad_token_id)
    T, prefill = tokens_BT.shape[1], tokens_BT.shape[1] - 6
    ref_BTV = hf_logits(hf_gguf_model, tokens_BT, mask_BT)
    positions_BT = np.asarray(model.left_pad_positions(mask_BT))
    cache = model.init_cache(cfg, batch=len(ids), max_len=T)
    logits = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]:
        cols = slice(start, stop)
        out_BTV, cache = _forward(
            cfg, params, tokens_BT[:, cols], positions_BT[:, cols], mask_BT[:, cols], cache
        )
        logits.append(np.asarray(out_BTV))
    assert _relative_diff(np.concatenate(logits, axis=1), ref_BTV, mask_BT) <= 1e-4


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_matches_transformers_generate(ours, hf_gguf_model):
    cfg, params, tokenizer = ours
    R = 64
    ids = _chat_ids(tokenizer, QUESTIONS)
    tokens_PT, mask_PT = _left_pad(ids, tokenizer.pad_token_id)
    stop_ids = from_config.stop_ids(cfg, (), tokenizer)
    out = sampler.sample(
        params, cfg, tokens_PT, mask_PT, jax.random.key(0), token_draw.SamplingParams.make(0.0),
        n_samples=1, max_new_tokens=R, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
    )  # fmt: skip
    tokens_PR, length_P = np.asarray(out.tokens_PNR[:, 0]), np.asarray(out.length_PN[:, 0])
    for p, prompt in enumerate(ids):
        with torch.no_grad():
            ref = hf_gguf_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=R, eos_token_id=list(stop_ids),
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()  # fmt: skip
        ours_p = tokens_PR[p, : length_P[p]].tolist()
        assert ours_p == ref, (tokenizer.decode(ours_p), tokenizer.decode(ref))
    # The stop token was compared too: at least one response ends with <|im_end|> in 64 tokens.
    assert (np.asarray(out.finish_PN) == sampler.FINISH_STOP).any()


# ----------------------------------------------------------------------------- the shipped config


def test_shipped_config_runs_a_ttrl_step_with_answers(smollm2_gguf, tmp_path):
    """configs/smollm2-135m_apples.yaml through the command line on one CPU device, as a user
    runs it, at a few prompts and samples: its prompt template, chat template, stop token and
    last-number answers give the vote answers to count, and the step runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    config = Path(__file__).parents[1] / "configs" / "smollm2-135m_apples.yaml"
    args = [
        f"model.name_or_path={smollm2_gguf}", f"run.out_dir={tmp_path}", "data.batch_prompts=2",
        "sample.n_vote=4", "sample.n_train=2", "optim.mini_batch_prompts=2", "run.max_steps=1",
        "eval.k=2", "eval.greedy=false", "eval.before_training=false", "run.tensorboard=false",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "ttrl_jax.run", "--config", str(config), *args],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r.get("train"))
    assert train["answered"] >= 0.75  # free text answers through the last-number fallback
    assert train["response_length_max"] <= 32  # the config's sample.max_new_tokens
    assert np.isfinite(train["loss"]) and np.isfinite(train["grad_norm"])  # 2 groups may agree
    final = next(r for r in rows if r.get("eval"))
    assert final["eval/answered"] >= 0.75
