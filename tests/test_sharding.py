"""sharding.py: meshes from DxM, and the errors that name the fix."""

import jax
import pytest

from ttrl_jax import sharding


def test_mesh_size_mismatch_error():
    with pytest.raises(ValueError, match=r"mesh 3x3 needs 9 devices but 16 are available"):
        sharding.make_mesh("3x3", jax.devices()[:16])


def test_mesh_spec_format_error():
    with pytest.raises(ValueError, match=r"'4by4' is not of the form DxM"):
        sharding.make_mesh("4by4")
