"""The Slurm scaler (`runpack_runner.py slurm`) end to end: the real CLI against the fake worker and
a real throw-away Slurm cluster (tests/slurm_cluster.py), one per test.

A burst of jobs drains through at most --max-runners batch jobs of runners, each job reported
once; idle runners leave and the queue empties; a runner killed mid-job leaves a state directory
that gets a runner of its own, which runs the job again; a scaler killed with -9 and started again
counts the runners already in Slurm; an sbatch that fails is one warning and a back-off; bad
settings exit with their codes; and the runner key is in no command line and no file. Nothing
here asserts a duration: waits are for states, and rounds are counted in the scaler's log.
"""

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from conftest import RUNNER_KEY, RUNNER_PY, TEST_JOB_TYPES, TESTS, run_cli
from fake_worker import FakeWorker
from slurm_cluster import TAG_VARIABLE, SlurmCluster, cluster_processes, require_slurm, wait_until_gone

import runpack_runner

# The runner settings the scaler passes on to its runners; the scaler polls at --poll-interval.
FAST_SETTINGS = ("--poll-interval", "0.5", "--poll-interval-step", "0.1", "--poll-interval-max", "0.5",
                 "--heartbeat-interval", "0.5", "--request-timeout", "2", "--retry-max", "0.3")
HANDLERS = ("--handlers", TEST_JOB_TYPES)
HELD_JOB_TYPES = os.path.join(TESTS, "job_types_for_metrics.py")  # "held": runs until a file exists
DECISION = re.compile(r"(\d+) jobs? waiting(?:, (\d+) state director(?:y|ies) with a job to run again)?, "
                      r"(\d+) runners? running, (\d+) pending, (\d+) slots? free: submitting (none|\d+)")
QUIET_ROUND = "0 jobs waiting, 0 runners running, 0 pending, 0 slots free: submitting none"
EXIT_USAGE, EXIT_STATE_DIR_BUSY = 2, 4
SCALER_START_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 90


# ---- Fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def worker():
    """A fake worker whose rate limit no poll of these tests reaches (the scaler and its runners
    poll every half second for a minute or more)."""
    with FakeWorker(rate_limit=100000) as fake:
        yield fake
        assert not fake.internal_errors, "the fake worker itself failed:\n%s" % fake.internal_errors


@pytest.fixture
def cluster():
    """A Slurm cluster of this test's own (about a second to start): its teardown ends every job and
    every process started with its environment, the scalers included."""
    require_slurm()
    with SlurmCluster() as started:
        yield started


def scaler_environment(cluster, **overrides):
    """The cluster's environment (SLURM_CONF and its tag) with the runner key and no other Runpack
    setting of the machine running the tests."""
    env = {key: value for key, value in cluster.env.items()
           if key == TAG_VARIABLE or not key.startswith(("RUNPACK_", "NOTIFY_RELAY_"))}
    env["RUNPACK_RUNNER_API_KEY"] = RUNNER_KEY
    env.update(overrides)
    return env


class Scaler:
    """`python runpack_runner.py slurm ...` in the background, its stdout in a file."""

    def __init__(self, command, env, output_path):
        self.command, self.output_path = command, output_path
        self._output = open(output_path, "wb")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=self._output,
                                        stderr=subprocess.STDOUT)

    @property
    def output(self):
        with open(self.output_path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def decisions(self):
        """The scaler's round lines so far, as DECISION matches."""
        return [match for match in map(DECISION.search, self.output.splitlines()) if match]

    def wait_for(self, predicate, timeout=SCALER_START_TIMEOUT_S, message="the scaler's output"):
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            if self.process.poll() is not None:
                raise AssertionError("the scaler exited with %s; %s:\n%s" % (self.process.returncode, message,
                                                                             self.output))
            if time.monotonic() > deadline:
                raise AssertionError("%s never came within %ss:\n%s" % (message, timeout, self.output))
            time.sleep(0.05)

    def wait_for_text(self, text, count=1, timeout=SCALER_START_TIMEOUT_S):
        self.wait_for(lambda output: output.count(text) >= count, timeout, "%d x %r" % (count, text))

    def stop(self, timeout=20):
        """SIGTERM, and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the scaler did not exit within %ss of SIGTERM:\n%s" % (timeout, self.output))

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._output.close()


@pytest.fixture
def start_scaler(tmp_path, worker, cluster):
    """Start the real `slurm` command on ``tmp_path/scaler`` against the fake worker and the cluster:
    ``start_scaler("--max-runners", "3", "--idle-timeout", "2")``; each is stopped at teardown."""
    started = []

    def start(*extra_args, state_dir=None, env=None):
        command = [sys.executable, RUNNER_PY, "slurm", "--state-dir", str(state_dir or tmp_path / "scaler"),
                   "--worker-url", worker.url] + list(FAST_SETTINGS) + list(extra_args)
        scaler = Scaler(command, scaler_environment(cluster, **(env or {})),
                        str(tmp_path / ("scaler-%d.out" % len(started))))
        started.append(scaler)
        return scaler

    yield start
    for scaler in started:
        scaler.close()


def scaler_dir(tmp_path):
    return str(tmp_path / "scaler")


def scaler_identity(state_dir, timeout=SCALER_START_TIMEOUT_S):
    """The scaler's {runner_id, runner_name}, once it has registered with the worker."""
    path = os.path.join(state_dir, ".runpack_runner.json")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the scaler never saved its identity in %s" % path
        time.sleep(0.05)
    return runpack_runner.StateDirectory(state_dir).load_identity()


def scaler_job_name(state_dir):
    """The name of the scaler's batch jobs: runpack-<first 8 characters of its runner id>."""
    return "runpack-" + scaler_identity(state_dir)["runner_id"][:8]


def scaler_jobs(cluster, job_name):
    """The scaler's batch jobs still active in Slurm."""
    return [job for job in cluster.active_jobs() if job.name == job_name]


def slurm_job_of(pid):
    """The id of the Slurm job that process ``pid`` runs in (its SLURM_JOB_ID)."""
    with open("/proc/%d/environ" % pid, "rb") as stream:
        variables = dict(item.split(b"=", 1) for item in stream.read().split(b"\0") if b"=" in item)
    return variables[b"SLURM_JOB_ID"].decode()


def pool_directories(state_dir):
    """{runner id: pool directory} of the runners that took a directory of DIR/runners."""
    pool = runpack_runner.StatePool(os.path.join(state_dir, "runners"))
    identities = {state.path: state.load_identity() for state in pool.directories()}
    return {identity["runner_id"]: path for path, identity in identities.items() if identity}


def read(path):
    with open(path, encoding="utf-8", errors="replace") as stream:
        return stream.read()


def drain_while_sampling(worker, cluster, job_ids, job_name, timeout=DRAIN_TIMEOUT_S):
    """Wait until every job is completed, sampling the scaler's active batch jobs meanwhile;
    the largest number of them seen at once."""
    deadline, most = time.monotonic() + timeout, 0
    while True:
        most = max(most, len(scaler_jobs(cluster, job_name)))
        if all(worker.job(job_id)["status"] == "completed" for job_id in job_ids):
            return most
        if time.monotonic() > deadline:
            raise AssertionError("jobs not completed after %ss; Slurm: %s\n%s"
                                 % (timeout, cluster.jobs(), worker.describe()))
        time.sleep(0.1)


def assert_each_reported_once(worker, job_ids):
    for job_id in job_ids:
        job = worker.job(job_id)
        assert job["status"] == "completed", job
        assert [kind for kind, _ in job["reports"]] == ["complete"], "job %s: reports %s" % (job_id, job["reports"])
        assert worker.count("complete", job_id=job_id, status=200) == 1


def is_in_progress(worker, job_id):
    """True once the job's runner has sent a heartbeat: the job runs."""
    return worker.job(job_id)["status"] == "in_progress"


# ---- How many runners: scaling_decision ---------------------------------------------------


def decide(waiting, runners, held=(), orphans=(), concurrency=1, max_runners=8):
    """scaling_decision for ``runners`` in Slurm ({id: state}), pool directories that live runners
    ``held`` (the jobs each holds) and ``orphans`` (the jobs each holds to settle)."""
    return runpack_runner.scaling_decision(waiting, runpack_runner.PoolSurvey(list(held), list(orphans)),
                                           runners, concurrency, max_runners)


def test_scaling_decision_counts_idle_runners_as_room_and_submits_for_the_rest():
    decision = decide(3, {"1": "RUNNING"}, held=[0])

    assert (decision.submit, decision.running, decision.pending, decision.free) == (2, 1, 0, 1)
    assert str(decision) == "3 jobs waiting, 1 runner running, 0 pending, 1 slot free: submitting 2"


def test_scaling_decision_counts_no_room_in_a_runner_busy_with_its_jobs():
    decision = decide(3, {"1": "RUNNING", "2": "RUNNING"}, held=[1, 1])

    assert (decision.submit, decision.free) == (3, 0)
    assert decide(3, {"1": "RUNNING"}, held=[2], concurrency=4).submit == 1, "2 of its 4 slots are free"


def test_scaling_decision_counts_no_room_in_a_directory_held_by_no_runner_of_the_scaler():
    assert decide(1, {}, held=[0]).submit == 1, "a runner whose batch job has ended holds it yet"
    assert decide(2, {"1": "RUNNING"}, held=[0, 1]).submit == 2, "the runner in Slurm may be the busy one"


def test_scaling_decision_counts_a_runner_without_a_directory_yet_as_all_its_slots():
    assert decide(3, {"1": "PENDING"}).submit == 2
    assert decide(3, {"1": "RUNNING", "2": "RUNNING"}, held=[1]).submit == 2, "one holds a job, one starts"


def test_scaling_decision_credits_no_pending_runner_with_a_directory_that_an_ending_runner_holds():
    """Runner 1 runs and holds a directory; the second one held is its predecessor's, ending:
    the pending runner 2 holds nothing yet, so it takes the orphan, or a waiting job."""
    runners = {"1": "RUNNING", "2": "PENDING"}

    assert decide(0, runners, held=[1, 0], orphans=[1]).submit == 0
    assert decide(2, runners, held=[1, 1]).submit == 1

def test_scaling_decision_counts_a_runner_on_hold_in_slurm_as_pending_and_no_room():
    decision = decide(1, {"1": "REQUEUE_HOLD", "2": "SIGNALING"}, held=[1])

    assert (decision.submit, decision.running, decision.pending, decision.free) == (1, 1, 1, 0)

def test_scaling_decision_never_goes_past_max_runners():
    assert decide(50, {}, max_runners=3).submit == 3
    assert decide(50, {"1": "PENDING"}, orphans=[1, 1], max_runners=3).submit == 2
    assert decide(50, {"1": "RUNNING", "2": "PENDING", "3": "RUNNING"}, held=[1, 1], max_runners=3).submit == 0


def test_scaling_decision_gives_each_orphaned_state_directory_a_runner_even_while_others_are_busy():
    decision = decide(0, {}, orphans=[1, 1])

    assert decision.submit == 2
    assert str(decision) == ("0 jobs waiting, 2 state directories with a job to run again, 0 runners running, "
                             "0 pending, 0 slots free: submitting 2")
    assert decide(0, {"1": "RUNNING"}, held=[1], orphans=[1]).submit == 1
    assert decide(0, {"1": "RUNNING"}, held=[0], orphans=[1]).submit == 1, "an idle runner keeps its own directory"


def test_scaling_decision_lets_a_runner_without_a_directory_yet_take_an_orphaned_one():
    assert decide(0, {"1": "PENDING"}, orphans=[1]).submit == 0
    assert decide(3, {"1": "PENDING"}, orphans=[1]).submit == 3, "its one slot goes to the job to run again"
    assert decide(3, {"1": "PENDING"}, orphans=[1], concurrency=4).submit == 0


def test_scaling_decision_counts_the_concurrency_of_each_runner():
    assert decide(9, {}, concurrency=4).submit == 3
    assert decide(8, {}, concurrency=4).submit == 2
    assert decide(9, {"1": "PENDING"}, concurrency=4).submit == 2


def test_scaling_decision_submits_nothing_when_nothing_waits():
    decision = decide(0, {"7": "RUNNING", "8": "RUNNING"}, held=[0, 1])

    assert (decision.submit, decision.running, decision.pending) == (0, 2, 0)
    assert str(decision) == "0 jobs waiting, 2 runners running, 0 pending, 1 slot free: submitting none"


# ---- Slurm's commands: SlurmClient with stand-in sbatch and squeue on PATH ------------------------


def slurm_client(tmp_path, **commands):
    """A SlurmClient whose PATH holds only shell scripts standing in for Slurm's commands:
    ``slurm_client(tmp_path, sbatch="echo 42")``."""
    folder = tmp_path / "slurm-bin"
    folder.mkdir()
    for name, body in commands.items():
        (folder / name).write_text("#!/bin/sh\n%s\n" % body)
        (folder / name).chmod(0o755)
    return runpack_runner.SlurmClient("runpack-test", {"PATH": "%s:/usr/bin:/bin" % folder})


def test_an_sbatch_message_not_in_utf_8_is_a_failure_of_one_line_not_a_crash(tmp_path):
    slurm = slurm_client(tmp_path, sbatch="printf 'sbatch: error: caf\\351\\n' >&2; exit 1")

    with pytest.raises(runpack_runner.SlurmUnavailable) as failure:
        slurm.submit("#!/bin/sh\n", [])

    assert str(failure.value) == "sbatch failed (exit 1: sbatch: error: caf\ufffd)"
    assert isinstance(failure.value, runpack_runner.TransientError), "the scaler backs off and tries again"


def test_an_sbatch_that_submits_nothing_and_prints_no_job_id_is_a_failure_not_a_runner(tmp_path):
    slurm = slurm_client(tmp_path, sbatch="echo 'sbatch: Job 3 to start at 2024-05-01T10:00:00' >&2")

    with pytest.raises(runpack_runner.SlurmUnavailable) as failure:
        slurm.submit("#!/bin/sh\n", ["--test-only"])

    assert str(failure.value) == "sbatch printed no job id (sbatch: Job 3 to start at 2024-05-01T10:00:00)"


def test_squeue_lists_the_runners_whatever_squeue_variables_the_operator_has_set(tmp_path):
    slurm = slurm_client(tmp_path, squeue='[ -z "$SQUEUE_PARTITION$SQUEUE_CLUSTERS" ] && echo "7 RUNNING"')
    slurm.environ.update(SQUEUE_PARTITION="other", SQUEUE_CLUSTERS="other")

    assert slurm.runners() == {"7": "RUNNING"}


def scaler_against(worker, tmp_path, squeue, max_runners):
    """A SlurmScaler polling the fake worker as a registered runner, with a stand-in squeue
    that prints ``squeue`` and an sbatch that notes each submission in tmp_path/submitted."""
    client = runpack_runner.WorkerClient(worker.url, RUNNER_KEY, 2)
    client.runner_id = worker.register_runner("slurm-scaler")
    slurm = slurm_client(tmp_path, squeue="printf '%s'" % squeue,
                         sbatch="echo submitted >> %s; echo 100" % (tmp_path / "submitted"))
    settings = types.SimpleNamespace(max_runners=max_runners, poll_interval=10.0, concurrency=1,
                                     state_dir=str(tmp_path / "scaler"))
    pool = runpack_runner.StatePool(str(tmp_path / "scaler" / "runners"))
    return runpack_runner.SlurmScaler(settings, client, slurm, pool, "true", [],
                                      runpack_runner.NewJobNotices(None, runpack_runner.Waker()))


def test_runners_that_slurm_signals_or_holds_count_against_max_runners(worker, tmp_path):
    for number in range(5):
        worker.add_job("hello_world", {"name": "n%d" % number})
    scaler = scaler_against(worker, tmp_path, "1 PENDING\\n2 RUNNING\\n3 SIGNALING\\n4 REQUEUE_HOLD\\n",
                            max_runners=3)

    scaler._round(["hello_world"])

    assert not (tmp_path / "submitted").exists(), "4 runners live or held in Slurm, 3 at most"


def test_a_scaler_that_polled_as_often_as_the_worker_allows_waits_rather_than_poll_again(worker, tmp_path):
    """A burst of NotifyRelay notices asks for a round each: the rounds keep to the rule of
    the runners' polls (PollPacer), under the worker's 120 a minute per runner."""
    worker.add_job("hello_world", {"name": "waits"})
    scaler = scaler_against(worker, tmp_path, "", max_runners=3)
    for _ in range(runpack_runner.PollPacer.POLLS_PER_MINUTE):
        scaler.pacer.polled()
    round_thread = threading.Thread(target=scaler._round, args=(["hello_world"],))

    round_thread.start()
    scaler.shutdown(signal.SIGTERM)  # as the handler would: the waiting round ends without its poll
    round_thread.join(30)

    assert not round_thread.is_alive()
    assert worker.count("available") == 0
    assert not (tmp_path / "submitted").exists()


# A stand-in for the runner in the batch script: notes each SIGTERM, and exits 0 on SIGUSR2.
SIGNAL_NOTING_RUNNER = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
def note(line):
    with open(sys.argv[1], "a") as stream:
        stream.write(line + "\\n")
note("started %d" % os.getpid())
while signal.sigwaitinfo({signal.SIGTERM, signal.SIGUSR2}).si_signo == signal.SIGTERM:
    note("TERM")
"""


def wait_for_lines(path, predicate, shell):
    deadline = time.monotonic() + 30
    while not (os.path.exists(str(path)) and predicate(read(str(path)).splitlines())):
        assert shell.poll() is None, "the batch script exited with %s" % shell.returncode
        assert time.monotonic() < deadline, "never came: %s" % (read(str(path)) if os.path.exists(str(path)) else "")
        time.sleep(0.05)
    return read(str(path)).splitlines()


def test_the_batch_script_passes_the_margin_warning_on_once_and_slurms_sigterm_not_again(tmp_path):
    """Slurm's SIGTERM goes to every process of the job; the runner must count it once, so that
    it finishes its job. USR1 (--signal=B:USR1@margin) goes to the shell alone: passed on."""
    (tmp_path / "runner.py").write_text(SIGNAL_NOTING_RUNNER)
    noted = tmp_path / "noted"
    command = "%s %s %s" % (sys.executable, tmp_path / "runner.py", noted)
    shell = subprocess.Popen(["sh", "-c", runpack_runner.SLURM_BATCH_SCRIPT.format(command=command)])
    try:
        runner_pid = int(wait_for_lines(noted, lambda lines: lines, shell)[0].split()[1])

        for pid in (shell.pid, runner_pid):  # as Slurm: scancel, preemption, the time limit
            os.kill(pid, signal.SIGTERM)
        wait_for_lines(noted, lambda lines: "TERM" in lines, shell)  # two TERMs pending would be one
        shell.send_signal(signal.SIGUSR1)  # as --signal=B:USR1@margin
        wait_for_lines(noted, lambda lines: lines.count("TERM") >= 2, shell)
        os.kill(runner_pid, signal.SIGUSR2)

        assert shell.wait(30) == 0
        assert read(str(noted)).splitlines()[1:] == ["TERM", "TERM"], "one from Slurm, one from USR1"
    finally:
        if shell.poll() is None:
            shell.kill()

# ---- What sbatch gets, and the state pool (values only) --------------------------------------------


def sbatch_settings(**changes):
    settings = dict(state_dir="/shared/100% runpack", stop_margin=299.5, concurrency=2,
                    sbatch_header="header.sh", sbatch_options=[])
    settings.update(changes)
    return types.SimpleNamespace(**settings)


def test_sbatch_gets_the_header_lines_read_as_a_shell_would_then_the_options_given():
    header = ["#!/bin/sh", "#SBATCH --time=4:00:00  # four hours", '#SBATCH --comment "Runpack runners"',
              "# SBATCH --partition=ignored", "echo not an option"]
    options = runpack_runner.sbatch_options(sbatch_settings(sbatch_options=["--partition=cpu"]), header)

    assert options == ["--output=/shared/100%% runpack/logs/runner-%j.out", "--signal=B:USR1@300",
                       "--cpus-per-task=2", "--time=4:00:00", "--comment", "Runpack runners", "--partition=cpu"]



def test_an_sbatch_option_given_as_a_flag_wins_over_the_environments():
    environ = {"RUNPACK_SBATCH_OPTIONS": "--partition=cpu --time=1:00:00"}

    options = runpack_runner.given_sbatch_options(["--partition=gpu"], environ)

    assert options == ["--partition=cpu", "--time=1:00:00", "--partition=gpu"], "sbatch takes the later one"


def test_each_sbatch_option_flag_is_read_as_a_shell_would():
    options = runpack_runner.given_sbatch_options(["--time 04:00:00", "--comment='Runpack runners'"], {})

    assert options == ["--time", "04:00:00", "--comment=Runpack runners"]
    with pytest.raises(runpack_runner.ConfigurationError, match="^cannot read --sbatch-option --comment 'x: "):
        runpack_runner.given_sbatch_options(["--comment 'x"], {})


def test_sbatch_header_lines_after_the_first_command_are_not_options_as_for_sbatch():
    header = ["#!/bin/sh", "", "   # a comment", "#SBATCH --time=4:00:00", "module load python",
              "#SBATCH --partition=ignored"]

    options = runpack_runner.sbatch_options(sbatch_settings(), header)

    assert options[3:] == ["--time=4:00:00"]

@pytest.mark.parametrize("option", ["--job-name=mine", "--job=mine", "-J", "-Jmine", "--array=1-4", "--arr=1-4",
                                    "-a1-4", "--clusters=other", "-M", "--wrap=hostname"])
def test_sbatch_options_that_would_hide_or_multiply_the_runners_are_refused_in_every_spelling(option):
    with pytest.raises(runpack_runner.ConfigurationError, match="cannot take the sbatch option %s: " % re.escape(option)):
        runpack_runner.sbatch_options(sbatch_settings(sbatch_options=[option]), [])


def test_an_sbatch_header_line_that_a_shell_could_not_read_is_refused_naming_the_line():
    with pytest.raises(runpack_runner.ConfigurationError, match="^cannot read line 2 of --sbatch-header header.sh: "):
        runpack_runner.sbatch_options(sbatch_settings(), ["#!/bin/sh", '#SBATCH --comment "unclosed'])


def test_runners_get_the_scalers_environment_less_the_variables_each_runner_has_its_own():
    environ = {"RUNPACK_RUNNER_API_KEY": "k", "RUNPACK_HANDLERS": "jobs.py", "PATH": "/usr/bin",
               "RUNPACK_LISTEN": "127.0.0.1:9100", "NOTIFY_RELAY_SUBSCRIBE_ID": "one-for-all",
               "RUNPACK_STATE_DIR": "/scaler", "RUNPACK_STATE_POOL": "/pool", "RUNPACK_ONCE": "1"}

    assert runpack_runner.slurm_runner_environment(environ) == {
        "RUNPACK_RUNNER_API_KEY": "k", "RUNPACK_HANDLERS": "jobs.py", "PATH": "/usr/bin"}


def test_the_pool_surveys_the_jobs_of_held_directories_and_of_orphaned_ones_and_skips_what_is_no_directory(tmp_path):
    pool = runpack_runner.StatePool(str(tmp_path))
    for number, jobs in ((1, 2), (2, 0), (3, 1)):
        state = runpack_runner.StateDirectory(str(tmp_path / str(number)))
        state.prepare()
        for job in range(jobs):
            state.save_job({"job_id": "job-%d-%d" % (number, job), "report": None})
    (tmp_path / "4").write_text("not a state directory")

    with pool_directory_held(str(tmp_path / "3")):
        assert pool.survey() == runpack_runner.PoolSurvey(held=[1], orphans=[2])
        taken = pool.take()
        assert taken.path == str(tmp_path / "1"), "the orphaned directory first"
    assert pool.survey() == runpack_runner.PoolSurvey(held=[2], orphans=[1])
    taken.unlock()


def test_a_lock_that_fails_for_want_of_locks_is_not_taken_for_another_runners():
    assert runpack_runner._held_by_another(OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable"))
    assert not runpack_runner._held_by_another(OSError(errno.ENOLCK, "No locks available"))


def test_a_state_directory_whose_lock_file_cannot_be_opened_is_a_configuration_error(tmp_path):
    state = runpack_runner.StateDirectory(str(tmp_path))
    os.mkdir(os.path.join(str(tmp_path), state.LOCK_FILE))

    with pytest.raises(runpack_runner.ConfigurationError, match="^cannot use the state directory "):
        state.lock()


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-12", 129600),
                                           ("1-12:30", 131400), ("1-12:30:05", 131405), ("0", None),
                                           ("UNLIMITED", None), ("INFINITE", None), ("soon", None)])
def test_slurm_time_limits_are_read_in_every_spelling_sbatch_takes(text, seconds):
    assert runpack_runner.slurm_time_limit_seconds(text) == seconds


@pytest.mark.parametrize("options, seconds", [(["--time=10"], 600), (["--time", "1:00:00"], 3600), (["-t", "5"], 300),
                                              (["-t7"], 420), (["--time=10", "-t", "20"], 1200),
                                              (["--partition=cpu"], None)])
def test_the_runners_time_limit_is_the_last_time_option_as_for_sbatch(options, seconds):
    assert runpack_runner.runners_time_limit(["--output=x"] + options) == seconds


def test_a_time_limit_longer_than_the_stop_margin_is_taken():
    runpack_runner.check_time_limit(["--time=6"], 300)  # 360 s: a minute to take a job


@pytest.mark.parametrize("setting, message", [
    (("--sbatch-option=--array=1-8",), "Error: the scaler cannot take the sbatch option --array=1-8: "),
    (("--stop-margin", "70000"), "Error: --stop-margin can be at most 65535 s, as sbatch --signal takes"),
    ({"RUNPACK_SBATCH_OPTIONS": "--comment 'unclosed"}, "Error: cannot read RUNPACK_SBATCH_OPTIONS: "),
    (("--sbatch-option", "--job-name runpack"), "Error: the scaler cannot take the sbatch option --job-name: "),
    ({"SBATCH_ARRAY_INX": "1-4"}, "Error: the scaler cannot take SBATCH_ARRAY_INX=1-4 from the environment: "),
    ({"SBATCH_CLUSTERS": "other"}, "Error: the scaler cannot take SBATCH_CLUSTERS=other from the environment: "),
    (("--sbatch-header", "HEADER"), "Error: cannot read --sbatch-header "),
    (("--sbatch-option", "-t 5"), "Error: the runners' time limit (300 s) is not longer than --stop-margin (300 s): "),
], ids=["refused option", "stop margin", "options variable", "option of two words", "array variable",
       "clusters variable", "header not utf-8", "time limit within the margin"])
def test_bad_sbatch_settings_exit_2_with_one_line_before_anything_starts(tmp_path, setting, message):
    header = tmp_path / "header.sh"
    header.write_bytes(b"#SBATCH --comment caf\xe9\n")
    flags = [str(header) if word == "HEADER" else word for word in setting] if isinstance(setting, tuple) else []
    env = dict(setting) if isinstance(setting, dict) else {}
    env["RUNPACK_RUNNER_API_KEY"] = RUNNER_KEY
    result = run_cli("slurm", "--max-runners", "2", "--state-dir", str(tmp_path / "scaler"), *flags, env=env)

    assert result.returncode == EXIT_USAGE
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert not os.path.exists(str(tmp_path / "scaler"))


# ---- Scaling with the jobs -------------------------------------------------------------------


@pytest.mark.slow
def test_a_burst_drains_through_at_most_max_runners_with_each_job_reported_once(
        worker, cluster, start_scaler, tmp_path):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 1})
               for number in range(12)]

    start_scaler("--max-runners", "3", "--idle-timeout", "2")
    job_name = scaler_job_name(scaler_dir(tmp_path))
    most_at_once = drain_while_sampling(worker, cluster, job_ids, job_name)

    assert_each_reported_once(worker, job_ids)
    assert 1 <= most_at_once <= 3
    runners = pool_directories(scaler_dir(tmp_path))
    claimed_by = {worker.job(job_id)["claimed_by"] for job_id in job_ids}
    assert len(claimed_by) > 1, "one runner ran every job"
    assert claimed_by <= set(runners), "jobs claimed by runners that have no pool directory"


@pytest.mark.slow
def test_a_job_that_comes_while_the_only_runner_is_busy_gets_a_runner_of_its_own(
        worker, cluster, start_scaler, tmp_path):
    gate = tmp_path / "gate"
    long_job = worker.add_job("held", {"gate": str(gate), "seconds": 120})
    scaler = start_scaler("--max-runners", "2", "--idle-timeout", "30", "--handlers", HELD_JOB_TYPES)
    worker.wait_until(lambda: is_in_progress(worker, long_job), timeout=60, message="the long job never started")

    short_job = worker.add_job("held", {"gate": str(tmp_path), "seconds": 0})
    worker.wait_until(lambda: worker.job(short_job)["status"] == "completed", timeout=DRAIN_TIMEOUT_S,
                      message="the job that came later waited for the busy runner")

    assert worker.job(long_job)["status"] == "in_progress"
    assert worker.job(short_job)["claimed_by"] != worker.job(long_job)["claimed_by"]
    assert "1 job waiting, 1 runner running, 0 pending, 0 slots free: submitting 1" in scaler.output
    gate.touch()
    worker.wait_until(lambda: worker.job(long_job)["status"] == "completed", timeout=30)


@pytest.mark.slow
def test_idle_runners_leave_and_the_scaler_submits_nothing_while_nothing_waits(
        worker, cluster, start_scaler, tmp_path):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 1})
               for number in range(3)]
    scaler = start_scaler("--max-runners", "2", "--idle-timeout", "2", "--verbose")
    job_name = scaler_job_name(scaler_dir(tmp_path))
    drain_while_sampling(worker, cluster, job_ids, job_name)

    cluster.wait_for_no_jobs(timeout=60)
    ended = [job for job in cluster.jobs() if job.name == job_name]  # for MinJobAge seconds
    assert scaler.process.poll() is None, "the scaler exited:\n" + scaler.output
    submitted, quiet_rounds = scaler.output.count("Submitted runner"), scaler.output.count(QUIET_ROUND)
    scaler.wait_for_text(QUIET_ROUND, count=quiet_rounds + 4)

    assert scaler.output.count("Submitted runner") == submitted
    assert scaler_jobs(cluster, job_name) == []
    assert ended and {job.state for job in ended} == {"COMPLETED"}, "an idle runner's exit is no failure"
    assert_each_reported_once(worker, job_ids)
    for pool_dir in pool_directories(scaler_dir(tmp_path)).values():
        assert "(--idle-timeout)" in read(os.path.join(pool_dir, "runpack_runner.log"))


@pytest.mark.slow
def test_without_verbose_the_scaler_logs_only_its_submissions_and_the_queue_going_quiet(
        worker, cluster, start_scaler, tmp_path):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 1})
               for number in range(2)]
    scaler = start_scaler("--max-runners", "1", "--idle-timeout", "1")
    scaler_id = scaler_identity(scaler_dir(tmp_path))["runner_id"]
    drain_while_sampling(worker, cluster, job_ids, "runpack-" + scaler_id[:8])
    cluster.wait_for_no_jobs(timeout=60)
    scaler.wait_for_text(QUIET_ROUND)
    rounds = worker.count("available", runner_id=scaler_id)
    worker.wait_until(lambda: worker.count("available", runner_id=scaler_id) >= rounds + 3, timeout=30,
                      message="the scaler stopped polling")

    lines = [line for line in scaler.output.splitlines() if DECISION.search(line)]
    logged = read(os.path.join(scaler_dir(tmp_path), "runpack_slurm.log")).splitlines()
    assert [line for line in logged if DECISION.search(line)] == lines, "the log file and stdout differ"
    assert lines[0].endswith("INFO: 2 jobs waiting, 0 runners running, 0 pending, 0 slots free: submitting 1"), lines
    assert all(" INFO: " in line for line in lines), lines
    said = [DECISION.search(line).group(0) for line in lines]
    assert all(line.startswith("0 jobs waiting") for line in said if line.endswith("submitting none")), said
    assert all(earlier != later for earlier, later in zip(said, said[1:])), said
    assert said[-1] == QUIET_ROUND
    assert len(lines) < worker.count("available", runner_id=scaler_id)


# ---- Runners that die, a scaler that dies ---------------------------------------------------------


@contextlib.contextmanager
def pool_directory_held(path):
    """Hold the lock of the pool directory ``path``, as a live runner would, so that a runner
    started meanwhile takes another one."""
    state = runpack_runner.StateDirectory(path)
    state.prepare()
    state.lock()
    try:
        yield state
    finally:
        state.unlock()


@pytest.mark.slow
def test_a_runner_killed_mid_job_gets_a_new_runner_on_its_state_directory_that_reports_once(
        worker, cluster, start_scaler, tmp_path):
    """The killed runner works in DIR/runners/2 while DIR/runners/1, free and empty, comes first
    in the pool: the job runs again only if the new runner prefers the directory with its record."""
    marker = str(tmp_path / "started")
    free_dir, orphan_dir = (os.path.join(scaler_dir(tmp_path), "runners", name) for name in ("1", "2"))
    job_id = worker.add_job("counted_sleep", {"marker": marker, "seconds": 6})
    with pool_directory_held(free_dir):
        scaler = start_scaler("--max-runners", "2", "--idle-timeout", "2", *HANDLERS)
        job_name = scaler_job_name(scaler_dir(tmp_path))
        worker.wait_until(lambda: is_in_progress(worker, job_id) and os.path.exists(marker), timeout=60,
                          message="the job never started in a runner")
    first_runner = worker.job(job_id)["claimed_by"]
    assert pool_directories(scaler_dir(tmp_path))[first_runner] == orphan_dir
    runner_pid = int(read(os.path.join(orphan_dir, ".runpack_runner.lock")))
    killed = slurm_job_of(runner_pid)
    assert killed in [job.id for job in scaler_jobs(cluster, job_name)]

    cluster.run("scancel", "--full", "--signal=KILL", killed)

    assert wait_until_gone([runner_pid], 15) == [], "the runner outlived scancel --signal=KILL"
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed", timeout=DRAIN_TIMEOUT_S,
                      message="the job never completed after its runner was killed")
    assert_each_reported_once(worker, job_ids=[job_id])
    assert worker.job(job_id)["claimed_by"] == first_runner
    assert read(marker).count("started") == 2, "the job did not run again: %s" % read(marker)
    assert "running it again" in read(os.path.join(orphan_dir, "runpack_runner.log"))
    orphan_rounds = [match.group(0) for match in scaler.decisions() if match.group(2) == "1"]
    assert any(line.startswith("0 jobs waiting") and line.endswith("submitting 1") for line in orphan_rounds), \
        "no runner for the orphaned directory while nothing waited:\n" + scaler.output


@pytest.mark.slow
def test_a_scaler_killed_and_started_again_counts_the_runners_already_in_slurm(
        worker, cluster, start_scaler, tmp_path):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 4})
               for number in range(4)]
    first = start_scaler("--max-runners", "2", "--idle-timeout", "2", "--verbose")
    first.wait_for_text("Submitted runner", count=2)
    job_name = scaler_job_name(scaler_dir(tmp_path))

    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    assert len(scaler_jobs(cluster, job_name)) == 2
    second = start_scaler("--max-runners", "2", "--idle-timeout", "2", "--verbose")
    most_at_once = drain_while_sampling(worker, cluster, job_ids, job_name)

    assert most_at_once <= 2
    assert_each_reported_once(worker, job_ids)
    second.wait_for(lambda output: DECISION.search(output), message="a round of the second scaler")
    first_round = second.decisions()[0]
    running, pending, submit = int(first_round.group(3)), int(first_round.group(4)), first_round.group(6)
    assert (running + pending, submit) == (2, "none"), first_round.group(0)


# ---- sbatch failing, bad settings ---------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_sbatch_is_one_warning_then_quiet_retries_and_sigterm_exits_0(
        worker, cluster, start_scaler, tmp_path):
    worker.add_job("hello_world", {"name": "waits", "processing_time": 0})

    scaler = start_scaler("--max-runners", "2", "--sbatch-option=--partition=nope", "--verbose")
    scaler.wait_for_text("Cannot scale yet", count=3)

    assert scaler.process.poll() is None
    failures = [line for line in scaler.output.splitlines() if "sbatch failed (exit" in line]
    warnings = [line for line in failures if "WARNING:" in line]
    assert len(warnings) == 1, warnings
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in warnings[0], warnings[0]
    assert all("DEBUG:" in line for line in failures if line not in warnings)
    assert cluster.jobs() == []
    assert scaler.stop() == 0


@pytest.mark.slow
def test_a_runner_that_fails_in_slurm_is_warned_of_once_with_its_error_and_the_next_ones_wait_longer(
        worker, cluster, start_scaler):
    """--export=NONE (some sites' default) keeps the key from the runner: it fails at once. The
    scaler must not submit a failing runner every round."""
    worker.add_job("hello_world", {"name": "waits", "processing_time": 0})
    scaler = start_scaler("--max-runners", "2", "--sbatch-option=--export=NONE", "--verbose")
    scaler.wait_for_text("failed in Slurm", count=3)
    failures = [line for line in scaler.output.splitlines() if "failed in Slurm" in line]
    assert "WARNING:" in failures[0] and all("DEBUG:" in line for line in failures[1:])
    assert "says: Error: RUNPACK_RUNNER_API_KEY environment variable is not set" in failures[0]
    waits = [float(re.search(r"the next runner waits ([\d.]+) s", line).group(1)) for line in failures]
    assert waits == sorted(waits) and waits[-1] > waits[0], "the waits grow"
    assert scaler.stop() == 0


@pytest.mark.slow
def test_the_scaler_without_max_runners_exits_2_with_one_line(worker, tmp_path):
    result = run_cli("slurm", "--state-dir", str(tmp_path / "scaler"), "--worker-url", worker.url,
                     env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY})

    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().splitlines() == ["Error: give the most runners to keep in Slurm: --max-runners N"]


@pytest.mark.slow
def test_the_scaler_without_a_key_exits_2_naming_the_variable(worker, tmp_path):
    result = run_cli("slurm", "--max-runners", "2", "--state-dir", str(tmp_path / "scaler"),
                     "--worker-url", worker.url)

    assert result.returncode == EXIT_USAGE
    assert "RUNPACK_RUNNER_API_KEY" in result.stderr.splitlines()[0]
    assert worker.requests == []


@pytest.mark.slow
def test_the_scaler_without_sbatch_on_path_exits_2_naming_sbatch(worker, tmp_path):
    result = run_cli("slurm", "--max-runners", "2", "--state-dir", str(tmp_path / "scaler"),
                     "--worker-url", worker.url, env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY, "PATH": "/nonexistent"})

    assert result.returncode == EXIT_USAGE
    assert len(result.stderr.strip().splitlines()) == 1 and "sbatch" in result.stderr, result.stderr
    assert worker.requests == []


@pytest.mark.slow
def test_a_second_scaler_on_the_same_state_directory_exits_4(worker, cluster, start_scaler, tmp_path):
    first = start_scaler("--max-runners", "2")
    first.wait_for_text(QUIET_ROUND)

    second = subprocess.run([sys.executable, RUNNER_PY, "slurm", "--max-runners", "2", "--state-dir",
                             scaler_dir(tmp_path), "--worker-url", worker.url],
                            env=scaler_environment(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert second.returncode == EXIT_STATE_DIR_BUSY, second.stderr
    assert "another scaler" in second.stderr
    assert first.process.poll() is None
    assert first.stop() == 0


# ---- The key ----------------------------------------------------------------------------------


def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as stream:
            return stream.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_the_runner_key_is_in_no_command_line_no_batch_script_and_no_file(
        worker, cluster, start_scaler, tmp_path):
    job_id = worker.add_job("hello_world", {"name": "secret keeper", "processing_time": 4})
    start_scaler("--max-runners", "1", "--idle-timeout", "1")
    job_name = scaler_job_name(scaler_dir(tmp_path))
    worker.wait_until(lambda: is_in_progress(worker, job_id), timeout=60, message="the job never started in a runner")
    [runner_job] = scaler_jobs(cluster, job_name)

    shown = cluster.run("scontrol", "show", "job", runner_job.id).stdout
    script = cluster.run("scontrol", "write", "batch_script", runner_job.id, "-").stdout
    command_lines = [command_line(pid) for pid in cluster_processes(cluster.tag)]
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed", timeout=60)
    cluster.wait_for_no_jobs(timeout=60)

    assert job_name in shown and RUNNER_KEY not in shown
    assert "runner --state-pool" in script and RUNNER_KEY not in script
    assert any("runner --state-pool" in line for line in command_lines), command_lines
    assert [line for line in command_lines if RUNNER_KEY in line] == []
    files = [os.path.join(folder, name) for folder, _, names in os.walk(scaler_dir(tmp_path)) for name in names]
    assert any(path.endswith("runpack_runner.log") for path in files), files
    holding_the_key = []
    for path in files:
        with open(path, "rb") as stream:
            if RUNNER_KEY.encode() in stream.read():
                holding_the_key.append(path)
    assert holding_the_key == []
