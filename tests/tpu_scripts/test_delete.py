"""tpu_scripts/delete.sh: deleting a TPU or its queued resource."""


def test_delete(scripts, bash_only_path):
    (cmd,) = scripts.dry_run("delete.sh", *scripts.VALID_ARGS["delete.sh"], path=bash_only_path)
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "ttrl-v4", "--zone=us-central2-b",
    ]  # fmt: skip


def test_delete_queued(scripts, bash_only_path):
    args = [*scripts.VALID_ARGS["delete.sh"], "--queued", "--yes", "--project", "p"]
    (cmd,) = scripts.dry_run("delete.sh", *args, path=bash_only_path)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ttrl-v4",
                   "--zone=us-central2-b", "--project=p", "--force", "--quiet"]  # fmt: skip
