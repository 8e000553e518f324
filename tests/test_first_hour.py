"""What a new user meets in the first hour: the state directory verdicts of check and runner,
a closed stdout, the --once log line, the progress a completed job ends with."""

import os
import subprocess
import sys

import pytest

from conftest import FAST_SETTINGS, RUNNER_KEY, RUNNER_PY, clean_environment, run_cli

pytestmark = pytest.mark.slow

HANDLERS = ("--handlers", os.path.join(os.path.dirname(os.path.abspath(__file__)), "job_types_for_first_hour.py"))


def runner_verdict(state_dir, worker_url):
    """The exit code and stderr of `runner` on a state directory, stopped at the first hurdle."""
    result = run_cli("runner", "--worker-url", worker_url, "--state-dir", state_dir, "--once",
                     "--idle-timeout", "0.5", *FAST_SETTINGS, env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY}, timeout=30)
    return result.returncode, result.stderr


def check_verdict(state_dir, worker_url):
    result = run_cli("check", "--worker-url", worker_url, "--state-dir", state_dir,
                     env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY})
    state_line = [line for line in result.stdout.splitlines() if line.startswith("State directory")]
    return state_line[0]


@pytest.mark.parametrize("kind", ["missing", "missing_under_a_file", "a_file", "jobs_dir_is_a_file"])
def test_check_and_runner_give_the_same_verdict_on_a_state_directory(worker, tmp_path, kind):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    state_dir = {"missing": tmp_path / "new" / "state", "missing_under_a_file": a_file / "state",
                 "a_file": a_file, "jobs_dir_is_a_file": tmp_path / "state"}[kind]
    if kind == "jobs_dir_is_a_file":
        state_dir.mkdir()
        (state_dir / ".runpack_jobs").write_text("")
    check_says_problem = "PROBLEM" in check_verdict(str(state_dir), worker.url)
    code, stderr = runner_verdict(str(state_dir), worker.url)
    runner_refuses = code == 2 and "state directory" in stderr
    assert check_says_problem == runner_refuses == (kind != "missing"), (kind, code, stderr)
    assert "Traceback" not in stderr


def test_a_closed_stdout_does_not_flood_stderr_and_the_runner_goes_on(worker, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    job_id = worker.add_job("hello_world", {"name": "quiet", "processing_time": 0})
    environment = clean_environment(RUNPACK_RUNNER_API_KEY=RUNNER_KEY)
    runner = subprocess.Popen([sys.executable, RUNNER_PY, "runner", "--worker-url", worker.url, "--state-dir",
                               str(state_dir)] + list(FAST_SETTINGS), env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runner.stdout.readline()  # like `| head -1`: read a line, then close the pipe
    runner.stdout.close()
    try:
        worker.wait_until(lambda: worker.job(job_id)["status"] == "completed", timeout=20)
        later = worker.add_job("hello_world", {"name": "after the pipe closed", "processing_time": 0})
        worker.wait_until(lambda: worker.job(later)["status"] == "completed", timeout=20)
        assert runner.poll() is None, "the runner goes on"
    finally:
        runner.terminate()
        stderr = runner.communicate(timeout=20)[1].decode()
    assert runner.returncode == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[:2000]
    with open(str(state_dir / "runpack_runner.log")) as log:
        assert "Job %s completed" % later in log.read(), "the log file goes on"


def test_once_says_it_stops_after_the_job_has_run(worker, start_runner):
    job_id = worker.add_job("two_thirds", {"seconds": 0.5})
    runner = start_runner(*HANDLERS, "--once")
    assert runner.wait() == 5
    output = runner.output
    assert output.index("Job %s completed" % job_id) < output.index("Stopping: ran 1 job(s)")


def test_a_completed_job_whose_progress_was_shown_ends_at_total_over_total(worker, start_runner):
    job_id = worker.add_job("two_thirds", {"seconds": 1.5})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed", timeout=20)
    job = worker.job(job_id)
    assert job["heartbeats"][0]["progress_current"] == 66, "the worker showed 66/100 while it ran"
    assert (job["progress_current"], job["progress_total"]) == (100, 100)
    assert runner.stop() == 0


def test_an_instant_job_that_reported_progress_costs_no_heartbeat(worker, start_runner):
    job_id = worker.add_job("hello_world", {"name": "instant", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed", timeout=20)
    assert worker.job(job_id)["heartbeats"] == []
    assert runner.stop() == 0


def test_an_idle_runner_says_so_once_and_logs_each_poll_only_with_verbose(worker, start_runner, tmp_path):
    fast = ("--poll-interval", "0.05", "--poll-interval-max", "0.05")
    quiet = start_runner(*fast, state_dir=tmp_path / "quiet")
    verbose = start_runner(*fast, "--verbose", state_dir=tmp_path / "verbose")
    worker.wait_until(lambda: worker.count("available") >= 20)
    assert quiet.stop() == 0 and verbose.stop() == 0
    assert quiet.output.count("No jobs available") == 1
    assert verbose.output.count("No jobs available; next poll in") >= 5


# ---- The command line ------------------------------------------------------------------------


def test_run_without_a_job_type_and_run_help_list_the_job_types():
    bare = run_cli("run")
    assert bare.returncode == 2 and "hello_world" in bare.stderr and "usage: runpack run" in bare.stderr
    assert "hello_world" in run_cli("run", "--help").stdout


def test_the_hidden_job_process_command_is_not_offered():
    result = run_cli("nonsense")
    assert result.returncode == 2 and "_job" not in result.stderr and "_job" not in run_cli("--help").stdout


def test_an_unknown_option_of_run_shows_the_usage_of_run():
    result = run_cli("run", "hello_world", "--bogus")
    assert result.returncode == 2 and "usage: runpack run" in result.stderr


def test_help_names_what_each_flag_takes_and_shows_no_false_defaults():
    text = run_cli("runner", "--help").stdout
    assert "--poll-interval SECONDS" in text and "--concurrency N" in text and "--worker-url URL" in text
    assert "default False" not in text and "VALUE" not in text


def test_params_file_dash_reads_standard_input_and_the_output_keeps_non_ascii():
    result = subprocess.run([sys.executable, RUNNER_PY, "run", "hello_world", "--params-file", "-"],
                            input='{"name": "Zoë", "processing_time": 0}', stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, env=clean_environment(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert '"Hello, Zoë!"' in result.stdout


def test_a_string_parameter_read_as_a_number_gets_a_hint_to_quote_it():
    result = run_cli("run", "hello_world", "name=42", "processing_time=0")
    assert result.returncode == 1
    hint = [line for line in result.stderr.splitlines() if line.startswith("Hint:")]
    assert hint and "name=" in hint[0] and "--params" in hint[0]
    assert not [line for line in run_cli("run", "hello_world", "name=Al", "processing_time=-1").stderr.splitlines()
                if line.startswith("Hint:")], "no hint when the value was a string already"
