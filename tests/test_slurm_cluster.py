"""The test harness for a real Slurm (tests/slurm_cluster.py): a private cluster starts, runs jobs side
by side, cancels them, and leaves no process behind; a missing Slurm skips, or fails under CI=true."""

import contextlib
import os
import signal
import time

import pytest

import slurm_cluster as harness
from slurm_cluster import SlurmCluster, cluster_processes, process_alive, require_slurm, slurm_cluster  # noqa: F401


@pytest.fixture
def cluster(slurm_cluster):  # noqa: F811
    """The module's cluster, with no job left active after each test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
    slurm_cluster.wait_for_no_jobs(harness.JOBS_END_TIMEOUT_S)


def wait_for_file(path, cluster, timeout=15):
    """The text of ``path`` once a job has written a line to it."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and open(path).read().endswith("\n")):
        assert time.monotonic() < deadline, "no %s after %ss; jobs: %s" % (path, timeout, cluster.jobs())
        time.sleep(0.05)
    return open(path).read()


@pytest.mark.slow
def test_a_batch_job_runs_with_the_submitters_environment(cluster, tmp_path):
    output = str(tmp_path / "job.out")
    job_id = cluster.submit("--job-name", "runpack-hello", "--comment", "scaler tag | with spaces",
                            "--output", output, "--wrap", 'echo "ran with $RUNPACK_TEST_MARKER"',
                            env=dict(cluster.env, RUNPACK_TEST_MARKER="marker-42"))

    job = cluster.wait_for_state(job_id, "COMPLETED")

    assert open(output).read() == "ran with marker-42\n"
    assert (job.name, job.comment, job.partition) == ("runpack-hello", "scaler tag | with spaces", "debug")


@pytest.mark.slow
def test_three_one_cpu_jobs_run_at_once(cluster, tmp_path):
    started = [str(tmp_path / ("started-%d" % n)) for n in range(3)]
    job_ids = [cluster.submit("--ntasks=1", "--cpus-per-task=1", "--partition", "batch", "--output", "/dev/null",
                              "--wrap", "echo $SLURM_JOB_ID > %s; exec sleep 300" % path) for path in started]

    for job_id in job_ids:
        cluster.wait_for_state(job_id, "RUNNING")

    assert sorted(wait_for_file(path, cluster).strip() for path in started) == sorted(job_ids)
    assert [job.state for job in cluster.jobs() if job.id in job_ids] == ["RUNNING"] * 3


@pytest.mark.slow
def test_scancel_ends_a_running_job(cluster, tmp_path):
    pid_file = str(tmp_path / "pid")
    job_id = cluster.submit("--output", "/dev/null", "--wrap", "echo $$ > %s; exec sleep 300" % pid_file)
    job_pid = int(wait_for_file(pid_file, cluster))

    cluster.run("scancel", job_id)

    assert cluster.wait_for_state(job_id, "CANCELLED", timeout=harness.JOBS_END_TIMEOUT_S).state == "CANCELLED"
    assert harness.wait_until_gone([job_pid], 5) == []


def running_cluster_with_a_job(stack, tmp_path, *sbatch_options):
    """A started cluster, entered on ``stack``, and the pid of its running `sleep` job."""
    cluster = stack.enter_context(SlurmCluster())
    pid_file = str(tmp_path / "pid")
    cluster.submit("--output", "/dev/null", *sbatch_options, "--wrap", "echo $$ > %s; exec sleep 300" % pid_file)
    return cluster, int(wait_for_file(pid_file, cluster))


def assert_nothing_left(cluster, pids):
    assert [pid for pid in pids if process_alive(pid)] == []
    assert cluster_processes(cluster.tag) == []
    assert not os.path.exists(os.path.dirname(cluster.conf_path))


@pytest.mark.slow
def test_teardown_leaves_no_process_of_the_cluster_behind(tmp_path):
    require_slurm()
    with contextlib.ExitStack() as stack:
        cluster, job_pid = running_cluster_with_a_job(stack, tmp_path)
        pids = [process.pid for process in cluster.daemons.values()] + cluster_processes(cluster.tag)
        names = {open("/proc/%d/comm" % pid).read().strip() for pid in pids if process_alive(pid)}
        assert {"slurmctld", "slurmd", "slurmstepd", "sleep"} <= names

    assert job_pid in pids
    assert_nothing_left(cluster, pids)


@pytest.mark.slow
def test_teardown_ends_the_jobs_of_a_killed_slurmd(tmp_path):
    """slurmstepd outlives a slurmd killed with SIGKILL; the job, submitted without the cluster's
    environment (--export=NONE), is found as slurmstepd's descendant."""
    require_slurm()
    with contextlib.ExitStack() as stack:
        cluster, job_pid = running_cluster_with_a_job(stack, tmp_path, "--export=NONE")
        pids = cluster_processes(cluster.tag)
        cluster.daemons["slurmd"].send_signal(signal.SIGKILL)
        cluster.daemons["slurmd"].wait()
        assert process_alive(job_pid)

    assert_nothing_left(cluster, pids + [job_pid])


@pytest.mark.slow
def test_a_second_cluster_starts_right_after_the_first(tmp_path):
    require_slurm()
    for name in ("first", "second"):
        with SlurmCluster() as cluster:
            output = str(tmp_path / (name + ".out"))
            job_id = cluster.submit("--output", output, "--wrap", "echo %s" % name)
            cluster.wait_for_state(job_id, "COMPLETED")
            assert open(output).read() == name + "\n"


def without_slurm(monkeypatch, ci):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(harness, "SBIN_FOLDERS", ())
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)


def test_missing_slurm_skips_with_the_install_command(monkeypatch):
    without_slurm(monkeypatch, ci=None)

    assert harness.slurm_available() == (
        False, "slurmctld not installed (apt-get install slurmctld slurmd slurm-client munge)")
    with pytest.raises(pytest.skip.Exception, match=r"slurmctld not installed \(apt-get install"):
        require_slurm()


def test_missing_slurm_fails_under_ci(monkeypatch):
    without_slurm(monkeypatch, ci="true")

    with pytest.raises(pytest.fail.Exception, match=r"CI=true and Slurm is missing: slurmctld not installed"):
        require_slurm()
