"""config/load.py: YAML files, overrides, cross-section checks, and the errors for bad input."""

import dataclasses
from pathlib import Path

import pytest

from ttrl_jax.config import load as config_lib
from ttrl_jax.config.load import load_config
from ttrl_jax.config.schema import TOY_MODEL, TOY_MODEL_DIR, Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


HUB_IDS = {
    "qwen2.5-math-1.5b": "Qwen/Qwen2.5-Math-1.5B",
    "qwen2.5-math-7b": "Qwen/Qwen2.5-Math-7B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
}


PAPER_DATA = {"aime24": (8, 80), "amc": (8, 30), "math500": (32, 10)}  # batch, episodes


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    if path.name == "toy.yaml":
        assert cfg.model.name_or_path == TOY_MODEL and cfg.data.name == "toy"
        return
    if path.name.startswith("smollm2"):  # the real model on a CPU, not a paper run
        assert cfg.model.name_or_path.endswith(".gguf") and cfg.ttrl.last_number_fallback
        assert cfg.run.out_dir == f"runs/{path.stem}"
        return
    model_key, bench = path.stem.rsplit("_", 1)
    assert cfg.model.name_or_path == HUB_IDS[model_key]
    assert cfg.data.name == bench
    assert (cfg.data.batch_prompts, cfg.data.episodes) == PAPER_DATA[bench]
    math_model = model_key.startswith("qwen2.5-math")
    assert cfg.sample.temperature == (1.0 if math_model else 0.6)
    assert cfg.sample.max_new_tokens == 3072
    assert cfg.model.dtype == "bfloat16"
    assert cfg.run.out_dir == f"runs/{path.stem}"
    # Math models rely on the template's \boxed{} instruction; the others get it explicitly.
    assert (cfg.data.system_prompt is None) == math_model
    if not math_model:
        assert "\\boxed{}" in cfg.data.system_prompt
    if math_model:  # Qwen2.5-Math's context is 4096 tokens
        config_lib.check_context_length(cfg, 4096)


def test_the_lora_apples_config_is_the_apples_config_with_lora():
    """The LoRA run differs from the full fine-tune it is compared with in LoRA, lr and folder."""
    full = config_lib.config_to_dict(load_config(CONFIGS / "smollm2-135m_apples.yaml"))
    lora = config_lib.config_to_dict(load_config(CONFIGS / "smollm2-135m_apples_lora.yaml"))
    assert (full["model"].pop("lora")["rank"], lora["model"].pop("lora")["rank"]) == (0, 16)
    assert lora["optim"].pop("lr") == pytest.approx(10 * full["optim"].pop("lr"))
    assert lora["run"].pop("out_dir") != full["run"].pop("out_dir")
    assert lora == full


def test_all_paper_configs_exist():
    names = {p.stem for p in CONFIG_FILES}
    expected = {f"{m}_{b}" for m in HUB_IDS for b in PAPER_DATA} | {"toy"}
    assert expected <= names


def test_default_config_path_is_toy_yaml():
    assert Path(config_lib.default_config_path()) == CONFIGS / "toy.yaml"


def test_overrides_apply_after_the_file_with_types(tmp_path):
    path = write(tmp_path, "sample:\n  n_vote: 8\n  n_train: 4\n")
    cfg = load_config(
        path,
        [
            "sample.n_vote=16",
            "optim.lr=1e-5",
            "optim.dual_clip=null",
            "sample.prompt_buckets=[64,2048]",
            "data.skip_long_prompts=true",
            "data.path=/tmp/x.json",
        ],
    )
    assert (cfg.sample.n_vote, cfg.sample.n_train) == (16, 4)
    assert cfg.optim.lr == 1e-5 and cfg.optim.dual_clip is None
    assert cfg.sample.prompt_buckets == (64, 2048)
    assert cfg.data.skip_long_prompts is True and cfg.data.path == "/tmp/x.json"


def test_later_override_wins():
    cfg = load_config(None, ["data.episodes=3", "data.episodes=5"])
    assert cfg.data.episodes == 5


def test_unknown_key_in_yaml_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "sample:\n  n_votes: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "sample.n_votes" in msg and str(path) in msg
    assert "Did you mean 'sample.n_vote'" in msg and "max_new_tokens" in msg


def test_unknown_section_lists_sections(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trainer'.*optim.*eval"):
        load_config(path)


def test_unknown_key_in_override_names_the_override():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.learning_rate=1e-6"])
    msg = str(err.value)
    assert "override 'optim.learning_rate=1e-6'" in msg and "optim.learning_rate" in msg
    assert "Valid keys of 'optim'" in msg and "lr" in msg


def test_key_below_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"'sample.n_vote' is a value, not a section"):
        load_config(None, ["sample.n_vote.x=1"])


def test_wrong_type_in_yaml_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "data:\n  batch_prompts: eight\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "data.batch_prompts" in msg and str(path) in msg and "expected int" in msg


def test_wrong_type_in_override_names_override():
    with pytest.raises(ConfigError, match=r"override 'data.shuffle=maybe'.*data.shuffle.*bool"):
        load_config(None, ["data.shuffle=maybe"])


def test_section_given_a_scalar(tmp_path):
    path = write(tmp_path, "sample: 3\n")
    with pytest.raises(ConfigError, match=r"'sample' is a section, not a value.*sample.n_vote="):
        load_config(path)


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"override 'sample.n_vote' is not of the form"):
        load_config(None, ["sample.n_vote"])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        load_config(missing)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_invalid_yaml_syntax(tmp_path):
    path = write(tmp_path, "sample: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_data_path_replaces_the_name_check():
    cfg = load_config(None, ["data.name=my_set", "data.path=/somewhere/test.json"])
    assert cfg.data.path == "/somewhere/test.json"


def test_explicit_mesh_checks_divisibility():
    ok = load_config(None, ["mesh.shape=2x4"])  # 8 x 64 rollout rows, 1 x 32 mini-batch rows
    assert ok.mesh.shape == "2x4"
    with pytest.raises(ConfigError, match=r"mini-batch rows .* = 32 .* data axis \(64\)"):
        load_config(None, ["mesh.shape=64x1"])


def test_validate_with_known_data_axis():
    cfg = load_config(None, ["sample.n_train=6", "sample.n_vote=6", "data.batch_prompts=8"])
    config_lib.validate_config(cfg, data_axis_size=2)
    with pytest.raises(ConfigError, match=r"rows .* = 6 is not divisible by the mesh's data axis"):
        config_lib.validate_config(cfg, data_axis_size=4)


def test_check_context_length():
    cfg = load_config()
    config_lib.check_context_length(cfg, 4096)
    with pytest.raises(ConfigError, match=r"1024.*3072.*= 4096 exceeds the model's context of 20"):
        config_lib.check_context_length(cfg, 2048)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(
        CONFIGS / "qwen3-8b_amc.yaml", ["optim.grad_clip=null", "eval.benchmarks=[gpqa]"]
    )
    out = tmp_path / "run" / "config.yaml"
    config_lib.save_config(cfg, out)
    assert load_config(out) == cfg


def test_config_to_dict_is_plain():
    d = config_lib.config_to_dict(load_config())
    assert d["sample"]["prompt_buckets"] == [128, 256, 512, 1024]
    assert d["optim"]["lr"] == 5e-7 and set(d) == {f.name for f in dataclasses.fields(Config)}


def test_resolve_model_path():
    assert config_lib.resolve_model_path("toy") == str(TOY_MODEL_DIR)
    assert config_lib.resolve_model_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"
