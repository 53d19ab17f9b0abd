"""tpu_scripts/logs.sh: fetching and following the workers' logs."""


def test_logs_fetch_each_worker(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--run-name", "r1", "--workers", "2"]
    mkdir, scp0, scp1 = scripts.dry_run("logs.sh", *args, path=bash_only_path)
    assert mkdir == ["mkdir", "-p", "tpu_logs/t1/r1"]
    for worker, scp in enumerate([scp0, scp1]):
        assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "t1:ttrl_runs/r1/worker-*.log",
                       "tpu_logs/t1/r1/", f"--worker={worker}", "--zone=z"]  # fmt: skip


def test_logs_fetch_one_worker_of_the_latest_run(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--worker", "3", "--out", "my logs"]
    mkdir, scp = scripts.dry_run("logs.sh", *args, path=bash_only_path)
    assert mkdir == ["mkdir", "-p", "my logs"]
    assert scp[5:8] == ["t1:ttrl_runs/latest/worker-*.log", "my logs/", "--worker=3"]


def test_logs_follow(scripts, bash_only_path):
    args = ["--name", "t1", "--zone", "z", "--run-name", "r1", "--follow", "--lines", "20"]
    (cmd,) = scripts.dry_run("logs.sh", *args, path=bash_only_path)
    assert cmd[:8] == scripts.SSH_ALL_T1
    remote = scripts.remote_command(cmd)
    assert '"$HOME/ttrl_runs/r1"' in remote
    assert 'tail -n 20 -F "$1"' in remote and "[worker $w]" in remote
