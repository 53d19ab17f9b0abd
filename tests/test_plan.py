"""The ahead-of-time memory plan: exact shard bytes, both phases, the verdict, errors, the CLI."""

import dataclasses
import json

import jax
import pytest
import yaml

from ttrl_jax import config as config_lib
from ttrl_jax import model as model_lib
from ttrl_jax import plan, sharding

# Heads and kv heads divide a model axis of 4; every param kind of Qwen2 (q/k/v biases).
TINY = model_lib.ModelConfig.tiny(
    "qwen2", vocab_size=256, num_layers=1, num_heads=8, num_kv_heads=4, eos_token_id=1
)
V, D, L, Q, K, H, F = 256, 32, 1, 8, 4, 8, 64
P, N, T, G = 4, 8, 32, 16  # prompts, samples, prompt bucket, new tokens

SETTINGS = {
    "sample": {
        "n_vote": N,
        "n_train": 4,
        "max_new_tokens": G,
        "prompt_buckets": [16, T, 64],
    },
    "data": {"name": "aime24", "max_prompt_tokens": 20, "batch_prompts": P},
    "optim": {"mini_batch_prompts": 2},
}
CATEGORIES = [
    "params",
    "optimizer state",
    "reference params (KL)",
    "sampler params",
    "KV cache",
    "activations / temporaries",
    "batch and outputs",
]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY.to_hf()))
    settings = {"model": {"name_or_path": str(root / "model")}, **SETTINGS}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture(scope="module")
def cfg(config_path):
    return config_lib.load_config(config_path)


def devices(d, m):
    return jax.devices()[: d * m]


@pytest.fixture(scope="module")
def plan_2x4(cfg):
    return plan.make_plan(cfg, (2, 4), "v4", devices=devices(2, 4))


# ----------------------------------------------------------------------------- exact bytes


def train_layout_bytes(d, m):
    """fp32 bytes per device under TRAIN_RULES: embed over data; vocab/heads/kv/mlp over model."""
    per_layer = (
        2 * D / d  # attention and MLP norm scales
        + (D * Q * H + 2 * D * K * H + Q * H * D) / (d * m)  # q, k, v, o
        + (Q * H + 2 * K * H) / m  # q, k, v biases
        + 3 * D * F / (d * m)  # gate, up, down
    )
    return 4 * int(2 * V * D / (d * m) + D / d + L * per_layer)


def sample_layout_bytes(m):
    """fp32 bytes per device under SAMPLE_RULES: as training, but embed replicated."""
    return train_layout_bytes(1, m)


def test_exact_bytes_shrink_with_the_mesh(cfg):
    mcfg, shapes = plan.model_config(cfg), plan.plan_shapes(cfg)
    assert (shapes.prompts, shapes.n_vote, shapes.prompt_len, shapes.response_len) == (P, N, T, G)
    one = plan.exact_bytes(cfg, mcfg, shapes, sharding.make_mesh((1, 1), devices(1, 1)))
    eight = plan.exact_bytes(cfg, mcfg, shapes, sharding.make_mesh((2, 4), devices(2, 4)))

    n_params = model_lib.count_params(
        jax.eval_shape(lambda: model_lib.init_params(TINY, jax.random.key(0)))
    )
    assert one["params"] == 4 * n_params == train_layout_bytes(1, 1)
    assert eight["params"] == train_layout_bytes(2, 4)
    assert eight["params"] < one["params"] / 7  # only norms and biases are not split 8 ways
    for e in (one, eight):
        assert e["reference params (KL)"] == e["params"]  # KL is on by default
        # AdamW's two moments mirror the params; the step counters are a few int32 scalars.
        assert 0 < e["optimizer state"] - 2 * e["params"] <= 64
    # One data shard: the sample layout is the train layout, so resharding copies nothing.
    assert one["sampler params"] == 0
    assert eight["sampler params"] == sample_layout_bytes(4)

    # K/V of the P prompts [L, P, K, T, H] and of the P*N responses [L, B, K, G-1, H], split
    # over data (rows) and model (kv heads), float32.
    kv = lambda d, m: 2 * 4 * L * (P // d * T + P * N // d * (G - 1)) * (K // m) * H
    assert one["KV cache"] == kv(1, 1)
    assert eight["KV cache"] == kv(2, 4)
    # 2 kv heads on 4 model shards: each device keeps the one its query heads read.
    gqa = TINY.replace(num_kv_heads=2)
    one_kv_head = 2 * 4 * L * (P * T + P * N * (G - 1)) * 1 * H
    assert (
        plan.kv_cache_bytes(gqa, shapes, sharding.make_mesh((1, 4), devices(1, 4))) == one_kv_head
    )
    rows = lambda d: (P * T * 5 + P * N * G * (4 + 1 + 4 + 4) + P * N * 4 + P * 4) // d
    assert one["rollout batch"] == rows(1)
    assert eight["rollout batch"] == rows(2)


# ----------------------------------------------------------------------------- the plan


def test_plan_measures_both_phases_per_device(cfg, plan_2x4):
    p = plan_2x4
    assert list(p.sample) == CATEGORIES and list(p.train) == CATEGORIES
    exact = plan.exact_bytes(cfg, TINY, p.shapes, sharding.make_mesh((2, 4), devices(2, 4)))
    for name in ("params", "optimizer state", "reference params (KL)"):
        assert p.sample[name] == p.train[name] == exact[name] > 0
    assert p.sample["sampler params"] == exact["sampler params"] > 0
    assert p.sample["KV cache"] == exact["KV cache"] > 0
    assert p.sample["activations / temporaries"] > 0 and p.train["activations / temporaries"] > 0
    assert p.train["KV cache"] == p.train["sampler params"] == 0
    # XLA's figures are per device: the train step's arguments are this device's shards of the
    # state, the reference params and the batch (less what the step never reads: jit drops
    # unused arguments, here the rollout log-probs that the step recomputes).
    resident = sum(exact[k] for k in ("params", "optimizer state", "reference params (KL)"))
    logp_bytes = P * N * G * 4 // 2
    args = p.train_program.argument
    assert resident + exact["rollout batch"] - logp_bytes <= args
    assert args <= resident + exact["rollout batch"] + 64  # + the key and a few scalars
    # The donated state is reused for the new state.
    assert p.train_program.alias >= exact["params"] + exact["optimizer state"] - 64
    assert p.train["batch and outputs"] >= exact["rollout batch"]
    assert p.peak == max(p.sample_total, p.train_total)

    text = plan.format_text(p)
    for name in [*CATEGORIES, "total", "sampling", "training", "fits", "Estimate"]:
        assert name in text
    assert p.fits and p.suggested_micro_batch == 8  # the whole mini-batch, far below 32 GiB


def test_verdict_flips_with_the_hbm_size(cfg, plan_2x4):
    peak = plan_2x4.peak

    def verdict(hbm):  # compiles hit JAX's in-memory cache: same programs, same devices
        p = plan.make_plan(cfg, (2, 4), devices=devices(2, 4), hbm=hbm, headroom=0.0, search="none")
        assert p.peak == peak
        return p.fits

    assert verdict(peak)
    assert not verdict(peak - 1)
    small = dataclasses.replace(plan_2x4, hbm_bytes=peak // 2)
    assert not small.fits and small.suggested_micro_batch is None
    assert "does NOT fit" in plan.format_text(small)


def test_linear_micro_batch_search_interpolates_and_confirms():
    compiled = []

    def total(rows, bump=0):
        compiled.append(rows)
        return 1000 + 100 * rows + (bump if rows == 8 else 0)

    found = plan.search_micro_batches([32, 16, 8, 4, 2], "linear", 2000, total)
    assert [m.rows for m in found] == [32, 16, 8, 4, 2]
    assert compiled == [32, 2, 8]  # the ends, then the interpolated pick to confirm it
    assert {m.rows: m.compiled for m in found} == {32: True, 16: False, 8: True, 4: False, 2: True}
    assert {m.rows: m.train_total for m in found}[16] == 2600  # on the line through the ends

    compiled.clear()  # the pick does not fit once compiled: step down to the next one
    found = plan.search_micro_batches([32, 16, 8, 4, 2], "linear", 2000, lambda r: total(r, 500))
    assert compiled == [32, 2, 8, 4]
    assert max(m.rows for m in found if m.train_total <= 2000) == 4

    compiled.clear()
    assert [m.rows for m in plan.search_micro_batches([8, 4], "linear", 10**9, total)] == [8]
    assert plan.search_micro_batches([8, 4], "none", 0, total) == []
    assert len(plan.search_micro_batches([8, 4, 2], "all", 0, total)) == 3
    assert plan.micro_batch_candidates(32, 4) == [32, 16, 8, 4]


def test_mesh_errors_come_from_the_sharding_module(cfg):
    with pytest.raises(ValueError, match="mesh 3x3 needs 9 devices but 16 are available"):
        plan.make_plan(cfg, (3, 3))
    # 8 query heads cannot split over 16 model shards.
    with pytest.raises(ValueError, match=r"\(heads=8\) does not divide over mesh axis 'model'"):
        plan.make_plan(cfg, "1x16")
    # 2 prompts x 4 responses per mini-batch cannot split over 16 data shards.
    with pytest.raises(config_lib.ConfigError, match="not divisible by the mesh's data axis"):
        plan.make_plan(cfg, "16x1")


def test_model_config_from_presets_folders_or_a_clear_error(cfg):
    base = config_lib.load_config(None, ["model.name_or_path=Qwen/Qwen2.5-Math-1.5B"])
    assert plan.model_config(base) == model_lib.preset("Qwen/Qwen2.5-Math-1.5B")
    llama = config_lib.load_config(
        None, ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct", "model.dtype=bfloat16"]
    )
    assert plan.model_config(llama) == model_lib.preset("meta-llama/Llama-3.1-8B", dtype="bfloat16")
    assert plan.model_config(cfg) == TINY
    unknown = config_lib.load_config(None, ["model.name_or_path=someone/Unknown-7B"])
    with pytest.raises(ValueError, match="neither a local folder nor a known preset"):
        plan.model_config(unknown)
    assert plan.hbm_bytes("v5e") == 16 * 2**30 and plan.hbm_bytes("v5p") == 95 * 2**30
    with pytest.raises(ValueError, match="unknown TPU 'v3'"):
        plan.hbm_bytes("v3")


def test_main_prints_a_markdown_table(config_path, plan_2x4, capsys):
    plans = plan.main(
        ["--config", config_path, "--mesh", "2x4", "--markdown", "--search", "none",
         "optim.kl_coef=0.001"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert len(plans) == 1 and plans[0].peak == plan_2x4.peak
    assert "| GiB per device | sampling | training |" in out
    assert "|---|---:|---:|" in out
    for name in CATEGORIES:
        assert f"| {name} | " in out
    assert "| **total** |" in out and "micro-batch 8 rows): fits" in out

    with pytest.raises(SystemExit, match=r"on mesh 1x16: .*does not divide over mesh axis"):
        plan.main(["--config", config_path, "--mesh", "1x16"])
    with pytest.raises(SystemExit, match="unknown key 'sample.n_votes'"):
        plan.main(["--config", config_path, "--mesh", "2x4", "sample.n_votes=4"])
