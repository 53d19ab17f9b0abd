"""plan/search.py with tpu.py, programs.py, timing.py and report.py: slice names, XLA:TPU
compiles of both phases, the verdict and the searches, the seconds estimate's premises, the
XLA:CPU fallback, reports and the command line."""

import json

import jax
import jax.numpy as jnp
import pytest
import yaml

from ttrl_jax import sharding
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import ConfigError, LoraSection
from ttrl_jax.model import config as model_config
from ttrl_jax.model import lora
from ttrl_jax.model.config import LoraConfig, ModelConfig
from ttrl_jax.plan import programs as plan_programs
from ttrl_jax.plan import report as plan_report
from ttrl_jax.plan import search as plan
from ttrl_jax.plan import timing as plan_time
from ttrl_jax.plan import tpu as tpu_lib
from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import from_config
from ttrl_jax.sampling import sampler as sampler_lib
from ttrl_jax.sampling import token_draw

# Heads and kv heads divide a model axis of 4; every param kind of Qwen2 (q/k/v biases).
TINY = ModelConfig.tiny(
    "qwen2", vocab_size=256, num_layers=1, num_heads=8, num_kv_heads=4, eos_token_id=1
)
V, D, L, Q, K, H, F = 256, 32, 1, 8, 4, 8, 64
P, N, T, R = 4, 8, 32, 16  # prompts, samples, prompt bucket, new tokens

SETTINGS = {
    "sample": {"n_vote": N, "n_train": 4, "max_new_tokens": R, "prompt_buckets": [16, T, 64]},
    "data": {"name": "aime24", "max_prompt_tokens": 20, "batch_prompts": P},
    "optim": {"mini_batch_prompts": 2},
}
JSON_KEYS = {
    "compiler", "fits", "sample_gib", "train_gib", "usable_gib", "micro_batch", "est_sample_s",
    "est_train_s", "tpu", "mesh", "changed", "shortfall",
}  # fmt: skip

needs_tpu = pytest.mark.skipif(
    tpu_lib.compiler_missing() is not None,
    reason=f"the TPU compiler is not available: {tpu_lib.compiler_missing()}",
)


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


@pytest.fixture(scope="module")
def tpu_plan(cfg):
    """The tiny config on a v5e-4 slice, compiled by XLA:TPU, with the seconds estimate."""
    if tpu_lib.compiler_missing():
        pytest.skip(f"the TPU compiler is not available: {tpu_lib.compiler_missing()}")
    return plan.make_plan(cfg, "v5e-4")


# ----------------------------------------------------------------------------- slices


def test_slice_names_count_chips_or_tensorcores():
    s = tpu_lib.slice_spec("v5e-16")
    assert (s.chips, s.topology, s.hbm_bytes) == (16, "v5e:4x4", 16 * 2**30)
    assert (s.chips_per_host_bounds, tpu_lib.slice_spec("v5e-4").chips_per_host_bounds) == (
        (2, 4, 1),
        (2, 2, 1),
    )
    # v4 and v5p names count TensorCores, two per chip; v5e and v6e count chips.
    assert (tpu_lib.slice_spec("v4-8").chips, tpu_lib.slice_spec("v4-8").topology) == (
        4,
        "v4:2x2x1",
    )
    assert tpu_lib.slice_spec("v4-16").topology == "v4:2x2x2"
    assert tpu_lib.slice_spec("V5P-8").chips == 4 and tpu_lib.slice_spec("v6e-8").chips == 8
    for bad in ("v5e-12", "v4-7", "v4-4", "v3-8", "v5e", "tpu-16", "v5e-x"):
        with pytest.raises(ValueError, match=r"^unknown TPU slice .*; known: v4-8, v4-16, ") as e:
            tpu_lib.slice_spec(bad)
        assert "\n" not in str(e.value)


def test_default_mesh_keeps_kv_heads_whole():
    def mesh(preset, slice_name, prompts=8):
        mcfg = model_config.preset(preset)
        return tpu_lib.default_mesh(tpu_lib.slice_spec(slice_name), mcfg.num_kv_heads, prompts)

    assert mesh("Qwen/Qwen2.5-Math-7B", "v5e-16") == (4, 4)  # 4 kv heads
    assert mesh("Qwen/Qwen2.5-Math-1.5B", "v5e-8") == (4, 2)  # 2 kv heads
    assert mesh("Qwen/Qwen2.5-Math-1.5B", "v4-8") == (2, 2)
    assert mesh("meta-llama/Llama-3.1-8B", "v5e-16") == (2, 8)
    assert mesh("Qwen/Qwen3-8B", "v5p-8") == (1, 4)
    with pytest.raises(ValueError, match="pass --mesh DxM"):
        mesh("Qwen/Qwen2.5-Math-7B", "v5e-16", prompts=3)


@needs_tpu
def test_every_known_slice_gives_its_abstract_devices():
    kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
    for name in tpu_lib.known_slices():
        s = tpu_lib.slice_spec(name)
        devices = tpu_lib.compile_devices(s)
        assert len(devices) == s.chips, name
        assert {d.device_kind for d in devices} == {kinds[s.generation]}, name


@needs_tpu
def test_hbm_table_matches_the_compilers_limit():
    """The per-chip HBM of tpu.GENERATIONS against the limit XLA:TPU refuses a program over."""
    for gen in tpu_lib.GENERATIONS:
        devices = tpu_lib.compile_devices(tpu_lib.slice_spec(tpu_lib.known_slices(gen)[0]))
        sh = jax.sharding.SingleDeviceSharding(devices[0])
        x = jax.ShapeDtypeStruct((2**17, 2**17), jnp.float32, sharding=sh)  # 64 GiB
        with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as e:
            jax.jit(lambda a: a * 2).lower(x).compile()
        limit = float(str(e.value).split("exceeds available HBM (")[1].split("G)")[0])
        table = tpu_lib.GENERATIONS[gen].hbm_gib
        assert 0.95 * table <= limit <= 1.01 * table, (gen, limit, table)
        assert plan.needed_bytes(str(e.value)) > 64 * 2**30


def test_needed_bytes_reads_the_compilers_messages():
    m = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    assert plan.needed_bytes(m + "temporaries (13.43G) exceeds available HBM (1000.00M).") == int(
        13.43 * 2**30
    )
    assert plan.needed_bytes("RESOURCE_EXHAUSTED: Used 20.5G of 15.75G hbm.") == int(20.5 * 2**30)
    assert plan.needed_bytes("RESOURCE_EXHAUSTED: something else") is None


# ----------------------------------------------------------------------------- what it compiles


def devices(d, m):
    return jax.devices()[: d * m]


def train_layout_bytes(d, m):
    """fp32 bytes per device under TRAIN_RULES: embed over data; vocab/heads/kv/mlp over model."""
    per_layer = (
        2 * D / d  # attention and MLP norm scales
        + (D * Q * H + 2 * D * K * H + Q * H * D) / (d * m)  # q, k, v, o
        + (Q * H + 2 * K * H) / m  # q, k, v biases
        + 3 * D * F / (d * m)  # gate, up, down
    )
    return 4 * int(2 * V * D / (d * m) + D / d + L * per_layer)


def test_known_argument_bytes_follow_the_shardings(cfg):
    one = sharding.make_mesh((1, 1), devices(1, 1))
    eight = sharding.make_mesh((2, 4), devices(2, 4))
    for mesh, (d, m) in ((one, (1, 1)), (eight, (2, 4))):
        known = plan_programs.sample_program(cfg, TINY, mesh).known
        assert known["params"] == train_layout_bytes(d, m)
        assert known["reference params (KL)"] == known["params"]  # KL is on by default
        # AdamW's two moments mirror the params; the step counters are a few int32 scalars.
        assert 0 < known["optimizer state"] - 2 * known["params"] <= 64
        # One data shard: the sample layout is the train layout, so resharding copies nothing.
        assert known["sampler params"] == (0 if d == 1 else train_layout_bytes(1, m))
        rows = plan_programs.train_program(cfg, TINY, mesh).known["rollout batch"]
        assert rows == (P * T * 5 + P * N * R * (4 + 1 + 4 + 4) + P * N * 4 + P * 4) // d
    # K/V of the P prompts and of the P*N responses (R-1 slots), over data rows and kv heads.
    shapes = plan.plan_shapes(cfg)
    kv = 2 * 4 * L * (P // 2 * T + P * N // 2 * (R - 1)) * (K // 4) * H
    assert plan_programs.kv_cache_bytes(TINY, shapes, eight) == kv
    # 2 kv heads on 4 model shards: each device keeps the one its query heads read.
    gqa = TINY.replace(num_kv_heads=2)
    one_head = 2 * 4 * L * (P * T + P * N * (R - 1)) * 1 * H
    assert plan_programs.kv_cache_bytes(gqa, shapes, sharding.make_mesh((1, 4), devices(1, 4))) == (
        one_head
    )


def test_programs_take_their_pieces_from_parts(cfg, monkeypatch):
    """The train step gets the StepConfig parts.py builds (here with a micro-batch), the sampler
    the stop ids parts.py finds."""
    seen = {}
    build, compiled = train_lib.build_train_step, sampler_lib.compiled_sampler

    def spy_build(mcfg, step_cfg, *a, **k):
        seen["step_cfg"] = step_cfg
        return build(mcfg, step_cfg, *a, **k)

    def spy_sampler(mcfg, n, r, stop_ids, *a, **k):
        seen["stop_ids"] = stop_ids
        return compiled(mcfg, n, r, stop_ids, *a, **k)

    monkeypatch.setattr(train_lib, "build_train_step", spy_build)
    monkeypatch.setattr(sampler_lib, "compiled_sampler", spy_sampler)
    mesh = sharding.make_mesh((2, 2), devices(2, 2))
    micro = plan_programs.with_settings(cfg, {"optim.micro_batch_size": 2, "optim.kl_coef": 0.0})
    plan_programs.train_program(micro, TINY, mesh)
    assert seen["step_cfg"] == from_config.step_config(micro)
    assert seen["step_cfg"].micro_batch_rows == 2 and not seen["step_cfg"].use_kl
    with_stop = plan_programs.with_settings(cfg, {"sample.stop_token_ids": (7,)})
    plan_programs.sample_program(with_stop, TINY, mesh)
    assert seen["stop_ids"] == from_config.stop_ids(TINY, (7,)) == (1, 7)


def test_largest_fitting_reads_the_line_through_the_ends_and_confirms():
    compiled = []

    def total(bump=0, refused=()):
        def at(rows):
            compiled.append(rows)
            return None if rows in refused else 1000 + 100 * rows + (bump if rows == 8 else 0)

        return at

    sizes = [32, 16, 8, 4, 2]
    assert plan.largest_fitting(sizes, total(), 2000) == 8
    assert compiled == [32, 2, 8]  # the ends, then the pick on the line, confirmed
    compiled.clear()  # the pick does not fit once compiled: step down to the next one
    assert plan.largest_fitting(sizes, total(bump=500), 2000) == 4 and compiled == [32, 2, 8, 4]
    compiled.clear()
    assert plan.largest_fitting(sizes, total(), 10**9) == 32 and compiled == [32]
    compiled.clear()
    assert plan.largest_fitting(sizes, total(), 1000) is None and compiled == [32, 2]
    # A refusal without a figure: the line starts just over the usable bytes.
    compiled.clear()
    assert plan.largest_fitting(sizes, total(refused=(32,)), 2000) == 8
    assert plan.largest_fitting([], total(), 2000) is None
    assert plan_programs.micro_batch_candidates(32, 4) == [32, 16, 8, 4]


def test_remat_choices_go_towards_recomputing_more(cfg):
    choices = plan.remat_choices(cfg)
    assert choices[0] is False and len(choices) >= 2
    on = plan_programs.with_settings(cfg, {"model.remat": choices[-1]})
    assert plan.remat_choices(on) == [choices[-1]]


# ----------------------------------------------------------------------------- XLA:TPU plans


@pytest.mark.slow
def test_tpu_plan_is_the_compilers(tpu_plan, cfg):
    p = tpu_plan
    out = plan_report.to_json(p)
    assert set(out) >= JSON_KEYS
    assert out["compiler"] == "tpu" and out["compiler_note"] == "" and out["mesh"] == "1x4"
    assert out["fits"] is True and p.fits == (p.peak <= p.usable_bytes)
    assert out["usable_gib"] == pytest.approx(16 * 0.95)
    assert out["sample_gib"] == p.sample.total / 2**30 and out["train_gib"] == p.train.total / 2**30
    # The breakdown sums to the compiler's total; the known arguments are a part of it.
    for phase in (p.sample, p.train):
        assert sum(phase.parts.values()) == phase.total
        assert phase.memory.argument >= phase.parts["params"] + phase.parts["optimizer state"]
    assert p.sample.parts["KV cache"] == plan_programs.kv_cache_bytes(
        TINY, p.shapes, sharding.make_mesh((1, 4), tpu_lib.compile_devices(p.slice))
    )
    # The donated state is reused for the new state.
    assert p.train.memory.alias >= p.train.parts["params"] + p.train.parts["optimizer state"] - 64
    # The largest micro-batch: a divisor of the mini-batch rows, on the data axis, that fits.
    mini = p.shapes.mini_batch_rows
    assert out["micro_batch"] == mini and mini % out["micro_batch"] == 0
    assert p.micro_batches[out["micro_batch"]] <= p.usable_bytes
    assert out["changed"] == {} and out["shortfall"] == ""
    t = p.time
    assert 0 < out["est_sample_s"] == t.sample_s and 0 < out["est_train_s"] == t.train_s
    assert t.decode_steps == R - 1 and t.updates == 2 and t.rows_per_device == P * 4
    assert t.passes == 1
    assert t.sample_s == pytest.approx(t.prefill_s + (R - 1) * t.decode_step_s)
    assert min(t.prefill_s, t.decode_step_s, t.update_s, t.row_s) > 0
    text = plan_report.format_text(p)
    for word in ("XLA:TPU", "v5e-4", "verdict: fits", "largest micro-batch that fits: 8", "decode"):
        assert word in text


@needs_tpu
def test_lora_plan_compiles_the_lora_step_and_the_merge(cfg, tpu_plan):
    """model.lora: the state is the adapters and their Adam moments, the base sits once in the
    compute dtype (it is the KL reference), the sampler reads merged weights."""
    lora_cfg = plan_programs.with_settings(cfg, {"model.lora": LoraSection(rank=4, alpha=8)})
    p = plan.make_plan(lora_cfg, "v5e-4", search=False)
    mcfg = plan_programs.model_config(lora_cfg)
    assert p.compiler == "tpu" and p.fits and mcfg.lora == LoraConfig(4, 8.0)
    assert p.trained_params == lora.count(mcfg) < p.n_params / 10
    assert p.lora["rank"] == 4 and plan_report.to_json(p)["trained_params"] == p.trained_params
    mesh = sharding.make_mesh((1, 4), tpu_lib.compile_devices(p.slice))
    adapters = lora.adapter_shapes(mcfg)
    adapter_sh = lora.adapter_shardings(mcfg, mesh, sharding.TRAIN_RULES)
    adapter_bytes = plan_programs.shard_bytes(plan_programs.abstract(adapters, adapter_sh))
    for phase, full in ((p.sample, tpu_plan.sample), (p.train, tpu_plan.train)):
        assert sum(phase.parts.values()) == phase.total
        assert "params" not in phase.parts and "reference params (KL)" not in phase.parts
        # float32 adapters and their two Adam moments, no more
        assert phase.parts["LoRA adapters"] == adapter_bytes < full.parts["params"]
        assert 2 * adapter_bytes <= phase.parts["optimizer state"] <= 2 * adapter_bytes + 64
        # the base in the compute dtype, as full fine-tuning keeps its KL reference
        assert phase.parts["frozen base (KL reference)"] == full.parts["reference params (KL)"]
    # What the step holds: less (on a tiny model its temporaries and code outweigh the state).
    assert p.train.memory.argument < tpu_plan.train.memory.argument
    t = p.time
    assert t.merge_s > 0
    assert t.sample_s == pytest.approx(t.merge_s + t.prefill_s + (R - 1) * t.decode_step_s)
    text = plan_report.format_text(p)
    assert "LoRA rank 4 (alpha 8) on q,k,v,o,gate,up,down" in text and "LoRA merge" in text
    assert "| model, LoRA rank 4 | v5e-4, 1x4 | yes |" in plan_report.summary_markdown([p])


@needs_tpu
def test_tpu_refusal_is_reported_with_the_compilers_figure(cfg, tpu_plan):
    usable = 2 * 2**20  # 2 MiB: the tiny step needs more
    tight = plan.make_plan(
        cfg, "v5e-4", headroom=1 - usable / 2**34, search=False, estimate_time=False
    )
    out = plan_report.to_json(tight)
    assert out["fits"] is False and tight.fits == (tight.peak is not None and tight.peak <= usable)
    assert "RESOURCE_EXHAUSTED" in out["sample_refused"]
    assert tight.sample.total > usable  # the figure the refusal gives
    assert "sampling needs" in out["shortfall"] and "what would fit" in out["shortfall"]
    assert "does NOT fit" in plan_report.format_text(tight)


@needs_tpu
def test_when_nothing_fits_the_train_setting_that_needs_least_is_reported(cfg):
    usable = 2 * 2**20  # 2 MiB: no remat policy or micro-batch makes the tiny step fit
    tight = plan.make_plan(cfg, "v5e-4", headroom=1 - usable / 2**34, estimate_time=False)
    assert not tight.fits and tight.micro_batch is None
    needs = {k: v for k, v in tight.micro_batches.items() if v is not None}
    assert len(needs) >= 2 and tight.train.total == min(needs.values())
    assert tight.settings["optim.micro_batch_size"] == min(needs, key=needs.get)
    assert f"{tight.train.total / 2**30:.2f} GiB" in plan_report.to_json(tight)["shortfall"]


@needs_tpu
def test_seconds_estimate_premises_hold_on_xla_tpu():
    """plan_time's method rests on these: a loop's body is counted once whatever its trip count,
    and the decode while_loop adds nothing, so a longer response does not cost more."""
    devices_ = tpu_lib.compile_devices(tpu_lib.slice_spec("v5e-1"))
    sh = jax.sharding.SingleDeviceSharding(devices_[0])
    x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=sh)

    def flops(n):
        f = lambda a: jax.lax.scan(lambda y, _: (y @ a, None), a, None, length=n)[0]
        return plan_time.Cost(jax.jit(f).lower(x).compile().cost_analysis()["flops"], 0).flops

    assert flops(4) == flops(1) == pytest.approx(2 * 512**3, rel=0.01)
    mesh = sharding.make_mesh((1, 1), devices_)
    costs = []
    for r in (4, 64):
        sampler = sampler_lib.compiled_sampler(TINY, 2, r, (1,), 0, mesh)
        params = plan_programs.params_abstract(TINY, mesh, sharding.SAMPLE_RULES)
        prompt = jax.ShapeDtypeStruct((1, 16), jnp.int32, sharding=sh)
        sp = plan_programs.replicated_like(jax.eval_shape(token_draw.SamplingParams.make), mesh)
        mask = jax.ShapeDtypeStruct((1, 16), jnp.bool_, sharding=sh)
        args = (params, prompt, mask, plan_programs.abstract_key(mesh), sp)
        costs.append(sampler.lower(*args).compile().cost_analysis()["flops"])
    one_step = 2 * 2 * plan_programs.n_params(TINY)  # 2 rows through every weight
    assert abs(costs[1] - costs[0]) < one_step  # not the 60 steps more


# ----------------------------------------------------------------------------- the fallback


def test_cpu_fallback_without_libtpu_says_so(cfg, monkeypatch):
    monkeypatch.setattr(tpu_lib, "compiler_missing", lambda: "libtpu is not installed (test)")
    p = plan.make_plan(cfg, "v5e-4", estimate_time=False)
    out = plan_report.to_json(p)
    assert out["compiler"] == "cpu" and "libtpu is not installed (test)" in out["compiler_note"]
    assert "XLA:CPU stands in for XLA:TPU" in out["compiler_note"]
    assert out["fits"] == (p.peak <= p.usable_bytes) and out["micro_batch"] == 8
    text = plan_report.format_text(p)
    assert "XLA:CPU (fallback)" in text and "note: XLA:CPU stands in" in text
    # Without libtpu, asking for its devices is an error that says why.
    with pytest.raises(RuntimeError, match="libtpu is not installed"):
        tpu_lib.compile_devices(tpu_lib.slice_spec("v5e-4"))


def test_plan_errors_name_the_fix(cfg):
    with pytest.raises(ValueError, match="mesh 3x3 needs 9 devices but v5e-16 has 16 chips"):
        plan.make_plan(cfg, "v5e-16", "3x3", devices=devices(4, 4))
    # 8 query heads cannot split over 16 model shards.
    with pytest.raises(ValueError, match=r"\(heads=8\) does not divide over mesh axis 'model'"):
        plan.make_plan(cfg, "v5e-16", "1x16", devices=devices(4, 4))
    # 2 prompts x 4 responses per mini-batch cannot split over 16 data shards.
    with pytest.raises(ConfigError, match="not divisible by the mesh's data axis"):
        plan.make_plan(cfg, "v5e-16", "16x1", devices=devices(4, 4))
    with pytest.raises(ValueError, match="unknown TPU slice 'v5e-12'"):
        plan.make_plan(cfg, "v5e-12")


def test_model_config_from_presets_folders_or_a_clear_error(cfg):
    base = config_lib.load_config(None, ["model.name_or_path=Qwen/Qwen2.5-Math-1.5B"])
    assert plan.model_config(base) == model_config.preset("Qwen/Qwen2.5-Math-1.5B")
    llama = config_lib.load_config(
        None, ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct", "model.dtype=bfloat16"]
    )
    llama_8b = model_config.preset("meta-llama/Llama-3.1-8B", dtype="bfloat16")
    assert plan.model_config(llama) == llama_8b
    assert plan.model_config(cfg) == TINY
    unknown = config_lib.load_config(None, ["model.name_or_path=someone/Unknown-7B"])
    with pytest.raises(ValueError, match="neither a local folder nor a known preset"):
        plan.model_config(unknown)


# ----------------------------------------------------------------------------- command line


def test_main_prints_one_json_object_and_a_table(config_path, capsys):
    plans = plan_report.main(
        ["--config", config_path, "--tpu", "v5e-4", "--json", "--no-time", "--markdown"]
    )
    out = capsys.readouterr().out.splitlines()
    got = json.loads(out[0])
    assert len(plans) == 1 and set(got) >= JSON_KEYS and got["tpu"] == "v5e-4"
    assert got["fits"] is True and got["micro_batch"] == 8 and got["est_sample_s"] is None
    assert got["compiler"] == ("cpu" if tpu_lib.compiler_missing() else "tpu")
    assert out[1].startswith("| model | slice, mesh | fits |")
    assert out[3].startswith("| model | v5e-4, 1x4 | yes | 8 | the config |")


def test_main_errors_are_one_line(config_path, capsys):
    with pytest.raises(SystemExit):
        plan_report.main(["--config", config_path, "--tpu", "v5e-12"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown TPU slice 'v5e-12'; known: v4-8" in err
    with pytest.raises(SystemExit, match="unknown key 'sample.n_votes'"):
        plan_report.main(["--config", config_path, "--tpu", "v5e-4", "sample.n_votes=4"])
    with pytest.raises(SystemExit, match=r"on v5e-4: mesh 3x1 needs 3 devices"):
        plan_report.main(["--config", config_path, "--tpu", "v5e-4", "--mesh", "3x1"])


def test_with_settings_replaces_dotted_keys(cfg):
    c = plan_programs.with_settings(cfg, {"optim.micro_batch_size": 4, "model.remat": True})
    assert (c.optim.micro_batch_size, c.model.remat, c.sample) == (4, True, cfg.sample)
    assert plan_programs.has_key(cfg, "optim.micro_batch_size")
    assert not plan_programs.has_key(cfg, "optim.no_such_key")
