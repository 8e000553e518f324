"""Reliability end to end: the real runner CLI against a fake worker that fails on purpose.

The worker never times out a job and keeps a failure forever, so the runner alone must make
every claimed job end in exactly one accepted report, whatever the network, the worker or the
runner's own process does. Each test breaks one thing and then checks the worker's final state:
every job completed or failed exactly once, none left claimed, and the runner key seen by the
worker only.
"""

import json
import os
import re
import signal
import socket
import time

import pytest

from conftest import RUNNER_KEY, TEST_JOB_TYPES, process_exists
from fake_worker import RecordingServer, js_length

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

HANDLERS = ("--handlers", TEST_JOB_TYPES)
CONSOLE_LIMIT = 1048576
OUTPUT_JSON_LIMIT = 512000
ERROR_MESSAGE_LIMIT = 10240
EXIT_USAGE, EXIT_KEY_REJECTED, EXIT_STATE_DIR_BUSY = 2, 3, 4


# ---- Helpers ----------------------------------------------------------------------


def status_is(worker, job_id, *statuses):
    return lambda: worker.job(job_id)["status"] in statuses


def log_text(runner):
    with open(os.path.join(runner.state_dir, "runpack_runner.log"), encoding="utf-8") as stream:
        return stream.read()


def log_lines(runner, *fragments, level="WARNING"):
    """Lines of the runner's log file at ``level`` that contain every fragment."""
    return [line for line in log_text(runner).splitlines()
            if "] %s: " % level in line and all(fragment in line for fragment in fragments)]


def job_records(runner):
    folder = os.path.join(runner.state_dir, ".runpack_jobs")
    return sorted(name for name in os.listdir(folder) if name.endswith(".json"))


def read_job_record(runner, job_id):
    with open(os.path.join(runner.state_dir, ".runpack_jobs", job_id + ".json"), encoding="utf-8") as stream:
        return json.load(stream)


def runner_identity(runner):
    with open(os.path.join(runner.state_dir, ".runpack_runner.json"), encoding="utf-8") as stream:
        return json.load(stream)["runner_id"]


def marker_lines(path):
    if not os.path.exists(str(path)):
        return []
    with open(str(path)) as stream:
        return stream.read().splitlines()


def assert_reported_once(worker, expected):
    """``expected``: job id -> "completed" or "failed". Each got exactly one accepted report."""
    for job_id, status in expected.items():
        job = worker.job(job_id)
        assert job["status"] == status, worker.describe()
        kind = "complete" if status == "completed" else "error"
        assert [report for report, _ in job["reports"]] == [kind], worker.describe()


def assert_nothing_left_claimed(worker):
    assert worker.jobs("claimed") == [] and worker.jobs("in_progress") == [], worker.describe()


def assert_key_seen_only_by_the_worker(worker, *runners):
    """The key went in the Authorization header to the worker, and nowhere else: not in the
    output or log, not in any file of the state directory, not in any stored job field."""
    for request in worker.requests:
        if request.route not in ("health", "submit", "unknown"):
            assert request.authorization == "Bearer " + RUNNER_KEY
    for job in worker.jobs():
        for field in ("console_output", "output_data", "error_message"):
            assert RUNNER_KEY not in json.dumps(job[field]), "key stored in job %s" % field
        assert RUNNER_KEY not in json.dumps(job["heartbeats"])
    for runner in runners:
        assert RUNNER_KEY not in runner.output
        for folder, _, files in os.walk(runner.state_dir):
            for name in files:
                with open(os.path.join(folder, name), "rb") as stream:
                    assert RUNNER_KEY.encode() not in stream.read(), "key written to %s" % name


def assert_settled(worker, runner, expected, *more_runners):
    """The final state every scenario must reach."""
    assert_reported_once(worker, expected)
    assert_nothing_left_claimed(worker)
    assert job_records(runner) == [], "custody records left behind"
    assert_key_seen_only_by_the_worker(worker, runner, *more_runners)
    assert_no_crash(runner)


def assert_no_crash(runner):
    """No traceback in the output but those of job handlers that raised, which are logged on purpose."""
    output = runner.output
    assert "Unexpected error" not in output
    assert output.count("Traceback") == output.count("raised an exception:"), output


def no_400_was_answered(worker):
    return worker.count(status=400) == 0


# ---- Timeouts: a worker that accepts and never answers ------------------------------


def test_a_poll_that_never_gets_an_answer_times_out_and_the_loop_carries_on(worker, start_runner):
    worker.add_fault("hang", route="available", times=1)
    job_id = worker.add_job("hello_world", {"name": "after the hang", "processing_time": 0})
    runner = start_runner("--request-timeout", "1")
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.count("available") >= 2
    assert len(log_lines(runner, "GET /api/runner/jobs/available", "timed out")) == 1
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_heartbeat_and_a_report_that_never_get_an_answer_stall_neither_the_job_nor_later_heartbeats(
        worker, start_runner):
    job_id = worker.add_job("sleepy", {"seconds": 3})
    worker.add_fault("hang", route="heartbeat", times=1)
    worker.add_fault("hang", route="complete", times=1)
    runner = start_runner(*HANDLERS, "--request-timeout", "1")
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    heartbeats = worker.job(job_id)["heartbeats"]
    assert len(heartbeats) >= 2, "heartbeats must go on after the one that hung"
    assert worker.count("complete", job_id=job_id) == 2
    assert len(log_lines(runner, "Heartbeat for job %s failed" % job_id, "timed out")) == 1
    assert len(log_lines(runner, "Delivering the report of job %s failed" % job_id, "timed out")) == 1
    later = worker.add_job("hello_world", {"name": "next", "processing_time": 0})
    worker.wait_until(status_is(worker, later, "completed"), timeout=20)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed", later: "completed"})


# ---- Retries: unreachable, 5xx, 429, 401 -------------------------------------------


def test_a_worker_down_at_start_is_retried_until_it_answers(worker, start_runner):
    job_id = worker.add_job("hello_world", {"name": "patient", "processing_time": 0})
    worker.go_down()
    runner = start_runner("--verbose")
    deadline = time.monotonic() + 15
    while len(re.findall(r"Cannot register with the worker yet", runner.output)) < 3:
        assert runner.process.poll() is None, "the runner gave up:\n" + runner.output
        assert time.monotonic() < deadline, runner.output
        time.sleep(0.05)
    assert worker.runners == {}
    worker.come_up()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert re.search(r"The worker answers again, after \d+ failed tries in [\d.]+ s", runner.output)
    warnings = log_lines(runner, "Cannot register with the worker yet")
    tries = warnings + log_lines(runner, "Cannot register with the worker yet", level="DEBUG")
    assert len(warnings) == 1 and len(tries) >= 3, "a spell of one kind of failure is one warning"
    assert all("refused" in line.lower() for line in tries)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_bursts_of_5xx_cost_one_warning_each_with_capped_jittered_backoff_and_the_loop_survives(
        worker, start_runner):
    worker.add_fault("status", route="available", times=8, status=500)
    worker.add_fault("reset", route="available", times=2)
    worker.add_fault("status", route="heartbeat", times=3, status=502)
    job_id = worker.add_job("sleepy", {"seconds": 1.5})
    runner = start_runner(*HANDLERS + ("--verbose",))
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.count("available", status=500) == 8
    error_500 = "GET /api/runner/jobs/available: worker error 500"
    assert len(log_lines(runner, error_500)) == 1, "a spell of one kind of failure is one warning"
    poll_tries = log_lines(runner, error_500) + log_lines(runner, error_500, level="DEBUG")
    assert len(poll_tries) == 8, "each failed poll is logged, at DEBUG after the first"
    reset = "GET /api/runner/jobs/available: cannot reach the worker"
    assert len(log_lines(runner, reset)) == 1 and len(log_lines(runner, reset, level="DEBUG")) == 1, \
        "a new kind of failure in the spell is warned of once"
    delays = [float(re.search(r"trying again in ([\d.]+) s", line).group(1)) for line in poll_tries]
    assert all(0 <= delay <= 0.3 for delay in delays), "backoff must be capped by --retry-max 0.3"
    assert len(set(delays)) > 1, "full jitter: the waits are random"
    # a spell of failing heartbeats is one warning, not one per heartbeat
    assert len(log_lines(runner, "Heartbeat for job %s failed" % job_id)) == 1
    assert runner.process.poll() is None
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_429_waits_until_the_reset_time_not_the_short_backoff(worker, start_runner):
    worker.add_fault("rate_limit", route="available", reset_in_s=1.5)
    worker.add_fault("rate_limit", route="complete", reset_in_s=1.0)
    job_id = worker.add_job("hello_world", {"name": "limited", "processing_time": 0})
    runner = start_runner()  # --retry-max 0.3: without resetTime the retry would come within 0.3 s
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    polls = [r for r in worker.requests if r.route == "available"]
    assert polls[0].status == 429 and polls[1].status == 200
    assert polls[1].at - polls[0].at >= 1.3
    reports = [r for r in worker.requests if r.route == "complete"]
    assert [r.status for r in reports] == [429, 200]
    assert reports[1].at - reports[0].at >= 0.8
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_401_at_start_exits_3_at_once_with_one_clear_line(worker, start_runner):
    wrong_key = "not-the-runner-key-4242"
    runner = start_runner(key=wrong_key)
    assert runner.wait(timeout=20) == EXIT_KEY_REJECTED
    assert worker.count("register") == 1, "a rejected key is not retried"
    errors = [line for line in runner.output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "rejected the runner key" in errors[0], runner.output
    assert_no_crash(runner)
    assert wrong_key not in runner.output and wrong_key not in log_text(runner)


def test_a_401_while_serving_stops_the_runner_with_exit_3(worker, start_runner):
    runner = start_runner()
    worker.wait_until(lambda: worker.count("available", status=200) >= 1)
    worker.runner_key = "the-key-was-rotated"
    assert runner.wait(timeout=20) == EXIT_KEY_REJECTED
    assert worker.count(status=401) == 1
    assert len(log_lines(runner, "rejected the runner key", level="ERROR")) == 1
    assert_no_crash(runner)


# ---- Reports are never lost ------------------------------------------------------


def test_report_survives_a_burst_of_500s_when_it_is_due_and_is_delivered_once(worker, start_runner):
    worker.add_fault("status", route="complete", times=4)
    failing = worker.add_job("boom", {"why": "on purpose"})
    worker.add_fault("status", route="error", times=3, status=503)
    job_id = worker.add_job("hello_world", {"name": "reported", "processing_time": 0})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed"
                      and worker.job(failing)["status"] == "failed", timeout=20)
    assert worker.count("complete", job_id=job_id) == 5
    assert worker.count("error", job_id=failing) == 4
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed", failing: "failed"})


def test_report_survives_a_worker_outage_and_is_delivered_once(worker, start_runner):
    job_id = worker.add_job("sleepy", {"seconds": 1})
    runner = start_runner(*HANDLERS + ("--verbose",))
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    worker.go_down()
    deadline = time.monotonic() + 15
    while len(log_lines(runner, "Delivering the report of job %s failed" % job_id, level="DEBUG")) < 1:
        assert time.monotonic() < deadline, runner.output
        time.sleep(0.05)
    record = read_job_record(runner, job_id)
    assert record["report"]["kind"] == "complete"
    assert record["report"]["body"]["output_data"] == {"slept": 1}
    worker.come_up()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.job(job_id)["output_data"] == {"slept": 1}
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_heartbeats_survive_a_worker_outage_of_several_intervals_mid_job(worker, start_runner):
    job_id = worker.add_job("sleepy", {"seconds": 3.5})
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    worker.go_down()
    time.sleep(1.6)  # more than three 0.5 s heartbeat intervals
    worker.come_up()
    back_up = time.monotonic()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert any(heartbeat["at"] > back_up for heartbeat in worker.job(job_id)["heartbeats"])
    assert len(log_lines(runner, "Heartbeat for job %s failed" % job_id)) == 1
    assert "Heartbeats for job %s are getting through again" % job_id in runner.output
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_report_accepted_but_whose_answer_was_lost_is_not_delivered_twice(worker, start_runner):
    worker.add_fault("reset", route="complete", after=True)
    worker.add_fault("garbage", route="error", after=True)
    job_id = worker.add_job("hello_world", {"name": "lost answer", "processing_time": 0})
    failing = worker.add_job("boom", {"why": "lost answer"})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.job(job_id)["status"] == "completed"
                      and worker.job(failing)["status"] == "failed", timeout=20)
    worker.wait_until(lambda: job_records(runner) == [])
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed", failing: "failed"})


def test_a_report_answered_with_garbage_is_retried_until_really_accepted(worker, start_runner):
    worker.add_fault("garbage", route="complete")
    job_id = worker.add_job("hello_world", {"name": "html answer", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert len(log_lines(runner, "Delivering the report of job %s failed" % job_id, "not a JSON object")) == 1
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_report_answer_without_success_is_not_taken_for_an_accepted_report(worker, start_runner):
    """A 200 whose body lacks the contract's {"success": true} is a malformed answer: the
    runner must retry, not forget the job (the worker never stored the report)."""
    worker.add_fault("bad_shape", route="complete", body={"unexpected": True})
    job_id = worker.add_job("hello_world", {"name": "bad shape", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=8,
                      message="the job was left claimed after a malformed answer to its report")
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_sigterm_while_the_report_cannot_be_delivered_spools_it_and_the_next_start_delivers_it_first(
        worker, start_runner):
    first_job = worker.add_job("sleepy", {"seconds": 1.5})
    first = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, first_job, "in_progress"))
    worker.go_down()
    first.send(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    assert "Could not deliver the report of job" in first.output
    record = read_job_record(first, first_job)
    assert record["report"]["kind"] == "complete"
    assert "1 job record(s) wait" in first.output

    worker.come_up()
    new_job = worker.add_job("hello_world", {"name": "new work", "processing_time": 0})
    seen_before_restart = len(worker.requests)
    second = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, new_job, "completed"), timeout=20)
    after_restart = worker.requests[seen_before_restart:]
    routes = [(r.route, r.job_id) for r in after_restart]
    delivered = routes.index(("complete", first_job))
    assert delivered < routes.index(("available", None)), routes
    assert delivered < routes.index(("claim", new_job)), routes
    assert worker.count("register") == 1
    assert worker.job(first_job)["output_data"] == {"slept": 1.5}
    assert second.stop() == 0
    assert_settled(worker, second, {first_job: "completed", new_job: "completed"}, first)


# ---- Malformed answers -------------------------------------------------------------


def test_garbage_and_wrongly_shaped_poll_answers_are_one_warning_each_and_transient(worker, start_runner):
    worker.add_fault("garbage", route="available")
    worker.add_fault("bad_shape", route="available")
    worker.add_fault("bad_shape", route="available", body={"jobs": "none"})
    worker.add_fault("bad_shape", route="available", body={"jobs": [{"job_type": "hello_world"}]})
    worker.add_fault("status", route="available", status=200, body=["not", "an", "object"])
    job_id = worker.add_job("hello_world", {"name": "after garbage", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    warnings = log_lines(runner, "trying again in")
    assert len(warnings) == 5, "one warning line per kind of malformed answer:\n" + "\n".join(warnings)
    assert all("available" in line for line in warnings)
    assert runner.process.poll() is None
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_redirect_from_register_is_retried_until_a_real_id_comes(worker, start_runner):
    worker.add_fault("redirect", route="register", location="http://127.0.0.1:9/elsewhere")
    job_id = worker.add_job("hello_world", {"name": "registered", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.count("register") == 2
    assert len(log_lines(runner, "Cannot register with the worker yet")) == 1
    (runner_id,) = worker.runners
    assert runner_identity(runner) == runner_id == worker.job(job_id)["claimed_by"]
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


@pytest.mark.parametrize("fault", [{"kind": "garbage"}, {"kind": "bad_shape"},
                                   {"kind": "bad_shape", "body": {"runner_id": 42}}])
def test_a_2xx_register_answer_that_is_not_the_workers_json_is_a_wrong_url_exit_2(worker, start_runner, fault):
    worker.add_fault(route="register", **fault)
    runner = start_runner()
    assert runner.wait() == 2
    assert worker.count("register") == 1, "a wrong URL is not an outage to wait out"
    assert "not as a Runpack worker" in runner.output


def test_a_5xx_from_register_is_retried_and_the_log_shows_the_status(
        worker, start_runner):
    worker.add_fault("status", route="register", status=502, body={"error": "upstream down"})
    job_id = worker.add_job("hello_world", {"name": "after 502", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    (warning,) = log_lines(runner, "Cannot register with the worker yet")
    assert "502" in warning and "upstream down" in warning
    assert runner.stop() == 0


# ---- No orphaned jobs: custody records, lost claim answers, kill -9 ------------------


def test_a_claim_whose_answer_was_lost_is_still_run_and_reported(worker, start_runner):
    worker.add_fault("reset", route="claim", after=True)  # the worker did claim it
    job_id = worker.add_job("sleepy", {"seconds": 0.5})
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    assert worker.count("claim") == 1
    assert worker.job(job_id)["claimed_by"] == runner_identity(runner)
    assert worker.job(job_id)["output_data"] == {"slept": 0.5}
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_claim_that_did_not_happen_is_dropped_and_the_job_claimed_again(worker, start_runner):
    worker.add_fault("reset", route="claim")  # the worker did not claim it
    job_id = worker.add_job("hello_world", {"name": "second try", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.count("claim", job_id=job_id) == 2
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_claim_answer_without_the_job_is_transient_and_the_handler_runs_once(
        worker, start_runner, tmp_path):
    """200 without {"success": true, "job": ...} is malformed: the runner must not start the
    handler on it (the worker did not claim the job), but settle the claim as unanswered."""
    marker = tmp_path / "starts.txt"
    worker.add_fault("bad_shape", route="claim")
    job_id = worker.add_job("counted_sleep", {"marker": str(marker), "seconds": 0.5})
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    time.sleep(0.6)
    assert len(marker_lines(marker)) == 1, "the handler ran without a claim: %s" % marker_lines(marker)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_a_runner_killed_while_its_claim_is_unanswered_runs_the_job_after_restart(
        worker, start_runner):
    hang = worker.add_fault("hang", route="claim", after=True)
    job_id = worker.add_job("hello_world", {"name": "custody", "processing_time": 0})
    first = start_runner("--request-timeout", "10")
    worker.wait_until(status_is(worker, job_id, "claimed"))
    assert job_records(first) == [job_id + ".json"], "the custody record is written before the claim"
    first.process.kill()
    first.process.wait()
    hang.release()
    second = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert worker.count("claim") == 1
    assert worker.job(job_id)["claimed_by"] == runner_identity(second)
    assert worker.count("register") == 1
    assert second.stop() == 0
    assert_settled(worker, second, {job_id: "completed"}, first)


def test_a_job_whose_runner_was_killed_is_rerun_and_completed_once_by_the_same_runner(
        worker, start_runner, tmp_path):
    marker = tmp_path / "starts.txt"
    job_id = worker.add_job("counted_sleep", {"marker": str(marker), "seconds": 2})
    first = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    runner_id = worker.job(job_id)["claimed_by"]
    first.process.kill()
    first.process.wait()
    assert worker.job(job_id)["status"] == "in_progress"  # the worker alone would keep it forever
    second = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    assert worker.job(job_id)["output_data"] == {"slept": 2}
    assert worker.job(job_id)["claimed_by"] == runner_id == runner_identity(second)
    assert worker.count("register") == 1 and worker.count("claim") == 1
    assert len(marker_lines(marker)) == 2
    assert "running it again" in second.output
    assert second.stop() == 0
    assert_settled(worker, second, {job_id: "completed"}, first)


def test_a_job_whose_run_the_runner_did_not_survive_twice_is_reported_failed(
        worker, start_runner, tmp_path):
    marker = tmp_path / "starts.txt"
    job_id = worker.add_job("counted_sleep", {"marker": str(marker), "seconds": 60})
    runners = []
    for start in (1, 2):
        runner = start_runner(*HANDLERS)
        runners.append(runner)
        worker.wait_until(lambda: len(marker_lines(marker)) == start, timeout=15)
        runner.process.kill()
        runner.process.wait()
    third = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    job = worker.job(job_id)
    assert "the runner process ended while running this job, 2 times" in job["error_message"]
    assert len(marker_lines(marker)) == 2, "not run a third time"
    assert job["claimed_by"] == runner_identity(third)
    assert third.stop() == 0
    assert_settled(worker, third, {job_id: "failed"}, *runners)


def test_with_two_job_slots_a_kill_9_reruns_both_jobs_and_each_is_reported_once(
        worker, start_runner, tmp_path):
    markers = [tmp_path / "first.txt", tmp_path / "second.txt"]
    jobs = [worker.add_job("counted_sleep", {"marker": str(marker), "seconds": 2}) for marker in markers]
    first = start_runner(*HANDLERS, "--concurrency", "2")
    worker.wait_until(lambda: all(worker.job(j)["status"] == "in_progress" for j in jobs))
    first.process.kill()
    first.process.wait()
    second = start_runner(*HANDLERS, "--concurrency", "2")
    worker.wait_until(lambda: all(worker.job(j)["status"] in ("completed", "failed") for j in jobs),
                      timeout=20)
    assert [len(marker_lines(marker)) for marker in markers] == [2, 2]
    assert worker.count("claim") == 2 and worker.count("register") == 1
    assert second.stop() == 0
    assert_settled(worker, second, {job_id: "completed" for job_id in jobs}, first)


# ---- One runner per state directory ---------------------------------------------------


def test_a_second_runner_on_the_same_state_directory_exits_4(worker, start_runner):
    first = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    second = start_runner()
    assert second.wait(timeout=20) == EXIT_STATE_DIR_BUSY
    assert "another runner (pid %d) is using the state directory" % first.process.pid in second.output
    assert worker.count("register") == 1 and worker.count("verify") == 0
    assert first.process.poll() is None, "the first runner keeps going"
    job_id = worker.add_job("hello_world", {"name": "still served", "processing_time": 0})
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert first.stop() == 0
    assert_settled(worker, first, {job_id: "completed"}, second)


# ---- Lost claim ------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["job process", "in-process"])
def test_a_lost_claim_stops_the_handler_discards_its_result_and_the_next_job_runs(
        worker, start_runner, tmp_path, isolation):
    marker = tmp_path / "witness.txt"
    lost = worker.add_job("cancel_witness", {"marker": str(marker), "seconds": 30})
    following = worker.add_job("hello_world", {"name": "next in line", "processing_time": 0})
    flags = ("--in-process",) if isolation == "in-process" else ()
    runner = start_runner(*HANDLERS, "--poll-interval", "30", *flags)
    worker.wait_until(status_is(worker, lost, "in_progress"))
    other_runner = worker.register_runner("another-runner")
    worker.claim_for(lost, other_runner)
    worker.wait_until(status_is(worker, following, "completed"), timeout=20)
    handler_pid = int(marker_lines(marker)[0].split()[1])
    if isolation == "in-process":
        # the handler learns it through heartbeat_callback, which raises JobCancelled
        worker.wait_until(lambda: any(line.startswith("cancelled: ") for line in marker_lines(marker)),
                          message="heartbeat_callback did not raise JobCancelled")
        assert "no longer claimed by this runner" in marker_lines(marker)[1]
    else:
        # the job process (and its process group) is stopped
        assert handler_pid != runner.process.pid
        worker.wait_until(lambda: not process_exists(handler_pid), message="the job process still runs")
    time.sleep(0.6)  # more than a heartbeat interval: no heartbeat may follow the 400
    job = worker.job(lost)
    assert job["claimed_by"] == other_runner and job["status"] == "claimed"
    assert job["reports"] == [] and worker.count("complete", job_id=lost) == 0
    assert worker.count("error", job_id=lost) == 0
    assert worker.count("heartbeat", job_id=lost, status=400) == 1
    assert len(log_lines(runner, lost, "discarded its result")) == 1
    assert polls_before(worker, ("complete", following)) == 1, "the next job came from the same list"
    assert runner.stop() == 0
    assert_reported_once(worker, {following: "completed"})
    assert job_records(runner) == []
    assert_key_seen_only_by_the_worker(worker, runner)
    assert_no_crash(runner)


def polls_before(worker, request):
    routes = [(r.route, r.job_id) for r in worker.requests]
    return routes[:routes.index(request)].count(("available", None))


# ---- Limits before sending ------------------------------------------------------------


def test_an_oversize_console_keeps_its_tail_within_the_limit_with_a_marker_line(worker, start_runner):
    emoji = 600000  # 1.2 million JavaScript characters: each counts twice
    job_id = worker.add_job("console_of_size", {"emoji": emoji})
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=30)
    console = worker.job(job_id)["console_output"]
    original = "start\n" + "\U0001F600" * emoji + "\nthe end"
    assert CONSOLE_LIMIT - 100 <= js_length(console) <= CONSOLE_LIMIT
    marker, kept = console.split("\n", 1)
    dropped = int(re.match(r"^\[runpack: (\d+) earlier characters of console output were dropped\]$",
                           marker).group(1))
    assert original.endswith(kept) and kept.endswith("\nthe end")
    assert dropped == len(original) - len(kept)
    assert worker.job(job_id)["output_data"] == {"done": True}
    assert no_400_was_answered(worker)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "completed"})


def test_output_over_the_json_limit_fails_the_job_with_a_message_saying_so(worker, start_runner):
    # {"text":"..."} is 11 characters of JSON around the text
    fits = worker.add_job("output_of_size", {"characters": OUTPUT_JSON_LIMIT - 11})
    too_big = worker.add_job("output_of_size", {"characters": OUTPUT_JSON_LIMIT - 10})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: all(worker.job(j)["status"] in ("completed", "failed")
                                  for j in (fits, too_big)), timeout=20)
    assert worker.job(fits)["output_data"] == {"text": "x" * (OUTPUT_JSON_LIMIT - 11)}
    message = worker.job(too_big)["error_message"]
    assert "512000" in message and "JSON" in message
    assert no_400_was_answered(worker), "the limit is checked before sending, not learnt from a 400"
    assert runner.stop() == 0
    assert_settled(worker, runner, {fits: "completed", too_big: "failed"})


def test_output_that_is_not_json_fails_the_job_at_once_without_a_retry_loop(worker, start_runner):
    nan = worker.add_job("not_json", {"nan": True})
    opaque = worker.add_job("not_json", {})
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: all(worker.job(j)["status"] in ("completed", "failed")
                                  for j in (nan, opaque)), timeout=20)
    for job_id in (nan, opaque):
        assert "not JSON-serialisable" in worker.job(job_id)["error_message"]
    assert worker.count("complete") == 0 and worker.count("error") == 2
    assert no_400_was_answered(worker)
    assert runner.stop() == 0
    assert_settled(worker, runner, {nan: "failed", opaque: "failed"})


def test_a_long_error_message_is_trimmed_to_the_limit(worker, start_runner):
    job_id = worker.add_job("long_error", {"characters": 30000})
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    message = worker.job(job_id)["error_message"]
    assert js_length(message) <= ERROR_MESSAGE_LIMIT
    assert message.startswith("Job execution failed: eeee") and js_length(message) > ERROR_MESSAGE_LIMIT - 100
    assert "e" * 20000 in worker.job(job_id)["console_output"], "the whole error stays in the console"
    assert no_400_was_answered(worker)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "failed"})


def test_a_long_error_message_outside_the_bmp_is_trimmed_to_the_limit_not_emptied(worker, start_runner):
    job_id = worker.add_job("long_emoji_error", {"characters": 30000})  # 60,000 JavaScript characters
    runner = start_runner(*HANDLERS)
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    message = worker.job(job_id)["error_message"]
    assert js_length(message) <= ERROR_MESSAGE_LIMIT
    assert js_length(message) > ERROR_MESSAGE_LIMIT - 100, \
        "only %d of the %d characters allowed were kept: %r" % (js_length(message), ERROR_MESSAGE_LIMIT,
                                                             message[:80])
    assert message.startswith("Job execution failed: \U0001F600")
    assert no_400_was_answered(worker)
    assert runner.stop() == 0
    assert_settled(worker, runner, {job_id: "failed"})


# ---- Credentials -------------------------------------------------------------------------


def test_redirects_are_never_followed_so_another_port_never_sees_the_key(worker, start_runner):
    first = start_runner(*HANDLERS)  # registers, so that the second start verifies
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert first.stop() == 0
    with RecordingServer() as elsewhere:
        worker.add_fault("redirect", route="verify", location=elsewhere.url + "/api/runner/verify")
        worker.add_fault("redirect", route="available", times=2,
                         location=elsewhere.url + "/api/runner/jobs/available")
        worker.add_fault("redirect", route="heartbeat", status=307, location=elsewhere.url + "/hb")
        worker.add_fault("redirect", route="complete", times=2, status=308, location=elsewhere.url + "/done")
        job_id = worker.add_job("sleepy", {"seconds": 1})
        runner = start_runner(*HANDLERS)
        worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
        assert runner.stop() == 0
        assert elsewhere.requests == [], "a redirect was followed"
    assert worker.count("complete", job_id=job_id) == 3
    assert "redirects are not followed" in runner.output
    assert_settled(worker, runner, {job_id: "completed"}, first)


def test_a_worker_answer_that_echoes_the_key_never_puts_it_in_logs_or_reports(worker, start_runner):
    echo = {"error": "rejected request with Authorization: Bearer %s" % RUNNER_KEY}
    worker.add_fault("status", route="available", status=503, body=echo)
    worker.add_fault("status", route="complete", status=400, body=echo)
    job_id = worker.add_job("hello_world", {"name": "echo", "processing_time": 0})
    runner = start_runner()
    worker.wait_until(status_is(worker, job_id, "completed", "failed"), timeout=20)
    assert "[redacted]" in runner.output
    assert runner.stop() == 0
    assert RUNNER_KEY not in (worker.job(job_id)["error_message"] or ""), \
        "the key went into the job's error message, which every submitter can read"
    assert_settled(worker, runner, {job_id: "failed"})


def test_plain_http_to_a_host_that_is_not_loopback_is_refused_unless_allowed(worker, start_runner):
    host = socket.gethostname()
    url = "http://%s:%d" % (host, worker.port)
    refused = start_runner(worker_url=url)
    assert refused.wait(timeout=20) == EXIT_USAGE
    assert "refusing to send the runner key over plain http to %s" % host in refused.output
    assert worker.requests == [], "nothing may be sent before the URL is checked"
    assert RUNNER_KEY not in refused.output
    try:
        reaches_worker = socket.gethostbyname(host).startswith("127.")
    except OSError:
        reaches_worker = False
    if not reaches_worker:
        pytest.skip("%s does not resolve to this machine's loopback" % host)
    job_id = worker.add_job("hello_world", {"name": "trusted network", "processing_time": 0})
    allowed = start_runner("--allow-insecure-http", worker_url=url)
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    assert allowed.stop() == 0
    assert_settled(worker, allowed, {job_id: "completed"}, refused)
