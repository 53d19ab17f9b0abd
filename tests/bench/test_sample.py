"""bench/sample.py: sizes from the command line, and the roofline's bytes and FLOPs a step."""

import pytest

from ttrl_jax.bench import sample
from ttrl_jax.model import config as model_config

TINY = model_config.preset("HuggingFaceTB/SmolLM2-135M", num_layers=1, vocab_size=64)


def test_sizes_parse_or_name_the_form():
    assert sample.SampleSize.parse("8x16x128x256") == sample.SampleSize(8, 16, 128, 256)
    with pytest.raises(ValueError, match="PxNxTxR"):
        sample.SampleSize.parse("8x16x128")


def test_a_step_reads_each_prompt_once_whatever_its_samples():
    one, many = (sample.decode_step_cost(TINY, sample.SampleSize(2, n, 64, 9)) for n in (1, 8))
    # The prompt's keys and values are read once a prompt, the responses' once a row: going
    # from 1 to 8 samples adds only the responses' (7 more rows x 4 tokens on average).
    L, K, H = TINY.num_layers, TINY.num_kv_heads, TINY.head_dim
    kv_per_token = 2 * L * K * H * 4  # float32
    assert many["step_bytes"] - one["step_bytes"] == 2 * 7 * 4 * kv_per_token
    assert one["prefill_flops"] == many["prefill_flops"]
