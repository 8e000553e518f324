"""A fleet of runners and push wake-ups end to end: the real CLI against the fake worker and the
fake NotifyRelay, over real sockets.

Runners given the same oldest-first list spread their claims instead of racing for its head, and
a lone runner still claims strictly oldest first. A notification from the relay cuts a long wait
short, a burst of them is a handful of polls, and a relay that fails or loses a notification
never stops polling, never holds up a shutdown and never sees its key leak. Timings are proven
by the order of the requests the fakes recorded, never by a duration.
"""

import hashlib
import json
import os

import pytest

from conftest import RUNNER_KEY, TEST_JOB_TYPES, relay_environment, run_cli
from fake_relay import RELAY_SUBSCRIBE_KEY

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

HANDLERS = ("--handlers", TEST_JOB_TYPES)
LONG_POLL_INTERVAL = ("--poll-interval", "60", "--poll-interval-max", "60")  # after FAST_SETTINGS: wins
WRONG_SUBSCRIBE_KEY = "wrong-subscribe-key-0123456789abcdef"
EXIT_FAILURE = 1


# ---- Helpers ----------------------------------------------------------------------


def requests_to(service, route):
    """The requests of ``route`` that a fake worker or relay recorded, in arrival order."""
    return [record for record in service.requests if record.route == route]


def polls_after(worker, moment):
    return sum(record.at > moment for record in requests_to(worker, "available"))


def all_completed(worker, job_ids):
    return lambda: all(worker.job(job_id)["status"] == "completed" for job_id in job_ids)


def runner_identity(runner):
    with open(os.path.join(runner.state_dir, ".runpack_runner.json"), encoding="utf-8") as stream:
        return json.load(stream)


def log_text(runner):
    with open(os.path.join(runner.state_dir, "runpack_runner.log"), encoding="utf-8") as stream:
        return stream.read()


def wait_until_idle_and_subscribed(worker, relay, subscribers=1):
    """Until the runners made their first (empty) poll and the relay holds their polls."""
    worker.wait_until(lambda: worker.count("available") >= subscribers, timeout=15,
                      message="the runner never polled the worker")
    relay.wait_until(lambda: relay.held_polls >= subscribers, timeout=15,
                     message="the runner never subscribed to the relay")


def assert_each_completed_exactly_once(worker, job_ids, runner_ids):
    for job_id in job_ids:
        job = worker.job(job_id)
        assert job["status"] == "completed", job
        assert worker.count("complete", job_id=job_id, status=200) == 1, "job %s reported twice" % job_id
        assert job["claimed_by"] in runner_ids, "job %s claimed by an unknown runner" % job_id
    assert worker.jobs(status="claimed") == [] and worker.jobs(status="in_progress") == []
    assert worker.count(status=429) == 0


# ---- A fleet shares one queue ---------------------------------------------------------


def test_a_fleet_of_eight_drains_a_queue_with_each_job_completed_once_and_claims_spread(
        worker, start_runner, tmp_path):
    runners = [start_runner("--in-process", state_dir=tmp_path / ("state-%d" % number)) for number in range(8)]
    worker.wait_until(lambda: len({record.runner_id for record in requests_to(worker, "available")}) == 8,
                      timeout=30, message="not every runner polled")
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 0})
               for number in range(120)]
    worker.wait_until(all_completed(worker, job_ids), timeout=30, message="the fleet did not drain the queue")
    for runner in runners:
        assert runner.stop() == 0, runner.output
    runner_ids = {runner_identity(runner)["runner_id"] for runner in runners}
    assert runner_ids == set(worker.runners)
    assert_each_completed_exactly_once(worker, job_ids, runner_ids)
    completed_by = {worker.job(job_id)["claimed_by"] for job_id in job_ids}
    lost_claims = worker.count("claim", status=409)
    assert len(completed_by) > 1, "one runner took the whole queue"
    # Runners that claim down the same list in order race for its head: with claim spreading
    # switched off (one lane, always), this very drain lost 4.4 to 5.6 claims per job; spread, it
    # lost 0.7 to 1.1 in a dozen runs. Two per job lies far from both, so it does not flake.
    assert lost_claims < 2 * len(job_ids), "claims were not spread: %d lost claims" % lost_claims


def test_a_lone_runner_claims_strictly_oldest_first(worker, start_runner):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 0})
               for number in range(20)]
    runner = start_runner("--in-process")
    worker.wait_until(all_completed(worker, job_ids), timeout=20)
    assert runner.stop() == 0
    assert [record.job_id for record in requests_to(worker, "claim")] == job_ids


# ---- Push wake-up: NotifyRelay --------------------------------------------------------


def test_a_notification_wakes_a_runner_whose_poll_interval_is_at_a_long_cap(worker, relay, start_runner):
    runner = start_runner("--in-process", *LONG_POLL_INTERVAL, env=relay_environment(relay))
    wait_until_idle_and_subscribed(worker, relay)
    runner_id = runner_identity(runner)["runner_id"]
    assert list(relay.subscribers) == ["runpack-runner-" + runner_id]
    assert "Listening for new jobs on NotifyRelay %s (subscriber runpack-runner-%s)" % (
        relay.url, runner_id) in runner.output
    job_id = worker.add_job("hello_world", {"name": "woken", "processing_time": 0})
    worker.wait_until(all_completed(worker, [job_id]), timeout=10,
                      message="the notification did not wake the runner (its next poll is 60 s away)")
    publish = requests_to(relay, "publish")[0]
    first_poll, second_poll = requests_to(worker, "available")[:2]
    assert first_poll.at < publish.at < second_poll.at < requests_to(worker, "claim")[0].at
    assert runner.stop() == 0


def test_a_burst_of_notifications_is_a_handful_of_polls_not_one_each(worker, relay, start_runner):
    runner = start_runner("--in-process", "--concurrency", "2", *HANDLERS, *LONG_POLL_INTERVAL,
                          env=relay_environment(relay))
    wait_until_idle_and_subscribed(worker, relay)
    job_ids = [worker.add_job("sleepy", {"seconds": 0.15, "number": number}) for number in range(20)]
    worker.wait_until(lambda: worker.count("claim") >= 2)  # both slots busy: the next 20 notices come meanwhile
    job_ids += [worker.add_job("sleepy", {"seconds": 0.15, "number": number}) for number in range(20, 40)]
    worker.wait_until(all_completed(worker, job_ids), timeout=30)
    burst_started = requests_to(relay, "publish")[0].at
    last_report = requests_to(worker, "complete")[-1].at
    polls = [record for record in requests_to(worker, "available") if burst_started < record.at < last_report]
    assert len(polls) <= 10, "%d polls for 40 notifications" % len(polls)
    assert runner.stop() == 0
    assert_each_completed_exactly_once(worker, job_ids, set(worker.runners))


def break_relay(relay, failure):
    if failure == "down":
        relay.go_down()
    elif failure == "500":
        relay.add_fault("status", status=500, times=None)
    else:
        relay.add_fault(failure, times=None)


@pytest.mark.parametrize("failure", ["down", "500", "garbage", "hang"])
def test_a_failing_relay_never_stops_polling_nor_holds_up_shutdown(worker, relay, start_runner, failure):
    break_relay(relay, failure)
    runner = start_runner("--in-process", env=relay_environment(relay))
    runner.wait_for_output("Listening for new jobs on NotifyRelay")
    if failure != "down":
        relay.wait_until(lambda: relay.count("poll") >= 1, message="the runner never tried the relay")
    job_id = worker.add_job("hello_world", {"name": "polled", "processing_time": 0})
    worker.wait_until(all_completed(worker, [job_id]), timeout=10, message="polling stopped with the relay")
    if failure in ("500", "garbage"):  # retried with full jitter: within 1 s, then within 2 s
        relay.wait_until(lambda: relay.count("poll") >= 3, message="the runner did not retry the relay")
    if failure != "hang":  # a hanging poll fails only when its read times out, after 65 s
        runner.wait_for_output("polling the worker goes on, retrying the relay")
    assert runner.stop(timeout=5) == 0
    if failure != "hang":
        assert runner.output.count("polling the worker goes on, retrying the relay") == 1, \
            "not one warning per spell of failures:\n" + runner.output
    assert_each_completed_exactly_once(worker, [job_id], set(worker.runners))


def test_a_rejected_subscribe_key_is_one_error_and_no_more_relay_polls_while_worker_polls_go_on(
        worker, relay, start_runner):
    runner = start_runner("--in-process", env=relay_environment(relay, WRONG_SUBSCRIBE_KEY))
    relay.wait_until(lambda: relay.count("poll", status=401) == 1)
    rejected_at = requests_to(relay, "poll")[0].at
    job_id = worker.add_job("hello_world", {"name": "polled", "processing_time": 0})
    worker.wait_until(all_completed(worker, [job_id]), timeout=10, message="polling stopped with the relay")
    worker.wait_until(lambda: polls_after(worker, rejected_at) >= 5, message="the runner stopped polling")
    assert relay.count("poll") == 1, "the runner kept polling the relay with a rejected key"
    assert runner.stop(timeout=5) == 0
    [error] = [line for line in runner.output.splitlines() if "rejected the subscribe key" in line]
    assert "ERROR" in error and "NOTIFY_RELAY_SUBSCRIBE_KEY" in error
    assert WRONG_SUBSCRIBE_KEY not in runner.output + log_text(runner)
    assert_each_completed_exactly_once(worker, [job_id], set(worker.runners))


def test_a_lost_notification_is_covered_by_polling(worker, relay, start_runner):
    runner = start_runner("--in-process", "--poll-interval", "0.5", "--poll-interval-max", "0.5",
                          env=relay_environment(relay))
    wait_until_idle_and_subscribed(worker, relay)
    relay.drop_next_publishes(1)
    job_id = worker.add_job("hello_world", {"name": "unannounced", "processing_time": 0})
    worker.wait_until(all_completed(worker, [job_id]), timeout=10, message="polling did not find the job")
    assert [message["dropped"] for message in relay.published] == [True]
    assert runner.stop() == 0


@pytest.mark.parametrize("isolation", [(), ("--in-process",)], ids=["job process", "in-process"])
def test_the_subscribe_key_reaches_neither_output_log_console_nor_job_environment(
        worker, relay, start_runner, isolation):
    relay.add_fault("status", status=502, times=2, body={"error": "%s is not welcome" % RELAY_SUBSCRIBE_KEY})
    runner = start_runner(*isolation, *HANDLERS, env=relay_environment(relay))
    wait_until_idle_and_subscribed(worker, relay)  # the relay's answers echoed the key twice, then a poll held
    secret = {"sha256": hashlib.sha256(RELAY_SUBSCRIBE_KEY.encode("utf-8")).hexdigest(),
              "length": len(RELAY_SUBSCRIBE_KEY)}
    job_id = worker.add_job("environment_witness", secret)
    worker.wait_until(all_completed(worker, [job_id]), timeout=10)
    runner.wait_for_output("NotifyRelay answers again")  # the held poll returned the job's notice
    assert runner.stop() == 0
    job = worker.job(job_id)
    assert job["output_data"]["holding_the_secret"] == []
    assert "NOTIFY_RELAY_SUBSCRIBE_KEY" not in job["output_data"]["names"]
    assert "NOTIFY_RELAY_BASE_URL" in job["output_data"]["names"], "the witness did not see the environment"
    assert RELAY_SUBSCRIBE_KEY not in json.dumps(job)
    assert "[redacted] is not welcome" in runner.output, "the relay's answer was not logged"
    for text in (runner.output, log_text(runner)):
        assert RELAY_SUBSCRIBE_KEY not in text
        assert RUNNER_KEY not in text


# ---- `check` reports the relay --------------------------------------------------------


def check(worker, tmp_path, **env):
    return run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path),
                   env=dict(env, RUNPACK_RUNNER_API_KEY=RUNNER_KEY))


def relay_line(result):
    return [line for line in result.stdout.splitlines() if line.startswith("NotifyRelay")]


def test_check_says_when_no_relay_is_configured_and_still_exits_0(worker, tmp_path):
    result = check(worker, tmp_path)
    assert result.returncode == 0, result.stdout
    assert relay_line(result) == ["NotifyRelay      not configured (optional: new jobs would wake the runner "
                                  "at once)"]


def test_check_reports_a_reachable_relay_that_accepts_the_subscribe_key(worker, relay, tmp_path):
    result = check(worker, tmp_path, **relay_environment(relay))
    assert result.returncode == 0, result.stdout
    assert relay_line(result) == ["NotifyRelay      %s: reachable, subscribe key accepted" % relay.url]
    assert RELAY_SUBSCRIBE_KEY not in result.stdout + result.stderr


def test_check_reports_a_rejected_subscribe_key_as_a_problem_and_exits_1(worker, relay, tmp_path):
    result = check(worker, tmp_path, **relay_environment(relay, WRONG_SUBSCRIBE_KEY))
    assert result.returncode == EXIT_FAILURE, result.stdout
    [line] = relay_line(result)
    assert "PROBLEM" in line and "rejected the subscribe key" in line and "NOTIFY_RELAY_SUBSCRIBE_KEY" in line
    assert WRONG_SUBSCRIBE_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize("missing", ["NOTIFY_RELAY_BASE_URL", "NOTIFY_RELAY_SUBSCRIBE_KEY"])
def test_check_reports_a_relay_half_configured_as_a_problem_and_exits_1(worker, relay, tmp_path, missing):
    env = relay_environment(relay)
    del env[missing]
    result = check(worker, tmp_path, **env)
    assert result.returncode == EXIT_FAILURE, result.stdout
    [line] = relay_line(result)
    assert "PROBLEM" in line and missing in line
    assert relay.requests == [], "check asked a relay that is not fully configured"
