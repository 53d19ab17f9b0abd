"""bench/machine.py: the memory-bandwidth probe."""

from ttrl_jax.bench import machine


def test_memory_bandwidth_probe_reads_the_whole_array():
    assert machine.measure_memory_bandwidth(nbytes=2**20, repeats=1) > 0
