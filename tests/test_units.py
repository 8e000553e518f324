"""The runner's pure parts, in process and in milliseconds: settings, URL checks, text limits,
the retry schedule, the worker's answers, the reports, and the worker client against the fake
worker over real sockets. No subprocess, no sleep: what the end-to-end tests prove slowly, these
pin down one behaviour at a time."""

import argparse
import ast
import copy
import json
import logging
import os
import random
import re
import time
import types
import uuid

import pytest

import runpack_runner
from fake_worker import RUNNER_KEY, RecordingServer

CONSOLE_LIMIT = runpack_runner.CONSOLE_LIMIT
ERROR_MESSAGE_LIMIT = runpack_runner.ERROR_MESSAGE_LIMIT
OUTPUT_JSON_LIMIT = runpack_runner.OUTPUT_JSON_LIMIT
EMOJI = "\U0001F600"  # one character, two UTF-16 code units
MARKER = re.compile(r"\[runpack: (\d+) earlier characters of console output were dropped\]\n")


def settle(names, args=None, environ=None, defaults=None):
    return runpack_runner.resolve_settings(args or types.SimpleNamespace(), names, environ or {}, defaults)


def has_no_lone_surrogate(text):
    """A string that splits a surrogate pair cannot be encoded as UTF-8 (nor sent as JSON to the worker)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- Settings ------------------------------------------------------------------------------


def test_a_flag_beats_the_environment_variable():
    settings = settle(["poll_interval"], types.SimpleNamespace(poll_interval="5"),
                      {"RUNPACK_POLL_INTERVAL": "7"})
    assert settings.poll_interval == 5.0


def test_the_environment_variable_beats_the_default():
    assert settle(["poll_interval"], environ={"RUNPACK_POLL_INTERVAL": "7"}).poll_interval == 7.0


def test_a_setting_given_nowhere_takes_its_default():
    settings = settle(["poll_interval", "concurrency", "once"], argparse.Namespace(poll_interval=None))
    assert (settings.poll_interval, settings.concurrency, settings.once) == (10.0, 1, False)


def test_the_defaults_argument_overrides_the_settings_own_default_but_not_the_environment():
    defaults = {"heartbeat_interval": 1.0}
    assert settle(["heartbeat_interval"], defaults=defaults).heartbeat_interval == 1.0
    assert settle(["heartbeat_interval"], environ={"RUNPACK_HEARTBEAT_INTERVAL": "4"},
                  defaults=defaults).heartbeat_interval == 4.0


def test_a_boolean_flag_given_on_the_command_line_is_true():
    assert settle(["once"], types.SimpleNamespace(once=True)).once is True


@pytest.mark.parametrize("text, value", [("yes", True), ("on", True), ("TRUE", True), (" 1 ", True),
                                         ("off", False), ("no", False), ("false", False), ("0", False)])
def test_a_boolean_environment_variable_reads_yes_on_off_and_the_like(text, value):
    assert settle(["in_process"], environ={"RUNPACK_IN_PROCESS": text}).in_process is value


def test_a_bad_flag_value_names_the_flag_and_the_kind_expected():
    with pytest.raises(runpack_runner.ConfigurationError) as caught:
        settle(["job_timeout"], types.SimpleNamespace(job_timeout="soon"), {"RUNPACK_JOB_TIMEOUT": "5"})
    message = str(caught.value)
    assert "--job-timeout" in message and "a number of seconds" in message and "'soon'" in message
    assert "RUNPACK_JOB_TIMEOUT" not in message


def test_a_bad_environment_value_names_the_variable_and_the_kind_expected():
    with pytest.raises(runpack_runner.ConfigurationError) as caught:
        settle(["concurrency"], environ={"RUNPACK_CONCURRENCY": "0"})
    message = str(caught.value)
    assert "RUNPACK_CONCURRENCY" in message and "a whole number from 1" in message
    assert "--concurrency" not in message


def test_a_boolean_that_is_neither_true_nor_false_is_a_configuration_error():
    with pytest.raises(runpack_runner.ConfigurationError) as caught:
        settle(["once"], environ={"RUNPACK_ONCE": "maybe"})
    assert "RUNPACK_ONCE" in str(caught.value) and "true or false" in str(caught.value)


@pytest.mark.parametrize("text, value", [("0", 0.0), ("2.5", 2.5), ("1e3", 1000.0),
                                         (str(runpack_runner.MAX_SECONDS), runpack_runner.MAX_SECONDS)])
def test_seconds_accept_zero_up_to_max_seconds(text, value):
    assert runpack_runner._parse_seconds(text) == value


@pytest.mark.parametrize("text", ["-1", "-0.5", str(runpack_runner.MAX_SECONDS * 2), "nan", "inf", "-inf",
                                  "soon", ""])
def test_seconds_refuse_negative_huge_nan_infinite_and_words(text):
    with pytest.raises(ValueError):
        runpack_runner._parse_seconds(text)


@pytest.mark.parametrize("text", ["0", "0.0", "-3", "nan", str(runpack_runner.MAX_SECONDS * 2)])
def test_positive_seconds_refuse_zero_and_what_seconds_refuse(text):
    with pytest.raises(ValueError):
        runpack_runner._parse_positive_seconds(text)


def test_positive_seconds_accept_a_small_fraction():
    assert runpack_runner._parse_positive_seconds("0.001") == 0.001


@pytest.mark.parametrize("parse, text, value", [
    (runpack_runner._parse_count, "0", 0), (runpack_runner._parse_count, "12", 12),
    (runpack_runner._parse_positive_count, "1", 1), (runpack_runner._parse_positive_count, "8", 8)])
def test_counts_accept_whole_numbers(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text", [
    (runpack_runner._parse_count, "-1"), (runpack_runner._parse_count, "1.5"),
    (runpack_runner._parse_count, "many"), (runpack_runner._parse_positive_count, "0"),
    (runpack_runner._parse_positive_count, "-2"), (runpack_runner._parse_positive_count, "2.0")])
def test_counts_refuse_negatives_fractions_words_and_positive_counts_refuse_zero(parse, text):
    with pytest.raises(ValueError):
        parse(text)


def test_boolean_parser_passes_a_bool_through_and_refuses_other_words():
    assert runpack_runner._parse_boolean(True) is True and runpack_runner._parse_boolean(False) is False
    with pytest.raises((ValueError, KeyError)):
        runpack_runner._parse_boolean("perhaps")


# ---- The worker URL ------------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("https://runpack.example.org/", "https://runpack.example.org"),
    ("https://runpack.example.org:8443/base/", "https://runpack.example.org:8443/base"),
    ("https://runpack.example.org", "https://runpack.example.org")])
def test_worker_url_comes_back_without_its_trailing_slash(url, expected):
    assert runpack_runner.check_worker_url(url, False) == expected


@pytest.mark.parametrize("url", [
    "ftp://example.org", "example.org", "https://", "https://example.org:99999", "https://example.org:port",
    "https://example.org/?x=1", "https://example.org/#top", "https://user:password@example.org",
    "https://user@example.org"])
def test_worker_url_with_a_bad_scheme_host_port_query_fragment_or_credentials_is_refused(url):
    with pytest.raises(runpack_runner.ConfigurationError):
        runpack_runner.check_worker_url(url, True)


def test_plain_http_to_a_remote_host_is_refused_unless_allowed():
    with pytest.raises(runpack_runner.ConfigurationError) as caught:
        runpack_runner.check_worker_url("http://runpack.example.org", False)
    assert "runpack.example.org" in str(caught.value)
    assert runpack_runner.check_worker_url("http://runpack.example.org/", True) == "http://runpack.example.org"


@pytest.mark.parametrize("url", ["http://localhost:8787", "http://127.0.0.1:8787/", "http://[::1]:8787"])
def test_plain_http_to_loopback_is_allowed(url):
    assert runpack_runner.check_worker_url(url, False) == url.rstrip("/")


# ---- Text limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, length", [("", 0), ("abc", 3), ("é", 1), (EMOJI, 2), ("a" + EMOJI + "b", 4)])
def test_js_length_counts_astral_characters_twice(text, length):
    assert runpack_runner.js_length(text) == length


def test_console_tail_leaves_a_console_within_the_limit_unchanged():
    assert runpack_runner.keep_console_tail("x" * 100, limit=100) == "x" * 100
    assert runpack_runner.keep_console_tail(EMOJI * 50, limit=100) == EMOJI * 50


def test_console_tail_keeps_the_end_after_a_line_saying_how_much_was_dropped():
    console = "".join("line %d\n" % number for number in range(1000))
    kept = runpack_runner.keep_console_tail(console, limit=500)
    assert runpack_runner.js_length(kept) <= 500
    marker = MARKER.match(kept)
    assert marker, kept[:100]
    tail = kept[marker.end():]
    assert console.endswith(tail) and tail.endswith("line 999\n")
    assert int(marker.group(1)) == len(console) - len(tail)


@pytest.mark.parametrize("limit", range(100, 106))
def test_console_tail_never_splits_a_surrogate_pair(limit):
    console = EMOJI * 200
    kept = runpack_runner.keep_console_tail(console, limit=limit)
    assert runpack_runner.js_length(kept) <= limit
    assert has_no_lone_surrogate(kept)
    tail = kept[MARKER.match(kept).end():]
    assert tail and tail == EMOJI * len(tail)


def test_error_message_within_the_limit_is_unchanged():
    assert runpack_runner.trim_error_message("e" * 50, limit=50) == "e" * 50


def test_error_message_over_the_limit_keeps_its_start_and_says_it_was_truncated():
    message = "Job execution failed: " + "because " * 100
    trimmed = runpack_runner.trim_error_message(message, limit=100)
    assert runpack_runner.js_length(trimmed) <= 100
    assert trimmed.endswith(" [truncated]")
    assert message.startswith(trimmed[:-len(" [truncated]")])
    assert trimmed.startswith("Job execution failed: because")


@pytest.mark.parametrize("limit", range(40, 44))
def test_error_message_trim_never_splits_a_surrogate_pair(limit):
    trimmed = runpack_runner.trim_error_message(EMOJI * 100, limit=limit)
    assert runpack_runner.js_length(trimmed) <= limit
    assert has_no_lone_surrogate(trimmed)
    assert trimmed.endswith(" [truncated]") and trimmed[:-len(" [truncated]")] == EMOJI * ((limit - 12) // 2)


def test_redact_replaces_every_occurrence_of_the_secret():
    assert runpack_runner.redact("key=s3cr3t, again s3cr3t", "s3cr3t") == "key=[redacted], again [redacted]"


def test_a_short_key_is_redacted_where_it_stands_alone_and_never_inside_ordinary_words():
    assert runpack_runner.redact("[Errno -2] Name or service not known", "-") == "[Errno -2] Name or service not known"
    assert runpack_runner.redact("key abc; abcdef; x=abc&y; (abc)", "abc") == \
        "key [redacted]; abcdef; x=[redacted]&y; ([redacted])"


def test_a_long_key_is_redacted_even_inside_a_longer_run():
    key = "k" * runpack_runner.SECRET_LENGTH_REDACTED_ANYWHERE
    assert runpack_runner.redact("x%sy" % key, key) == "x[redacted]y"


@pytest.mark.parametrize("secret", [None, ""])
def test_redact_without_a_secret_changes_nothing(secret):
    assert runpack_runner.redact("nothing to hide", secret) == "nothing to hide"


# ---- Retry schedule ------------------------------------------------------------------------


def test_backoff_delay_of_the_nth_failure_stays_within_first_times_two_to_the_n_minus_one():
    random.seed(1)
    for _ in range(50):
        backoff = runpack_runner.RetryBackoff(cap=1000.0, first=0.5)
        for failure in range(1, 9):
            assert 0.0 <= backoff.next_delay() <= 0.5 * 2 ** (failure - 1)


def test_backoff_delay_never_exceeds_the_cap():
    random.seed(2)
    backoff = runpack_runner.RetryBackoff(cap=3.0)
    delays = [backoff.next_delay() for _ in range(500)]
    assert max(delays) <= 3.0
    assert max(delays) > 2.0  # the cap, not the first steps, bounds the late delays


def test_backoff_delays_grow_with_the_failures():
    random.seed(3)
    first, fifth = [], []
    for _ in range(200):
        backoff = runpack_runner.RetryBackoff(cap=60.0)
        delays = [backoff.next_delay() for _ in range(5)]
        first.append(delays[0])
        fifth.append(delays[4])
    assert max(first) <= 1.0 < max(fifth) <= 16.0


def test_backoff_delays_are_random():
    random.seed(4)
    backoff = runpack_runner.RetryBackoff(cap=60.0)
    for _ in range(6):
        backoff.next_delay()
    assert len({backoff.next_delay() for _ in range(20)}) == 20


def test_backoff_waits_what_a_429_asked_plus_up_to_a_second_even_beyond_the_cap():
    random.seed(5)
    backoff = runpack_runner.RetryBackoff(cap=1.0)
    error = runpack_runner.TransientWorkerError("x", 429, 2.0)
    delays = [backoff.next_delay(error) for _ in range(200)]
    assert all(2.0 <= delay <= 3.0 for delay in delays)
    assert len(set(delays)) > 1


def test_backoff_ignores_an_error_that_asked_for_no_particular_wait():
    random.seed(6)
    backoff = runpack_runner.RetryBackoff(cap=60.0)
    assert backoff.next_delay(runpack_runner.TransientWorkerError("x", 500)) <= 1.0


def test_backoff_counts_failures():
    random.seed(7)
    backoff = runpack_runner.RetryBackoff(cap=60.0)
    for _ in range(10):
        backoff.next_delay()
    backoff.next_delay(runpack_runner.TransientWorkerError("x", 429, 1.0))
    assert backoff.failures == 11


class LogLines(logging.Handler):
    """The runner's log messages, kept in a list (the runner's logger does not propagate)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = LogLines()
    runpack_runner.LOG.addHandler(handler)
    runpack_runner.LOG.setLevel(logging.INFO)
    yield handler.lines
    runpack_runner.LOG.removeHandler(handler)


def failing(times, error_class=runpack_runner.TransientWorkerError):
    """An attempt that raises ``times`` times, then answers "ok"; ``calls`` counts the tries."""
    calls = []

    def attempt():
        calls.append(None)
        if len(calls) <= times:
            raise error_class("GET /x: worker error 503", 503)
        return "ok"
    attempt.calls = calls
    return attempt


def test_retrying_repeats_transient_failures_with_one_warning_a_spell_and_says_when_it_works(log_lines):
    waits = []
    retrying = runpack_runner.Retrying(0.5, waits.append, lambda delay: False)
    attempt = failing(3)
    assert retrying.call(attempt, "Cannot poll yet") == "ok"
    assert len(attempt.calls) == 4 and len(waits) == 3
    assert all(0 <= wait <= 0.5 for wait in waits), "waits are capped by retry_max"
    warnings = [line for line in log_lines if line.startswith("Cannot poll yet: GET /x")]
    assert len(warnings) == 1 and "trying again in" in warnings[0] and "back-off up to 0.5 s" in warnings[0]
    assert len([line for line in log_lines if line.startswith("The worker answers again, after 3 failed tries")]) == 1


def test_retrying_says_nothing_when_the_first_try_works(log_lines):
    retrying = runpack_runner.Retrying(0.5, lambda seconds: None, lambda delay: False)
    assert retrying.call(lambda: 7, "Cannot poll yet") == 7
    assert log_lines == []


def test_retrying_gives_up_before_a_wait_when_asked_and_carries_the_last_error(log_lines):
    waits = []
    retrying = runpack_runner.Retrying(0.5, waits.append, lambda delay: True)
    with pytest.raises(runpack_runner.GaveUp) as gave_up:
        retrying.call(failing(5), "Cannot poll yet")
    assert isinstance(gave_up.value.error, runpack_runner.TransientWorkerError)
    assert waits == [] and log_lines == [], "no wait and no 'trying again' once it gives up"


def test_retrying_gives_up_after_a_wait_that_a_stop_cut_short():
    asked = []

    def give_up(delay):
        asked.append(delay)
        return len(asked) == 2  # no before the wait, yes after it
    retrying = runpack_runner.Retrying(0.5, lambda seconds: None, give_up)
    attempt = failing(5)
    with pytest.raises(runpack_runner.GaveUp):
        retrying.call(attempt, "Cannot poll yet")
    assert len(attempt.calls) == 1 and asked[1] == 0.0


def test_retrying_lets_a_definitive_no_through_at_once():
    retrying = runpack_runner.Retrying(0.5, lambda seconds: None, lambda delay: False)
    attempt = failing(1, lambda message, status: runpack_runner.WorkerRejected(message, 400))
    with pytest.raises(runpack_runner.WorkerRejected):
        retrying.call(attempt, "Cannot poll yet")
    assert len(attempt.calls) == 1


def test_retrying_waits_what_a_429_asked_for():
    waits = []
    retrying = runpack_runner.Retrying(0.1, waits.append, lambda delay: False)
    limited = [runpack_runner.TransientWorkerError("rate limited", 429, 2.0)]

    def attempt():
        if limited:
            raise limited.pop()
        return "ok"
    assert retrying.call(attempt, "Cannot poll yet") == "ok"
    assert 2.0 <= waits[0] <= 3.0, "the reset time, not the 0.1 s cap"


# ---- Batch limits --------------------------------------------------------------------------


def batch_limits(**settings):
    values = dict(once=False, max_jobs=0, max_uptime=0.0, idle_timeout=0.0)
    values.update(settings)
    return runpack_runner.BatchLimits(types.SimpleNamespace(**values))


def test_batch_limits_without_limits_are_never_reached():
    limits = batch_limits()
    for _ in range(100):
        limits.job_started()
    assert limits.reached(idle=True) is None and limits.seconds_left(idle=True) is None


def test_once_is_reached_after_the_first_job_with_exit_code_5():
    limits = batch_limits(once=True)
    assert limits.reached(idle=False) is None
    limits.job_started()
    assert limits.reached(idle=False)[0] == runpack_runner.EXIT_JOBS_DONE == 5


def test_max_jobs_counts_the_jobs_started():
    limits = batch_limits(max_jobs=3)
    for _ in range(2):
        limits.job_started()
    assert limits.reached(idle=False) is None
    limits.job_started()
    assert "ran 3 job(s)" in limits.reached(idle=False)[1]


def test_idle_timeout_counts_only_while_no_job_runs():
    limits = batch_limits(idle_timeout=0.001)
    limits.last_busy -= 1.0
    assert limits.reached(idle=False) is None, "a running job is not idleness"
    assert limits.reached(idle=True)[0] == runpack_runner.EXIT_IDLE
    limits.busy()
    assert limits.seconds_left(idle=True) <= 0.001


def test_max_uptime_is_reached_and_comes_before_idleness():
    limits = batch_limits(max_uptime=0.001, idle_timeout=0.001)
    limits.started_at -= 1.0
    limits.last_busy -= 1.0
    assert limits.reached(idle=True)[0] == runpack_runner.EXIT_MAX_UPTIME
    assert limits.seconds_left(idle=False) == 0.0


def test_seconds_left_is_the_nearer_limit():
    limits = batch_limits(max_uptime=100.0, idle_timeout=10.0)
    assert 9.0 < limits.seconds_left(idle=True) <= 10.0
    assert 99.0 < limits.seconds_left(idle=False) <= 100.0


# ---- The worker's answers: read_answer -----------------------------------------------------

WHERE = "GET /api/runner/verify"


def read(status, body=b"", location=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    return runpack_runner.read_answer(WHERE, status, raw, location)


@pytest.mark.parametrize("status", [200, 201])
def test_answer_2xx_json_object_is_returned_decoded(status):
    assert read(status, {"exists": True, "runner_name": "r"}) == {"exists": True, "runner_name": "r"}


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_answer_redirect_is_transient_and_not_followed(status):
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(status, location="https://elsewhere.example/api/runner/verify")
    message = str(caught.value)
    assert caught.value.status == status and message.startswith(WHERE)
    assert "redirect" in message and "not followed" in message


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 599])
def test_answer_408_and_5xx_are_transient(status):
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(status, {"error": "Internal error"})
    assert caught.value.status == status and str(caught.value).startswith(WHERE)
    assert not isinstance(caught.value, runpack_runner.WorkerRejected)


@pytest.mark.parametrize("raw", [b"<html><body>Bad gateway</body></html>", b"[1, 2]", b'"text"', b"\xff\xfe garbage",
                                 b""])
def test_answer_2xx_that_is_not_a_json_object_is_transient(raw):
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(200, raw)
    assert caught.value.status == 200 and str(caught.value).startswith(WHERE)


def test_answer_429_asks_to_wait_until_the_reset_time():
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(429, {"error": "Rate limit exceeded", "resetTime": int((time.time() + 5) * 1000)})
    assert caught.value.status == 429
    assert 3.0 <= caught.value.retry_after <= 5.0


@pytest.mark.parametrize("reset_in_s, expected", [(-30, 0.0), (3600, 60.0)])
def test_answer_429_wait_is_between_zero_and_the_rate_limit_window(reset_in_s, expected):
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(429, {"error": "Rate limit exceeded", "resetTime": int((time.time() + reset_in_s) * 1000)})
    assert caught.value.retry_after == expected


@pytest.mark.parametrize("body", [{"error": "Rate limit exceeded"}, b"slow down", {"resetTime": "soon"}])
def test_answer_429_without_a_reset_time_asks_for_no_particular_wait(body):
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        read(429, body)
    assert caught.value.status == 429 and caught.value.retry_after is None


def test_answer_401_means_the_key_was_rejected():
    with pytest.raises(runpack_runner.WorkerKeyRejected) as caught:
        read(401, {"error": "Invalid API key"})
    assert isinstance(caught.value, runpack_runner.WorkerRejected)
    assert not isinstance(caught.value, runpack_runner.UnauthorizedNotByTheWorker)
    assert caught.value.status == 401
    assert str(caught.value) == WHERE + ": the worker rejected the runner key (Invalid API key)"


def test_answer_401_with_an_html_page_is_not_the_worker_rejecting_the_key():
    with pytest.raises(runpack_runner.UnauthorizedNotByTheWorker) as caught:
        read(401, b"<!DOCTYPE html><html><head><title>Sign in</title></head></html>")
    assert caught.value.status == 401
    assert str(caught.value) == WHERE + ": the URL answers 401 with an HTML page, not as a Runpack worker"


@pytest.mark.parametrize("status, body, decoded", [
    (404, {"exists": False, "message": "Runner not found"}, {"exists": False, "message": "Runner not found"}),
    (400, {"success": False, "message": "Job not found or not claimed by this runner"},
     {"success": False, "message": "Job not found or not claimed by this runner"}),
    (409, b"<html>conflict</html>", None)])
def test_answer_other_4xx_is_a_rejection_carrying_status_and_decoded_body(status, body, decoded):
    with pytest.raises(runpack_runner.WorkerRejected) as caught:
        read(status, body)
    assert not isinstance(caught.value, runpack_runner.WorkerKeyRejected)
    assert (caught.value.status, caught.value.body) == (status, decoded)
    assert str(caught.value).startswith(WHERE)


def test_an_answer_that_is_not_json_is_described_in_words_never_as_bytes():
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        runpack_runner.read_answer("POST /api/runner/register", 502, b"<html><body>Bad gateway</body></html>" * 9, None)
    assert str(caught.value) == "POST /api/runner/register: worker error 502 (an HTML page)"
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        runpack_runner.read_answer("GET /api/runner/jobs/available", 503, b"upstream connect error " * 20, None)
    assert "worker error 503 (text that is not JSON: upstream connect error" in str(caught.value)
    assert "b'" not in str(caught.value) and len(str(caught.value)) < 200, "the first words, not the whole text"


# ---- /healthz's verdict ----------------------------------------------------------------------


def health_of(slots_busy, stopping, stopping_now=False):
    """RunnerHealth's verdict for a runner whose worker has just answered."""
    metrics = runpack_runner.RunnerMetrics()
    metrics.worker_answered("available", 200, True)
    settings = types.SimpleNamespace(heartbeat_interval=30, retry_max=60, request_timeout=30)
    status = runpack_runner.RunnerStatus(2, slots_busy, 0, "", 0, stopping, stopping_now)
    return runpack_runner.RunnerHealth(metrics, settings, 60).check(status)


def test_healthz_stays_200_while_a_gracefully_stopping_runner_finishes_its_jobs():
    assert health_of(1, "a shutdown signal came") == (200, "stopping: finishing 1 job (a shutdown signal came)")
    assert health_of(2, "--max-uptime 60 s reached; taking no new job") == (
        200, "stopping: finishing 2 jobs (--max-uptime 60 s reached; taking no new job)")


def test_healthz_is_503_once_a_stopping_runner_has_no_job_left_or_stops_its_jobs_now():
    assert health_of(0, "a shutdown signal came") == (503, "stopping: a shutdown signal came")
    assert health_of(1, "a shutdown signal came", stopping_now=True) == (503, "stopping: a shutdown signal came")
    assert health_of(1, "")[0] == 200 and health_of(1, "")[1].startswith("ok: ")


# ---- Reports -------------------------------------------------------------------------------


def test_error_report_holds_the_message_and_the_console():
    assert runpack_runner.error_report("Job execution failed: boom", "line 1\n") == {
        "kind": "error", "body": {"error_message": "Job execution failed: boom", "console_output": "line 1\n"}}


def test_error_report_keeps_the_details_as_a_traceback_beside_the_body():
    report = runpack_runner.error_report("boom", "", "Traceback (most recent call last): ...")
    assert report["traceback"] == "Traceback (most recent call last): ..."
    assert report["body"] == {"error_message": "boom", "console_output": ""}


def test_error_report_does_not_trim_what_seal_report_will_trim():
    message, console = "e" * (ERROR_MESSAGE_LIMIT + 100), "c" * (CONSOLE_LIMIT + 100)
    report = runpack_runner.error_report(message, console)
    assert report["body"] == {"error_message": message, "console_output": console}


def test_complete_report_moves_console_output_from_the_result_to_the_console():
    result = {"answer": 42, "console_output": "final console\n"}
    assert runpack_runner.complete_report(result, "live console\n") == {
        "kind": "complete", "body": {"output_data": {"answer": 42}, "console_output": "final console\n"}}


def test_complete_report_turns_a_none_console_output_into_an_empty_console():
    report = runpack_runner.complete_report({"answer": 42, "console_output": None}, "live console\n")
    assert report["body"] == {"output_data": {"answer": 42}, "console_output": ""}


def test_complete_report_keeps_the_live_console_when_the_result_has_none():
    report = runpack_runner.complete_report({"answer": 42}, "live console\n")
    assert report == {"kind": "complete", "body": {"output_data": {"answer": 42}, "console_output": "live console\n"}}


def test_complete_report_does_not_modify_the_result():
    result = {"answer": [1, 2], "console_output": "final"}
    runpack_runner.complete_report(result, "")
    assert result == {"answer": [1, 2], "console_output": "final"}


def test_complete_report_does_not_trim_the_console():
    console = "c" * (CONSOLE_LIMIT + 100)
    assert runpack_runner.complete_report({}, console)["body"]["console_output"] == console


@pytest.mark.parametrize("result", [None, [1, 2], "done", 42])
def test_complete_report_of_a_result_that_is_not_a_dict_is_an_error_report(result):
    report = runpack_runner.complete_report(result, "live console\n")
    assert report["kind"] == "error"
    assert report["body"]["console_output"] == "live console\n"
    assert report["body"]["error_message"]


def _recursive():
    value = {"items": []}
    value["items"].append(value)
    return value


@pytest.mark.parametrize("output", [{"tags": {1, 2}}, {"thing": object()}, {"x": float("nan")},
                                    {"x": float("inf")}, {"x": [float("-inf")]}, _recursive()],
                         ids=["set", "object", "nan", "infinity", "minus-infinity", "recursive"])
def test_complete_report_of_output_that_is_not_json_is_an_error_report(output):
    report = runpack_runner.complete_report(output, "live console\n")
    assert report["kind"] == "error"
    assert report["body"]["console_output"] == "live console\n"


def test_complete_report_of_output_over_the_json_limit_is_an_error_report():
    overhead = len('{"s":""}')
    assert runpack_runner.complete_report({"s": "x" * (OUTPUT_JSON_LIMIT - overhead)}, "")["kind"] == "complete"
    report = runpack_runner.complete_report({"s": "x" * (OUTPUT_JSON_LIMIT - overhead + 1)}, "console")
    assert report["kind"] == "error" and report["body"]["console_output"] == "console"


def test_complete_report_counts_the_json_limit_in_javascript_length_of_compact_json():
    overhead = len('{"s":""}')
    astral = {"s": EMOJI * ((OUTPUT_JSON_LIMIT - overhead) // 2 + 1)}  # under the limit in characters
    assert runpack_runner.complete_report(astral, "")["kind"] == "error"
    accented = {"s": "é" * (OUTPUT_JSON_LIMIT - overhead)}  # at the limit unless escaped as \u00e9
    assert runpack_runner.complete_report(accented, "")["kind"] == "complete"


def error_body(message, console):
    """An error report built by hand, so that the seal_report tests do not depend on error_report."""
    return {"kind": "error", "body": {"error_message": message, "console_output": console}}


def test_seal_report_replaces_the_key_everywhere_in_the_body():
    report = {"kind": "complete", "body": {
        "output_data": {"url": "https://x.example/?key=" + RUNNER_KEY, "nested": [{"deep": RUNNER_KEY}], "n": 3},
        "console_output": "printed " + RUNNER_KEY + "\n"}}
    sealed = runpack_runner.seal_report(report, RUNNER_KEY)
    assert sealed == {"kind": "complete", "body": {
        "output_data": {"url": "https://x.example/?key=[redacted]", "nested": [{"deep": "[redacted]"}], "n": 3},
        "console_output": "printed [redacted]\n"}}


def test_seal_report_replaces_the_key_in_the_error_message():
    report = error_body("failed with key " + RUNNER_KEY, "")
    assert runpack_runner.seal_report(report, RUNNER_KEY)["body"]["error_message"] == "failed with key [redacted]"


def test_seal_report_replaces_a_key_that_json_would_escape():
    secret = 'key"with\\quote'  # a key may hold any printable ASCII but the space
    report = error_body("message " + secret, "console " + secret)
    sealed = runpack_runner.seal_report(report, secret)
    assert sealed["body"] == {"error_message": "message [redacted]", "console_output": "console [redacted]"}


@pytest.mark.parametrize("secret", [None, "", RUNNER_KEY])
def test_seal_report_returns_a_new_report_of_kind_and_body_only(secret):
    report = dict(error_body("boom", "console"), traceback="Traceback ...")
    original = copy.deepcopy(report)
    sealed = runpack_runner.seal_report(report, secret)
    assert sealed is not report and set(sealed) == {"kind", "body"}
    assert sealed["body"] == {"error_message": "boom", "console_output": "console"}
    assert report == original


def test_seal_report_does_not_modify_the_report_it_is_given():
    report = {"kind": "complete", "body": {"output_data": {"key": RUNNER_KEY}, "console_output": RUNNER_KEY * 3}}
    original = copy.deepcopy(report)
    runpack_runner.seal_report(report, RUNNER_KEY)
    assert report == original


@pytest.mark.parametrize("secret", [None, ""])
def test_seal_report_applies_the_worker_limits_even_without_a_key(secret):
    report = error_body("e" * (ERROR_MESSAGE_LIMIT + 1), "c" * (CONSOLE_LIMIT + 1))
    body = runpack_runner.seal_report(report, secret)["body"]
    assert runpack_runner.js_length(body["error_message"]) <= ERROR_MESSAGE_LIMIT
    assert body["error_message"].endswith(" [truncated]")
    assert runpack_runner.js_length(body["console_output"]) <= CONSOLE_LIMIT
    assert MARKER.match(body["console_output"])


def test_seal_report_applies_the_limits_after_the_longer_replacement():
    secret = "k3y"  # "[redacted]" is longer: a console at the limit grows past it
    report = error_body((secret + " ") * (ERROR_MESSAGE_LIMIT // 4), (secret + " ") * (CONSOLE_LIMIT // 4))
    body = runpack_runner.seal_report(report, secret)["body"]
    assert runpack_runner.js_length(body["console_output"]) <= CONSOLE_LIMIT
    assert runpack_runner.js_length(body["error_message"]) <= ERROR_MESSAGE_LIMIT
    assert secret not in body["console_output"] and secret not in body["error_message"]


def test_seal_report_of_a_complete_report_trims_the_console_and_keeps_the_output():
    report = {"kind": "complete", "body": {"output_data": {"answer": 42}, "console_output": EMOJI * CONSOLE_LIMIT}}
    sealed = runpack_runner.seal_report(report, None)
    assert sealed["kind"] == "complete" and sealed["body"]["output_data"] == {"answer": 42}
    assert runpack_runner.js_length(sealed["body"]["console_output"]) <= CONSOLE_LIMIT
    assert has_no_lone_surrogate(sealed["body"]["console_output"])


REFUSAL = runpack_runner.WorkerRejected(
    "POST /api/runner/jobs/j/complete: 400 Output JSON exceeds size limit of 512000 bytes", 400,
    {"error": "Output JSON exceeds size limit of 512000 bytes"})


def test_a_refused_complete_report_falls_back_to_an_error_report_with_the_same_console():
    report = {"kind": "complete", "body": {"output_data": {"answer": 42}, "console_output": "console\n"}}
    fallback = runpack_runner.fallback_report(report, REFUSAL)
    assert fallback["kind"] == "error" and fallback["body"]["console_output"] == "console\n"
    assert "refused the complete report" in fallback["body"]["error_message"]
    assert str(REFUSAL) in fallback["body"]["error_message"]


def test_a_refused_error_report_falls_back_to_the_same_message_without_console():
    report = runpack_runner.error_report("Job execution failed: boom", "console\n")
    fallback = runpack_runner.fallback_report(report, REFUSAL)
    assert fallback["kind"] == "error" and fallback["body"]["console_output"] == ""
    assert "refused the error report" in fallback["body"]["error_message"]


def test_a_refused_minimal_report_has_no_fallback():
    complete = {"kind": "complete", "body": {"output_data": {}, "console_output": "console\n"}}
    first = runpack_runner.fallback_report(complete, REFUSAL)
    minimal = runpack_runner.fallback_report(first, REFUSAL)
    assert minimal is not None
    assert runpack_runner.fallback_report(minimal, REFUSAL) is None


def test_a_fallback_message_fits_the_worker_limit_however_long_the_refusal():
    refusal = runpack_runner.WorkerRejected("x" * (2 * ERROR_MESSAGE_LIMIT), 400, None)
    report = runpack_runner.error_report("boom", "console\n")
    message = runpack_runner.fallback_report(report, refusal)["body"]["error_message"]
    assert runpack_runner.js_length(message) <= ERROR_MESSAGE_LIMIT


def test_falling_back_ends_even_when_every_refusal_is_worded_differently():
    report = {"kind": "complete", "body": {"output_data": {}, "console_output": "console\n"}}
    for attempt in range(10):
        refusal = runpack_runner.WorkerRejected("400 request %d refused" % attempt, 400, None)
        report = runpack_runner.fallback_report(report, refusal)
        if report is None:
            break
    assert report is None and attempt == 2, "complete -> error with console -> error without -> end"


def test_a_refused_short_error_report_without_console_has_no_fallback():
    report = runpack_runner.error_report("Job execution failed: boom", "")
    assert runpack_runner.fallback_report(report, REFUSAL) is None


def test_a_refused_long_error_report_without_console_falls_back_to_a_short_one():
    report = runpack_runner.error_report("Job execution failed: " + "e" * 5000, "")
    fallback = runpack_runner.fallback_report(report, REFUSAL)
    assert runpack_runner.js_length(fallback["body"]["error_message"]) <= 1000


# ---- Small tools: run parameters, exit descriptions, consoles, progress --------------------


def test_run_params_values_are_json_when_they_parse_else_strings():
    params = runpack_runner.parse_run_params(
        ["n=3", "flag=true", "name=Alice", "items=[1, 2]", "empty=", "sum=a=b"], None, None)
    assert params == {"n": 3, "flag": True, "name": "Alice", "items": [1, 2], "empty": "", "sum": "a=b"}


def test_run_params_file_then_json_then_assignments_each_override_the_one_before(tmp_path):
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"a": 1, "b": 1, "c": 1}))
    assert runpack_runner.parse_run_params(["c=3"], '{"b": 2, "c": 2}', str(params_file)) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("assignments, params_json, params_file", [
    (["justaword"], None, None), (["=value"], None, None), ([], "{oops", None), ([], "[1]", None),
    ([], None, "/nonexistent/params.json")])
def test_bad_run_params_are_configuration_errors(assignments, params_json, params_file):
    with pytest.raises(runpack_runner.ConfigurationError):
        runpack_runner.parse_run_params(assignments, params_json, params_file)


def test_describe_exit_of_sigkill_suggests_the_oom_killer():
    description = runpack_runner.describe_exit(-9)
    assert "SIGKILL" in description and "out of memory" in description


def test_describe_exit_names_other_signals_and_exit_codes():
    assert "SIGTERM" in runpack_runner.describe_exit(-15)
    assert "out of memory" not in runpack_runner.describe_exit(-15)
    assert "exited with code 3" in runpack_runner.describe_exit(3)


def test_merge_console_without_process_output_is_the_handler_console():
    assert runpack_runner.merge_console("handler\n", "") == "handler\n"


def test_merge_console_puts_the_process_output_after_a_marker_line():
    marker = runpack_runner.PROCESS_OUTPUT_MARKER
    assert runpack_runner.merge_console("handler", "printed\n") == "handler\n%s\nprinted\n" % marker
    assert runpack_runner.merge_console("handler\n", "printed\n") == "handler\n%s\nprinted\n" % marker
    assert runpack_runner.merge_console("", "printed\n") == "%s\nprinted\n" % marker


def test_job_progress_snapshot_holds_the_latest_update():
    progress = runpack_runner.JobProgress(30.0)
    version = progress.snapshot()[0]
    progress(progress_current=3, progress_total=10, console_output="line 1")
    progress(console_output="line 1\nline 2")
    new_version, current, total, console = progress.snapshot()
    assert (current, total, console) == (3, 10, "line 1\nline 2")
    assert new_version != version


def test_a_progress_value_that_is_not_a_number_is_a_handler_bug_not_a_parameter_error():
    progress = runpack_runner.JobProgress(1.0)
    for bad in ("x", float("nan"), float("inf"), [1]):
        with pytest.raises(TypeError):
            progress(progress_current=bad)
    progress(progress_current=3.7, progress_total="10")
    assert progress.snapshot()[1:3] == (3, 10)


def test_job_progress_console_output_none_becomes_empty():
    progress = runpack_runner.JobProgress(30.0)
    progress.update(console_output="something")
    progress.update(console_output=None)
    assert progress.snapshot()[3] == ""


def test_job_progress_raises_job_cancelled_once_cancelled_with_the_first_reason():
    progress = runpack_runner.JobProgress(30.0)
    progress.cancel("claim lost")
    progress.cancel("shutdown")
    with pytest.raises(runpack_runner.JobCancelled) as caught:
        progress(progress_current=1)
    assert str(caught.value) == "claim lost"
    assert progress.cancelled
    assert not issubclass(runpack_runner.JobCancelled, Exception)  # `except Exception` in a handler lets it by


# ---- The worker client, against the fake worker over real sockets ---------------------------

TIMEOUT_S = 2.0


def client_for(worker, runner_id=None, key=RUNNER_KEY):
    return runpack_runner.WorkerClient(worker.url, key, TIMEOUT_S, runner_id=runner_id)


def claimed_job(worker, runner_id, params=None):
    job_id = worker.add_job("hello_world", params or {"name": "A", "processing_time": 0})
    worker.claim_for(job_id, runner_id)
    return job_id


def test_client_health_is_quiet_when_the_worker_answers(worker):
    assert client_for(worker).health() is None
    assert worker.count("health", status=200) == 1


def test_client_registers_and_gets_a_runner_id(worker):
    runner_id = client_for(worker).register("runner-a", ["hello_world"])
    assert worker.runners[runner_id]["name"] == "runner-a"
    assert worker.runners[runner_id]["capabilities"] == ["hello_world"]


def test_client_verify_is_true_for_a_known_runner_and_false_for_a_forgotten_one(worker):
    runner_id = worker.register_runner()
    client = client_for(worker)
    assert client.verify(runner_id) is True
    worker.forget_runner(runner_id)
    assert client.verify(runner_id) is False


def test_client_verify_of_a_404_that_is_not_the_workers_is_a_rejection(worker):
    worker.add_fault("status", route="verify", status=404, body={"error": "Not found"})
    with pytest.raises(runpack_runner.WorkerRejected):
        client_for(worker).verify(str(uuid.uuid4()))


def test_client_check_key_is_none_when_the_worker_accepts_the_key(worker):
    assert client_for(worker).check_key() is None


def test_client_check_key_raises_when_the_worker_rejects_the_key(worker):
    with pytest.raises(runpack_runner.WorkerKeyRejected):
        client_for(worker, key="not-the-runner-key").check_key()


def test_client_with_a_wrong_key_gets_worker_key_rejected(worker):
    with pytest.raises(runpack_runner.WorkerKeyRejected) as caught:
        client_for(worker, key="not-the-runner-key").register("runner-a", ["hello_world"])
    assert caught.value.status == 401
    assert worker.runners == {}


def test_client_lists_the_available_jobs_of_its_types(worker):
    runner_id = worker.register_runner()
    wanted = worker.add_job("hello_world", {"name": "A"})
    worker.add_job("other_type", {"name": "B"})
    jobs = client_for(worker, runner_id).available(["hello_world"])
    assert [(job["job_id"], job["job_type"], job["input_params"]) for job in jobs] == [
        (wanted, "hello_world", {"name": "A"})]


def test_client_treats_a_malformed_job_list_as_transient(worker):
    worker.add_fault("bad_shape", route="available", body={"jobs": [{"job_id": 3}]})
    with pytest.raises(runpack_runner.TransientWorkerError):
        client_for(worker, worker.register_runner()).available(["hello_world"])


def test_client_claim_returns_the_job(worker):
    runner_id = worker.register_runner()
    job_id = worker.add_job("hello_world", {"name": "A"})
    job = client_for(worker, runner_id).claim(job_id)
    assert (job["job_id"], job["input_params"]) == (job_id, {"name": "A"})
    assert worker.job(job_id)["claimed_by"] == runner_id


def test_client_claim_conflict_is_none(worker):
    job_id = claimed_job(worker, "another-runner")
    assert client_for(worker, worker.register_runner()).claim(job_id) is None


def test_client_claim_answered_500_says_the_worker_may_have_forgotten_the_runner(worker):
    job_id = worker.add_job("hello_world", {"name": "A"})
    with pytest.raises(runpack_runner.RunnerMaybeForgotten) as caught:
        client_for(worker, str(uuid.uuid4())).claim(job_id)
    assert isinstance(caught.value, runpack_runner.TransientWorkerError) and caught.value.status == 500
    assert worker.job(job_id)["status"] == "pending"


def test_client_heartbeat_of_our_job_is_true_and_carries_the_progress(worker):
    runner_id = worker.register_runner()
    job_id = claimed_job(worker, runner_id)
    assert client_for(worker).heartbeat(job_id, 3, 10, "working\n", runner_id=runner_id) is True
    job = worker.job(job_id)
    assert (job["status"], job["progress_current"], job["progress_total"], job["console_output"]) == (
        "in_progress", 3, 10, "working\n")


def test_client_heartbeat_of_a_job_that_is_not_ours_is_false(worker):
    job_id = claimed_job(worker, "another-runner")
    assert client_for(worker, worker.register_runner()).heartbeat(job_id, None, None, "") is False


def test_client_heartbeat_console_reaches_the_worker_with_the_key_redacted(worker):
    runner_id = worker.register_runner()
    job_id = claimed_job(worker, runner_id)
    assert client_for(worker, runner_id).heartbeat(job_id, None, None, "the key is %s\n" % RUNNER_KEY) is True
    assert worker.job(job_id)["console_output"] == "the key is [redacted]\n"


def test_client_heartbeat_console_is_cut_to_the_workers_limit(worker):
    runner_id = worker.register_runner()
    job_id = claimed_job(worker, runner_id)
    console = "x" * CONSOLE_LIMIT + "\nthe end"
    assert client_for(worker, runner_id).heartbeat(job_id, None, None, console) is True
    stored = worker.job(job_id)["console_output"]
    assert runpack_runner.js_length(stored) <= CONSOLE_LIMIT and stored.endswith("x\nthe end")


@pytest.mark.parametrize("report, status, field, value", [
    ({"kind": "complete", "body": {"output_data": {"answer": 42}, "console_output": "done\n"}},
     "completed", "output_data", {"answer": 42}),
    ({"kind": "error", "body": {"error_message": "Job execution failed: boom", "console_output": "trace\n"}},
     "failed", "error_message", "Job execution failed: boom")])
def test_client_report_of_our_job_is_true_and_ends_it(worker, report, status, field, value):
    runner_id = worker.register_runner()
    job_id = claimed_job(worker, runner_id)
    assert client_for(worker).report(job_id, report, runner_id=runner_id) is True
    job = worker.job(job_id)
    assert (job["status"], job[field]) == (status, value)
    assert job["reports"] == [(report["kind"], report["body"])]


def test_client_report_of_a_job_that_is_not_ours_is_false(worker):
    job_id = claimed_job(worker, "another-runner")
    report = {"kind": "complete", "body": {"output_data": {}, "console_output": ""}}
    assert client_for(worker, worker.register_runner()).report(job_id, report) is False
    assert worker.job(job_id)["status"] == "claimed"


def test_client_does_not_follow_a_redirect(worker):
    with RecordingServer() as elsewhere:
        worker.add_fault("redirect", route="register", status=307, location=elsewhere.url + "/api/runner/register")
        with pytest.raises(runpack_runner.TransientWorkerError) as caught:
            client_for(worker).register("runner-a", ["hello_world"])
        assert "redirect" in str(caught.value)
        assert elsewhere.requests == []


def test_client_rate_limited_answer_carries_the_wait(worker):
    worker.add_fault("rate_limit", route="available", reset_in_s=2.0)
    with pytest.raises(runpack_runner.TransientWorkerError) as caught:
        client_for(worker, worker.register_runner()).available(["hello_world"])
    assert caught.value.status == 429 and 0.0 <= caught.value.retry_after <= 2.0


@pytest.mark.parametrize("fault, status, working", [
    (None, 200, True),
    (dict(kind="status", status=400, body={"error": "Invalid request"}), 400, True),
    (dict(kind="rate_limit"), 429, True),
    (dict(kind="status", status=502, body={"error": "Bad gateway"}), 502, False),
    (dict(kind="garbage"), 200, False),
    (dict(kind="bad_shape", body={"unexpected": True}), 200, False)],
    ids=["jobs", "worker's 4xx", "429", "502", "200 html page", "200 other json"])
def test_client_tells_which_answers_show_a_working_worker(worker, fault, status, working):
    answers = []
    client = client_for(worker, worker.register_runner())
    client.on_answer = lambda endpoint, *answer: answers.append((endpoint,) + answer)
    if fault:
        worker.add_fault(route="available", **fault)
    try:
        client.available(["hello_world"])
    except runpack_runner.WorkerError:
        pass
    assert answers == [("available", status, working)]


@pytest.mark.parametrize("fault, expected", [
    (dict(kind="status", status=503, body={"error": "bad key " + RUNNER_KEY}), runpack_runner.TransientWorkerError),
    (dict(kind="status", status=400, body={"error": "bad key " + RUNNER_KEY}), runpack_runner.WorkerRejected),
    (dict(kind="status", status=401, body={"error": "bad key " + RUNNER_KEY}), runpack_runner.WorkerKeyRejected),
    (dict(kind="bad_shape", body={"runner": RUNNER_KEY}), runpack_runner.WorkerRejected)],
    ids=["503", "400", "401", "bad-shape"])
def test_client_errors_never_repeat_the_key_an_answer_echoes(worker, fault, expected):
    worker.add_fault(route="register", **fault)
    with pytest.raises(expected) as caught:
        client_for(worker).register("runner-a", ["hello_world"])
    assert RUNNER_KEY not in str(caught.value)


@pytest.mark.parametrize("wrap", [lambda text: {"runner": text}, lambda text: [text]], ids=["object", "list"])
def test_client_errors_never_show_part_of_the_key_where_they_cut_a_long_answer(worker, wrap):
    for padding in range(0, 300, 5):  # wherever the message is cut, some padding puts the cut inside the key
        worker.add_fault("bad_shape", route="register", body=wrap("a" * padding + RUNNER_KEY))
        with pytest.raises(runpack_runner.WorkerError) as caught:
            client_for(worker).register("runner-a", ["hello_world"])
        assert RUNNER_KEY[:8] not in str(caught.value), padding


# ---- Claim spreading and the poll pacer ----------------------------------------------------


def listed(count):
    return [{"job_id": str(uuid.UUID(int=number)), "job_type": "hello_world"} for number in range(count)]


def test_a_lone_runner_claims_strictly_oldest_first():
    spreading = runpack_runner.ClaimSpreading()
    jobs = listed(50)
    untried = list(jobs)
    spreading.new_list()
    taken = [spreading.take_next(untried) for _ in range(50)]
    assert taken == jobs and untried == []
    assert spreading.take_next(untried) is None


def test_lost_claims_double_the_lanes_up_to_the_cap_and_clean_lists_halve_them():
    random.seed(3)
    spreading = runpack_runner.ClaimSpreading()
    for expected in (2, 4, 8, 16, 16):
        spreading.lost_claim()
        assert spreading.lanes == expected and 0 <= spreading.lane < expected
    spreading.new_list()  # the list that had lost claims ends: no halving yet
    assert spreading.lanes == 16
    for expected in (8, 4, 2, 1, 1):
        spreading.new_list()
        assert spreading.lanes == expected


def test_runners_in_different_lanes_take_disjoint_jobs_of_the_same_list_oldest_first_within_a_lane():
    jobs = listed(50)
    taken = []
    for lane in range(4):
        spreading = runpack_runner.ClaimSpreading()
        spreading.lanes, spreading.lane = 4, lane
        untried = list(jobs)
        mine = []
        while True:
            job = spreading.take_next(untried)
            if job is None:
                break
            mine.append(job)
        assert mine == sorted(mine, key=jobs.index), "oldest first within the lane"
        taken.append({job["job_id"] for job in mine})
    assert sum(len(lane_jobs) for lane_jobs in taken) == 50
    assert set.union(*taken) == {job["job_id"] for job in jobs}, "the lanes cover the list, without overlap"
    assert all(len(lane_jobs) < 50 for lane_jobs in taken)


def test_lanes_are_the_same_in_every_runner_process():
    """The lane of a job comes from a fixed hash (not Python's per-process hash()), so that
    runners in other processes agree on it."""
    import subprocess
    import sys

    code = ("import runpack_runner as r; s = r.ClaimSpreading(); s.lanes, s.lane = 8, 3; "
            "jobs = [{'job_id': 'job-%d' % n} for n in range(40)]; "
            "print([j['job_id'] for j in iter(lambda: s.take_next(jobs), None)])")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(runpack_runner.__file__),
                              env=dict(os.environ, PYTHONHASHSEED=str(seed)),
                              stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
               for seed in (1, 2)}
    assert len(outputs) == 1


def poll_waits(first, step, most):
    return runpack_runner.PollWaits(types.SimpleNamespace(
        poll_interval=first, poll_interval_step=step, poll_interval_max=most))


def test_empty_poll_waits_grow_by_the_step_up_to_the_max_and_restart_after_a_job():
    waits = poll_waits(10, 2, 14)
    assert [waits.take() for _ in range(4)] == [10, 12, 14, 14]
    waits.restart()
    assert waits.take() == 10
    assert (waits.longest, waits.describe()) == (14, "every 10 s or more")


def test_a_poll_interval_above_the_max_is_the_first_wait_only_and_the_longest():
    waits = poll_waits(8, 2, 1)
    assert [waits.take() for _ in range(3)] == [8, 1, 1]
    assert (waits.longest, waits.describe()) == (8, "again in 8 s, then every 1 s")


def test_the_poll_pacer_lets_the_first_poll_go_at_once_then_keeps_a_gap():
    pacer = runpack_runner.PollPacer()
    assert pacer.wait_before_poll() == 0
    pacer.polled()
    wait = pacer.wait_before_poll()
    assert 0 < wait <= runpack_runner.PollPacer.MIN_POLL_GAP_S


def test_the_poll_pacer_never_allows_more_polls_in_a_minute_than_its_budget():
    pacer = runpack_runner.PollPacer()
    now = time.monotonic()
    for index in range(runpack_runner.PollPacer.POLLS_PER_MINUTE):
        pacer._times.append(now - 30 + index * 0.01)  # a burst 30 s ago
    wait = pacer.wait_before_poll()
    assert 29 < wait <= 30.01, "the next poll waits until the oldest of the burst is a minute old"
    assert runpack_runner.PollPacer.POLLS_PER_MINUTE < 120, "under the worker's limit of 120 a minute"


def test_the_poll_pacer_forgets_polls_older_than_a_minute():
    pacer = runpack_runner.PollPacer()
    long_ago = time.monotonic() - 61
    for _ in range(runpack_runner.PollPacer.POLLS_PER_MINUTE):
        pacer._times.append(long_ago)
    assert pacer.wait_before_poll() == 0


# ---- NotifyRelay: messages, the client, the subscriber -------------------------------------


def test_a_new_job_notice_gives_its_job_type_and_anything_else_gives_none():
    notice = json.dumps({"type": "new_job", "job_id": "j", "job_hash": "h", "job_type": "hello_world",
                         "timestamp": 1})
    assert runpack_runner.new_job_type(notice) == "hello_world"
    for other in ("not json", json.dumps({"type": "other", "job_type": "x"}), json.dumps(["new_job"]),
                  json.dumps({"type": "new_job"}), None):
        assert runpack_runner.new_job_type(other) is None


@pytest.fixture
def relay():
    from fake_relay import FakeRelay

    with FakeRelay() as fake:
        yield fake


def relay_client(relay, key=None):
    from fake_relay import RELAY_SUBSCRIBE_KEY

    return runpack_runner.RelayClient(relay.url, key or RELAY_SUBSCRIBE_KEY, "unit-subscriber", "unit test")


def test_the_relay_client_returns_the_message_strings_published_on_the_topic(relay):
    client = relay_client(relay)
    assert client.poll(timeout_ms=50) == []  # the first poll makes the subscriber known
    relay.publish("runpack_notifications", '{"type":"new_job","job_type":"hello_world"}')
    relay.publish("another_topic", "not for us")
    assert client.poll(timeout_ms=1000) == ['{"type":"new_job","job_type":"hello_world"}']
    poll = [record for record in relay.requests if record.route == "poll"][-1]
    assert poll.body["subscriber_id"] == "unit-subscriber" and poll.body["topics"] == ["runpack_notifications"]


def test_the_relay_client_sends_the_bare_subscribe_key(relay):
    from fake_relay import RELAY_SUBSCRIBE_KEY

    relay_client(relay).poll(timeout_ms=10)
    assert [record.authorization for record in relay.requests if record.route == "poll"] == [RELAY_SUBSCRIBE_KEY]


def test_a_wrong_subscribe_key_is_relay_key_rejected(relay):
    with pytest.raises(runpack_runner.RelayKeyRejected):
        relay_client(relay, key="wrong-key").poll(timeout_ms=10)


@pytest.mark.parametrize("fault", [{"kind": "status", "status": 500}, {"kind": "garbage"}, {"kind": "reset"}])
def test_relay_failures_other_than_the_key_are_worth_a_retry(relay, fault):
    relay.add_fault(**fault)
    with pytest.raises(runpack_runner.RelayUnavailable) as caught:
        relay_client(relay).poll(timeout_ms=10)
    assert isinstance(caught.value, runpack_runner.TransientError)


def test_a_relay_that_is_down_is_worth_a_retry(relay):
    relay.go_down()
    with pytest.raises(runpack_runner.RelayUnavailable):
        relay_client(relay).poll(timeout_ms=10)


def test_a_relay_answer_that_echoes_the_subscribe_key_never_shows_it(relay):
    from fake_relay import RELAY_SUBSCRIBE_KEY

    relay.add_fault("status", status=502, body={"error": "bad key " + RELAY_SUBSCRIBE_KEY})
    with pytest.raises(runpack_runner.RelayUnavailable) as caught:
        relay_client(relay).poll(timeout_ms=10)
    assert RELAY_SUBSCRIBE_KEY not in str(caught.value) and "[redacted]" in str(caught.value)


def test_the_subscriber_passes_each_new_job_notice_on_and_stops_for_good_on_a_rejected_key(relay, log_lines):
    noticed = []
    client = relay_client(relay)
    subscriber = runpack_runner.RelaySubscriber(client, noticed.append)
    subscriber.start()
    relay.wait_until(lambda: relay.held_polls >= 1)
    relay.publish("runpack_notifications", json.dumps({"type": "new_job", "job_type": "hello_world"}))
    relay.publish("runpack_notifications", json.dumps({"type": "something_else"}))
    relay.wait_until(lambda: noticed == ["hello_world"] and relay.held_polls >= 1)
    relay.add_fault("status", status=401, body={"error": "Invalid key"})
    relay.publish("runpack_notifications", json.dumps({"type": "new_job", "job_type": "hello_world"}))
    subscriber.join(5)
    assert not subscriber.is_alive(), "a rejected key ends subscribing"
    assert sum("rejected the subscribe key" in line for line in log_lines) == 1


def test_a_2xx_answer_to_register_that_is_not_the_workers_json_is_a_wrong_url(worker):
    worker.add_fault("garbage", route="register")
    with pytest.raises(runpack_runner.WorkerRejected) as caught:
        client_for(worker).register("runner-a", ["hello_world"])
    assert "not as a Runpack worker" in str(caught.value)


def test_a_2xx_answer_to_a_poll_that_is_not_the_workers_json_is_still_transient(worker):
    worker.add_fault("garbage", route="available")
    with pytest.raises(runpack_runner.TransientWorkerError):
        client_for(worker, worker.register_runner()).available(["hello_world"])


def test_a_notice_wait_grows_with_claims_lost_after_notices_and_shrinks_with_claims_won():
    spread = runpack_runner.NoticeSpread()
    assert spread.longest == runpack_runner.NoticeSpread.SHORTEST_S, "a lone runner waits 50 ms at most"
    for _ in range(10):
        spread.lost_claim()
    assert spread.longest == runpack_runner.NoticeSpread.LONGEST_S
    assert all(0 <= spread.delay() <= runpack_runner.NoticeSpread.LONGEST_S for _ in range(100))
    for _ in range(10):
        spread.won_claim()
    assert spread.longest == runpack_runner.NoticeSpread.SHORTEST_S


# ---- Code layout -----------------------------------------------------------------------------


def test_the_runner_class_stays_under_300_lines():
    """Issue 17: what grows in the loop goes into a small class of its own."""
    with open(runpack_runner.__file__, encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    runner, = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Runner"]
    assert runner.end_lineno - runner.lineno + 1 < 300
