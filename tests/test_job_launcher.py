"""The job launcher: job processes forked warm, as isolated as fresh interpreters, and a launcher
whose death, signals or a killed runner lose no job and leave no process behind. The real CLI
against the fake worker."""

import itertools
import os
import signal
import time

import pytest

from conftest import (LAUNCHER_NAME, TESTS, children_of, descendants_of, job_processes_of, launcher_of,
                      process_exists, process_name, read_pid, run_cli)

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

HANDLERS = ("--handlers", os.path.join(TESTS, "job_types_for_operations.py"))
JOB_NUMBERS = itertools.count()
BREAKER = os.path.join(TESTS, "job_types_that_break_the_launcher.py")
EXIT_NO_JOB_PROCESSES = 8


def status_of(worker, job_id):
    return worker.job(job_id)["status"]


def run_jobs(worker, job_type, params_list, timeout=30):
    """Add the jobs one at a time, each once the one before it completed; their outputs. Each
    gets a parameter of its own: the worker hands back a known job for known parameters."""
    outputs = []
    for params in params_list:
        job_id = worker.add_job(job_type, dict(params, job_number=next(JOB_NUMBERS)))
        worker.wait_until(lambda: status_of(worker, job_id) in ("completed", "failed"), timeout=timeout)
        job = worker.job(job_id)
        assert job["status"] == "completed", job
        outputs.append(job["output_data"])
    return outputs


def wait_until_idle(worker):
    polls = worker.count("available")
    worker.wait_until(lambda: worker.count("available") >= polls + 2)


# ---- isolation as strong as a fresh interpreter ---------------------------------------------


def test_each_job_runs_in_a_process_of_its_own_that_does_not_see_the_last_jobs_globals(worker, start_runner):
    runner = start_runner(*HANDLERS)
    outputs = run_jobs(worker, "module_state", [{}] * 3)
    assert [output["count"] for output in outputs] == [1, 1, 1], "a job saw a global another job changed"
    pids = [output["pid"] for output in outputs]
    assert len(set(pids)) == 3 and runner.process.pid not in pids


def test_a_job_whose_forked_child_keeps_its_pipes_open_completes_and_the_child_is_ended(
        worker, start_runner, tmp_path):
    pid_file = str(tmp_path / "child.pid")
    runner = start_runner(*HANDLERS)
    output, = run_jobs(worker, "forks", [{"pid_file": pid_file, "seconds": 60}])
    child = read_pid(pid_file)
    assert output == {"child": child}
    worker.wait_until(lambda: not process_exists(child), timeout=10, message="the job's child lives on")
    after, = run_jobs(worker, "module_state", [{}])
    assert after["count"] == 1
    assert runner.stop() == 0


# ---- warm imports ------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [((), [False, True, True]),
                                             (("--no-warm-imports",), [False, False, False])],
                         ids=["warm", "no-warm-imports"])
def test_a_job_types_warm_modules_are_imported_for_its_later_jobs_not_its_first(
        worker, start_runner, flags, expected):
    start_runner(*(HANDLERS + flags))
    outputs = run_jobs(worker, "warm_probe", [{}] * 3)
    assert [output["warm"] for output in outputs] == expected


def test_an_idle_runner_keeps_its_launcher_only_while_it_keeps_something_warm(worker, start_runner, tmp_path):
    runner = start_runner(*HANDLERS)
    run_jobs(worker, "module_state", [{}])
    wait_until_idle(worker)
    assert children_of(runner.process.pid) == [], "an idle runner with nothing warm keeps its launcher"
    run_jobs(worker, "warm_probe", [{}])
    wait_until_idle(worker)
    launcher_of(runner)  # the launcher keeping warm_probe warm is still there
    assert runner.stop() == 0

    cold = start_runner(*(HANDLERS + ("--no-warm-imports",)), state_dir=tmp_path / "cold")
    run_jobs(worker, "warm_probe", [{}])
    wait_until_idle(worker)
    assert children_of(cold.process.pid) == []


# ---- the launcher's death and signals, a killed runner -------------------------------------


def test_run_says_in_one_line_that_it_cannot_start_a_job_process():
    result = run_cli("run", "module_state", "--handlers", HANDLERS[1] + "," + BREAKER)
    assert result.returncode == 1
    assert "Error: cannot start a job process: the job launcher did not start" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_runner_that_cannot_start_job_processes_says_why_and_stops_before_claiming_a_job(
        worker, start_runner):
    """The launcher starts before the first claim: a runner that could not run a job never takes
    one, and its log holds what the launcher printed (the log file is where operators look)."""
    job_id = worker.add_job("module_state", {})
    broken = start_runner("--handlers", HANDLERS[1] + "," + BREAKER)
    assert broken.wait() == EXIT_NO_JOB_PROCESSES
    with open(os.path.join(broken.state_dir, "runpack_runner.log")) as stream:
        log = stream.read()
    assert "Cannot start job processes: the job launcher did not start" in log
    assert "RuntimeError: this module does not import in the launcher" in log
    assert worker.count("claim") == 0 and status_of(worker, job_id) == "pending"


def test_a_runner_whose_job_processes_stop_starting_stops_and_the_job_runs_at_the_next_start(
        worker, start_runner, tmp_path):
    """Failing job after job would turn a broken machine into a sink for the queue: the worker
    keeps a failure forever."""
    breaking = tmp_path / "break-the-launcher-now"
    env = {"BREAK_LAUNCHER_WHEN": str(breaking)}
    broken = start_runner("--handlers", HANDLERS[1] + "," + BREAKER, env=env)
    wait_until_idle(worker)
    assert children_of(broken.process.pid) == [], "an idle runner with nothing warm keeps no launcher"
    breaking.touch()
    job_id = worker.add_job("module_state", {})
    assert broken.wait() == EXIT_NO_JOB_PROCESSES
    assert "Cannot start job processes: the job launcher did not start" in broken.output
    assert "this module does not import in the launcher" in broken.output
    assert worker.job(job_id)["status"] == "claimed" and worker.job(job_id)["reports"] == []
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: status_of(worker, job_id) == "completed")
    assert worker.job(job_id)["output_data"]["count"] == 1
    assert len(worker.job(job_id)["reports"]) == 1
    assert "running it again" not in runner.output, "a job that never started counts as one that ran"
    assert runner.stop() == 0



def test_a_launcher_killed_mid_drain_loses_no_job_and_the_job_it_had_started_goes_on(
        worker, start_runner, tmp_path):
    pid_file = str(tmp_path / "nap.pid")
    running = worker.add_job("nap", {"pid_file": pid_file, "seconds": 1.5})
    queued = [worker.add_job("nap", {"seconds": 0.05, "n": n}) for n in range(20)]
    runner = start_runner(*HANDLERS)
    job_pid = read_pid(pid_file)
    first_launcher = launcher_of(runner)
    os.kill(first_launcher, signal.SIGKILL)
    worker.wait_until(lambda: status_of(worker, running) == "completed", timeout=15)
    assert worker.job(running)["output_data"] == {"napped": 1.5}
    assert not process_exists(job_pid)
    worker.wait_until(lambda: sum(status_of(worker, job_id) == "completed" for job_id in queued) >= 8, timeout=30)
    second_launcher = launcher_of(runner)
    assert second_launcher != first_launcher
    os.kill(second_launcher, signal.SIGKILL)
    worker.wait_until(lambda: all(status_of(worker, job_id) == "completed" for job_id in queued), timeout=30)
    assert all(len(worker.job(job_id)["reports"]) == 1 for job_id in [running] + queued)
    assert runner.stop() == 0
    assert "Unexpected error" not in runner.output


def test_a_spare_killed_while_it_waits_is_replaced_and_the_next_job_runs(worker, start_runner):
    runner = start_runner(*HANDLERS)
    run_jobs(worker, "warm_probe", [{}])  # warm: the launcher and its spare stay while idle
    launcher = launcher_of(runner)
    worker.wait_until(lambda: children_of(launcher) != [], message="no spare")
    spare, = children_of(launcher)
    assert process_name(spare) == LAUNCHER_NAME
    os.kill(spare, signal.SIGKILL)
    output, = run_jobs(worker, "warm_probe", [{}])
    assert output == {"warm": True}
    assert runner.stop() == 0


def test_sigterm_and_sigint_to_the_launcher_and_its_spare_disturb_no_job(worker, start_runner, tmp_path):
    """What systemd (KillMode=control-group) and Slurm send to every process: the runner's to handle."""
    pid_file = str(tmp_path / "nap.pid")
    job_id = worker.add_job("nap", {"pid_file": pid_file, "seconds": 1.0})
    runner = start_runner(*HANDLERS)
    read_pid(pid_file)
    others = [pid for pid in descendants_of(runner.process.pid) if process_name(pid) == LAUNCHER_NAME]
    assert others, "no launcher"
    for pid in others:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.3)  # the job naps on for a second
    assert [pid for pid in others if not process_exists(pid)] == []
    worker.wait_until(lambda: status_of(worker, job_id) == "completed", timeout=15)
    run_jobs(worker, "module_state", [{}])
    assert runner.stop() == 0


def test_kill_9_of_the_runner_leaves_no_launcher_spare_job_process_or_process_the_job_started(
        worker, start_runner, tmp_path):
    pid_file = str(tmp_path / "child.pid")
    nap_pid_file = str(tmp_path / "nap.pid")
    worker.add_job("forks", {"pid_file": pid_file, "seconds": 60})
    runner = start_runner(*HANDLERS, "--concurrency", "2")
    forked_child = read_pid(pid_file)
    worker.add_job("nap", {"pid_file": nap_pid_file, "seconds": 60})
    job_pid = read_pid(nap_pid_file)
    assert job_pid in job_processes_of(runner.process.pid)
    everything = descendants_of(runner.process.pid)
    assert {job_pid, launcher_of(runner)} <= set(everything)
    runner.process.kill()
    runner.process.wait()
    deadline = time.monotonic() + 10
    while any(process_exists(pid) for pid in everything + [forked_child]):
        assert time.monotonic() < deadline, "left running: %s" % [
            (pid, process_name(pid)) for pid in everything + [forked_child] if process_exists(pid)]
        time.sleep(0.05)
