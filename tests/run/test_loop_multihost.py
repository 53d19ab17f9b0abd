"""run/loop.py across hosts: two processes on localhost (4 fake CPU devices each, one 2x4 mesh)
run the TTRL job as one multi-host run; the result equals the same job in one process with 8
devices."""

import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ttrl_jax.hf import export as hf_export
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.toy import tokenizer as toy_tokenizer

TIMEOUT_S = 420
# Not bit-exact: the cross-process CPU collectives (gloo) sum in another order than the
# in-process ones, so reductions over the mesh round differently (~1e-7 relative). Any mix-up
# of rows would change answers, lengths and votes exactly, and parameters by about optim.lr.
METRIC_RTOL, METRIC_ATOL = 1e-3, 1e-6
PARAM_ATOL = 1e-4  # a tenth of optim.lr below


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """A tiny qwen2 that mostly writes `\\boxed{1}`, `{2}` or `{3}`, so votes and rewards vary.

    Its residual stream is dominated by the current token's embedding (attention and MLP
    outputs scaled down), and the unembedding maps each token to the next step of
    `\\boxed` -> `{` -> a digit -> `}` -> end of turn.
    """
    tok = toy_tokenizer.build_tokenizer()
    cfg = ModelConfig.tiny(
        "qwen2", vocab_size=toy_tokenizer.VOCAB_SIZE, eos_token_id=tok.eos_token_id,
        max_position_embeddings=512,
    )  # fmt: skip
    params = jax.tree.map(np.array, model_lib.init_params(cfg, jax.random.key(0)))
    p = params["params"]
    ids = lambda text: tok.encode(text, add_special_tokens=False)
    (boxed,), (open_,), (close,) = ids("\\boxed"), ids("{"), ids("}")
    digits = [ids(c)[0] for c in "123"]
    V, D = p["embed"].shape
    state_V = np.zeros(V, int)  # 0: anything else, then one state per step of the answer
    state_V[boxed], state_V[open_], state_V[digits], state_V[close] = 1, 2, 3, 4
    rng = np.random.default_rng(0)
    p["embed"] = 0.1 * rng.standard_normal((V, D)) + 4.0 * np.eye(D)[state_V]
    next_SV = np.zeros((5, V))
    next_SV[0, boxed] = next_SV[1, open_] = next_SV[3, close] = 8.0
    next_SV[4, tok.eos_token_id] = 8.0
    next_SV[2, digits] = [6.0, 5.5, 5.0]
    p["lm_head"] = 0.05 * rng.standard_normal((D, V))
    p["lm_head"][:5] += next_SV / 5.6  # 5.6: the state coordinate after the final RMSNorm
    p["layers"]["attn"]["o"] *= 0.1
    p["layers"]["mlp"]["down"] *= 0.1
    folder = tmp_path_factory.mktemp("answering") / "hf"
    hf_export.save_hf(params, cfg, folder, tok)
    return str(folder)


def run_args(model, data, out_dir, mesh="2x4"):
    return [
        "--mesh", mesh, f"model.name_or_path={model}", f"data.path={data}",
        f"run.out_dir={out_dir}", "sample.n_vote=4", "sample.n_train=2",
        "sample.max_new_tokens=6", "sample.prompt_buckets=[128]", "data.batch_prompts=2",
        "data.episodes=1", "optim.mini_batch_prompts=1", "optim.lr=1e-3", "eval.k=4",
        "eval.max_new_tokens=6", "eval.greedy=false", "eval.every_steps=0",
        "run.checkpoint_every=0", "run.max_steps=3", "run.export_hf=true",
        "run.tensorboard=false",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, devices, process_id=None, port=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if process_id is not None:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(process_id),
        )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "ttrl_jax.run", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(procs):
    """Waits for every process (bounded); kills all that are left if one fails or hangs."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return logs


def two_process_run(args):
    port = free_port()
    return [start(args, 4, process_id=i, port=port) for i in range(2)]


KINDS = ("train", "eval", "result", "baseline")


def assert_records_match(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert math.isclose(v, b[k], rel_tol=METRIC_RTOL, abs_tol=METRIC_ATOL), (
                    a["step"], k, v, b[k],
                )  # fmt: skip
            else:
                assert v == b[k], (a["step"], k)


@pytest.mark.slow
def test_two_processes_match_one(toy_run, answering_model, data_file, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = two_process_run(run_args(answering_model, data_file, multi))
    procs.append(start(run_args(answering_model, data_file, single), 8))
    log0, log1, log_single = finish(procs)
    assert procs[0].returncode == 0, log0
    assert procs[1].returncode == 0, log1
    assert procs[2].returncode == 0, log_single
    assert "outputs in" in log0 and "outputs in" not in log1  # process 0 alone reports

    ours, theirs = toy_run.records(multi), toy_run.records(single)
    kinds = [(r["step"], next(k for k in KINDS if r.get(k))) for r in ours]
    assert kinds == [(0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval"),
                     (3, "result"), (3, "baseline")]  # fmt: skip
    trains = [r for r in ours if r.get("train")]
    # The run is not trivial: answers were found, votes split and responses were rewarded.
    assert min(r["answered"] for r in trains) > 0.5
    assert any(r["advantage_abs_mean"] > 0 for r in trains)
    assert any(r["majority_ratio"] < 1 for r in trains)
    assert_records_match(ours, theirs)
    for name in ("config.yaml", "curves.png", "summary.md", "checkpoints/3"):
        assert (multi / name).exists(), name

    a, b = load_file(multi / "hf/model.safetensors"), load_file(single / "hf/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=PARAM_ATOL, err_msg=name)
    initial = load_file(os.path.join(answering_model, "model.safetensors"))
    # It trained: the warmed-up steps move some weight well past the two runs' tolerance.
    assert max(np.abs(a[n] - initial[n]).max() for n in a) > 3 * PARAM_ATOL


@pytest.mark.slow
def test_layout_splitting_prompt_groups_across_hosts_is_an_error(
    answering_model, data_file, tmp_path
):
    # A 1x8 mesh puts every batch row on devices of both processes: no process owns a group.
    procs = two_process_run(run_args(answering_model, data_file, tmp_path / "run", mesh="1x8"))
    for proc, log in zip(procs, finish(procs)):
        assert proc.returncode == 2, log
        assert "owning whole prompt groups" in log, log
