"""The fake worker honours shared/worker-api.md: every contract point and every fault kind, over real sockets."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from fake_worker import (  # noqa: E402
    RUNNER_KEY, SUBMIT_KEY, FakeWorker, RecordingServer, job_identity, js_length)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- A tiny client ----------------------------------------------------------------


class Answer(object):
    def __init__(self, status, payload, headers):
        self.status = status
        self.payload = payload
        self.headers = headers

    def json(self):
        return json.loads(self.payload.decode("utf-8"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def call(base, method, path, body=None, key=RUNNER_KEY, runner_id=None, raw=None,
         authorization=None, timeout=5.0):
    """One request; HTTP errors come back as answers, no-answer cases raise OSError."""
    data = raw if raw is not None else (json.dumps(body).encode("utf-8") if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    elif key is not None:
        request.add_header("Authorization", "Bearer " + key)
    if runner_id is not None:
        request.add_header("X-Runner-ID", runner_id)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, response.read(), response.headers)
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read(), error.headers)


@pytest.fixture
def fake():
    worker = FakeWorker().start()
    yield worker
    worker.stop()
    assert worker.internal_errors == []


def register(fake, name="runner-a"):
    answer = call(fake.url, "POST", "/api/runner/register", {"name": name, "capabilities": ["hello_world"]})
    assert answer.status == 201
    return answer.json()["runner_id"]


def claimed_job(fake, runner_id, job_type="hello_world", params=None):
    job_id = fake.add_job(job_type, params if params is not None else {"n": 1})
    assert call(fake.url, "POST", "/api/runner/jobs/%s/claim" % job_id, runner_id=runner_id).status == 200
    return job_id


def heartbeat(fake, job_id, runner_id, console="", current=None, total=None):
    return call(fake.url, "POST", "/api/runner/jobs/%s/heartbeat" % job_id,
                {"progress_current": current, "progress_total": total, "console_output": console},
                runner_id=runner_id)


def complete(fake, job_id, runner_id, output_data, console=""):
    return call(fake.url, "POST", "/api/runner/jobs/%s/complete" % job_id,
                {"output_data": output_data, "console_output": console}, runner_id=runner_id)


def fail(fake, job_id, runner_id, message, console=""):
    return call(fake.url, "POST", "/api/runner/jobs/%s/error" % job_id,
                {"error_message": message, "console_output": console}, runner_id=runner_id)


def submit(fake, job_type, params):
    return call(fake.url, "POST", "/api/jobs/submit", {"job_type": job_type, "input_params": params},
                key=SUBMIT_KEY)


# ---- Health, routing, auth --------------------------------------------------------


def test_health_and_root_answer_ok_without_auth(fake):
    for path in ("/health", "/"):
        answer = call(fake.url, "GET", path, key=None)
        assert (answer.status, answer.json()) == (200, {"status": "ok", "service": "runpack-worker"})
        assert answer.headers["Content-Type"] == "application/json"


def test_unknown_route_and_wrong_method_answer_404_not_found(fake):
    assert call(fake.url, "GET", "/nope", key=None).json() == {"error": "Not found"}
    wrong_method = call(fake.url, "GET", "/api/runner/register")
    assert (wrong_method.status, wrong_method.json()) == (404, {"error": "Not found"})
    assert fake.requests[-1].route == "unknown"


def test_runner_route_without_authorization_is_401_missing_header(fake):
    answer = call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []}, key=None)
    assert (answer.status, answer.json()) == (401, {"error": "Missing Authorization header"})


def test_runner_route_with_non_bearer_header_is_401_invalid_format(fake):
    answer = call(fake.url, "GET", "/api/runner/verify", authorization="Token " + RUNNER_KEY,
                  runner_id="x")
    assert (answer.status, answer.json()) == (
        401, {"error": "Invalid Authorization header format. Use: Bearer <token>"})


def test_runner_route_with_submit_or_unknown_key_is_401_invalid_api_key(fake):
    for key in (SUBMIT_KEY, "wrong"):
        answer = call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []}, key=key)
        assert (answer.status, answer.json()) == (401, {"error": "Invalid API key"})


def test_runner_jobs_routes_check_runner_id_before_auth(fake):
    for path in ("/api/runner/jobs/available?types[]=a", "/api/runner/jobs/x/claim"):
        method = "GET" if "available" in path else "POST"
        answer = call(fake.url, method, path, key="bad key")
        assert (answer.status, answer.json()) == (400, {"error": "Missing X-Runner-ID header"})
    assert call(fake.url, "GET", "/api/runner/jobs/available", key="bad", runner_id="r").status == 401


def test_submit_accepts_only_the_submit_key(fake):
    answer = call(fake.url, "POST", "/api/jobs/submit", {"job_type": "t", "input_params": {}}, key=RUNNER_KEY)
    assert (answer.status, answer.json()) == (401, {"error": "Invalid API key"})
    assert submit(fake, "t", {}).status == 201


def test_admin_check_and_status_routes_are_not_implemented_and_answer_404(fake):
    job_id = fake.add_job("t", {})
    for method, path, key in (("GET", "/api/admin/stats", RUNNER_KEY), ("GET", "/api/admin/jobs/" + job_id, None),
                              ("DELETE", "/api/admin/jobs/" + job_id, RUNNER_KEY),
                              ("POST", "/api/jobs/check", SUBMIT_KEY), ("GET", "/api/jobs/" + job_id, SUBMIT_KEY)):
        body = {"job_type": "t", "input_params": {}} if method == "POST" else None
        answer = call(fake.url, method, path, body, key=key)
        assert (answer.status, answer.json()) == (404, {"error": "Not found"}), path
        assert fake.requests[-1].route == "unknown"
    assert [job["job_id"] for job in fake.jobs()] == [job_id]


def test_server_does_not_log_requests(fake, capfd):
    call(fake.url, "GET", "/health")
    call(fake.url, "GET", "/nope")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


# ---- Register and verify ----------------------------------------------------------


def test_register_returns_201_and_a_new_uuid4_each_time(fake):
    first, second = register(fake, "same"), register(fake, "same")
    assert first != second
    assert uuid.UUID(first).version == 4
    assert fake.runners[first] == {"name": "same", "capabilities": ["hello_world"],
                                   "registered_at": fake.runners[first]["registered_at"]}
    answer = call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []})
    assert set(answer.json()) == {"runner_id", "message"}


def test_register_with_missing_name_or_non_list_capabilities_is_400(fake):
    for body in ({"capabilities": []}, {"name": 3, "capabilities": []}, {"name": "a"},
                 {"name": "a", "capabilities": "hello_world"}):
        answer = call(fake.url, "POST", "/api/runner/register", body)
        assert (answer.status, answer.json()) == (400, {"error": "Invalid registration data"})
    assert fake.runners == {}


def test_invalid_json_body_is_500_with_failed_to_details(fake):
    answer = call(fake.url, "POST", "/api/runner/register", raw=b"{not json")
    assert answer.status == 500
    assert answer.json()["error"] == "Failed to register runner"
    assert answer.json()["details"]


def test_verify_known_runner_200_unknown_404_missing_header_400(fake):
    runner_id = register(fake, "alpha")
    known = call(fake.url, "GET", "/api/runner/verify", runner_id=runner_id).json()
    assert known["exists"] is True and known["runner_name"] == "alpha" and known["message"]
    unknown = call(fake.url, "GET", "/api/runner/verify", runner_id=str(uuid.uuid4()))
    assert (unknown.status, unknown.json()) == (404, {"exists": False, "message": "Runner not found"})
    missing = call(fake.url, "GET", "/api/runner/verify")
    assert (missing.status, missing.json()) == (400, {"error": "Missing X-Runner-ID header"})


def test_forget_runner_makes_verify_404_and_claim_500(fake):
    runner_id = register(fake)
    job_id = fake.add_job("hello_world", {})
    fake.forget_runner(runner_id)
    assert call(fake.url, "GET", "/api/runner/verify", runner_id=runner_id).status == 404
    claim = call(fake.url, "POST", "/api/runner/jobs/%s/claim" % job_id, runner_id=runner_id)
    assert claim.status == 500 and claim.json()["error"] == "Failed to claim job"
    assert "details" in claim.json()
    assert fake.job(job_id)["status"] == "pending"


# ---- Available and claim ------------------------------------------------------------


def test_available_lists_only_pending_jobs_of_requested_types_oldest_first(fake):
    runner_id = register(fake)
    first = fake.add_job("a", {"i": 1})
    fake.add_job("other", {"i": 2})
    taken = fake.add_job("a", {"i": 3})
    fake.claim_for(taken, "someone-else")
    third = fake.add_job("b", {"i": 4})
    answer = call(fake.url, "GET", "/api/runner/jobs/available?types[]=a&types[]=b", runner_id=runner_id)
    jobs = answer.json()["jobs"]
    assert [job["job_id"] for job in jobs] == [first, third]
    assert set(jobs[0]) == {"job_id", "job_type", "input_params", "created_at"}
    assert jobs[0]["input_params"] == {"i": 1}


def test_available_without_types_or_with_misspelled_parameter_is_empty(fake):
    fake.add_job("a", {})
    for query in ("", "?types=a", "?type[]=a"):
        answer = call(fake.url, "GET", "/api/runner/jobs/available" + query, runner_id="r")
        assert (answer.status, answer.json()) == (200, {"jobs": []})


def test_available_lists_at_most_max_listed_jobs(fake):
    ids = [fake.add_job("a", {"i": i}) for i in range(55)]
    jobs = call(fake.url, "GET", "/api/runner/jobs/available?types[]=a", runner_id="r").json()["jobs"]
    assert [job["job_id"] for job in jobs] == ids[:50]


def test_claim_pending_job_returns_job_and_marks_it_claimed(fake):
    runner_id = register(fake)
    job_id = fake.add_job("hello_world", {"who": "x"})
    answer = call(fake.url, "POST", "/api/runner/jobs/%s/claim" % job_id, runner_id=runner_id)
    body = answer.json()
    assert answer.status == 200 and body["success"] is True and body["message"]
    assert body["job"] == {"job_id": job_id, "job_type": "hello_world", "input_params": {"who": "x"}}
    snapshot = fake.job(job_id)
    assert (snapshot["status"], snapshot["claimed_by"]) == ("claimed", runner_id)


def test_claim_of_taken_or_unknown_job_is_409(fake):
    runner_a, runner_b = register(fake, "a"), register(fake, "b")
    job_id = claimed_job(fake, runner_a)
    for target, runner in ((job_id, runner_b), (job_id, runner_a), (str(uuid.uuid4()), runner_a)):
        answer = call(fake.url, "POST", "/api/runner/jobs/%s/claim" % target, runner_id=runner)
        assert (answer.status, answer.json()) == (
            409, {"success": False, "message": "Job already claimed or not found"})


def test_claim_for_makes_job_belong_to_another_runner(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    fake.claim_for(job_id, "other-runner")
    assert fake.job(job_id)["claimed_by"] == "other-runner"
    assert heartbeat(fake, job_id, runner_id).status == 400


# ---- Heartbeat, complete, error -------------------------------------------------------


def test_heartbeat_moves_job_to_in_progress_and_replaces_console(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    assert heartbeat(fake, job_id, runner_id, "line 1\n", 1, 10).json()["success"] is True
    answer = heartbeat(fake, job_id, runner_id, "line 2\n", 2, 10)
    assert answer.status == 200
    snapshot = fake.job(job_id)
    assert snapshot["status"] == "in_progress"
    assert snapshot["console_output"] == "line 2\n"
    assert (snapshot["progress_current"], snapshot["progress_total"]) == (2, 10)
    assert snapshot["last_heartbeat"] >= snapshot["created_at"]
    assert [beat["console_output"] for beat in snapshot["heartbeats"]] == ["line 1\n", "line 2\n"]
    assert all(isinstance(beat["at"], float) for beat in snapshot["heartbeats"])


def test_heartbeat_from_another_runner_is_rejected_with_400(fake):
    owner, intruder = register(fake, "owner"), register(fake, "intruder")
    job_id = claimed_job(fake, owner)
    answer = heartbeat(fake, job_id, intruder, "x")
    assert (answer.status, answer.json()) == (
        400, {"success": False, "message": "Job not found or not claimed by this runner"})
    assert fake.job(job_id)["heartbeats"] == []


def test_heartbeat_after_job_finished_or_deleted_is_400(fake):
    runner_id = register(fake)
    finished = claimed_job(fake, runner_id, params={"n": 1})
    assert complete(fake, finished, runner_id, {"ok": True}).status == 200
    assert heartbeat(fake, finished, runner_id).status == 400
    deleted = claimed_job(fake, runner_id, params={"n": 2})
    fake.delete_job(deleted)
    assert heartbeat(fake, deleted, runner_id).status == 400
    pending = fake.add_job("hello_world", {"n": 3})
    assert heartbeat(fake, pending, runner_id).status == 400


def test_heartbeat_without_console_output_is_500(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    answer = call(fake.url, "POST", "/api/runner/jobs/%s/heartbeat" % job_id,
                  {"progress_current": 1, "progress_total": 2}, runner_id=runner_id)
    assert answer.status == 500 and answer.json()["error"].startswith("Failed to ")


def test_complete_from_claimed_stores_output_and_console(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    answer = complete(fake, job_id, runner_id, {"message": "hi"}, "done\n")
    assert answer.status == 200 and answer.json()["success"] is True
    snapshot = fake.job(job_id)
    assert (snapshot["status"], snapshot["output_data"], snapshot["console_output"]) == (
        "completed", {"message": "hi"}, "done\n")
    assert snapshot["reports"] == [("complete", {"output_data": {"message": "hi"}, "console_output": "done\n"})]


def test_error_marks_job_failed_from_in_progress_and_records_report(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    heartbeat(fake, job_id, runner_id, "working")
    assert fail(fake, job_id, runner_id, "boom", "trace").status == 200
    snapshot = fake.job(job_id)
    assert (snapshot["status"], snapshot["error_message"], snapshot["console_output"]) == (
        "failed", "boom", "trace")
    assert [kind for kind, _ in snapshot["reports"]] == ["error"]


def test_complete_twice_or_by_another_runner_is_rejected_with_400(fake):
    owner, other = register(fake, "owner"), register(fake, "other")
    job_id = claimed_job(fake, owner)
    assert complete(fake, job_id, other, {}).json() == {
        "success": False, "message": "Job not found or not claimed by this runner"}
    assert complete(fake, job_id, owner, {}).status == 200
    assert complete(fake, job_id, owner, {}).status == 400
    assert fail(fake, job_id, owner, "late").status == 400
    assert len(fake.job(job_id)["reports"]) == 1


def test_complete_without_output_data_and_error_without_message_are_500(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    no_output = call(fake.url, "POST", "/api/runner/jobs/%s/complete" % job_id,
                     {"console_output": ""}, runner_id=runner_id)
    assert no_output.status == 500 and no_output.json()["error"] == "Failed to complete job"
    no_message = call(fake.url, "POST", "/api/runner/jobs/%s/error" % job_id,
                      {"console_output": ""}, runner_id=runner_id)
    assert no_message.status == 500 and no_message.json()["error"].startswith("Failed to ")
    assert "details" in no_message.json()
    assert fake.job(job_id)["status"] == "claimed"


def test_complete_accepts_null_output_data(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    assert complete(fake, job_id, runner_id, None).status == 200


# ---- Size limits -------------------------------------------------------------------------


def test_console_output_limit_is_strict_and_counted_in_utf16_units(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    assert heartbeat(fake, job_id, runner_id, "x" * 1048576).status == 200
    too_big = heartbeat(fake, job_id, runner_id, "x" * 1048577)
    assert (too_big.status, too_big.json()) == (
        400, {"error": "Console output exceeds size limit of 1048576 bytes"})
    emoji = "\U0001F600"                      # one character, two UTF-16 code units
    assert js_length(emoji) == 2
    assert heartbeat(fake, job_id, runner_id, emoji * 524288).status == 200
    assert heartbeat(fake, job_id, runner_id, emoji * 524288 + "x").status == 400
    assert complete(fake, job_id, runner_id, {}, "x" * 1048577).json() == too_big.json()
    assert fail(fake, job_id, runner_id, "m", "x" * 1048577).json() == too_big.json()
    assert fake.job(job_id)["status"] == "in_progress"


def test_output_json_limit_counts_compact_stringify_length(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    overhead = len('{"s":""}')
    too_big = complete(fake, job_id, runner_id, {"s": "x" * (512000 - overhead + 1)})
    assert (too_big.status, too_big.json()) == (
        400, {"error": "Output JSON exceeds size limit of 512000 bytes"})
    assert complete(fake, job_id, runner_id, {"s": "x" * (512000 - overhead)}).status == 200


def test_error_message_limit_is_10240(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    too_big = fail(fake, job_id, runner_id, "e" * 10241)
    assert (too_big.status, too_big.json()) == (
        400, {"error": "Error message exceeds size limit of 10240 bytes"})
    assert fail(fake, job_id, runner_id, "e" * 10240).status == 200


def test_submit_input_params_limit_is_102400(fake):
    overhead = len('{"s":""}')
    too_big = submit(fake, "t", {"s": "x" * (102400 - overhead + 1)})
    assert too_big.status == 400 and "102400" in too_big.json()["error"]
    assert submit(fake, "t", {"s": "x" * (102400 - overhead)}).status == 201


# ---- Rate limits ---------------------------------------------------------------------------


def test_available_rate_limit_is_per_runner_with_fixed_window_reset_time():
    with FakeWorker(rate_limit=3, rate_window_s=30.0) as fake:
        started_ms = time.time() * 1000
        path = "/api/runner/jobs/available?types[]=a"
        assert [call(fake.url, "GET", path, runner_id="r1").status for _ in range(3)] == [200] * 3
        limited = call(fake.url, "GET", path, runner_id="r1")
        assert limited.status == 429
        body = limited.json()
        assert set(body) == {"error", "resetTime"} and body["error"] == "Rate limit exceeded"
        assert started_ms + 29000 < body["resetTime"] <= time.time() * 1000 + 30000
        assert "Retry-After" not in limited.headers
        assert call(fake.url, "GET", path, runner_id="r2").status == 200


def test_heartbeat_rate_limit_is_per_runner_and_separate_from_available():
    with FakeWorker(rate_limit=2, rate_window_s=30.0) as fake:
        runner_id = fake.register_runner()
        job_id = fake.add_job("t", {})
        fake.claim_for(job_id, runner_id)
        for _ in range(2):
            assert call(fake.url, "GET", "/api/runner/jobs/available?types[]=t", runner_id=runner_id).status == 200
        assert [heartbeat(fake, job_id, runner_id).status for _ in range(3)] == [200, 200, 429]
        assert len(fake.job(job_id)["heartbeats"]) == 2
        assert complete(fake, job_id, runner_id, {}).status == 200      # complete is not limited


@pytest.mark.slow
def test_rate_limit_window_resets_after_window_elapses():
    with FakeWorker(rate_limit=1, rate_window_s=0.3) as fake:
        path = "/api/runner/jobs/available?types[]=a"
        assert call(fake.url, "GET", path, runner_id="r").status == 200
        reset_time = call(fake.url, "GET", path, runner_id="r").json()["resetTime"]
        time.sleep(max(0.0, reset_time / 1000.0 - time.time()) + 0.05)
        assert call(fake.url, "GET", path, runner_id="r").status == 200


def test_submit_is_limited_to_ten_per_window_per_client(fake):
    statuses = [submit(fake, "t", {"i": i % 6}).status for i in range(11)]
    assert statuses == [201] * 6 + [200] * 4 + [429]
    assert call(fake.url, "GET", "/api/runner/jobs/available?types[]=t", runner_id="r").status == 200


# ---- Submit side ----------------------------------------------------------------------------


def test_submit_new_job_is_201_pending_and_resubmit_is_200_with_status(fake):
    created = submit(fake, "hello_world", {"who": "you"})
    body = created.json()
    assert created.status == 201 and body["status"] == "pending" and body["message"]
    again = submit(fake, "hello_world", {"who": "you"})
    assert (again.status, again.json()["job_id"], again.json()["status"]) == (200, body["job_id"], "pending")
    fake.claim_for(body["job_id"], "r")
    assert submit(fake, "hello_world", {"who": "you"}).json()["status"] == "claimed"
    assert len(fake.jobs()) == 1


def test_submit_dedup_ignores_key_order_at_any_depth(fake):
    first = submit(fake, "t", {"a": 1, "b": {"x": [1, {"p": 1, "q": 2}], "y": 2}}).json()["job_id"]
    second = submit(fake, "t", {"b": {"y": 2, "x": [1, {"q": 2, "p": 1}]}, "a": 1})
    assert (second.status, second.json()["job_id"]) == (200, first)
    assert submit(fake, "other", {"a": 1, "b": {"x": [1, {"p": 1, "q": 2}], "y": 2}}).status == 201
    assert job_identity("t", {"a": 1, "b": 2}) == job_identity("t", {"b": 2, "a": 1})


def test_add_job_shares_dedup_identity_with_submit(fake):
    job_id = fake.add_job("t", {"b": 1, "a": 2})
    assert fake.add_job("t", {"a": 2, "b": 1}) == job_id
    assert submit(fake, "t", {"a": 2, "b": 1}).json()["job_id"] == job_id
    assert fake.jobs()[0]["status"] == "pending"


def test_resubmit_of_completed_or_failed_job_returns_result_or_error(fake):
    runner_id = register(fake)
    done = claimed_job(fake, runner_id, "t", {"i": 1})
    complete(fake, done, runner_id, {"answer": 42}, "out")
    answer = submit(fake, "t", {"i": 1}).json()
    assert answer["status"] == "completed"
    assert answer["result"] == {"output_data": {"answer": 42}, "console_output": "out"}
    broken = claimed_job(fake, runner_id, "t", {"i": 2})
    fail(fake, broken, runner_id, "it broke")
    failed = submit(fake, "t", {"i": 2})
    assert (failed.status, failed.json()["status"], failed.json()["error"]) == (200, "failed", "it broke")


def _completed_with(fake, output_data, params):
    job_id = fake.add_job("figpack", params)
    fake.update_job(job_id, status="completed", output_data=output_data, console_output="")
    return job_id


def test_resubmit_with_figpack_url_not_ending_in_index_html_recreates_job(fake):
    old = _completed_with(fake, {"nested": [{"figpack_url": "https://x.example/fig/"}]}, {"i": 1})
    answer = submit(fake, "figpack", {"i": 1})
    assert answer.status == 201 and answer.json()["job_id"] != old
    assert [job["status"] for job in fake.jobs()] == ["pending"]


def test_resubmit_with_reachable_figpack_url_keeps_result(fake):
    with RecordingServer() as figpack_host:
        url = figpack_host.url + "/figures/abc/index.html"
        job_id = _completed_with(fake, {"deep": {"figpack_url": url}}, {"i": 1})
        answer = submit(fake, "figpack", {"i": 1})
        assert (answer.status, answer.json()["job_id"], answer.json()["status"]) == (200, job_id, "completed")
        assert [(r.method, r.path) for r in figpack_host.requests] == [("GET", "/figures/abc/figpack.json")]


def test_resubmit_with_unreachable_figpack_url_recreates_job(fake):
    gone = RecordingServer().start()
    gone.stop()
    job_id = _completed_with(fake, {"figpack_url": gone.url + "/f/index.html"}, {"i": 1})
    answer = submit(fake, "figpack", {"i": 1})
    assert answer.status == 201 and answer.json()["job_id"] != job_id


# ---- Records and waiting ------------------------------------------------------------------------


def test_requests_are_recorded_with_route_job_runner_auth_status_and_body(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    heartbeat(fake, job_id, runner_id, "abc", 1, 2)
    record = fake.requests[-1]
    assert (record.method, record.path, record.route, record.job_id) == (
        "POST", "/api/runner/jobs/%s/heartbeat" % job_id, "heartbeat", job_id)
    assert (record.runner_id, record.authorization, record.status) == (runner_id, "Bearer " + RUNNER_KEY, 200)
    assert record.body == {"progress_current": 1, "progress_total": 2, "console_output": "abc"}
    assert isinstance(record.at, float)
    call(fake.url, "GET", "/api/runner/jobs/available?types[]=x&types[]=y", runner_id=runner_id)
    assert fake.requests[-1].path == "/api/runner/jobs/available?types[]=x&types[]=y"
    assert [r.route for r in fake.requests] == ["register", "claim", "heartbeat", "available"]


def test_count_filters_by_route_job_and_status(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    heartbeat(fake, job_id, runner_id)
    heartbeat(fake, job_id, "intruder")
    assert fake.count("heartbeat") == 2
    assert fake.count("heartbeat", job_id=job_id, status=200) == 1
    assert fake.count("heartbeat", status=400) == 1
    assert fake.count("claim", job_id="other") == 0


def test_wait_until_raises_assertion_with_state_summary(fake):
    fake.add_job("hello_world", {})
    fake.wait_until(lambda: True, timeout=0.1)
    with pytest.raises(AssertionError) as caught:
        fake.wait_until(lambda: False, timeout=0.1, message="never happens")
    assert "never happens" in str(caught.value) and "hello_world pending" in str(caught.value)


# ---- Faults -----------------------------------------------------------------------------------


def test_status_fault_answers_given_status_without_processing(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    fake.add_fault("status", route="heartbeat")
    answer = heartbeat(fake, job_id, runner_id)
    assert (answer.status, answer.json()) == (500, {"error": "Internal error"})
    fake.add_fault("status", route="heartbeat", status=503, body={"error": "busy"})
    assert heartbeat(fake, job_id, runner_id).json() == {"error": "busy"}
    assert fake.job(job_id)["heartbeats"] == []
    assert heartbeat(fake, job_id, runner_id).status == 200
    assert fake.count("heartbeat", status=500) == 1 and fake.count("heartbeat", status=503) == 1


@pytest.mark.slow
def test_hang_fault_never_answers_and_does_not_block_stop():
    fake = FakeWorker().start()
    fake.add_fault("hang", route="health")
    with pytest.raises(OSError):
        call(fake.url, "GET", "/health", timeout=0.3)
    assert fake.requests[-1].status is None
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0


def test_hang_fault_release_drops_connection(fake):
    fault = fake.add_fault("hang", route="health")
    outcome = []

    def client():
        try:
            outcome.append(call(fake.url, "GET", "/health", timeout=5).status)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=client)
    thread.start()
    fake.wait_until(lambda: fake.count("health") == 1, timeout=2)
    fault.release()
    thread.join(2)
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert call(fake.url, "GET", "/health").status == 200


@pytest.mark.slow
def test_slow_fault_delays_then_processes(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    fake.add_fault("slow", route="heartbeat", delay=0.3)
    started = time.monotonic()
    assert heartbeat(fake, job_id, runner_id, "late").status == 200
    assert time.monotonic() - started >= 0.3
    assert fake.job(job_id)["console_output"] == "late"


def test_garbage_fault_answers_html(fake):
    fake.add_fault("garbage")
    answer = call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/html"
    assert answer.payload == b"<html><body>Bad gateway</body></html>"
    assert fake.runners == {}


def test_bad_shape_fault_answers_unexpected_json(fake):
    fake.add_fault("bad_shape", route="available")
    assert call(fake.url, "GET", "/api/runner/jobs/available?types[]=a", runner_id="r").json() == {
        "unexpected": True}
    fake.add_fault("bad_shape", route="register", body={"runner": None})
    assert call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []}).json() == {
        "runner": None}
    assert fake.runners == {}


def test_reset_fault_closes_connection_without_answer(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    fake.add_fault("reset", route="complete")
    with pytest.raises(ConnectionError):
        complete(fake, job_id, runner_id, {})
    assert fake.requests[-1].status is None
    assert fake.job(job_id)["status"] == "claimed"


def test_redirect_fault_answers_location_without_processing(fake):
    fake.add_fault("redirect", route="register", location="http://127.0.0.1:9/elsewhere")
    answer = call(fake.url, "POST", "/api/runner/register", {"name": "a", "capabilities": []})
    assert (answer.status, answer.headers["Location"]) == (302, "http://127.0.0.1:9/elsewhere")
    fake.add_fault("redirect", location="/x", status=307)
    assert call(fake.url, "GET", "/health").status == 307
    assert fake.runners == {}


def test_redirect_target_records_what_a_following_client_sends(fake):
    with RecordingServer() as target:
        fake.add_fault("redirect", route="health", location=target.url + "/stolen", status=307)
        request = urllib.request.Request(fake.url + "/health", headers={"Authorization": "Bearer " + RUNNER_KEY})
        with urllib.request.urlopen(request, timeout=5) as response:   # follows redirects
            assert json.loads(response.read()) == {"ok": True}
        record = target.requests[0]
        assert (record.path, record.authorization) == ("/stolen", "Bearer " + RUNNER_KEY)
        assert record.status == 200


def test_rate_limit_fault_answers_429_with_reset_time(fake):
    fake.add_fault("rate_limit", route="available", reset_in_s=2.0)
    before = time.time() * 1000
    answer = call(fake.url, "GET", "/api/runner/jobs/available?types[]=a", runner_id="r")
    body = answer.json()
    assert answer.status == 429 and body["error"] == "Rate limit exceeded"
    assert before + 1900 <= body["resetTime"] <= time.time() * 1000 + 2000
    assert "Retry-After" not in answer.headers


def test_after_fault_processes_request_then_loses_answer(fake):
    runner_id = register(fake)
    job_id = claimed_job(fake, runner_id)
    fake.add_fault("status", route="complete", after=True, status=502, body={"error": "Bad gateway"})
    assert complete(fake, job_id, runner_id, {"ok": 1}).status == 502
    assert fake.job(job_id)["status"] == "completed"
    assert complete(fake, job_id, runner_id, {"ok": 1}).status == 400
    other = claimed_job(fake, runner_id, params={"n": 2})
    fake.add_fault("reset", route="error", after=True)
    with pytest.raises(ConnectionError):
        fail(fake, other, runner_id, "boom")
    assert fake.job(other)["status"] == "failed"


def test_faults_match_in_order_by_route_and_times(fake):
    fake.add_fault("status", route="verify", status=502)
    fake.add_fault("status", times=2, status=503)
    fake.add_fault("status", route="health", status=504)
    assert call(fake.url, "GET", "/health").status == 503       # first fault is verify-only
    assert call(fake.url, "GET", "/api/runner/verify", runner_id="r").status == 502
    assert call(fake.url, "GET", "/health").status == 503
    assert call(fake.url, "GET", "/health").status == 504
    assert call(fake.url, "GET", "/health").status == 200


def test_fault_can_target_one_job(fake):
    runner_id = register(fake)
    first, second = claimed_job(fake, runner_id, params={"n": 1}), claimed_job(fake, runner_id, params={"n": 2})
    fake.add_fault("status", route="heartbeat", job_id=second, times=None)
    assert heartbeat(fake, first, runner_id).status == 200
    assert heartbeat(fake, second, runner_id).status == 500


def test_fault_forever_until_clear_faults(fake):
    fake.add_fault("status", route="health", times=None, status=500)
    assert [call(fake.url, "GET", "/health").status for _ in range(4)] == [500] * 4
    fake.clear_faults()
    assert call(fake.url, "GET", "/health").status == 200


def test_unknown_fault_kind_is_refused(fake):
    with pytest.raises(ValueError):
        fake.add_fault("explode")


def test_go_down_refuses_connections_and_come_up_keeps_state_and_port(fake):
    job_id = fake.add_job("t", {})
    port = fake.port
    fake.go_down()
    with pytest.raises(urllib.error.URLError) as caught:
        call(fake.url, "GET", "/health", timeout=2)
    assert isinstance(caught.value.reason, ConnectionRefusedError)
    fake.come_up()
    assert fake.port == port
    listed = call(fake.url, "GET", "/api/runner/jobs/available?types[]=t", runner_id="r").json()["jobs"]
    assert [job["job_id"] for job in listed] == [job_id]


# ---- Portability ------------------------------------------------------------------------------


@pytest.mark.slow
def test_module_imports_under_python38():
    env = dict(os.environ, PYENV_VERSION="3.8.18")
    try:
        probe = subprocess.run(["python3.8", "-c", "import sys; print(sys.version_info[:2])"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("python3.8 not available")
    if probe.returncode != 0:
        pytest.skip("python3.8 not available")
    result = subprocess.run(["python3.8", "-c", "import fake_worker; fake_worker.FakeWorker().start().stop()"],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert result.returncode == 0, result.stderr.decode()
