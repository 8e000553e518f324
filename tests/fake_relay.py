"""A stand-in NotifyRelay server for tests, written from ``shared/notifyrelay-api.md``, over real sockets.

What it implements, as the contract says:

* ``POST /publish`` with ``Authorization: <publish key>`` (the bare key) and ``{"topic", "message"}``
  answers 200 ``{"success": true}`` and queues the message for every known subscriber of the topic.
* ``POST /poll`` with ``Authorization: <subscribe key>`` and ``{"subscriber_id", "subscriber_name",
  "topics", "timeout"}`` holds the request until one of its topics has a message or ``timeout`` ms
  pass, then answers 200 ``{"messages": {"<topic>": [{"message": "<string>", "timestamp": ms}]}}``
  (``{"messages": {}}`` after a timeout).  A subscriber becomes known at its first poll; from then
  on messages published between two of its polls wait in its own per-topic queues.  Each poll
  replaces the subscriber's name and topics.
* ``GET /`` answers a status JSON and ``GET /subscribers`` the list of subscribers.

Where the contract is silent, this fake picks the strict reading so that a client bug shows up:

* A wrong or missing key, or ``Bearer <key>``, is 401 ``{"error": ...}``; a body that is not JSON
  or misses a field is 400.  ``timeout`` must be a number from 0 to 55000: the contract says "at most
  55000", so a larger value is 400 ``{"error": "timeout must be at most 55000 ms"}``, not clamped.
* ``GET /`` and ``GET /subscribers`` need no key.  A message published before a subscriber's first
  poll is not delivered to it.  Two polls with one subscriber id share (steal from) one queue.
* When the server stops or goes down, every held poll is dropped unanswered, as a dying relay
  would: the client sees its connection reset.  Queued messages stay for the next poll.

Tests publish directly (``publish``), read what the worker published (``published``), watch
subscribers and requests (``subscribers``, ``held_polls``, ``requests``, ``count``, ``wait_until``),
lose notifications on purpose (``drop_next_publishes``), and break polls with ``add_fault``:
``status`` (e.g. 500 or 401), ``garbage`` (200 with HTML), ``hang`` (no answer until
``fault.release()`` or stop; then a reset) and ``reset``.  ``go_down`` / ``come_up`` stop listening
and listen again on the same port with the same state.

Standard library only; Python 3.8 compatible.  The HTTP plumbing is the fake worker's.
"""

import copy
import threading
import time
import traceback
import urllib.parse

from fake_worker import GARBAGE_HTML, _HTTPService, _parse_json, _Reply, now_ms

# ---- Keys, limits and routes --------------------------------------------------

RELAY_PUBLISH_KEY = "relay-publish-key-0123456789abcdef"
RELAY_SUBSCRIBE_KEY = "relay-subscribe-key-0123456789abcdef"
MAX_POLL_TIMEOUT_MS = 55000

ROUTES = ("status", "subscribers", "publish", "poll", "unknown")
FAULT_KINDS = ("status", "garbage", "hang", "reset")

_ROUTE_TABLE = {("GET", "/"): "status", ("GET", "/subscribers"): "subscribers",
                ("POST", "/publish"): "publish", ("POST", "/poll"): "poll"}


class _Refused(Exception):
    """An error answer (400, 401, 404) decided while reading a request."""

    def __init__(self, status, message):
        Exception.__init__(self, status, message)
        self.reply = _Reply(status, {"error": message})


class RelayRequest(object):
    """One request as the relay saw it; `status` is what was answered (None: no answer was sent)."""

    def __init__(self, method, path, route, subscriber_id, authorization, body, at):
        self.method = method
        self.path = path
        self.route = route
        self.subscriber_id = subscriber_id    # from the body of a poll, else None
        self.authorization = authorization
        self.body = body                      # parsed JSON, None if absent or not JSON
        self.at = at                          # time.monotonic() at arrival, as in FakeWorker
        self.status = None

    def __repr__(self):
        return "<%s %s route=%s status=%s>" % (self.method, self.path, self.route, self.status)


class RelayFault(object):
    """One injected fault; `release()` ends the hangs it holds (their connections are reset)."""

    def __init__(self, kind, route, times, options):
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r (one of %s)" % (kind, ", ".join(FAULT_KINDS)))
        if route not in ROUTES:
            raise ValueError("unknown route %r (one of %s)" % (route, ", ".join(ROUTES)))
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or at least 1")
        self.kind = kind
        self.route = route
        self.remaining = times
        self.options = options
        self.hits = 0
        self.released = threading.Event()

    def matches(self, record):
        return self.route == record.route

    def release(self):
        self.released.set()

    def __repr__(self):
        return "<RelayFault %s route=%s remaining=%s hits=%d>" % (
            self.kind, self.route, self.remaining, self.hits)


# ---- The relay ------------------------------------------------------------------


class FakeRelay(_HTTPService):
    """NotifyRelay in memory.  Direct methods are thread-safe and bypass HTTP, keys and faults."""

    def __init__(self, publish_key=RELAY_PUBLISH_KEY, subscribe_key=RELAY_SUBSCRIBE_KEY):
        _HTTPService.__init__(self)
        self.publish_key = publish_key
        self.subscribe_key = subscribe_key
        self._changed = threading.Condition(self._lock)    # a message was queued or the server closed
        self._subscribers = {}      # subscriber_id -> {"name", "topics", "last_poll", "queues"}
        self._published = []
        self._drops_left = 0
        self._held = 0

    def _close(self):
        _HTTPService._close(self)
        with self._changed:
            self._changed.notify_all()

    # messages

    def publish(self, topic, message):
        """Queue `message` (normally a string) for every known subscriber of `topic`, as a publish
        would, without HTTP or drops; returns how many subscribers it was queued for."""
        entry = {"message": message, "timestamp": now_ms()}
        with self._changed:
            targets = [sub for sub in self._subscribers.values() if topic in sub["topics"]]
            for subscriber in targets:
                subscriber["queues"].setdefault(topic, []).append(dict(entry))
            self._changed.notify_all()
        return len(targets)

    @property
    def published(self):
        """What arrived on POST /publish with the right key: [{"topic", "message", "dropped"}], in order."""
        with self._lock:
            return copy.deepcopy(self._published)

    def drop_next_publishes(self, count=1):
        """Accept the next `count` POST /publish with 200 but deliver nothing (a lost notification)."""
        with self._lock:
            self._drops_left += count

    # subscribers

    @property
    def subscribers(self):
        """{subscriber_id: {"subscriber_id", "subscriber_name", "topics", "last_poll", "pending"}};
        `last_poll` is epoch ms of the latest poll, `pending` counts queued messages per topic."""
        with self._lock:
            return {subscriber_id: self._describe_subscriber(subscriber_id, pending=True)
                    for subscriber_id in self._subscribers}

    @property
    def held_polls(self):
        """How many polls are waiting for a message right now (hanging faults not counted)."""
        with self._lock:
            return self._held

    # requests, waiting and faults

    def describe(self, last_requests=25):
        """Human-readable state: subscribers, publishes, faults and the last requests."""
        with self._lock:
            lines = ["subscribers: %s" % list(self.subscribers.values()),
                     "held polls: %d, published: %d, drops left: %d" % (
                         self._held, len(self._published), self._drops_left)]
            if self._faults:
                lines.append("faults: %s" % self._faults)
            lines.append("last requests (of %d):" % len(self._records))
            lines.extend("  %s %s -> %s" % (record.method, record.path, record.status)
                         for record in self._records[-last_requests:])
            return "\n".join(lines)

    def add_fault(self, kind, route="poll", times=1, **options):
        """Break the next `times` requests to `route` (None: until clear_faults()), before any check.

        Kinds: "status" (options status=500, body={"error": "Internal error"}), "garbage" (200 HTML),
        "hang" (no answer until release() or stop, then a reset), "reset".  Returns the fault.
        """
        return self._add_fault(RelayFault(kind, route, times, options))

    # ---- Serving a request ----------------------------------------------------

    def _handle(self, handler):
        raw = handler.read_body()
        path = urllib.parse.urlsplit(handler.path).path
        route = _ROUTE_TABLE.get((handler.command, path), "unknown")
        try:
            body = _parse_json(raw) if raw else None
        except ValueError:
            body = None
        subscriber_id = body.get("subscriber_id") if route == "poll" and isinstance(body, dict) else None
        record = RelayRequest(handler.command, handler.path, route, subscriber_id,
                              handler.headers.get("Authorization"), body, time.monotonic())
        with self._lock:
            self._records.append(record)
        fault = self._take_fault(record)
        try:
            if fault is not None:
                self._inject(handler, record, fault)
            elif route == "poll":
                self._poll(handler, record, body)
            else:
                self._send(handler, record, self._answer(route, record, body))
        except _Refused as refused:
            self._send(handler, record, refused.reply)
        except OSError:
            raise                       # the client went away
        except Exception:
            details = traceback.format_exc()
            with self._lock:
                self._internal_errors.append(details)
            self._send(handler, record, _Reply(500, {"error": "Fake relay bug", "details": details}))

    def _inject(self, handler, record, fault):
        if fault.kind == "status":
            self._send(handler, record, _Reply(fault.options.get("status", 500),
                                               fault.options.get("body", {"error": "Internal error"})))
        elif fault.kind == "garbage":
            self._send(handler, record, _Reply(200, raw=GARBAGE_HTML, content_type="text/html"))
        elif fault.kind == "hang":
            down = handler.server.down
            while not (fault.released.is_set() or down.is_set()):
                fault.released.wait(0.02)
            handler.drop()
        elif fault.kind == "reset":
            handler.drop()

    def _answer(self, route, record, body):
        if route == "status":
            with self._lock:
                return _Reply(200, {"status": "ok", "service": "notifyrelay",
                                    "subscribers": len(self._subscribers), "time": now_ms()})
        if route == "subscribers":
            with self._lock:
                return _Reply(200, {"subscribers": [self._describe_subscriber(subscriber_id)
                                                    for subscriber_id in self._subscribers]})
        if route == "publish":
            self._check_key(record, self.publish_key, "publish")
            topic, message = self._field(body, "topic", str), self._field(body, "message", str)
            with self._lock:
                dropped = self._drops_left > 0
                if dropped:
                    self._drops_left -= 1
                self._published.append({"topic": topic, "message": message, "dropped": dropped})
            if not dropped:
                self.publish(topic, message)
            return _Reply(200, {"success": True})
        raise _Refused(404, "Not found")

    def _poll(self, handler, record, body):
        self._check_key(record, self.subscribe_key, "subscribe")
        subscriber_id = self._field(body, "subscriber_id", str)
        name = self._field(body, "subscriber_name", str, allow_empty=True)
        topics = self._field(body, "topics", list)
        if not all(isinstance(topic, str) and topic for topic in topics):
            raise _Refused(400, "topics must be a list of non-empty strings")
        timeout_ms = self._field(body, "timeout", (int, float))
        if timeout_ms < 0:
            raise _Refused(400, "Missing or invalid field: timeout")
        if timeout_ms > MAX_POLL_TIMEOUT_MS:
            raise _Refused(400, "timeout must be at most %d ms" % MAX_POLL_TIMEOUT_MS)
        down = handler.server.down
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._changed:
            subscriber = self._subscribers.setdefault(subscriber_id, {"queues": {}})
            subscriber.update(name=name, topics=list(topics), last_poll=now_ms())
            self._held += 1
            try:
                while not (down.is_set() or any(subscriber["queues"].get(topic) for topic in topics)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                messages = {}
                if not down.is_set():
                    for topic in topics:
                        if subscriber["queues"].get(topic):
                            messages[topic] = subscriber["queues"].pop(topic)
            finally:
                self._held -= 1
        if down.is_set():
            handler.drop()
        else:
            self._send(handler, record, _Reply(200, {"messages": messages}))

    @staticmethod
    def _check_key(record, key, kind):
        if not record.authorization:
            raise _Refused(401, "Missing Authorization header")
        if record.authorization != key:
            raise _Refused(401, "Invalid %s key" % kind)

    @staticmethod
    def _field(body, name, kind, allow_empty=False):
        if not isinstance(body, dict):
            raise _Refused(400, "Body must be a JSON object")
        value = body.get(name)
        empty = value in ("", [])
        if not isinstance(value, kind) or isinstance(value, bool) or (empty and not allow_empty):
            raise _Refused(400, "Missing or invalid field: %s" % name)
        return value

    def _describe_subscriber(self, subscriber_id, pending=False):
        subscriber = self._subscribers[subscriber_id]
        described = {"subscriber_id": subscriber_id, "subscriber_name": subscriber["name"],
                     "topics": list(subscriber["topics"]), "last_poll": subscriber["last_poll"]}
        if pending:
            described["pending"] = {topic: len(queue) for topic, queue in subscriber["queues"].items()
                                    if queue}
        return described
