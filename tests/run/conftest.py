"""Shared by the run tests: a small unlabeled task, and runs of `python -m ttrl_jax.run` on it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ttrl_jax.data import toy_task as task
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.sampling import sampler

# Metrics that measure the machine, not the run: they differ between two equal runs.
TIMING_KEYS = ("time_sample", "time_reward", "time_train", "sample_tokens_per_s")


class ToyRun:
    """Runs of `python -m ttrl_jax.run` in a subprocess, and what they write."""

    @staticmethod
    def args(model, data, out_dir, *extra) -> list[str]:
        """A 5-step run on 6 prompts: checkpoints every step, evaluations every 2, HF export."""
        return [
            f"model.name_or_path={model}", f"data.path={data}", f"run.out_dir={out_dir}",
            "sample.n_vote=4", "sample.n_train=2", "sample.max_new_tokens=12",
            "sample.prompt_buckets=[128]", "data.batch_prompts=2", "data.episodes=2",
            "optim.mini_batch_prompts=1", "optim.lr=1e-3", "eval.k=2", "eval.max_new_tokens=12",
            "eval.every_steps=2", "run.checkpoint_every=1", "run.max_steps=5",
            "run.export_hf=true", "run.tensorboard=false", *extra,
        ]  # fmt: skip

    @staticmethod
    def start(args) -> subprocess.Popen:
        """The run in a subprocess on one CPU device, its output in one text stream."""
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        return subprocess.Popen(
            [sys.executable, "-m", "ttrl_jax.run", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    @staticmethod
    def records(out_dir) -> list[dict]:
        """metrics.jsonl's records without the timings."""
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    @staticmethod
    def same_weights(a, b) -> bool:
        """Whether two runs exported bit-identical HF weights."""
        ours, theirs = load_file(a / "hf/model.safetensors"), load_file(b / "hf/model.safetensors")
        return ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


@pytest.fixture(scope="session")
def toy_run():
    return ToyRun


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """Six unlabeled-style toy prompts (with their golds) as a JSON benchmark file."""
    path = tmp_path_factory.mktemp("data") / "toy.json"
    path.write_text(json.dumps(task.test_split(seed=1, n=6)))
    return str(path)


@pytest.fixture(scope="session")
def full_run(tiny_hf_model, data_file, tmp_path_factory):
    """(out_dir, log) of one uninterrupted ToyRun, the reference the other runs compare with."""
    out = tmp_path_factory.mktemp("full") / "run"
    proc = ToyRun.start(ToyRun.args(tiny_hf_model, data_file, out))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return out, log


@pytest.fixture(scope="session")
def fixed_generator():
    """A stand-in for rollout.Generator that returns scripted texts (the class; call it with a
    {first prompt token: texts} mapping)."""
    return FixedGenerator


class FixedGenerator:
    """Returns fixed texts: sample k copies of a scripted list, greedy the first text."""

    def __init__(self, texts_by_prompt):
        self.texts_by_prompt = texts_by_prompt
        self.calls = 0

    def __call__(self, params, prompt_ids, key, sampling, n_samples, max_new_tokens):
        self.calls += 1
        texts = [self.texts_by_prompt[ids[0]][:n_samples] for ids in prompt_ids]
        P = len(texts)
        rollout = sampler.Rollout(
            tokens_PNR=np.zeros((P, n_samples, 1), np.int32),
            mask_PNR=np.ones((P, n_samples, 1), bool),
            logp_PNR=np.zeros((P, n_samples, 1)), entropy_PNR=np.zeros((P, n_samples, 1)),
            length_PN=np.full((P, n_samples), 5), finish_PN=np.zeros((P, n_samples), np.int32),
            num_steps=np.int32(1), row_steps=np.int32(P * n_samples),
        )  # fmt: skip
        return rollout_lib.Generation(np.zeros((P, 1)), np.ones((P, 1), bool), rollout, texts)
