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

from conftest import (RELAY_SUBSCRIBE_KEY, RUNNER_KEY, TEST_JOB_TYPES, relay_environment,
                      run_cli)

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

HANDLERS = ("--handlers", TEST_JOB_TYPES)
LONG_POLL_INTERVAL = ("--poll-interval", "60", "--poll-interval-max", "60")  # after FAST_SETTINGS: wins
WRONG_SUBSCRIBE_KEY = "wrong-subscribe-key-0123456789abcdef"
EXIT_FAILURE = 1


# ---- Helpers ----------------------------------------------------------------------


def requests_to(service, route):
    """The requests of ``route`` that a fake worker or relay recorded, in arrival order."""
    return [record for record in service.requests if record.route == route]


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
    print("runners that completed jobs: %d, lost claims: %d" % (len(completed_by), lost_claims))
    assert len(completed_by) > 1, "one runner took the whole queue"
    # Runners claiming down the same list in order lose about 7 claims per job (each of the 8
    # tries the head that another has just won); spread claims lose well under one.
    assert lost_claims < 2 * len(job_ids), "claims were not spread: %d lost claims" % lost_claims


def test_a_lone_runner_claims_strictly_oldest_first(worker, start_runner):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 0})
               for number in range(20)]
    runner = start_runner("--in-process")
    worker.wait_until(all_completed(worker, job_ids), timeout=20)
    assert runner.stop() == 0
    assert [record.job_id for record in requests_to(worker, "claim")] == job_ids
