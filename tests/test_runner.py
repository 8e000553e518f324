"""The runner's job loop end to end: the real CLI as a subprocess against the fake worker."""

import json
import os
import re
import signal

import pytest

from conftest import RUNNER_KEY, TEST_JOB_TYPES, find_python, run_cli

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

HANDLERS = ("--handlers", TEST_JOB_TYPES)
PYTHONS = ["python3.8", "python3.9", "python3.10", "python3.11", "python3.12", "python3.13"]


def polls_before_last_report(worker):
    routes = [record.route for record in worker.requests]
    last_report = max(i for i, route in enumerate(routes) if route in ("complete", "error"))
    return routes[:last_report].count("available")


def completed(worker, job_id):
    return lambda: worker.job(job_id)["status"] == "completed"


def finished(worker, job_id):
    return lambda: worker.job(job_id)["status"] in ("completed", "failed")


@pytest.mark.parametrize("python", PYTHONS)
def test_hello_world_completes_with_output_console_and_progress(worker, start_runner, python):
    interpreter = find_python(python)
    if interpreter is None:
        pytest.skip("%s is not installed" % python)
    job_id = worker.add_job("hello_world", {"name": "Alice", "processing_time": 1.2})
    runner = start_runner(python=interpreter)
    worker.wait_until(completed(worker, job_id), timeout=20, message="hello_world did not complete")
    job = worker.job(job_id)
    assert job["output_data"] == {"message": "Hello, Alice!", "processing_time": 1.2}
    lines = job["console_output"].splitlines()
    stamp = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
    assert re.match(stamp + r"Starting hello_world job for Alice$", lines[0])
    assert re.match(stamp + r"Processing time: 1.2 seconds$", lines[1])
    assert any(re.match(stamp + r"Progress: \d+%$", line) for line in lines[2:-1])
    assert re.match(stamp + r"Completed!$", lines[-1])
    assert len(job["heartbeats"]) >= 2
    assert job["reports"] == [("complete", job["reports"][0][1])]
    assert runner.stop() == 0


def test_hello_world_says_a_processing_time_of_1_in_the_singular():
    result = run_cli("run", "hello_world", "name=Alice", "processing_time=1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\] Processing time: 1 second$", result.stderr, re.MULTILINE), result.stderr


def test_a_silent_handler_keeps_its_claim_through_runner_heartbeats(worker, start_runner):
    job_id = worker.add_job("sleepy", {"seconds": 2})
    start_runner(*HANDLERS)
    worker.wait_until(completed(worker, job_id), timeout=20)
    # one heartbeat at the start, then one per 0.5 s interval while the handler sleeps
    assert len(worker.job(job_id)["heartbeats"]) >= 3
    assert worker.job(job_id)["output_data"] == {"slept": 2}


def test_invalid_parameters_are_reported_naming_the_parameter(worker, start_runner):
    missing = worker.add_job("hello_world", {"name": "Alice"})
    wrong = worker.add_job("hello_world", {"name": 7, "processing_time": 1})
    start_runner()
    worker.wait_until(lambda: all(worker.job(j)["status"] == "failed" for j in (missing, wrong)))
    assert worker.job(missing)["error_message"] == "Invalid parameters: processing_time is required"
    assert worker.job(wrong)["error_message"] == "Invalid parameters: name must be a non-empty string"


def test_handler_exception_fails_the_job_with_traceback_in_console_and_log(worker, start_runner, tmp_path):
    job_id = worker.add_job("boom", {"why": "disk on fire"})
    runner = start_runner(*HANDLERS)
    worker.wait_until(finished(worker, job_id))
    job = worker.job(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == "Job execution failed: boom: disk on fire"
    assert job["console_output"].startswith("about to fail\n")
    assert "Traceback (most recent call last)" in job["console_output"]
    assert "RuntimeError: boom: disk on fire" in job["console_output"]
    assert runner.stop() == 0
    with open(os.path.join(runner.state_dir, "runpack_runner.log")) as log:
        assert "RuntimeError: boom: disk on fire" in log.read()


def test_console_output_key_leaves_the_output_and_becomes_the_console(worker, start_runner):
    job_id = worker.add_job("console_in_output", {})
    start_runner(*HANDLERS)
    worker.wait_until(completed(worker, job_id))
    assert worker.job(job_id)["output_data"] == {"answer": 42}
    assert worker.job(job_id)["console_output"] == "final console\n"


def test_queue_drains_with_one_poll_one_claim_and_one_report_per_job(worker, start_runner):
    jobs = [worker.add_job("hello_world", {"name": "n%d" % i, "processing_time": 0}) for i in range(20)]
    start_runner("--poll-interval", "30")
    worker.wait_until(lambda: all(worker.job(j)["status"] == "completed" for j in jobs), timeout=30)
    assert polls_before_last_report(worker) == 1
    assert worker.count("claim") == 20
    assert worker.count("complete") == 20
    assert worker.count("heartbeat") == 0, "an instant job needs no heartbeat: the claim is fresh"
    order = [worker.job(j)["updated_at"] for j in jobs]
    assert order == sorted(order), "jobs must be taken oldest first"


def test_a_queue_longer_than_one_list_is_polled_again_only_when_the_list_is_used_up(worker, start_runner):
    jobs = [worker.add_job("hello_world", {"name": "n%d" % i, "processing_time": 0}) for i in range(55)]
    start_runner("--poll-interval", "30")
    worker.wait_until(lambda: all(worker.job(j)["status"] == "completed" for j in jobs), timeout=60)
    assert polls_before_last_report(worker) == 2  # 50 listed, then the last 5
    assert worker.count("claim") == 55


def test_claim_conflict_moves_on_to_another_listed_job_and_never_retries_the_lost_one(worker, start_runner):
    first = worker.add_job("sleepy", {"seconds": 1})
    taken = worker.add_job("hello_world", {"name": "taken", "processing_time": 0})
    last = worker.add_job("hello_world", {"name": "last", "processing_time": 0})
    start_runner(*HANDLERS, "--poll-interval", "30")
    worker.wait_until(lambda: worker.job(first)["status"] == "in_progress")
    other_runner = worker.register_runner("another-runner")
    worker.claim_for(taken, other_runner)
    worker.wait_until(completed(worker, last))
    assert worker.count("claim", job_id=taken, status=409) == 1
    assert worker.job(taken)["claimed_by"] == other_runner
    assert polls_before_last_report(worker) <= 2  # a lost claim is worth one fresh list at most


def test_empty_polls_back_off_by_the_step_up_to_the_cap_and_reset_after_a_job(worker, start_runner):
    runner = start_runner("--poll-interval", "0.1", "--poll-interval-step", "0.1", "--poll-interval-max", "0.3",
                          "--verbose")  # each poll is logged at DEBUG
    worker.wait_until(lambda: worker.count("available") >= 5)
    job_id = worker.add_job("hello_world", {"name": "Bo", "processing_time": 0})
    worker.wait_until(completed(worker, job_id))
    polls_after_job = worker.count("available")
    worker.wait_until(lambda: worker.count("available") >= polls_after_job + 2)
    assert runner.stop() == 0
    announced = re.findall(r"No jobs available; next poll in ([\d.]+) s", runner.output)
    assert announced[:3] == ["0.1", "0.2", "0.3"]
    assert "0.1" in announced[3:], "the interval returns to its start after a job"
    times = [r.at for r in worker.requests if r.route == "available"][:4]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.3


def test_a_poll_interval_above_the_max_is_the_first_wait_only_and_the_idle_line_says_so(worker, start_runner):
    runner = start_runner("--poll-interval", "0.6", "--poll-interval-max", "0.2", "--verbose")
    worker.wait_until(lambda: worker.count("available") >= 4)
    assert runner.stop() == 0
    assert "No jobs available; polling again in 0.6 s, then every 0.2 s until one comes" in runner.output
    assert re.findall(r"No jobs available; next poll in ([\d.]+) s", runner.output)[:3] == ["0.6", "0.2", "0.2"]


def test_only_job_types_this_runner_can_run_are_polled_and_registered(worker, start_runner):
    start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.count("available") >= 1)
    poll = next(r for r in worker.requests if r.route == "available")
    assert "types%5B%5D=hello_world" in poll.path and "types%5B%5D=sleepy" in poll.path
    runner = next(iter(worker.runners.values()))
    assert "hello_world" in runner["capabilities"] and "countdown" not in runner["capabilities"]


def test_identity_is_saved_and_verified_on_the_next_start(worker, start_runner, tmp_path):
    first = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert first.stop() == 0
    with open(os.path.join(first.state_dir, ".runpack_runner.json")) as stream:
        identity = json.load(stream)
    assert re.match(r"^runner-.+-[0-9a-f]{8}$", identity["runner_name"])
    assert identity["runner_id"] in worker.runners
    second = start_runner()
    worker.wait_until(lambda: worker.count("verify") >= 1 and worker.count("available") >= 2)
    assert worker.count("register") == 1
    assert second.stop() == 0


def test_a_forgotten_runner_registers_again_under_the_same_name(worker, start_runner):
    first = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert first.stop() == 0
    (old_id, old_row), = worker.runners.items()
    worker.forget_runner(old_id)
    second = start_runner()
    worker.wait_until(lambda: len(worker.runners) == 1 and worker.count("available") >= 2)
    (new_id, new_row), = worker.runners.items()
    assert new_id != old_id and new_row["name"] == old_row["name"]
    assert "no longer knows runner" in second.output
    with open(os.path.join(second.state_dir, ".runpack_runner.json")) as stream:
        assert json.load(stream)["runner_id"] == new_id
    assert second.stop() == 0


def test_a_runner_the_worker_forgets_while_it_serves_registers_again_and_claims_the_job(worker, start_runner):
    runner = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    (old_id, old_row), = worker.runners.items()
    worker.forget_runner(old_id)  # its claims are answered 500 from now on
    job_id = worker.add_job("hello_world", {"name": "after", "processing_time": 0})
    worker.wait_until(completed(worker, job_id), timeout=20)
    (new_id, new_row), = worker.runners.items()
    assert new_id != old_id and new_row["name"] == old_row["name"]
    assert worker.count("claim", status=500) == 1
    assert "The worker no longer knows this runner; registering again" in runner.output
    assert runner.stop() == 0


def test_a_job_whose_runner_ended_during_each_of_its_attempts_is_failed_not_run_again(
        worker, start_runner, tmp_path):
    runner_id = worker.register_runner("earlier")
    job_id = worker.add_job("hello_world", {"name": "twice interrupted", "processing_time": 0})
    worker.claim_for(job_id, runner_id)
    jobs = tmp_path / "state" / ".runpack_jobs"
    jobs.mkdir(parents=True)
    (jobs / ("%s.json" % job_id)).write_text(json.dumps({
        "job_id": job_id, "job_type": "hello_world", "input_params": {"name": "twice interrupted",
                                                                       "processing_time": 0},
        "runner_id": runner_id, "recorded_at": 0, "attempts": 2}))
    runner = start_runner()
    worker.wait_until(finished(worker, job_id), timeout=20)
    assert worker.job(job_id)["error_message"] == (
        "Job execution failed: the runner process ended while running this job, 2 times")
    assert not (jobs / ("%s.json" % job_id)).exists()
    assert runner.stop() == 0


def test_an_unreadable_identity_file_means_registering_again(worker, start_runner, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / ".runpack_runner.json").write_text("{not json")
    runner = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert worker.count("register") == 1 and "Cannot read" in runner.output
    assert runner.stop() == 0


def test_first_signal_finishes_the_running_job_and_takes_no_other(worker, start_runner):
    running = worker.add_job("hello_world", {"name": "first", "processing_time": 1.5})
    waiting = worker.add_job("hello_world", {"name": "second", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(lambda: worker.job(running)["status"] == "in_progress")
    runner.send(signal.SIGTERM)
    assert runner.wait() == 0
    assert worker.job(running)["status"] == "completed"
    assert worker.job(waiting)["status"] == "pending"
    assert "finishing the running job" in runner.output


def test_second_signal_stops_the_job_now_keeps_its_claim_and_the_next_start_runs_it_again(
        worker, start_runner, tmp_path):
    job_id = worker.add_job("sleepy", {"seconds": 2})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.job(job_id)["status"] == "in_progress")
    runner.send(signal.SIGINT)
    runner.wait_for_output("finishing the running job")
    runner.send(signal.SIGINT)
    assert runner.wait(timeout=10) == 128 + signal.SIGINT
    job = worker.job(job_id)
    assert job["status"] == "in_progress" and job["reports"] == [], "not failed: the worker keeps a failure forever"
    assert os.listdir(str(tmp_path / "state" / ".runpack_jobs")) == [job_id + ".json"]
    assert "stopped by a second shutdown signal" in runner.output
    again = start_runner(*HANDLERS)
    worker.wait_until(completed(worker, job_id), timeout=20)
    assert "attempt 2" in again.output
    assert again.stop() == 0


def test_signal_while_idle_exits_zero_at_once(worker, start_runner):
    runner = start_runner("--poll-interval", "30")
    worker.wait_until(lambda: worker.count("available") >= 1)
    runner.send(signal.SIGTERM)
    assert runner.wait(timeout=5) == 0


def test_chatty_handler_heartbeats_are_coalesced(worker, start_runner):
    job_id = worker.add_job("chatty", {"seconds": 2})
    start_runner(*HANDLERS)
    worker.wait_until(completed(worker, job_id))
    assert worker.job(job_id)["output_data"]["calls"] > 1000
    # at most one heartbeat per 0.5 s: the worker allows 120 a minute
    assert 2 <= len(worker.job(job_id)["heartbeats"]) <= 6


def test_handlers_never_see_the_runner_key(worker, start_runner):
    job_id = worker.add_job("sees_key", {})
    runner = start_runner(*HANDLERS)
    worker.wait_until(completed(worker, job_id))
    assert worker.job(job_id)["output_data"] == {"key_in_environment": False}
    assert runner.stop() == 0
    assert RUNNER_KEY not in runner.output
    for folder, _, files in os.walk(runner.state_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as stream:
                assert RUNNER_KEY.encode() not in stream.read(), name


def test_handlers_module_attr_and_environment_variable_register_job_types(worker, start_runner):
    job_id = worker.add_job("countdown", {"steps": 4})
    start_runner(env={"RUNPACK_HANDLERS": "job_types_for_tests:EXTRA_JOB_TYPES",
                      "PYTHONPATH": os.path.dirname(TEST_JOB_TYPES)})
    worker.wait_until(completed(worker, job_id))
    assert worker.job(job_id)["output_data"] == {"counted": 4}


def test_a_worker_url_that_is_not_a_runpack_worker_is_one_error_line_and_exit_2(worker, start_runner):
    runner = start_runner(worker_url=worker.url + "/not-the-api")
    assert runner.wait() == 2
    assert "ERROR: The worker refused to register this runner (POST /api/runner/register: 404 Not found)" in runner.output
    assert "Traceback" not in runner.output


@pytest.mark.parametrize("isolation", [(), ("--in-process",)], ids=["job-process", "in-process"])
def test_a_handler_raising_job_cancelled_by_itself_is_reported_failed(worker, start_runner, isolation):
    job_id = worker.add_job("cancels_itself", {})
    start_runner(*(HANDLERS + isolation))
    worker.wait_until(finished(worker, job_id))
    assert worker.job(job_id)["error_message"] == "Job execution failed: gave up by itself"
