"""A fake Runpack worker for tests: the worker's HTTP contract, over real sockets, with fault injection.

The fake follows ``shared/worker-api.md`` to the letter for what it implements: status codes, error
bodies, the order of the header checks (X-Runner-ID before auth on ``/api/runner/jobs/*``), size limits
counted in JavaScript string length, fixed-window rate limits, and submit deduplication with figpack
re-validation.  It listens on 127.0.0.1 on a port chosen by the OS and never logs to stderr.

Not implemented here: admin, check, status (``/api/admin/*``, ``POST /api/jobs/check`` and
``GET /api/jobs/{id}``): the runner never calls them, and tests read the state directly instead.  A
request to one of them gets the 404 ``{"error": "Not found"}`` of an unknown route (after the
submit-key check, for ``/api/jobs/*``).

Tests create work and read state directly (``add_job``, ``job``, ``jobs``, ``requests``, ``count``,
``wait_until``) and break the service on purpose with ``add_fault`` (errors, hangs, slow answers,
garbage, resets, redirects, 429s, and "the worker did it but the answer was lost").  ``go_down`` /
``come_up`` make the whole service unreachable and bring it back on the same port with its state.

Given ``relay_url`` and ``relay_publish_key`` (see ``shared/notifyrelay-api.md`` and ``fake_relay.py``),
the fake publishes like the deployed worker: each time a new job row is created, by ``POST
/api/jobs/submit`` or by ``add_job`` (which stands for a submit; ``publish=False`` skips it), and only
after the row exists, it sends ``POST {relay_url}/publish`` with the bare publish key and the topic
``runpack_notifications``; the message is the JSON string of ``{"type": "new_job", "job_id",
"job_hash", "job_type", "timestamp"}``.  A resubmission of a known job publishes nothing.  Publishing
is best effort: a failure never fails the submit and is only kept in ``publish_errors``.

To try a runner by hand, ``python3 tests/fake_worker.py [--port PORT]`` serves one on 127.0.0.1 until
Ctrl-C and prints its URL, its keys, a ``curl`` line that submits a job and the command that starts a
runner against it (see ``main``).

Standard library only; Python 3.8 compatible.
"""

import argparse
import copy
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ---- Keys, limits and fixed answers -----------------------------------------

RUNNER_KEY = "runner-key-0123456789abcdef"
SUBMIT_KEY = "submit-key-0123456789abcdef"

CONSOLE_OUTPUT_LIMIT = 1048576
OUTPUT_JSON_LIMIT = 512000
ERROR_MESSAGE_LIMIT = 10240
INPUT_PARAMS_LIMIT = 102400
SUBMIT_RATE_LIMIT = 10      # submit, per client address and window
FIGPACK_TIMEOUT_S = 5.0
RELAY_TOPIC = "runpack_notifications"
RELAY_PUBLISH_TIMEOUT_S = 5.0

ROUTES = ("health", "register", "verify", "available", "claim", "heartbeat", "complete", "error",
          "submit", "unknown")
FAULT_KINDS = ("status", "hang", "slow", "garbage", "bad_shape", "reset", "redirect", "rate_limit")

NOT_FOUND = {"error": "Not found"}
MISSING_RUNNER_ID = {"error": "Missing X-Runner-ID header"}
MISSING_AUTH = {"error": "Missing Authorization header"}
BAD_AUTH_FORMAT = {"error": "Invalid Authorization header format. Use: Bearer <token>"}
INVALID_KEY = {"error": "Invalid API key"}
NOT_CLAIMED_BY_RUNNER = {"success": False, "message": "Job not found or not claimed by this runner"}
CLAIM_CONFLICT = {"success": False, "message": "Job already claimed or not found"}
CONSOLE_TOO_BIG = {"error": "Console output exceeds size limit of %d bytes" % CONSOLE_OUTPUT_LIMIT}
OUTPUT_TOO_BIG = {"error": "Output JSON exceeds size limit of %d bytes" % OUTPUT_JSON_LIMIT}
ERROR_TOO_BIG = {"error": "Error message exceeds size limit of %d bytes" % ERROR_MESSAGE_LIMIT}
INPUT_TOO_BIG = {"error": "Input parameters exceed size limit of %d bytes" % INPUT_PARAMS_LIMIT}
GARBAGE_HTML = b"<html><body>Bad gateway</body></html>"

# ---- Small helpers: time, JavaScript lengths, job identity, figpack URLs ----


def now_ms():
    """Wall-clock time in epoch milliseconds, the worker's timestamp unit."""
    return int(time.time() * 1000)


def js_length(text):
    """Length of `text` as JavaScript counts it (UTF-16 code units): the worker's size limits use it."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def js_stringify(value):
    """Close stand-in for JSON.stringify (compact, non-ASCII kept); floats like 1.0 differ by two characters."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def job_identity(job_type, input_params):
    """Dedup identity: SHA-256 of the job type and its parameters with keys sorted recursively."""
    canonical = json.dumps({"job_type": job_type, "input_params": input_params},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def figpack_urls(value):
    """Every value stored under a "figpack_url" key, at any depth of `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "figpack_url":
                yield item
            else:
                for found in figpack_urls(item):
                    yield found
    elif isinstance(value, list):
        for item in value:
            for found in figpack_urls(item):
                yield found


def figpack_url_is_live(url):
    """The worker's re-validation: the URL must end in /index.html and its figpack.json must answer 2xx."""
    if not isinstance(url, str) or not url.endswith("/index.html"):
        return False
    manifest_url = url[:-len("index.html")] + "figpack.json"
    try:
        with urllib.request.urlopen(manifest_url, timeout=FIGPACK_TIMEOUT_S) as response:
            response.read()
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _parse_json(raw):
    """Strict JSON (no NaN/Infinity, as JSON.parse); raises ValueError."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)


# ---- Request records ----------------------------------------------------------

_JOB = r"(?P<job_id>[^/]+)"
_ROUTE_TABLE = [
    # (method, path pattern, recorded route, handler method name)
    ("GET", r"/health", "health", "_health"),
    ("GET", r"/", "health", "_health"),
    ("POST", r"/api/runner/register", "register", "_register"),
    ("GET", r"/api/runner/verify", "verify", "_verify"),
    ("GET", r"/api/runner/jobs/available", "available", "_available"),
    ("POST", r"/api/runner/jobs/%s/claim" % _JOB, "claim", "_claim"),
    ("POST", r"/api/runner/jobs/%s/heartbeat" % _JOB, "heartbeat", "_heartbeat"),
    ("POST", r"/api/runner/jobs/%s/complete" % _JOB, "complete", "_complete"),
    ("POST", r"/api/runner/jobs/%s/error" % _JOB, "error", "_error"),
    ("POST", r"/api/jobs/submit", "submit", "_submit"),
]
_COMPILED_ROUTES = [(method, re.compile(pattern + "$"), route, handler)
                    for method, pattern, route, handler in _ROUTE_TABLE]


def classify(method, path):
    """(route, handler name or None, path parameters) for a request; unmatched -> ("unknown", None, {})."""
    for route_method, pattern, route, handler in _COMPILED_ROUTES:
        match = pattern.match(path)
        if match and route_method == method:
            return route, handler, match.groupdict()
    return "unknown", None, {}


class RequestRecord(object):
    """One request as the fake saw it; `status` is what was answered (None: no answer was sent)."""

    def __init__(self, method, path, route, job_id, runner_id, authorization, body, at,
                 headers, client):
        self.method = method
        self.path = path
        self.route = route
        self.job_id = job_id
        self.runner_id = runner_id
        self.authorization = authorization
        self.body = body
        self.at = at
        self.headers = headers          # dict of all request headers (last value wins)
        self.client = client            # client IP address
        self.status = None

    def __repr__(self):
        return "<%s %s route=%s status=%s>" % (self.method, self.path, self.route, self.status)


# ---- Faults -------------------------------------------------------------------


class Fault(object):
    """One injected fault; `release()` ends the hangs it holds (their connections are dropped unanswered)."""

    def __init__(self, kind, route, times, after, job_id, options):
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r (one of %s)" % (kind, ", ".join(FAULT_KINDS)))
        if route is not None and route not in ROUTES:
            raise ValueError("unknown route %r (one of %s)" % (route, ", ".join(ROUTES)))
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or at least 1")
        if kind == "slow" and "delay" not in options:
            raise ValueError('a "slow" fault needs delay=<seconds>')
        if kind == "redirect" and "location" not in options:
            raise ValueError('a "redirect" fault needs location=<url>')
        self.kind = kind
        self.route = route
        self.remaining = times
        self.after = after
        self.job_id = job_id
        self.options = options
        self.hits = 0
        self.released = threading.Event()

    def matches(self, record):
        return ((self.route is None or self.route == record.route)
                and (self.job_id is None or self.job_id == record.job_id))

    def release(self):
        self.released.set()

    def __repr__(self):
        return "<Fault %s route=%s remaining=%s after=%s hits=%d>" % (
            self.kind, self.route, self.remaining, self.after, self.hits)


# ---- HTTP plumbing: server, handler, replies ---------------------------------


class _Reply(object):
    """An answer to send: JSON `body`, or `raw` bytes with their content type."""

    def __init__(self, status, body=None, raw=None, content_type="application/json", headers=None):
        self.status = status
        self.body = body
        self.raw = raw
        self.content_type = content_type
        self.headers = headers or {}


class _Answer(Exception):
    """Raised by a route to answer at once (the error paths); carries the status and the JSON body."""

    def __init__(self, status, body):
        Exception.__init__(self, status, body)
        self.status = status
        self.body = body


def _crash(failure, details):
    """The worker's handler-crash answer: 500 {"error": "Failed to ...", "details": ...}."""
    return _Answer(500, {"error": failure, "details": details})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def server_bind(self):
        # Skip HTTPServer's reverse DNS lookup of the host name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):     # clients going away are not news
            ThreadingHTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request and hands it to the service behind the server; one request per connection."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _dispatch(self):
        self.close_connection = True
        self.server.service._handle(self)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _dispatch

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def send_reply(self, reply):
        payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def drop(self):
        """Close the connection without an answer; linger 0 makes it a reset rather than a clean close."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()

    def finish(self):
        try:
            BaseHTTPRequestHandler.finish(self)
        except (OSError, ValueError):
            pass


class _Incoming(object):
    """What a route needs from a request besides its record."""

    def __init__(self, record, split, handler_name, params, raw):
        self.record = record
        self.path = split.path
        self.query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        self.handler_name = handler_name
        self.params = params
        self.raw = raw


class _HTTPService(object):
    """Lifecycle, request recording and fault injection shared by FakeWorker, FakeRelay and RecordingServer."""

    def __init__(self):
        self._lock = threading.RLock()
        self._records = []
        self._internal_errors = []
        self._faults = []
        self._server = None
        self.port = None

    # lifecycle

    def start(self):
        if self._server is None:
            self._listen(0 if self.port is None else self.port)
        return self

    def stop(self):
        self._close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def is_up(self):
        return self._server is not None

    def go_down(self):
        """Close the listening socket (new connections are refused) and drop held requests; state is kept."""
        self._close()

    def come_up(self):
        """Listen again on the same port, with the same state."""
        if self._server is None:
            self._listen(self.port)

    def _listen(self, port):
        server = _Server(("127.0.0.1", port), _Handler)
        server.service = self
        server.down = threading.Event()     # set when this listener closes: ends its hangs and delays
        self.port = server.server_address[1]
        self._server = server
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                  name="%s-%d" % (type(self).__name__, self.port))
        thread.daemon = True
        thread.start()

    def _close(self):
        server, self._server = self._server, None
        if server is not None:
            server.down.set()
            server.shutdown()
            server.server_close()

    # recording and waiting

    @property
    def requests(self):
        with self._lock:
            return [copy.copy(record) for record in self._records]

    def count(self, route=None, status=None, **fields):
        """How many recorded requests match the route and answered status (None: any) and the
        record ``fields`` given (job_id=..., subscriber_id=...)."""
        with self._lock:
            return sum(1 for record in self._records
                       if (route is None or record.route == route)
                       and (status is None or record.status == status)
                       and all(getattr(record, name) == value for name, value in fields.items()))

    @property
    def internal_errors(self):
        """Tracebacks of bugs in the fake itself (each answered 500); tests can assert it stays empty."""
        with self._lock:
            return list(self._internal_errors)

    def wait_until(self, predicate, timeout=10.0, message=""):
        """Poll `predicate()` every 20 ms; on timeout raise AssertionError with a summary of the state."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise AssertionError("%s (waited %.1f s)\n%s" % (message or "condition not met",
                                                                  timeout, self.describe()))
            time.sleep(0.02)

    # faults, for the services that inject them

    def _add_fault(self, fault):
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self):
        """Forget faults not used up yet (requests already hanging keep hanging until release or stop)."""
        with self._lock:
            del self._faults[:]

    def _take_fault(self, record):
        """The first fault whose ``matches(record)`` holds, counted as used once; None if none does."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(record):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def describe(self, last_requests=25):
        """Human-readable state, for a failed wait: the last requests (services say more)."""
        with self._lock:
            return "\n".join(["last requests (of %d):" % len(self._records)] + [
                "  %s %s -> %s" % (record.method, record.path, record.status)
                for record in self._records[-last_requests:]])

    def _handle(self, handler):
        raw = handler.read_body()
        split = urllib.parse.urlsplit(handler.path)
        route, handler_name, params = classify(handler.command, split.path)
        try:
            body = _parse_json(raw) if raw else None
        except ValueError:
            body = None
        record = RequestRecord(
            method=handler.command, path=handler.path, route=route, job_id=params.get("job_id"),
            runner_id=handler.headers.get("X-Runner-ID"),
            authorization=handler.headers.get("Authorization"), body=body, at=time.monotonic(),
            headers=dict(handler.headers.items()), client=handler.client_address[0])
        with self._lock:
            self._records.append(record)
        self._serve(handler, _Incoming(record, split, handler_name, params, raw))

    def _send(self, handler, record, reply):
        with self._lock:
            record.status = reply.status
        handler.send_reply(reply)

    def _serve(self, handler, incoming):
        raise NotImplementedError


class _FixedWindows(object):
    """In-memory fixed-window counters: a window starts at a key's first request."""

    def __init__(self):
        self._windows = {}
        self._lock = threading.Lock()

    def hit(self, key, limit, window_s):
        """Count one request; None when allowed, else the epoch ms at which the window ends."""
        with self._lock:
            window = self._windows.get(key)
            if window is None or time.monotonic() >= window["start"] + window_s:
                window = {"start": time.monotonic(), "start_ms": now_ms(), "count": 0}
                self._windows[key] = window
            window["count"] += 1
            if window["count"] > limit:
                return window["start_ms"] + int(window_s * 1000)
            return None

    def clear(self):
        with self._lock:
            self._windows.clear()


# ---- The fake worker: state and direct access ---------------------------------

_JOB_FIELDS = ("job_id", "job_type", "input_params", "status", "claimed_by", "progress_current",
               "progress_total", "console_output", "output_data", "error_message", "created_at",
               "updated_at", "last_heartbeat")


class FakeWorker(_HTTPService):
    """The Runpack worker in memory.  All direct methods are thread-safe and bypass HTTP and rate limits."""

    def __init__(self, runner_key=RUNNER_KEY, submit_key=SUBMIT_KEY,
                 rate_limit=120, rate_window_s=60.0, max_listed=50,
                 submit_rate_limit=SUBMIT_RATE_LIMIT, relay_url=None, relay_publish_key=None):
        _HTTPService.__init__(self)
        self.runner_key = runner_key
        self.submit_key = submit_key
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.max_listed = max_listed
        self.submit_rate_limit = submit_rate_limit
        self.relay_url = relay_url                  # both set: new jobs are published (module doc)
        self.relay_publish_key = relay_publish_key
        self._jobs = {}         # job_id -> row
        self._sequence = itertools.count()      # creation order, to break created_at ties
        self._runners = {}      # runner_id -> row
        self._windows = _FixedWindows()
        self._publish_errors = []

    # jobs

    def add_job(self, job_type, input_params, publish=True):
        """Create a pending job (no HTTP, no limits); an already known type+params returns the existing id.

        A new job is published to the relay, if one is configured, unless `publish` is False.
        """
        created, job = self._find_or_create(job_type, input_params, revalidate=False)
        if created and publish:
            self._publish_new_job(job)
        return job["job_id"]

    def job(self, job_id):
        """Snapshot of one job (KeyError if unknown)."""
        with self._lock:
            return self._snapshot(self._jobs[job_id])

    def jobs(self, status=None):
        """Snapshots of all jobs (or those with `status`), oldest first."""
        with self._lock:
            return [self._snapshot(job) for job in self._ordered_jobs()
                    if status is None or job["status"] == status]

    def update_job(self, job_id, **fields):
        """Set stored fields of a job directly (e.g. status="completed", output_data=...)."""
        unknown = set(fields) - set(_JOB_FIELDS[1:])
        if unknown:
            raise ValueError("not a job field: %s" % ", ".join(sorted(unknown)))
        with self._lock:
            job = self._jobs[job_id]
            job.update(copy.deepcopy(fields))
            if "job_type" in fields or "input_params" in fields:
                job["identity"] = job_identity(job["job_type"], job["input_params"])

    def claim_for(self, job_id, runner_id):
        """Make the job claimed by `runner_id`, as if another runner had claimed it."""
        with self._lock:
            job = self._jobs[job_id]
            job.update(status="claimed", claimed_by=runner_id, updated_at=now_ms())

    def delete_job(self, job_id):
        """Delete a job row; True if it existed."""
        with self._lock:
            return self._jobs.pop(job_id, None) is not None

    # runners

    @property
    def runners(self):
        with self._lock:
            return copy.deepcopy(self._runners)

    def register_runner(self, name="test-runner", capabilities=()):
        """Register a runner directly and return its id."""
        runner_id = str(uuid.uuid4())
        with self._lock:
            self._runners[runner_id] = {"name": name, "capabilities": list(capabilities),
                                        "registered_at": now_ms()}
        return runner_id

    def forget_runner(self, runner_id):
        """Delete the runner row: verify answers 404, a claim with that id answers 500."""
        with self._lock:
            return self._runners.pop(runner_id, None) is not None

    # requests and waiting

    @property
    def publish_errors(self):
        """One line per failed publish to the relay ("<job_id>: <error>"), oldest first."""
        with self._lock:
            return list(self._publish_errors)

    def describe(self, last_requests=25):
        """Human-readable state: jobs, runners and the last requests."""
        with self._lock:
            lines = ["jobs:"]
            for job in self._ordered_jobs():
                lines.append("  %s %s %s claimed_by=%s heartbeats=%d reports=%s" % (
                    job["job_id"], job["job_type"], job["status"], job["claimed_by"],
                    len(job["heartbeats"]), [kind for kind, _ in job["reports"]]))
            lines.append("runners: %s" % ", ".join(
                "%s (%s)" % (rid, row["name"]) for rid, row in self._runners.items()))
            lines.append("last requests (of %d):" % len(self._records))
            for record in self._records[-last_requests:]:
                lines.append("  %s %s -> %s" % (record.method, record.path, record.status))
            if self._faults:
                lines.append("faults: %s" % self._faults)
            return "\n".join(lines)

    # faults

    def add_fault(self, kind, route=None, times=1, after=False, job_id=None, **options):
        """Break the next `times` matching requests (None: until clear_faults()); see the module doc.

        `job_id` narrows the match to one job's requests.  Returns the Fault (for `release()`).
        """
        return self._add_fault(Fault(kind, route, times, after, job_id, options))

    def reset_rate_limits(self):
        self._windows.clear()

    # internals

    def _ordered_jobs(self):
        return sorted(self._jobs.values(), key=lambda job: (job["created_at"], job["seq"]))

    @staticmethod
    def _snapshot(job):
        snapshot = {field: copy.deepcopy(job[field]) for field in _JOB_FIELDS}
        snapshot["heartbeats"] = copy.deepcopy(job["heartbeats"])
        snapshot["reports"] = copy.deepcopy(job["reports"])
        return snapshot

    def _find_or_create(self, job_type, input_params, revalidate):
        """(created, snapshot) for a type+params; completed figpack results are re-checked if `revalidate`."""
        identity = job_identity(job_type, input_params)
        with self._lock:
            job = self._job_by_identity(identity)
            if job is None:
                return True, self._snapshot(self._insert_job(job_type, input_params, identity))
            urls = list(figpack_urls(job["output_data"])) if job["status"] == "completed" else []
            if not (revalidate and urls):
                return False, self._snapshot(job)
            checked_job_id = job["job_id"]
        live = all(figpack_url_is_live(url) for url in urls)      # outside the lock: it is a fetch
        with self._lock:
            if not live:
                self._jobs.pop(checked_job_id, None)
            job = self._job_by_identity(identity)
            if job is None:
                return True, self._snapshot(self._insert_job(job_type, input_params, identity))
            return False, self._snapshot(job)

    def _publish_new_job(self, job):
        """The deployed worker's notification of a new job: best effort, a failure is only recorded."""
        if not (self.relay_url and self.relay_publish_key):
            return
        message = js_stringify({"type": "new_job", "job_id": job["job_id"],
                                "job_hash": job_identity(job["job_type"], job["input_params"]),
                                "job_type": job["job_type"], "timestamp": now_ms()})
        request = urllib.request.Request(
            self.relay_url.rstrip("/") + "/publish", method="POST",
            data=json.dumps({"topic": RELAY_TOPIC, "message": message}).encode("utf-8"),
            headers={"Authorization": self.relay_publish_key, "Content-Type": "application/json"})
        try:
            with _NO_PROXY_OPENER.open(request, timeout=RELAY_PUBLISH_TIMEOUT_S) as response:
                response.read()
        except Exception as error:      # anything at all: the worker logs it and carries on
            if isinstance(error, urllib.error.HTTPError):
                error.close()
            with self._lock:
                self._publish_errors.append("%s: %r" % (job["job_id"], error))

    def _job_by_identity(self, identity):
        for job in self._jobs.values():
            if job["identity"] == identity:
                return job
        return None

    def _insert_job(self, job_type, input_params, identity):
        created = now_ms()
        job = {
            "job_id": str(uuid.uuid4()), "job_type": job_type,
            "input_params": copy.deepcopy(input_params), "status": "pending", "claimed_by": None,
            "progress_current": None, "progress_total": None, "console_output": None,
            "output_data": None, "error_message": None, "created_at": created,
            "updated_at": created, "last_heartbeat": None, "heartbeats": [], "reports": [],
            "identity": identity, "seq": next(self._sequence),
        }
        self._jobs[job["job_id"]] = job
        return job

    # ---- The fake worker: serving a request (faults, checks, routes) ----------

    def _serve(self, handler, incoming):
        record = incoming.record
        fault = self._take_fault(record)
        if fault is None:
            self._send(handler, record, self._process(incoming))
            return
        down = handler.server.down
        real = self._process(incoming) if fault.after else None
        kind, options = fault.kind, fault.options
        if kind == "slow":
            down.wait(options["delay"])
            if not down.is_set():
                self._send(handler, record, real if real is not None else self._process(incoming))
        elif kind == "hang":
            while not (fault.released.is_set() or down.is_set()):
                fault.released.wait(0.02)
            handler.drop()
        elif kind == "reset":
            handler.drop()
        elif kind == "status":
            self._send(handler, record, _Reply(options.get("status", 500),
                                               options.get("body", {"error": "Internal error"}),
                                               headers=options.get("headers")))
        elif kind == "garbage":
            self._send(handler, record, _Reply(200, raw=GARBAGE_HTML, content_type="text/html"))
        elif kind == "bad_shape":
            self._send(handler, record, _Reply(200, options.get("body", {"unexpected": True})))
        elif kind == "redirect":
            self._send(handler, record, _Reply(options.get("status", 302), raw=b"", content_type=None,
                                               headers={"Location": options["location"]}))
        elif kind == "rate_limit":
            reset_time = now_ms() + int(options.get("reset_in_s", 1.0) * 1000)
            self._send(handler, record,
                       _Reply(429, {"error": "Rate limit exceeded", "resetTime": reset_time}))

    def _process(self, incoming):
        """Run the worker's middleware and route for one request and return the reply."""
        try:
            status, body = self._route(incoming)
            return _Reply(status, body)
        except _Answer as answer:
            return _Reply(answer.status, answer.body)
        except Exception:
            details = traceback.format_exc()
            with self._lock:
                self._internal_errors.append(details)
            return _Reply(500, {"error": "Fake worker bug", "details": details})

    def _route(self, incoming):
        path, record = incoming.path, incoming.record
        if path.startswith("/api/runner/jobs/") and not record.runner_id:
            raise _Answer(400, MISSING_RUNNER_ID)
        if path.startswith("/api/runner/"):
            self._authorize(record, (self.runner_key,))
        elif path.startswith("/api/jobs/"):
            self._authorize(record, (self.submit_key,))
        if incoming.handler_name is None:
            raise _Answer(404, NOT_FOUND)
        return getattr(self, incoming.handler_name)(incoming)

    @staticmethod
    def _authorize(record, keys):
        header = record.authorization
        if not header:
            raise _Answer(401, MISSING_AUTH)
        if not header.startswith("Bearer "):
            raise _Answer(401, BAD_AUTH_FORMAT)
        if header[len("Bearer "):] not in keys:
            raise _Answer(401, INVALID_KEY)

    def _limit(self, key, limit):
        reset_time = self._windows.hit(key, limit, self.rate_window_s)
        if reset_time is not None:
            raise _Answer(429, {"error": "Rate limit exceeded", "resetTime": reset_time})

    @staticmethod
    def _body(incoming, failure):
        """The JSON body as an object; invalid JSON is a handler crash (500), a non-object has no fields."""
        try:
            body = _parse_json(incoming.raw)
        except ValueError as exc:
            raise _crash(failure, "Invalid JSON body: %s" % exc)
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _required(body, field, failure, kind=None):
        if field not in body or (kind is not None and not isinstance(body[field], kind)):
            raise _crash(failure, "Missing or invalid field: %s" % field)
        return body[field]

    def _owned_job(self, job_id, runner_id):
        """The job if `runner_id` holds its claim (claimed or in_progress); else the 400 "not ours"."""
        job = self._jobs.get(job_id)
        if job is None or job["claimed_by"] != runner_id or job["status"] not in ("claimed", "in_progress"):
            raise _Answer(400, NOT_CLAIMED_BY_RUNNER)
        return job

    # routes: health and runners

    def _health(self, incoming):
        return 200, {"status": "ok", "service": "runpack-worker"}

    def _register(self, incoming):
        body = self._body(incoming, "Failed to register runner")
        name, capabilities = body.get("name"), body.get("capabilities")
        if not isinstance(name, str) or not name or not isinstance(capabilities, list):
            raise _Answer(400, {"error": "Invalid registration data"})
        runner_id = self.register_runner(name, capabilities)
        return 201, {"runner_id": runner_id, "message": "Runner registered successfully"}

    def _verify(self, incoming):
        runner_id = incoming.record.runner_id
        if not runner_id:
            raise _Answer(400, MISSING_RUNNER_ID)
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is None:
                return 404, {"exists": False, "message": "Runner not found"}
            return 200, {"exists": True, "runner_name": runner["name"], "message": "Runner verified"}

    # routes: the job lifecycle

    def _available(self, incoming):
        self._limit("available:" + incoming.record.runner_id, self.rate_limit)
        types = incoming.query.get("types[]", [])
        if not types:
            return 200, {"jobs": []}
        with self._lock:
            listed = [job for job in self._ordered_jobs()
                      if job["status"] == "pending" and job["job_type"] in types][:self.max_listed]
            return 200, {"jobs": [{"job_id": job["job_id"], "job_type": job["job_type"],
                                   "input_params": copy.deepcopy(job["input_params"]),
                                   "created_at": job["created_at"]} for job in listed]}

    def _claim(self, incoming):
        job_id, runner_id = incoming.params["job_id"], incoming.record.runner_id
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["status"] != "pending":
                return 409, CLAIM_CONFLICT
            if runner_id not in self._runners:
                raise _crash("Failed to claim job",
                             "FOREIGN KEY constraint failed: runner %s is not registered" % runner_id)
            job.update(status="claimed", claimed_by=runner_id, updated_at=now_ms())
            return 200, {"success": True, "message": "Job claimed successfully",
                         "job": {"job_id": job_id, "job_type": job["job_type"],
                                 "input_params": copy.deepcopy(job["input_params"])}}

    def _heartbeat(self, incoming):
        record = incoming.record
        self._limit("heartbeat:" + record.runner_id, self.rate_limit)
        failure = "Failed to update heartbeat"
        body = self._body(incoming, failure)
        console = self._required(body, "console_output", failure, str)
        if js_length(console) > CONSOLE_OUTPUT_LIMIT:
            raise _Answer(400, CONSOLE_TOO_BIG)
        with self._lock:
            job = self._owned_job(record.job_id, record.runner_id)
            stamp = now_ms()
            job.update(status="in_progress", progress_current=body.get("progress_current"),
                       progress_total=body.get("progress_total"), console_output=console,
                       last_heartbeat=stamp, updated_at=stamp)
            heartbeat = copy.deepcopy(body)
            heartbeat["at"] = time.monotonic()
            job["heartbeats"].append(heartbeat)
        return 200, {"success": True, "message": "Heartbeat received"}

    def _complete(self, incoming):
        failure = "Failed to complete job"
        body = self._body(incoming, failure)
        output_data = self._required(body, "output_data", failure)
        console = self._required(body, "console_output", failure, str)
        if js_length(js_stringify(output_data)) > OUTPUT_JSON_LIMIT:
            raise _Answer(400, OUTPUT_TOO_BIG)
        if js_length(console) > CONSOLE_OUTPUT_LIMIT:
            raise _Answer(400, CONSOLE_TOO_BIG)
        return self._finish(incoming, "complete", body, status="completed",
                            output_data=copy.deepcopy(output_data), console_output=console)

    def _error(self, incoming):
        failure = "Failed to report job error"
        body = self._body(incoming, failure)
        error_message = self._required(body, "error_message", failure, str)
        console = self._required(body, "console_output", failure, str)
        if js_length(error_message) > ERROR_MESSAGE_LIMIT:
            raise _Answer(400, ERROR_TOO_BIG)
        if js_length(console) > CONSOLE_OUTPUT_LIMIT:
            raise _Answer(400, CONSOLE_TOO_BIG)
        return self._finish(incoming, "error", body, status="failed", error_message=error_message,
                            console_output=console)

    def _finish(self, incoming, report, body, **fields):
        record = incoming.record
        with self._lock:
            job = self._owned_job(record.job_id, record.runner_id)
            job.update(updated_at=now_ms(), **fields)
            job["reports"].append((report, copy.deepcopy(body)))
        message = "Job completed successfully" if report == "complete" else "Job marked as failed"
        return 200, {"success": True, "message": message}

    # routes: submit side

    def _job_request(self, incoming, failure):
        """(job_type, input_params) of a submit body; 400 when missing or too big."""
        body = self._body(incoming, failure)
        job_type, input_params = body.get("job_type"), body.get("input_params")
        if not isinstance(job_type, str) or not job_type or not isinstance(input_params, dict):
            raise _Answer(400, {"error": "Missing required fields: job_type, input_params"})
        if js_length(js_stringify(input_params)) > INPUT_PARAMS_LIMIT:
            raise _Answer(400, INPUT_TOO_BIG)
        return job_type, input_params

    @staticmethod
    def _known_job_answer(job):
        status = job["status"]
        answer = {"job_id": job["job_id"], "status": status,
                  "message": "Job is %s" % status.replace("_", " ")}
        if status == "completed":
            answer["message"] = "Job already completed"
            answer["result"] = {"output_data": job["output_data"],
                                "console_output": job["console_output"]}
        elif status == "failed":
            answer["message"] = "Job already failed"
            answer["error"] = job["error_message"]
        return answer

    def _submit(self, incoming):
        self._limit("submit:" + incoming.record.client, self.submit_rate_limit)
        job_type, input_params = self._job_request(incoming, "Failed to submit job")
        created, job = self._find_or_create(job_type, input_params, revalidate=True)
        if created:
            self._publish_new_job(job)
            return 201, {"job_id": job["job_id"], "status": "pending",
                         "message": "Job submitted successfully"}
        return 200, self._known_job_answer(job)


# ---- A server that records and says yes ----------------------------------------


class RecordingServer(_HTTPService):
    """Answers every request 200 {"ok": true} and records it (e.g. to prove a redirect target never
    sees the API key, or to stand in for a figpack host during re-validation)."""

    def _serve(self, handler, incoming):
        self._send(handler, incoming.record, _Reply(200, {"ok": True}))


# ---- Try it by hand: python3 tests/fake_worker.py ---------------------------------

DEFAULT_PORT = 8787
TRY_JOB = {"job_type": "hello_world", "input_params": {"name": "Alice", "processing_time": 3}}


def instructions(url):
    """What the served fake prints: its URL, what each key is for, a submit and a runner command."""
    runner_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runpack_runner.py")
    curl = " ".join(["curl", "-sS", "-X", "POST", url + "/api/jobs/submit",
                     "-H", shlex.quote("Authorization: Bearer " + SUBMIT_KEY),
                     "-H", shlex.quote("Content-Type: application/json"),
                     "-d", shlex.quote(json.dumps(TRY_JOB))])
    state_dir = os.path.join(tempfile.gettempdir(), "runpack-try")
    runner = "RUNPACK_RUNNER_API_KEY=%s python3 %s runner --worker-url %s --state-dir %s --poll-interval 2" % (
        RUNNER_KEY, shlex.quote(runner_py), url, shlex.quote(state_dir))
    return "\n".join([
        "Fake Runpack worker on %s (jobs live in memory; Ctrl-C stops it)" % url,
        "",
        "Keys (fixed test keys; a real worker's keys are secrets of its deployment):",
        "  runner key  %s  what a runner sends: register, poll, claim, heartbeat, report" % RUNNER_KEY,
        "  submit key  %s  what a client sends to submit jobs (not a runner key)" % SUBMIT_KEY,
        "  admin key   none: the real worker's /api/admin/* routes are not in this fake",
        "",
        "Submit a hello_world job (run it again once the job is done to see its result):",
        "  " + curl,
        "",
        "Start a runner against it, in another terminal:",
        "  " + runner,
        "",
        "Jobs and runners, as they change:",
    ])


def _changes(worker, seen):
    """One line per new runner and per job status change since the last call (``seen`` remembers)."""
    lines = []
    for runner_id, row in sorted(worker.runners.items(), key=lambda item: item[1]["registered_at"]):
        if runner_id not in seen:
            seen[runner_id] = True
            lines.append("runner %s registered (%s)" % (runner_id, row["name"]))
    for job in worker.jobs():
        if seen.get(job["job_id"]) == job["status"]:
            continue
        seen[job["job_id"]] = job["status"]
        line = "job %s %s %s: %s" % (job["job_id"], job["job_type"], json.dumps(job["input_params"]),
                                     job["status"].replace("_", " "))
        if job["status"] == "completed":
            line += " " + json.dumps(job["output_data"])
        elif job["status"] == "failed":
            line += ": " + job["error_message"]
        lines.append(line)
    return lines


def main(argv=None):
    """Serve a fake worker on 127.0.0.1 until Ctrl-C (or SIGTERM), then exit 0."""
    parser = argparse.ArgumentParser(
        prog="python3 tests/fake_worker.py",
        description="Serve a fake Runpack worker on 127.0.0.1, to try a runner against it.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on (default %d; 0 picks a free one)" % DEFAULT_PORT)
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):     # also when started with SIGINT ignored (`cmd &`)
        signal.signal(signum, signal.default_int_handler)
    worker = FakeWorker()
    worker.port = args.port
    try:
        worker.start()
    except OSError as exc:
        print("fake_worker.py: cannot listen on 127.0.0.1:%d: %s (--port 0 picks a free port)"
              % (args.port, exc.strerror or exc), file=sys.stderr)
        return 2
    try:
        print(instructions(worker.url), flush=True)
        seen = {}
        while True:
            for line in _changes(worker, seen):
                print("[%s] %s" % (time.strftime("%H:%M:%S"), line), flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
