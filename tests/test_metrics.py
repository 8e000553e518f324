"""--listen end to end: the real runner CLI against the fake worker, its /metrics read with
prometheus_client's own text parser and its /healthz asked over a real socket on 127.0.0.1.

Jobs of each outcome are counted by type and outcome and timed in the histogram, every request
to the worker is counted by endpoint and answer, the gauges follow the slots, the custody
records and the relay, and /healthz turns 503 when the worker stops answering, and says so while
the runner stops. States are awaited through what the fakes and the runner show; no test asserts how
long anything took.
"""

import ctypes
import http.client
import os
import platform
import re
import signal
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import runpack_runner
from conftest import RUNNER_KEY, TEST_JOB_TYPES, relay_environment, run_cli
from fake_worker import _HTTPService, _Reply

pytestmark = pytest.mark.slow  # every test starts the runner CLI as a subprocess

METRICS_JOB_TYPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job_types_for_metrics.py")
HANDLERS = ("--handlers", "%s,%s" % (TEST_JOB_TYPES, METRICS_JOB_TYPES))
LISTEN = ("--listen", "0")
# /healthz fails after 2 x (0.5 + 0.3 + 1) s without an answer: a few seconds with these
QUICK_HEALTH = ("--poll-interval-max", "0.5", "--retry-max", "0.3", "--request-timeout", "1")
BUCKET_BOUNDS = ["0.1", "0.5", "1", "5", "10", "30", "60", "300", "900", "3600", "21600", "+Inf"]
EXIT_USAGE = 2
SERVING = re.compile(r"Serving /metrics and /healthz on http://(\[[^\]]+\]|[^:/\s]+):(\d+)/")
NOT_CLAIMED_BY_RUNNER = {"success": False, "message": "Job not found or not claimed by this runner"}
BAD_GATEWAY_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
CLAIM_CONFLICT = {"success": False, "message": "Job already claimed or not found"}


# ---- Helpers ----------------------------------------------------------------------


def served_address(runner):
    """(host, port) from the runner's "Serving /metrics and /healthz on http://HOST:PORT/" line."""
    runner.wait_for_output("Serving /metrics and /healthz on http://")
    host, port = SERVING.search(runner.output).groups()
    return host.strip("[]"), int(port)


def fetch(runner, path, method="GET"):
    """(status, Content-Type, body) of a GET (or ``method``) of ``path`` from the runner's --listen address."""
    host, port = served_address(runner)
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode("utf-8")
    finally:
        connection.close()


class Scrape:
    """One /metrics answer as prometheus_client's parser reads it."""

    def __init__(self, text):
        self.text, self.types, self.samples = text, {}, {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                assert key not in self.samples, "sample %s twice in:\n%s" % (key, text)
                self.samples[key] = sample.value

    def value(self, name, **labels):
        """The sample ``name`` with exactly these labels, or None when it is not there."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def by(self, name, *label_names):
        """{label values: value} of every sample ``name``; each must carry exactly ``label_names``."""
        found = {}
        for (sample_name, labels), value in self.samples.items():
            if sample_name == name:
                assert sorted(dict(labels)) == sorted(label_names), "%s has labels %s" % (name, labels)
                found[tuple(dict(labels)[label] for label in label_names)] = value
        return found if len(label_names) != 1 else {key[0]: value for key, value in found.items()}

    def buckets(self, job_type):
        """[(le, count)] of a job type's duration histogram, in the order served."""
        return [(dict(labels)["le"], value) for (name, labels), value in self.samples.items()
                if name == "runpack_job_duration_seconds_bucket" and dict(labels)["job_type"] == job_type]


def scrape(runner):
    status, content_type, body = fetch(runner, "/metrics")
    assert status == 200, body
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(body)


def scrape_until(worker, runner, predicate, message, timeout=15):
    """The first scrape for which ``predicate(scrape)`` holds (the runner counts a job a moment
    after the worker has its report)."""
    scrapes = []
    worker.wait_until(lambda: scrapes.append(scrape(runner)) or predicate(scrapes[-1]), timeout=timeout,
                      message="%s; last /metrics:\n%s" % (message, scrapes[-1].text if scrapes else ""))
    return scrapes[-1]


def health_until(runner, expected_status, line_start="", timeout=20):
    """(status, one line) of /healthz once it answers ``expected_status`` with a line that starts
    with ``line_start``."""
    deadline = time.monotonic() + timeout
    status, content_type, body = fetch(runner, "/healthz")
    while status != expected_status or not body.startswith(line_start):
        assert time.monotonic() < deadline, "/healthz never answered %d %r; last %d %r; runner output:\n%s" % (
            expected_status, line_start, status, body, runner.output)
        time.sleep(0.05)
        status, content_type, body = fetch(runner, "/healthz")
    assert content_type.startswith("text/plain")
    assert body.endswith("\n") and "\n" not in body[:-1], "not one line: %r" % body
    return status, body.rstrip("\n")


def signal_thread(runner, signum, main_thread):
    """Send ``signum`` to the runner's main thread, or to another of its threads, with tgkill(2).
    A signal sent to a process goes to any of its threads that does not block it: mostly the
    main thread, but not always (see test_a_sigterm_that_lands_on_another_thread_is_heard)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("no tgkill() in this C library (glibc 2.30 or later has it)")
    pid = runner.process.pid
    threads = [int(name) for name in os.listdir("/proc/%d/task" % pid)]
    thread = pid if main_thread else min(tid for tid in threads if tid != pid)
    if libc.tgkill(pid, thread, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill(%d, %d, %d) failed" % (pid, thread, signum))


def jobs_counted(count):
    return lambda scraped: sum(scraped.by("runpack_jobs_total", "job_type", "outcome").values()) == count


def ended(worker, *job_ids):
    return lambda: all(worker.job(job_id)["status"] in ("completed", "failed") for job_id in job_ids)


def status_is(worker, job_id, status):
    return lambda: worker.job(job_id)["status"] == status


def log_text(runner):
    with open(os.path.join(runner.state_dir, "runpack_runner.log"), encoding="utf-8") as stream:
        return stream.read()


class BadGatewayServer(_HTTPService):
    """Answers every request 502 with an HTML page, as a proxy whose worker is down (or a URL that
    was never a Runpack worker's) would."""

    def _serve(self, handler, incoming):
        self._send(handler, incoming.record, _Reply(502, raw=BAD_GATEWAY_PAGE, content_type="text/html"))


@pytest.fixture
def gate(tmp_path):
    """The file whose creation ends every "held" job; created at teardown too, so that no job
    process outlives a failed test."""
    path = tmp_path / "gate"
    yield path
    path.touch()


# ---- Jobs: outcomes and durations ---------------------------------------------------


def test_metrics_count_jobs_by_type_and_outcome_and_time_each_reported_one_in_the_histogram(
        worker, start_runner):
    completed = worker.add_job("hello_world", {"name": "metrics", "processing_time": 0})
    invalid = worker.add_job("hello_world", {"name": "metrics", "processing_time": -1})
    failed = worker.add_job("boom", {"why": "metrics"})
    timed_out = worker.add_job("sleepy", {"seconds": 30})
    runner = start_runner(*HANDLERS + LISTEN, "--job-timeout", "1")
    worker.wait_until(ended(worker, completed, invalid, failed, timed_out), timeout=20)
    assert "timed out after 1 s" in worker.job(timed_out)["error_message"]
    scraped = scrape_until(worker, runner, jobs_counted(4), "the runner did not count four jobs")

    assert scraped.types["runpack_jobs"] == "counter"
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {
        ("hello_world", "completed"): 1, ("hello_world", "invalid"): 1, ("boom", "failed"): 1,
        ("sleepy", "timed_out"): 1}
    assert scraped.types["runpack_job_duration_seconds"] == "histogram"
    assert scraped.by("runpack_job_duration_seconds_count", "job_type") == {"hello_world": 2, "boom": 1, "sleepy": 1}
    for job_type, count in (("hello_world", 2), ("boom", 1), ("sleepy", 1)):
        buckets = scraped.buckets(job_type)
        assert [le for le, _ in buckets] == BUCKET_BOUNDS
        counts = [value for _, value in buckets]
        assert counts == sorted(counts), "buckets of %s are not cumulative: %s" % (job_type, buckets)
        assert counts[-1] == count
        assert scraped.value("runpack_job_duration_seconds_sum", job_type=job_type) >= 0
    assert scraped.value("runpack_job_duration_seconds_bucket", job_type="sleepy", le="0.5") == 0, \
        "the timed-out job ran until its 1 s limit"
    assert scraped.value("runpack_job_duration_seconds_sum", job_type="sleepy") >= 1
    assert scraped.value("runpack_slots") == 1 and scraped.value("runpack_slots_busy") == 0
    assert scraped.value("runpack_reports_pending") == 0
    assert runner.stop() == 0


def test_metrics_show_build_info_uptime_and_no_relay_state_without_a_relay(worker, start_runner):
    runner = start_runner(*LISTEN)
    worker.wait_until(lambda: worker.count("available") >= 1)
    scraped = scrape(runner)
    assert scraped.by("runpack_build_info", "version", "python") == {
        (runpack_runner.__version__, platform.python_version()): 1}
    assert scraped.value("runpack_uptime_seconds") > 0
    assert scraped.by("runpack_claims_lost_total") == {(): 0}
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {}
    assert "runpack_relay_state" not in {name for name, _ in scraped.samples}
    assert "runpack_relay_notices_total" not in {name for name, _ in scraped.samples}
    assert runner.stop() == 0


def test_reports_the_worker_refused_or_no_longer_wanted_count_as_refused_and_discarded(worker, start_runner):
    discarded = worker.add_job("hello_world", {"name": "not ours any more", "processing_time": 0})
    refused = worker.add_job("hello_world", {"name": "refused", "processing_time": -1})
    worker.add_fault("status", route="complete", job_id=discarded, status=400, body=NOT_CLAIMED_BY_RUNNER)
    worker.add_fault("status", route="error", job_id=refused, status=400, body={"error": "Invalid report"})
    runner = start_runner(*LISTEN)
    scraped = scrape_until(worker, runner, jobs_counted(2), "the runner did not count two jobs")
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {
        ("hello_world", "discarded"): 1, ("hello_world", "refused"): 1}
    assert scraped.by("runpack_job_duration_seconds_count", "job_type") == {"hello_world": 2}
    assert scraped.value("runpack_reports_pending") == 0
    assert runner.stop() == 0


# ---- Requests to the worker ------------------------------------------------------------


def test_requests_to_the_worker_are_counted_by_endpoint_and_status_with_unreachable_for_no_answer(
        worker, start_runner):
    worker.add_fault("status", route="available", times=2, status=500)
    worker.add_fault("reset", route="available", times=1)
    job_id = worker.add_job("hello_world", {"name": "counted", "processing_time": 1})  # heartbeats, too
    runner = start_runner(*LISTEN)
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    scraped = scrape_until(worker, runner, jobs_counted(1), "the runner did not count its job")

    requests = scraped.by("runpack_worker_requests_total", "endpoint", "status")
    assert scraped.types["runpack_worker_requests"] == "counter"
    assert requests[("register", "201")] == 1
    assert requests[("available", "500")] == 2
    assert requests[("available", "unreachable")] == 1
    assert requests[("available", "200")] >= 1
    assert requests[("claim", "200")] == 1
    assert requests[("heartbeat", "200")] == worker.count("heartbeat", status=200) >= 1
    assert requests[("complete", "200")] == 1
    assert set(requests) == {("register", "201"), ("available", "500"), ("available", "unreachable"),
                             ("available", "200"), ("claim", "200"), ("heartbeat", "200"), ("complete", "200")}
    assert scraped.value("runpack_worker_last_answer_seconds") >= 0
    assert runner.stop() == 0


def test_a_restarted_runner_counts_its_verify_request(worker, start_runner):
    first = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert first.stop() == 0
    second = start_runner(*LISTEN)
    worker.wait_until(lambda: worker.count("verify") == 1 and worker.count("available") >= 2)
    scraped = scrape_until(worker, second, lambda scraped: scraped.value(
        "runpack_worker_requests_total", endpoint="available", status="200"), "no poll counted")
    requests = scraped.by("runpack_worker_requests_total", "endpoint", "status")
    assert requests[("verify", "200")] == 1 and ("register", "201") not in requests
    assert second.stop() == 0


# ---- Claims lost ---------------------------------------------------------------------


def test_a_claim_answered_409_counts_as_a_claim_lost_and_the_job_is_claimed_on_the_next_try(
        worker, start_runner):
    worker.add_fault("status", route="claim", status=409, body=CLAIM_CONFLICT)
    job_id = worker.add_job("hello_world", {"name": "second try", "processing_time": 0})
    runner = start_runner(*LISTEN)
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    scraped = scrape_until(worker, runner, jobs_counted(1), "the runner did not count its job")
    assert scraped.types["runpack_claims_lost"] == "counter"
    assert scraped.value("runpack_claims_lost_total") == 1
    assert scraped.value("runpack_worker_requests_total", endpoint="claim", status="409") == 1
    assert scraped.value("runpack_worker_requests_total", endpoint="claim", status="200") == 1
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {("hello_world", "completed"): 1}
    assert runner.stop() == 0


def test_a_job_whose_claim_is_lost_while_it_runs_counts_as_claim_lost_without_a_duration(
        worker, start_runner, gate):
    job_id = worker.add_job("held", {"gate": str(gate)})
    runner = start_runner(*HANDLERS + LISTEN)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    worker.claim_for(job_id, worker.register_runner("another-runner"))
    scraped = scrape_until(worker, runner, jobs_counted(1), "the runner did not count the lost job")
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {("held", "claim_lost"): 1}
    assert scraped.by("runpack_job_duration_seconds_count", "job_type") == {}
    assert scraped.value("runpack_claims_lost_total") == 0, "no claim was answered 409"
    assert scraped.value("runpack_slots_busy") == 0
    assert worker.job(job_id)["reports"] == []
    assert runner.stop() == 0


# ---- Gauges: slots and reports pending --------------------------------------------------


def test_slots_busy_counts_the_running_jobs_out_of_the_concurrency(worker, start_runner, gate):
    job_ids = [worker.add_job("held", {"gate": str(gate), "n": n}) for n in range(2)]
    runner = start_runner(*HANDLERS + LISTEN, "--concurrency", "2")
    worker.wait_until(lambda: all(worker.job(job_id)["status"] == "in_progress" for job_id in job_ids))
    scraped = scrape(runner)
    assert scraped.value("runpack_slots") == 2
    assert scraped.value("runpack_slots_busy") == 2
    gate.touch()
    worker.wait_until(lambda: all(worker.job(job_id)["status"] == "completed" for job_id in job_ids))
    scraped = scrape_until(worker, runner, jobs_counted(2), "the runner did not count two jobs")
    assert scraped.value("runpack_slots") == 2 and scraped.value("runpack_slots_busy") == 0
    assert runner.stop() == 0


def test_a_report_waiting_for_the_worker_shows_in_reports_pending_until_it_is_delivered(
        worker, start_runner, gate):
    job_id = worker.add_job("held", {"gate": str(gate)})
    runner = start_runner(*HANDLERS + LISTEN)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    assert scrape(runner).value("runpack_reports_pending") == 0, "the running job has no report yet"
    worker.go_down()
    gate.touch()
    scraped = scrape_until(worker, runner, lambda scraped: scraped.value("runpack_reports_pending") == 1,
                           "the finished job's report never showed as pending")
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {}, "not delivered, not counted yet"
    worker.come_up()
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    scraped = scrape_until(worker, runner, jobs_counted(1), "the delivered report was not counted")
    assert scraped.value("runpack_reports_pending") == 0
    assert scraped.by("runpack_jobs_total", "job_type", "outcome") == {("held", "completed"): 1}
    assert runner.stop() == 0


# ---- /healthz ------------------------------------------------------------------------------


def test_healthz_is_503_once_the_worker_stops_answering_and_200_again_once_it_answers(worker, start_runner):
    runner = start_runner(*LISTEN + QUICK_HEALTH)
    worker.wait_until(lambda: worker.count("available", status=200) >= 1)
    status, line = health_until(runner, 200)
    assert line.startswith("ok: ")
    worker.go_down()
    status, line = health_until(runner, 503)
    assert "has not answered" in line
    worker.come_up()
    status, line = health_until(runner, 200)
    assert line.startswith("ok: ")
    assert runner.stop() == 0


def test_healthz_is_503_when_every_answer_is_a_502_page_and_the_runner_never_registered(start_runner):
    with BadGatewayServer() as proxy:
        runner = start_runner(*LISTEN + QUICK_HEALTH, worker_url=proxy.url)
        status, line = health_until(runner, 503)
        assert line.startswith("the worker has not answered as a Runpack worker for "), line
        assert scrape(runner).value("runpack_worker_requests_total", endpoint="register", status="502") >= 1, \
            "every request still counts by its status"
        assert "runpack_worker_last_answer_seconds" not in {name for name, _ in scrape(runner).samples}
        assert runner.stop() == 0


@pytest.mark.parametrize("fault", [dict(kind="status", status=502), dict(kind="garbage", route="available")],
                         ids=["502 to every request", "200 html page to available"])
def test_healthz_is_503_once_the_worker_answers_only_with_errors_or_pages_not_its_own(
        worker, start_runner, fault):
    runner = start_runner(*LISTEN + QUICK_HEALTH)
    worker.wait_until(lambda: worker.count("available", status=200) >= 1)
    assert health_until(runner, 200)[1].startswith("ok: ")
    worker.add_fault(times=None, **fault)
    status, line = health_until(runner, 503)
    assert line.startswith("the worker has not answered as a Runpack worker for "), line
    assert scrape(runner).value("runpack_worker_requests_total", endpoint="available",
                                status=str(fault.get("status", 200))) >= 1
    worker.clear_faults()
    assert health_until(runner, 200)[1].startswith("ok: ")
    assert runner.stop() == 0


def test_healthz_stays_200_while_a_busy_runner_waits_for_its_first_heartbeat(worker, start_runner, gate):
    job_id = worker.add_job("held", {"gate": str(gate)})
    runner = start_runner(*HANDLERS + LISTEN + QUICK_HEALTH, "--heartbeat-interval", "8")
    worker.wait_until(status_is(worker, job_id, "claimed"))
    claimed_at = [record.at for record in worker.requests if record.route == "claim"][-1]
    silence_limit = 2 * (0.5 + 0.3 + 1)
    time.sleep(max(0.0, claimed_at + silence_limit + 0.5 - time.monotonic()))
    assert worker.job(job_id)["heartbeats"] == [], "the claim counts as the first heartbeat; the next is 8 s away"
    status, _, body = fetch(runner, "/healthz")
    assert (status, body[:4]) == (200, "ok: "), body
    gate.touch()
    worker.wait_until(status_is(worker, job_id, "completed"))
    assert runner.stop() == 0


def test_healthz_stays_200_while_an_idle_runner_waits_a_poll_interval_longer_than_the_max(worker, start_runner):
    runner = start_runner(*LISTEN + QUICK_HEALTH, "--poll-interval", "8")
    worker.wait_until(lambda: worker.count("available", status=200) == 1)
    polled_at = [record.at for record in worker.requests if record.route == "available"][-1]
    silence_limit = 2 * (0.5 + 0.3 + 1)  # what /healthz allowed when it forgot the first wait
    time.sleep(max(0.0, polled_at + silence_limit + 0.5 - time.monotonic()))
    status, _, body = fetch(runner, "/healthz")
    assert worker.count("available") == 1, "the runner waits 8 s after its first empty poll"
    assert (status, body[:4]) == (200, "ok: "), body
    assert runner.stop() == 0


def test_healthz_stays_200_saying_stopping_while_a_signalled_runner_finishes_its_job(worker, start_runner, gate):
    job_id = worker.add_job("held", {"gate": str(gate)})
    runner = start_runner(*HANDLERS + LISTEN)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    assert health_until(runner, 200)[1].startswith("ok: ")
    signal_thread(runner, signal.SIGTERM, main_thread=True)  # not runner.send: see the test below
    status, line = health_until(runner, 200, "stopping: ")
    assert line == "stopping: finishing 1 job (a shutdown signal came)"
    assert runner.process.poll() is None and worker.job(job_id)["status"] == "in_progress", \
        "the held job still runs"
    assert scrape(runner).value("runpack_slots_busy") == 1
    gate.touch()
    assert runner.wait() == 0
    assert worker.job(job_id)["status"] == "completed"


def test_a_sigterm_that_lands_on_another_thread_is_heard_while_a_job_runs(worker, start_runner, gate):
    job_id = worker.add_job("held", {"gate": str(gate)})
    runner = start_runner(*HANDLERS + LISTEN)
    worker.wait_until(status_is(worker, job_id, "in_progress"))
    signal_thread(runner, signal.SIGTERM, main_thread=False)
    health_until(runner, 200, "stopping: ", timeout=5)
    assert "Received SIGTERM" in runner.output
    gate.touch()
    assert runner.wait() == 0


def test_paths_other_than_metrics_and_healthz_are_404(worker, start_runner):
    runner = start_runner(*LISTEN)
    for path in ("/", "/metric", "/metrics/", "/healthz/extra", "/favicon.ico"):
        status, _, body = fetch(runner, path)
        assert status == 404, "%s answered %d: %s" % (path, status, body)
    assert fetch(runner, "/metrics?format=text")[0] == 200
    assert runner.stop() == 0


def test_head_of_metrics_and_healthz_answers_as_a_get_does_without_the_body(worker, start_runner):
    runner = start_runner(*LISTEN)
    worker.wait_until(lambda: worker.count("available", status=200) >= 1)
    assert fetch(runner, "/metrics", method="HEAD") == (200, "text/plain; version=0.0.4; charset=utf-8", "")
    assert fetch(runner, "/healthz", method="HEAD") == (200, "text/plain; charset=utf-8", "")
    assert fetch(runner, "/nothing", method="HEAD")[0] == 404
    assert runner.stop() == 0


# ---- The relay -------------------------------------------------------------------------------


def test_relay_notices_are_counted_and_the_relay_state_is_listening(worker, relay, start_runner):
    runner = start_runner(*LISTEN, env=relay_environment(relay))
    relay.wait_until(lambda: relay.held_polls >= 1, message="the runner never subscribed to the relay")
    job_id = worker.add_job("hello_world", {"name": "notified", "processing_time": 0})
    worker.wait_until(status_is(worker, job_id, "completed"), timeout=20)
    scraped = scrape_until(worker, runner, lambda scraped: scraped.value("runpack_relay_notices_total") == 1,
                           "the notice was not counted")
    assert scraped.by("runpack_relay_state", "state") == {
        "connecting": 0, "listening": 1, "retrying": 0, "key rejected": 0}
    assert scraped.types["runpack_relay_notices"] == "counter"
    assert runner.stop() == 0


def test_the_relay_state_turns_listening_while_the_relay_holds_the_first_poll(worker, relay, start_runner):
    runner = start_runner(*LISTEN, env=relay_environment(relay))
    relay.wait_until(lambda: relay.held_polls >= 1, message="the runner never subscribed to the relay")
    scraped = scrape_until(worker, runner, lambda scraped: scraped.value("runpack_relay_state", state="listening"),
                           "the relay state is not listening", timeout=5)
    assert scraped.by("runpack_relay_state", "state") == {
        "connecting": 0, "listening": 1, "retrying": 0, "key rejected": 0}
    assert scraped.value("runpack_relay_notices_total") == 0
    assert relay.count("publish") == 0, "no notice ended a poll"
    assert runner.stop() == 0


# ---- Settings: where to listen, and where not -------------------------------------------------


@pytest.mark.parametrize("flags, env", [
    (("--listen", "0"), {}),
    (("--listen", ":0"), {}),
    ((), {"RUNPACK_LISTEN": "127.0.0.1:0"}),
], ids=["port alone", "colon port", "RUNPACK_LISTEN"])
def test_listen_without_a_host_or_from_the_environment_serves_on_127_0_0_1(worker, start_runner, flags, env):
    runner = start_runner(*flags, env=env)
    host, port = served_address(runner)
    assert host == "127.0.0.1" and port > 0
    assert fetch(runner, "/healthz")[0] == 200
    assert runner.stop() == 0


def ipv6_loopback_works():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback (::1) on this machine")
def test_listen_on_the_ipv6_loopback_in_brackets(worker, start_runner):
    runner = start_runner("--listen", "[::1]:0")
    assert served_address(runner)[0] == "::1"
    assert "Serving /metrics and /healthz on http://[::1]:" in runner.output
    assert fetch(runner, "/healthz")[0] == 200
    assert runner.stop() == 0


def test_without_listen_the_runner_serves_nothing(worker, start_runner):
    runner = start_runner()
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert runner.stop() == 0
    assert "Serving /metrics" not in runner.output
    assert "Serving /metrics" not in log_text(runner)


@pytest.mark.parametrize("flags, env", [
    (("--listen", "nope"), {}),
    (("--listen", "1.2.3.4:99999"), {}),
    (("--listen", "127.0.0.1:"), {}),
    (("--listen", "::1"), {}),
    (("--listen", "127.0.0.1:0:0"), {}),
    (("--listen", "é..x:9400"), {}),
    ((), {"RUNPACK_LISTEN": "nope"}),
], ids=["not a port", "port over 65535", "no port", "ipv6 without brackets", "two ports", "non-ascii bad host",
        "RUNPACK_LISTEN"])
def test_a_bad_listen_value_is_one_line_and_exit_2(worker, tmp_path, flags, env):
    result = run_cli("runner", "--worker-url", worker.url, "--state-dir", str(tmp_path), *flags,
                     env=dict(env, RUNPACK_RUNNER_API_KEY=RUNNER_KEY))
    assert result.returncode == EXIT_USAGE
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert ("RUNPACK_LISTEN" if env else "--listen") in lines[0]
    assert worker.count() == 0


def test_a_listen_port_in_use_stops_the_runner_with_exit_2_before_it_claims_anything(worker, start_runner):
    job_id = worker.add_job("hello_world", {"name": "never claimed", "processing_time": 0})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        runner = start_runner("--listen", str(port))
        assert runner.wait() == EXIT_USAGE
    expected = "cannot listen on 127.0.0.1:%d (--listen): Address already in use; stopping" % port
    assert len([line for line in runner.output.splitlines() if expected in line]) == 1, runner.output
    assert "Serving /metrics" not in runner.output
    assert worker.count("claim") == 0 and worker.job(job_id)["status"] == "pending"
