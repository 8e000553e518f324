"""The fake relay honours shared/notifyrelay-api.md, and the fake worker publishes to it like the real
worker: every contract point and every fault kind, over real sockets, each test well under a second."""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from fake_relay import RELAY_PUBLISH_KEY, RELAY_SUBSCRIBE_KEY, FakeRelay  # noqa: E402
from fake_worker import RELAY_TOPIC, SUBMIT_KEY, FakeWorker, job_identity  # noqa: E402

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- A tiny client ----------------------------------------------------------------


class Answer(object):
    def __init__(self, status, payload):
        self.status = status
        self.payload = payload

    def json(self):
        return json.loads(self.payload.decode("utf-8"))


def call(base, method, path, body=None, authorization=None, timeout=5.0):
    """One request; HTTP errors come back as answers, no-answer cases raise OSError."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, error.read())


def publish(relay, message, topic=RELAY_TOPIC, key=RELAY_PUBLISH_KEY):
    return call(relay.url, "POST", "/publish", {"topic": topic, "message": message}, authorization=key)


def poll(relay, subscriber_id="runner-a", timeout_ms=200, topics=(RELAY_TOPIC,), key=RELAY_SUBSCRIBE_KEY,
         http_timeout=5.0):
    body = {"subscriber_id": subscriber_id, "subscriber_name": "name of " + subscriber_id,
            "topics": list(topics), "timeout": timeout_ms}
    return call(relay.url, "POST", "/poll", body, authorization=key, timeout=http_timeout)


def delivered(answer, topic=RELAY_TOPIC):
    """The message strings of a poll answer for `topic`."""
    assert answer.status == 200, answer.payload
    return [entry["message"] for entry in answer.json()["messages"].get(topic, [])]


class Background(object):
    """Runs `function` in a thread; `result()` is its return value or the exception it raised."""

    def __init__(self, function, *args, **kwargs):
        self._outcome = []

        def run():
            try:
                self._outcome.append(function(*args, **kwargs))
            except Exception as error:      # handed to the test through result()
                self._outcome.append(error)

        self._thread = threading.Thread(target=run)
        self._thread.daemon = True
        self.started = time.monotonic()
        self._thread.start()

    def result(self, timeout=2.0):
        self._thread.join(timeout)
        assert self._outcome, "still running after %.1f s" % timeout
        return self._outcome[0]


@pytest.fixture
def relay():
    server = FakeRelay().start()
    yield server
    server.stop()
    assert server.internal_errors == []


def submit_over_http(worker, job_type, input_params):
    return call(worker.url, "POST", "/api/jobs/submit", {"job_type": job_type, "input_params": input_params},
                authorization="Bearer " + SUBMIT_KEY)


# ---- Status and subscribers -------------------------------------------------------


def test_status_and_subscribers_answer_without_key(relay):
    status = call(relay.url, "GET", "/")
    assert status.status == 200 and status.json()["status"] == "ok"
    assert call(relay.url, "GET", "/subscribers").json() == {"subscribers": []}
    poll(relay, "runner-a", timeout_ms=0)
    (listed,) = call(relay.url, "GET", "/subscribers").json()["subscribers"]
    assert listed["subscriber_id"] == "runner-a" and listed["subscriber_name"] == "name of runner-a"
    assert listed["topics"] == [RELAY_TOPIC] and abs(listed["last_poll"] - time.time() * 1000) < 5000
    assert relay.subscribers["runner-a"]["pending"] == {}


def test_unknown_route_is_404(relay):
    assert call(relay.url, "GET", "/publish").status == 404
    assert relay.requests[-1].route == "unknown"


# ---- Publish and long poll ------------------------------------------------------


def test_held_poll_answers_as_soon_as_a_message_is_published(relay):
    poll(relay, timeout_ms=0)
    waiting = Background(poll, relay, timeout_ms=5000)
    relay.wait_until(lambda: relay.held_polls == 1, timeout=2)
    message = json.dumps({"type": "new_job", "job_id": "j1"})
    answer = publish(relay, message)
    assert (answer.status, answer.json()) == (200, {"success": True})
    got = waiting.result()
    assert time.monotonic() - waiting.started < 1.0
    (entry,) = got.json()["messages"][RELAY_TOPIC]
    assert entry["message"] == message and abs(entry["timestamp"] - time.time() * 1000) < 5000
    assert relay.published == [{"topic": RELAY_TOPIC, "message": message, "dropped": False}]


def test_poll_with_short_timeout_answers_empty_messages(relay):
    started = time.monotonic()
    answer = poll(relay, timeout_ms=200)
    assert 0.19 <= time.monotonic() - started < 0.8
    assert (answer.status, answer.json()) == (200, {"messages": {}})
    record = relay.requests[-1]
    assert (record.route, record.subscriber_id, record.authorization, record.status) == (
        "poll", "runner-a", RELAY_SUBSCRIBE_KEY, 200)


def test_message_published_between_polls_of_known_subscriber_waits_for_next_poll(relay):
    poll(relay, timeout_ms=0)
    publish(relay, "first")
    publish(relay, "second")
    assert relay.subscribers["runner-a"]["pending"] == {RELAY_TOPIC: 2}
    started = time.monotonic()
    assert delivered(poll(relay, timeout_ms=5000)) == ["first", "second"]
    assert time.monotonic() - started < 0.5
    assert delivered(poll(relay, timeout_ms=0)) == []


def test_message_published_before_first_poll_is_not_delivered(relay):
    assert relay.publish(RELAY_TOPIC, "too early") == 0
    assert delivered(poll(relay, timeout_ms=100)) == []


def test_two_subscribers_each_get_their_own_copy(relay):
    poll(relay, "runner-a", timeout_ms=0)
    poll(relay, "runner-b", timeout_ms=0)
    assert relay.publish(RELAY_TOPIC, "hello") == 2
    assert delivered(poll(relay, "runner-a")) == ["hello"]
    assert delivered(poll(relay, "runner-b")) == ["hello"]


def test_poll_delivers_only_its_topics(relay):
    poll(relay, timeout_ms=0)
    relay.publish("other_topic", "not for you")
    relay.publish(RELAY_TOPIC, "for you")
    answer = poll(relay, timeout_ms=0)
    assert list(answer.json()["messages"]) == [RELAY_TOPIC]
    assert delivered(answer) == ["for you"]


# ---- Keys and bad requests -------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong", RELAY_SUBSCRIBE_KEY, "Bearer " + RELAY_PUBLISH_KEY])
def test_publish_without_the_bare_publish_key_is_401_and_delivers_nothing(relay, key):
    poll(relay, timeout_ms=0)
    answer = publish(relay, "hello", key=key)
    assert answer.status == 401 and "error" in answer.json()
    assert relay.published == [] and relay.subscribers["runner-a"]["pending"] == {}


@pytest.mark.parametrize("key", [None, "wrong", RELAY_PUBLISH_KEY, "Bearer " + RELAY_SUBSCRIBE_KEY])
def test_poll_without_the_bare_subscribe_key_is_401(relay, key):
    answer = poll(relay, key=key)
    assert answer.status == 401 and "error" in answer.json()
    assert relay.subscribers == {} and relay.count("poll", status=401) == 1


@pytest.mark.parametrize("change", [
    {"timeout": 55001}, {"timeout": -1}, {"timeout": "200"}, {"topics": []}, {"topics": "t"},
    {"subscriber_id": ""}, {"subscriber_name": None},
])
def test_poll_with_invalid_body_is_400(relay, change):
    body = {"subscriber_id": "a", "subscriber_name": "a", "topics": [RELAY_TOPIC], "timeout": 100}
    body.update(change)
    answer = call(relay.url, "POST", "/poll", body, authorization=RELAY_SUBSCRIBE_KEY)
    assert answer.status == 400 and "error" in answer.json()
    assert relay.subscribers == {}


def test_poll_timeout_above_55000_is_refused_not_clamped(relay):
    answer = poll(relay, timeout_ms=60000)
    assert (answer.status, answer.json()) == (400, {"error": "timeout must be at most 55000 ms"})


def test_publish_with_non_string_message_is_400(relay):
    assert publish(relay, {"type": "new_job"}).status == 400
    assert relay.published == []


# ---- Lost notifications, faults, down and up -------------------------------------


def test_dropped_publishes_are_accepted_but_deliver_nothing(relay):
    poll(relay, timeout_ms=0)
    relay.drop_next_publishes(2)
    assert [publish(relay, text).status for text in ("one", "two", "three")] == [200, 200, 200]
    assert [entry["dropped"] for entry in relay.published] == [True, True, False]
    assert delivered(poll(relay, timeout_ms=0)) == ["three"]


@pytest.mark.parametrize("status", [500, 401])
def test_status_fault_answers_that_status_once(relay, status):
    relay.add_fault("status", status=status)
    answer = poll(relay)
    assert answer.status == status and "error" in answer.json()
    assert poll(relay, timeout_ms=0).status == 200
    assert relay.count("poll", status=status) == 1


def test_status_fault_can_last_until_cleared(relay):
    relay.add_fault("status", times=None, status=503, body={"error": "busy"})
    assert [poll(relay, timeout_ms=0).status for _ in range(3)] == [503] * 3
    relay.clear_faults()
    assert poll(relay, timeout_ms=0).status == 200


def test_garbage_fault_answers_200_with_html(relay):
    relay.add_fault("garbage")
    answer = poll(relay)
    assert answer.status == 200
    with pytest.raises(ValueError):
        answer.json()


def test_reset_fault_closes_the_connection_without_answer(relay):
    relay.add_fault("reset")
    with pytest.raises(ConnectionError):
        poll(relay)
    assert relay.requests[-1].status is None


def test_hang_fault_is_released_by_release(relay):
    fault = relay.add_fault("hang")
    hanging = Background(poll, relay)
    relay.wait_until(lambda: relay.count("poll") == 1, timeout=2)
    time.sleep(0.3)     # longer than the poll's own timeout: only release() can end it
    assert relay.requests[-1].status is None
    fault.release()
    assert isinstance(hanging.result(), OSError)
    assert relay.requests[0].status is None


def test_stop_promptly_ends_hanging_and_held_polls():
    relay = FakeRelay().start()
    relay.add_fault("hang")
    hanging = Background(poll, relay, timeout_ms=55000, http_timeout=30)
    relay.wait_until(lambda: relay.count("poll") == 1, timeout=2)
    held = Background(poll, relay, "runner-b", timeout_ms=55000, http_timeout=30)
    relay.wait_until(lambda: relay.held_polls == 1, timeout=2)
    started = time.monotonic()
    relay.stop()
    assert isinstance(hanging.result(), OSError) and isinstance(held.result(), OSError)
    assert time.monotonic() - started < 1.0
    assert relay.held_polls == 0 and relay.internal_errors == []


def test_go_down_refuses_and_come_up_keeps_port_subscribers_and_queues(relay):
    poll(relay, timeout_ms=0)
    port = relay.port
    relay.go_down()
    assert not relay.is_up
    with pytest.raises(OSError) as refused:
        poll(relay)
    assert isinstance(refused.value, ConnectionRefusedError) or isinstance(
        getattr(refused.value, "reason", None), ConnectionRefusedError)
    relay.publish(RELAY_TOPIC, "queued while down")
    relay.come_up()
    assert relay.port == port
    assert delivered(poll(relay, timeout_ms=0)) == ["queued while down"]


def test_go_down_resets_a_held_poll_and_keeps_its_messages(relay):
    poll(relay, timeout_ms=0)
    held = Background(poll, relay, timeout_ms=5000)
    relay.wait_until(lambda: relay.held_polls == 1, timeout=2)
    relay.go_down()
    assert isinstance(held.result(), OSError)
    relay.publish(RELAY_TOPIC, "later")
    relay.come_up()
    assert delivered(poll(relay, timeout_ms=0)) == ["later"]


# ---- The fake worker publishes new jobs ---------------------------------------------


@pytest.fixture
def worker(relay):
    server = FakeWorker(relay_url=relay.url, relay_publish_key=RELAY_PUBLISH_KEY).start()
    yield server
    server.stop()
    assert server.internal_errors == [] and server.publish_errors == []


def test_worker_publishes_once_per_new_job_submitted_and_not_on_resubmission(relay, worker):
    poll(relay, timeout_ms=0)
    params = {"who": "you"}
    created = submit_over_http(worker, "hello_world", params)
    assert created.status == 201
    job_id = created.json()["job_id"]
    (published,) = relay.published
    assert published["topic"] == RELAY_TOPIC and not published["dropped"]
    publish_record = [record for record in relay.requests if record.route == "publish"][0]
    assert publish_record.authorization == RELAY_PUBLISH_KEY
    message = json.loads(published["message"])
    assert set(message) == {"type", "job_id", "job_hash", "job_type", "timestamp"}
    assert (message["type"], message["job_id"], message["job_type"]) == ("new_job", job_id, "hello_world")
    assert message["job_hash"] == job_identity("hello_world", params)
    assert abs(message["timestamp"] - time.time() * 1000) < 5000

    again = submit_over_http(worker, "hello_world", params)
    assert (again.status, again.json()["job_id"]) == (200, job_id)
    assert len(relay.published) == 1
    assert delivered(poll(relay, timeout_ms=0)) == [published["message"]]


def test_woken_subscriber_finds_the_job_already_stored(relay, worker):
    poll(relay, timeout_ms=0)

    def wait_then_look_up():
        (text,) = delivered(poll(relay, timeout_ms=5000))
        return worker.job(json.loads(text)["job_id"])["status"]

    woken = Background(wait_then_look_up)
    relay.wait_until(lambda: relay.held_polls == 1, timeout=2)
    worker.add_job("hello_world", {"n": 1})
    assert woken.result() == "pending"


def test_add_job_publishes_new_jobs_unless_told_not_to(relay, worker):
    job_id = worker.add_job("hello_world", {"n": 1})
    assert worker.add_job("hello_world", {"n": 1}) == job_id
    worker.add_job("hello_world", {"n": 2}, publish=False)
    assert [json.loads(entry["message"])["job_id"] for entry in relay.published] == [job_id]


def test_worker_without_relay_settings_publishes_nothing(relay):
    with FakeWorker(relay_url=relay.url) as worker:
        assert submit_over_http(worker, "hello_world", {}).status == 201
        worker.add_job("hello_world", {"n": 1})
        assert worker.publish_errors == []
    assert relay.count("publish") == 0


def test_relay_down_or_refusing_does_not_fail_the_submit(relay):
    with FakeWorker(relay_url=relay.url, relay_publish_key="wrong key") as worker:
        assert submit_over_http(worker, "hello_world", {"n": 1}).status == 201
        relay.go_down()
        assert submit_over_http(worker, "hello_world", {"n": 2}).status == 201
        worker.add_job("hello_world", {"n": 3})
        errors = worker.publish_errors
        assert len(errors) == 3 and "401" in errors[0], errors
        assert len(worker.jobs(status="pending")) == 3
    assert relay.published == [] and relay.count("publish", status=401) == 1
