"""tpu_scripts/create.sh: the gcloud command it would run, for each kind of TPU and option."""

import pytest


def test_create_direct(scripts, bash_only_path):
    (cmd,) = scripts.dry_run("create.sh", *scripts.VALID_ARGS["create.sh"], path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "ttrl-v4",
        "--zone=us-central2-b", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "tpu_type, version",
    [
        ("v4-16", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_runtime_version_from_generation(scripts, tpu_type, version, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--type", tpu_type]
    (cmd,) = scripts.dry_run("create.sh", *args, path=bash_only_path)
    assert f"--accelerator-type={tpu_type}" in cmd
    assert f"--version={version}" in cmd


def test_create_version_override_spot_project_and_extra_flags(scripts, bash_only_path):
    args = ["--name=t1", "--zone=z", "--type=v4-8", "--version=my-image", "--spot"]
    args += ["--project", "proj", "--", "--description=my tpu"]
    (cmd,) = scripts.dry_run("create.sh", *args, path=bash_only_path)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert {"--zone=z", "--project=proj", "--version=my-image", "--spot"} <= set(cmd)
    assert cmd[-1] == "--description=my tpu"


def test_create_without_spot_has_no_spot_flag(scripts, bash_only_path):
    (cmd,) = scripts.dry_run("create.sh", *scripts.VALID_ARGS["create.sh"], path=bash_only_path)
    assert "--spot" not in cmd


def test_create_queued(scripts, bash_only_path):
    args = ["--name", "ttrl-v5e", "--zone", "us-west4-a", "--type", "v5litepod-16"]
    (cmd,) = scripts.dry_run("create.sh", *args, "--queued", "--spot", path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "ttrl-v5e",
        "--node-id=ttrl-v5e", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip


def test_create_reports_device_count_for_mesh(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--type", "v4-16", "--dry-run"]
    proc = scripts.run("create.sh", *args, path=bash_only_path)
    assert proc.returncode == 0
    assert "8 JAX devices" in proc.stderr


@pytest.mark.parametrize(
    "tpu_type, message",
    [("v5e-16", "v5litepod-16"), ("tpu8", "not an accelerator type"), ("v9x-8", "--version")],
)
def test_create_rejects_bad_types(scripts, tpu_type, message, bash_only_path):
    proc = scripts.run("create.sh", "--name", "t1", "--zone", "z", "--type", tpu_type,
                      "--dry-run", path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert message in proc.stderr


def test_create_rejects_invalid_tpu_name(scripts, bash_only_path):
    proc = scripts.run("create.sh", "--name", "My_TPU", "--zone", "z", "--type", "v4-8",
                      "--dry-run", path=bash_only_path)  # fmt: skip
    assert proc.returncode != 0
    assert "not a valid TPU name" in proc.stderr
