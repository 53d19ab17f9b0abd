"""model/config.py: the full-size presets, by their parameter counts (abstract shapes only)."""

import jax
import pytest

from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model


@pytest.mark.parametrize(
    "name,count",
    [
        ("HuggingFaceTB/SmolLM2-135M", 134_515_008),
        ("Qwen/Qwen2.5-0.5B", 494_032_768),
        ("Qwen/Qwen2.5-Math-1.5B", 1_543_714_304),
        ("Qwen/Qwen2.5-Math-7B", 7_615_616_512),
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("Qwen/Qwen3-8B", 8_190_735_360),
    ],
)
def test_full_size_preset_param_counts(name, count):
    cfg = model_config.preset(name)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    assert model.count_params(shapes) == count
    q = shapes["params"]["layers"]["attn"]["q"]
    assert q.shape == (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim)
