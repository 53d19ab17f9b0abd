"""toy/pretrain.py and what it made: the shipped toy model (ttrl_jax/toy/model), the default run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from ttrl_jax.config.schema import TOY_MODEL_DIR
from ttrl_jax.data import benchmarks as data_lib
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.data import toy_task as task
from ttrl_jax.hf import load as weights
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.sampling import sampler as sampler_lib
from ttrl_jax.sampling import token_draw
from ttrl_jax.toy import pretrain
from ttrl_jax.toy import tokenizer as toy_tokenizer


def _greedy_texts(cfg, params, tokenizer, questions, max_new_tokens=96):
    """One greedy response per question, through the run's own prompt and sampling path."""
    prompt_ids, _, _ = prompts_lib.build_prompts(
        [{"id": str(i), "prompt": q} for i, q in enumerate(questions)],
        tokenizer, None, max_prompt_tokens=128, skip_long=False,
    )  # fmt: skip
    generator = rollout_lib.Generator(
        cfg, tokenizer, (tokenizer.eos_token_id,), tokenizer.pad_token_id, (128,)
    )
    greedy = token_draw.SamplingParams.make(temperature=0.0)
    gen = generator(params, prompt_ids, jax.random.key(0), greedy, 1, max_new_tokens)
    return [texts[0] for texts in gen.texts_PN], gen


def test_shipped_folder_loads_with_matching_tokenizer():
    cfg, params = weights.load_hf(TOY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
    hf = json.loads((TOY_MODEL_DIR / "config.json").read_text())

    assert cfg.model_type == "qwen2" and hf["model_type"] == "qwen2"
    assert cfg.vocab_size == len(tokenizer) == toy_tokenizer.VOCAB_SIZE
    assert hf["eos_token_id"] == tokenizer.eos_token_id == 127
    assert hf["pad_token_id"] == tokenizer.pad_token_id == 125
    assert hf.get("bos_token_id") is None and tokenizer.bos_token is None
    assert cfg.max_position_embeddings >= 256
    # The folder's tokenizer is the builder's: same ids for a whole chat prompt and response.
    built = toy_tokenizer.build_tokenizer()
    question = task.test_split(data_lib.TOY_TEST_SEED, 1)[0]["prompt"]
    text = prompts_lib.chat_prompt_text(question, tokenizer, None) + "2 +3=5\n\\boxed{5}"
    assert tokenizer(text)["input_ids"] == built(text)["input_ids"]
    # Small enough to ship inside the package.
    size = sum(p.stat().st_size for p in TOY_MODEL_DIR.iterdir())
    assert size < 8 * 2**20, f"toy model folder is {size / 2**20:.1f} MB"
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_shipped_model_solves_chains_greedily():
    """The shipped model learned the task: greedy decoding writes correct worked chains.

    Its sampled answers are noisy by design (the slip phase), but the most likely token at each
    step is the right one, which is what the majority vote recovers.
    """
    cfg, params = weights.load_hf(TOY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
    rows = task.pretrain_examples(seed=123, n=32, min_steps=1, max_steps=4)
    texts, gen = _greedy_texts(cfg, params, tokenizer, [r["prompt"] for r in rows])
    correct = [task.is_correct(r["prompt"], t) for r, t in zip(rows, texts)]
    assert np.mean(correct) >= 0.9, list(zip([r["prompt"] for r in rows], texts))
    # Whole worked chains, not only answers: most responses are the reference solution.
    exact = [t == r["response"] for r, t in zip(rows, texts)]
    assert np.mean(exact) >= 0.85
    assert (np.asarray(gen.rollout.finish_PN) == sampler_lib.FINISH_STOP).all()


def test_pretrain_script_end_to_end(tmp_path):
    tiny = [
        "--embed-dim", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
        "--mlp-dim", "64", "--clean-steps", "3", "--slip-steps", "2", "--batch-size", "4",
        "--min-chain", "1", "--max-chain", "2", "--warmup-steps", "1", "--log-every", "1",
    ]  # fmt: skip
    out = pretrain.main(
        ["--out", str(tmp_path / "toy"), "--eval-prompts", "2", "--eval-k", "2"] + tiny
    )

    cfg, params = weights.load_hf(out)
    assert (cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (32, 1, 2, 1)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == cfg.vocab_size
    assert json.loads((out / "pretrain_config.json").read_text())["clean_steps"] == 3
    # Same settings, same weights: the script is deterministic and the export is lossless.
    pc, _ = pretrain.parse_args(tiny)
    _, again = pretrain.pretrain(pc)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The clean phase alone, then the slip phase from it (--init): the same weights again.
    no_eval = ["--eval-prompts", "0"]
    clean = pretrain.main(["--out", str(tmp_path / "clean"), *no_eval, *tiny, "--slip-steps", "0"])
    two_args = ["--out", str(tmp_path / "two"), *no_eval, "--init", str(clean), *tiny]
    two = pretrain.main([*two_args, "--clean-steps", "0"])
    _, two_params = weights.load_hf(two)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(two_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((two / "pretrain_config.json").read_text())["init"]["clean_steps"] == 3
    with pytest.raises(ValueError, match="another shape"):
        pretrain.main(
            ["--out", str(tmp_path / "x"), *no_eval, "--init", str(clean), "--num-layers", "2"]
        )
    texts, _ = _greedy_texts(
        cfg, params, tokenizer, ["Start at 5 and apply +1 in order, modulo 10."]
    )
    assert isinstance(texts[0], str)


@pytest.mark.slow
def test_default_run_on_the_shipped_model(tmp_path):
    """A short seeded default run: rewards, metrics and the checkpoint work on the shipped model."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = tmp_path / "run"
    args = [
        f"run.out_dir={out}", "run.max_steps=1", "eval.before_training=false",
        "data.batch_prompts=2", "sample.n_vote=4", "sample.n_train=4", "eval.k=2",
        "sample.max_new_tokens=64", "eval.max_new_tokens=64", "run.tensorboard=false",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "ttrl_jax.run", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r.get("train"))
    assert 0 <= train_row["label_accuracy"] <= 1 and train_row["answered"] > 0.5
    assert any(r.get("eval") and "eval/avg@2" in r for r in rows)
    assert (out / "checkpoints" / "1").is_dir()
