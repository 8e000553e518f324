#!/usr/bin/env python3
"""Runpack runner: turns any computer into a worker for the Runpack job service.

The runner registers with a Runpack worker, polls for jobs of the types it can run,
claims one, runs its handler while sending heartbeats, and reports the result or the
error. It is one file with no dependencies other than the Python Standard Library
(3.8 or newer), so it can be copied onto a bare machine and started at once:

    python3 runpack_runner.py run hello_world name=Alice processing_time=3
    RUNPACK_RUNNER_API_KEY=... python3 runpack_runner.py runner

Other projects add job types without editing this file: see ``job_type`` and
``--handlers`` below, and the README.
"""

__version__ = "0.1.0"
__license__ = "Apache-2.0"

import argparse
import codecs
import collections
import contextlib
import errno
import gc
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import warnings
import zlib

try:
    import fcntl
except ImportError:  # Windows, where msvcrt locks files
    fcntl = None

# urllib.request (14 ms), logging.handlers (7 ms) and subprocess (2 ms) are imported where
# they are first needed, so that `run` and `import runpack_runner` stay fast.


# ---- Settings ----------------------------------------------------------------

DEFAULT_WORKER_URL = "https://runpack-worker.neurosift.app"
API_KEY_ENV = "RUNPACK_RUNNER_API_KEY"
RELAY_KEY_ENV = "NOTIFY_RELAY_SUBSCRIBE_KEY"  # read from the environment only, like the runner key
SECRET_VARIABLES = (API_KEY_ENV, RELAY_KEY_ENV)
MISSING_KEY_MESSAGE = """Error: RUNPACK_RUNNER_API_KEY environment variable is not set
Set it to the runner key of your Runpack worker, then start the runner again:
    export RUNPACK_RUNNER_API_KEY=<your runner key>
    python3 runpack_runner.py runner"""

EXIT_OK = 0
EXIT_FAILURE = 1  # `run`: the job failed; `runner`: an unexpected error
EXIT_USAGE = 2  # bad command line, bad setting, missing key
EXIT_KEY_REJECTED = 3  # the worker answered 401 to our key
EXIT_STATE_DIR_BUSY = 4  # another runner holds the state directory
EXIT_JOBS_DONE = 5  # --once or --max-jobs: the jobs were run
EXIT_IDLE = 6  # --idle-timeout: no job came
EXIT_MAX_UPTIME = 7  # --max-uptime: the time was up
EXIT_NO_JOB_PROCESSES = 8  # job processes cannot be started here: see LauncherUnavailable
# A second shutdown signal exits with 128 + the signal number, as shells report it.


class ConfigurationError(Exception):
    """A setting or argument the user gave cannot be used; printed as one line."""


class Setting:
    """One named setting: its command-line flag, its environment variable and default."""

    __slots__ = ("name", "flag", "env", "default", "parse", "kind", "help")

    def __init__(self, name, flag, env, default, parse, kind, help):
        self.name, self.flag, self.env, self.default = name, flag, env, default
        self.parse, self.kind, self.help = parse, kind, help


MAX_SECONDS = 366 * 24 * 3600.0  # a year: longer waits overflow select() and mean a typo


def _parse_seconds(text):
    value = float(text)
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError(text)
    return value


def _parse_positive_seconds(text):
    """Seconds, more than zero: a zero poll interval, timeout or retry wait would spin."""
    value = _parse_seconds(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _parse_count(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _parse_positive_count(text):
    value = _parse_count(text)
    if value < 1:
        raise ValueError(text)
    return value


def _parse_names(text):
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _parse_listen(text):
    """--listen: (host, port); PORT alone or :PORT listen on loopback only. "" is off."""
    if not text.strip():
        return ""
    host, _, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [::1]:9400
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address needs its brackets
        raise ValueError(text)
    if not port.isdigit() or int(port) > 65535 or any(character in host for character in "/ []"):
        raise ValueError(text)
    host.encode("idna")  # a name that sockets cannot encode ("é..x") raises UnicodeError, a ValueError
    return host or "127.0.0.1", int(port)


ANY_NETWORK = "any"  # --allow-job-network any: jobs may reach every address


def _parse_networks(text):
    """--allow-job-network: networks jobs may reach besides public addresses, or ANY_NETWORK."""
    words = [word.strip() for word in text.split(",") if word.strip()]
    if [word.lower() for word in words] == [ANY_NETWORK]:
        return ANY_NETWORK
    return tuple(ipaddress.ip_network(word, strict=False) for word in words)


SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_JOB_MEMORY_LIMIT = 64 << 20  # a job process with figpack imported holds about that before it starts
MEMORY_HEADROOM = 64 << 20  # above the limit: room to report a job that ran out of memory (see JobLimits)
MAX_JOB_MEMORY_LIMIT = (1 << 63) - 1 - MEMORY_HEADROOM  # setrlimit takes a signed 64-bit number


def _parse_size(text):
    """A size such as 512M or 4G (powers of 1024, as Slurm's --mem reads them), in bytes; 0: none.
    Read in whole numbers, which never overflow, so that a size too large to set is refused here,
    not by setrlimit in every job process."""
    if text.strip() == "0":
        return 0
    match = re.match(r"\s*(\d+)(?:\.(\d+))?\s*([kmgt])i?b?\s*$", text, re.IGNORECASE)
    if not match:
        raise ValueError(text)
    whole, fraction, unit = match.group(1), match.group(2) or "", SIZE_UNITS[match.group(3).lower()]
    value = int(whole) * unit + int(fraction or "0") * unit // 10 ** len(fraction)
    if not MIN_JOB_MEMORY_LIMIT <= value <= MAX_JOB_MEMORY_LIMIT:
        raise ValueError(text)
    return value


def _parse_boolean(text):
    if isinstance(text, bool):
        return text
    answer = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False, "": False}
    return answer[text.strip().lower()]


SETTINGS = (
    Setting("worker_url", "--worker-url", "RUNPACK_WORKER_URL", DEFAULT_WORKER_URL, str,
            "a URL", "base URL of the Runpack worker"),
    Setting("state_dir", "--state-dir", "RUNPACK_STATE_DIR", ".", str, "a directory",
            "where the identity, lock, job records and log live"),
    Setting("state_pool", "--state-pool", "RUNPACK_STATE_POOL", "", str, "a directory",
            "take a free state directory POOL/1, POOL/2... (one with job records first), for runners "
            "that come and go: Slurm"),
    Setting("poll_interval", "--poll-interval", "RUNPACK_POLL_INTERVAL", 10.0, _parse_positive_seconds,
            "a number of seconds above 0", "wait after the first empty poll, and again after every job"),
    Setting("poll_interval_step", "--poll-interval-step", "RUNPACK_POLL_INTERVAL_STEP", 2.0,
            _parse_seconds, "a number of seconds", "added to the wait after each empty poll"),
    Setting("poll_interval_max", "--poll-interval-max", "RUNPACK_POLL_INTERVAL_MAX", 60.0,
            _parse_seconds, "a number of seconds",
            "longest wait between empty polls (a longer --poll-interval is the first wait only)"),
    Setting("heartbeat_interval", "--heartbeat-interval", "RUNPACK_HEARTBEAT_INTERVAL", 30.0,
            _parse_positive_seconds, "a number of seconds above 0", "time between heartbeats while a job runs"),
    Setting("request_timeout", "--request-timeout", "RUNPACK_REQUEST_TIMEOUT", 30.0,
            _parse_positive_seconds, "a number of seconds above 0", "connect and read timeout of every request"),
    Setting("retry_max", "--retry-max", "RUNPACK_RETRY_MAX", 60.0, _parse_positive_seconds,
            "a number of seconds above 0", "longest wait between retries of a failed request"),
    Setting("job_timeout", "--job-timeout", "RUNPACK_JOB_TIMEOUT", 6 * 3600.0, _parse_seconds,
            "a number of seconds", "a job running longer fails (0: no limit)"),
    Setting("concurrency", "--concurrency", "RUNPACK_CONCURRENCY", 1, _parse_positive_count,
            "a whole number from 1", "jobs run at once, each in its own process"),
    Setting("in_process", "--in-process", "RUNPACK_IN_PROCESS", False, _parse_boolean, "true or false",
            "run jobs in a thread of the runner, not a process each (for debugging)"),
    Setting("allow_job_network", "--allow-job-network", "RUNPACK_ALLOW_JOB_NETWORKS", (), _parse_networks,
            "a list of networks such as 10.1.0.0/16 (or any)",
            "networks jobs may reach besides public addresses, comma-separated CIDRs; any: no guard"),
    Setting("job_memory_limit", "--job-memory-limit", "RUNPACK_JOB_MEMORY_LIMIT", None, _parse_size,
            "a size from 64M such as 512M or 4G (0: no limit)",
            "memory a job may use, such as 512M or 4G (0: no limit; default: a share of this "
            "machine's memory per slot)"),
    Setting("no_warm_imports", "--no-warm-imports", "RUNPACK_NO_WARM_IMPORTS", False, _parse_boolean,
            "true or false", "keep no job type's packages imported between jobs (figpack's: ~70 MB)"),
    Setting("once", "--once", "RUNPACK_ONCE", False, _parse_boolean, "true or false",
            "run one job, then exit"),
    Setting("max_jobs", "--max-jobs", "RUNPACK_MAX_JOBS", 0, _parse_count, "a whole number",
            "exit after this many jobs (0: no limit)"),
    Setting("idle_timeout", "--idle-timeout", "RUNPACK_IDLE_TIMEOUT", 0.0, _parse_seconds,
            "a number of seconds", "exit after this long without a job (0: never)"),
    Setting("max_uptime", "--max-uptime", "RUNPACK_MAX_UPTIME", 0.0, _parse_seconds,
            "a number of seconds", "take no new job after this long, finish and exit (0: never)"),
    Setting("handlers", "--handlers", "RUNPACK_HANDLERS", "", str, "a list of modules",
            "comma-separated modules (module[:attr] or file.py) that register job types"),
    Setting("job_types", "--job-types", "RUNPACK_JOB_TYPES", (), _parse_names, "a list of job types",
            "serve only these job types, comma-separated (default: every type this runner can run)"),
    Setting("log_file", "--log-file", "RUNPACK_LOG_FILE", "runpack_runner.log", str, "a path",
            "log file, rotated by size; relative to the state directory"),
    Setting("verbose", "--verbose", "RUNPACK_VERBOSE", False, _parse_boolean, "true or false",
            "log at DEBUG: every poll, not only state changes"),
    Setting("allow_insecure_http", "--allow-insecure-http", "RUNPACK_ALLOW_INSECURE_HTTP", False,
            _parse_boolean, "true or false", "allow a plain http:// worker (or relay) URL that is not loopback"),
    Setting("listen", "--listen", "RUNPACK_LISTEN", "", _parse_listen, "[HOST:]PORT",
            "serve /metrics (Prometheus) and /healthz on this address (HOST: 127.0.0.1 unless given)"),
    Setting("max_runners", "--max-runners", "RUNPACK_SLURM_MAX_RUNNERS", None, _parse_positive_count,
            "a whole number from 1", "slurm (required): the most runners to keep in Slurm, pending and running"),
    Setting("stop_margin", "--stop-margin", "RUNPACK_SLURM_STOP_MARGIN", 300.0, _parse_positive_seconds,
            "a number of seconds above 0", "slurm: runners take no new job this long before their time limit"),
    Setting("sbatch_header", "--sbatch-header", "RUNPACK_SBATCH_HEADER", "", str, "a file",
            "slurm: a file whose #SBATCH lines are options for every runner's batch job"),
    Setting("notify_relay_url", "--notify-relay-url", "NOTIFY_RELAY_BASE_URL", "", str, "a URL",
            "NotifyRelay base URL: new jobs wake the runner at once (needs %s)" % RELAY_KEY_ENV),
    Setting("notify_relay_subscribe_id", "--notify-relay-subscribe-id", "NOTIFY_RELAY_SUBSCRIBE_ID", "", str,
            "an id", "NotifyRelay subscriber id (default: derived from the runner id)"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
SLURM_ONLY_SETTINGS = ("max_runners", "stop_margin", "sbatch_header")
RUNNER_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.name not in SLURM_ONLY_SETTINGS)
# Each runner's own: the scaler does not pass them on, nor their variables through sbatch.
SLURM_RUNNER_OWN_SETTINGS = ("state_dir", "state_pool", "once", "listen", "notify_relay_subscribe_id")
# What the scaler passes on to its runners when given on its command line (the environment
# passes through sbatch, less the variables of the settings above).
SLURM_RUNNER_SETTINGS = tuple(name for name in RUNNER_SETTINGS if name not in SLURM_RUNNER_OWN_SETTINGS)
SLURM_SETTINGS = SLURM_ONLY_SETTINGS + tuple(name for name in RUNNER_SETTINGS if name not in (
    "state_pool", "once", "listen", "notify_relay_subscribe_id"))
SBATCH_OPTIONS_ENV = "RUNPACK_SBATCH_OPTIONS"
RUN_SETTINGS = ("heartbeat_interval", "job_timeout", "in_process", "handlers", "allow_job_network",
                "job_memory_limit")
CHECK_SETTINGS = ("worker_url", "state_dir", "request_timeout", "handlers", "job_types", "allow_insecure_http",
                  "notify_relay_url", "concurrency", "allow_job_network", "job_memory_limit")
RUN_HEARTBEAT_INTERVAL_S = 1.0  # `run` refreshes the terminal, not a worker: it can be quick


def add_setting_flags(parser, names, defaults=None):
    """Add the flags of the named settings; their help shows the variable and the default."""
    for name in names:
        setting = SETTINGS_BY_NAME[name]
        default = (defaults or {}).get(name, setting.default)
        if setting.parse is _parse_boolean:
            parser.add_argument(setting.flag, dest=name, action="store_true", default=None,
                                help="%s (env %s=true)" % (setting.help, setting.env))
            continue
        shown = " s" if setting.parse in (_parse_seconds, _parse_positive_seconds) else ""
        help_text = "%s (env %s%s)" % (setting.help, setting.env,
                                       ", default %g%s" % (default, shown) if isinstance(default, (int, float))
                                       else ", default %s" % default if default else "")
        parser.add_argument(setting.flag, dest=name, default=None, metavar=_metavar(setting), help=help_text)


def _metavar(setting):
    """SECONDS, N, URL, DIRECTORY...: what the flag takes."""
    if setting.parse in (_parse_seconds, _parse_positive_seconds):
        return "SECONDS"
    if setting.parse in (_parse_count, _parse_positive_count):
        return "N"
    if setting.parse is _parse_networks:
        return "CIDR[,CIDR...]"
    if setting.parse is _parse_size:
        return "SIZE"
    if setting.parse is _parse_names:
        return "TYPE[,TYPE...]"
    if setting.parse is _parse_listen:
        return "[HOST:]PORT"
    return setting.kind.split()[-1].upper()


def resolve_settings(args, names, environ, defaults=None):
    """Settle each named setting: flag, then environment variable, then default."""
    values = {}
    for name in names:
        setting = SETTINGS_BY_NAME[name]
        raw, source = getattr(args, name, None), setting.flag
        if raw is None and environ.get(setting.env) is not None:
            raw, source = environ[setting.env], setting.env
        if raw is None:
            values[name] = (defaults or {}).get(name, setting.default)
            continue
        try:
            values[name] = setting.parse(raw)
        except (ValueError, KeyError):
            raise ConfigurationError("%s must be %s, got %r" % (source, setting.kind, raw))
    return types.SimpleNamespace(**values)


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_worker_url(url, allow_insecure_http, service="worker", key="runner key"):
    """Return the URL of a service we send a key to, without a trailing slash, or say why
    it cannot be used."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        parts = None
    if (not parts or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or "@" in parts.netloc):
        raise ConfigurationError("the %s URL must look like https://host[:port][/path], with no "
                                 "query, fragment or user:password, got %r" % (service, url))
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            "refusing to send the %s over plain http to %s; use https, or pass "
            "--allow-insecure-http if this network is trusted" % (key, parts.hostname))
    return url.rstrip("/")


def check_api_key(api_key, variable=API_KEY_ENV):
    if not all(" " < character < "\x7f" for character in api_key):
        raise ConfigurationError("%s holds characters that cannot go in an HTTP header (a line "
                                 "break or a space?)" % variable)


# ---- Text limits and redaction -------------------------------------------------

CONSOLE_LIMIT = 1048576  # the worker's limits, in JavaScript string length
OUTPUT_JSON_LIMIT = 512000
ERROR_MESSAGE_LIMIT = 10240
REDACTED = "[redacted]"


def js_length(text):
    """Length as JavaScript counts it: characters outside the BMP count twice."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _utf16_slice(text, units, from_end):
    """The longest start (or end) of ``text`` that is at most ``units`` UTF-16 code units,
    never splitting a surrogate pair."""
    if text.isascii():
        return text[len(text) - units:] if from_end else text[:units]
    encoded = text.encode("utf-16-le", "surrogatepass")
    if from_end:
        part = encoded[len(encoded) - 2 * units:]
        if part and 0xDC <= part[1] <= 0xDF:  # begins with the second half of a pair
            part = part[2:]
    else:
        part = encoded[:2 * units]
        if part and 0xD8 <= part[-1] <= 0xDB:  # ends with the first half of a pair
            part = part[:-2]
    return part.decode("utf-16-le", "surrogatepass")


def keep_console_tail(console, limit=CONSOLE_LIMIT):
    """The end of the console that fits the worker's limit, after a line saying what was cut."""
    if js_length(console) <= limit:
        return console
    marker = "[runpack: %d earlier characters of console output were dropped]\n"
    tail = _utf16_slice(console, limit - len(marker % len(console)), from_end=True)
    return marker % (len(console) - len(tail)) + tail


def trim_error_message(message, limit=ERROR_MESSAGE_LIMIT):
    """The start of an error message that fits the worker's limit (the start says the most)."""
    if js_length(message) <= limit:
        return message
    suffix = " [truncated]"
    return _utf16_slice(message, limit - len(suffix), from_end=False) + suffix


SECRET_LENGTH_REDACTED_ANYWHERE = 16  # a key this long is never part of ordinary text by chance


def redact(text, secret):
    """``text`` with ``secret`` replaced where it stands as a token of its own (not inside a
    longer run of letters, digits, ``-``, ``_`` or ``.``), and anywhere if it is long: a short
    key must not damage ordinary words that happen to contain it."""
    if not secret or secret not in text:
        return text
    if len(secret) >= SECRET_LENGTH_REDACTED_ANYWHERE:
        return text.replace(secret, REDACTED)
    return re.sub(r"(?<![\w.-])%s(?![\w.-])" % re.escape(secret), REDACTED, text)


def _redact_everywhere(value, secret):
    """A copy of a JSON value with ``secret`` replaced in every string, keys included."""
    if isinstance(value, str):
        return redact(value, secret)
    if isinstance(value, dict):
        return {redact(key, secret): _redact_everywhere(item, secret) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_everywhere(item, secret) for item in value]
    return value


def seal_console(console, secret):
    """A console as the worker gets it: without the key, then cut to the worker's limit
    (the replacement can be longer than the key)."""
    return keep_console_tail(redact(console, secret))


def seal_report(report, secret):
    """A report as it is kept in a custody record and sent: a new ``{kind, body}`` without
    the key anywhere, within the worker's limits."""
    body = dict(report["body"])
    body["console_output"] = seal_console(body["console_output"], secret)
    if "error_message" in body:
        body["error_message"] = trim_error_message(redact(body["error_message"], secret))
    if "output_data" in body:
        body["output_data"] = _redact_everywhere(body["output_data"], secret)
    return {"kind": report["kind"], "body": body}


# ---- Logging ------------------------------------------------------------------

LOG = logging.getLogger("runpack")
LOG_FORMAT = "[%(asctime)s] %(levelname)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 3


class SecretFilter(logging.Filter):
    """Replaces the keys in every log record, tracebacks included: a last line of defence."""

    def __init__(self, secrets):
        super().__init__()
        self._secrets = [secret for secret in secrets if secret]

    def filter(self, record):
        if self._secrets:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
                record.exc_info, record.exc_text = None, None
            for secret in self._secrets:
                message = redact(message, secret)
            record.msg, record.args = message, None
        return True


class ConsoleLogHandler(logging.StreamHandler):
    """The log on stdout or stderr. Once that is closed (`runpack runner | head -2`), it
    falls silent instead of printing a traceback for every line; the log file goes on."""

    def handleError(self, record):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)
            return
        self.setLevel(logging.CRITICAL + 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:  # so that the interpreter's last flush of the stream does not complain either
            os.dup2(devnull, self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        finally:
            os.close(devnull)


def configure_logging(stream, log_path=None, secrets=(), level=logging.INFO):
    """Log to a stream and, for the runner, to a size-rotated file."""
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
    handlers = [ConsoleLogHandler(stream)]
    if log_path:
        from logging.handlers import RotatingFileHandler

        try:
            handlers.append(RotatingFileHandler(
                log_path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
        except OSError as error:
            raise ConfigurationError("cannot write the log file %s: %s" % (log_path, error.strerror))
    for old in list(LOG.handlers):
        LOG.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(SecretFilter(secrets))
        LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False


# ---- Waiting, and the runner's shutdown signals ---------------------------------

class Waker:
    """Lets a signal handler or another thread cut a thread's wait short.

    A socket pair rather than threading.Event: writing a byte is safe inside a signal
    handler, while Event.set() can deadlock if the signal lands inside Event's own lock.
    """

    def __init__(self):
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self):
        try:
            self._writer.send(b"\0")
        except OSError:  # the buffer is full: a wake-up is already pending
            pass

    def close(self):
        self._reader.close()
        self._writer.close()

    def wake_on_signals(self):
        """Have the C signal handler wake this waker: a signal the kernel hands to another
        thread then still cuts the main thread's wait short, so its Python handler runs now."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def fileno(self):
        """For select(), with other things to wait for; drain() after it says so."""
        return self._reader.fileno()

    def wait(self, timeout=None):
        """Sleep until woken, or at most ``timeout`` seconds."""
        select.select([self._reader], [], [], None if timeout is None else max(0.0, timeout))
        self.drain()

    def drain(self):
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass


def wait_until(waker, seconds, done):
    """Wait ``seconds`` on ``waker``, less once ``done()`` is true: a wake-up that leaves
    ``done()`` false (another job ended, say) goes back to waiting."""
    deadline = time.monotonic() + seconds
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        waker.wait(remaining)


class ShutdownRequests:
    """Counts SIGINT/SIGTERM/SIGHUP: the first stops taking new jobs, the second stops the running ones.

    Being a signal handler, it only counts and wakes the threads that wait (each through
    its own Waker); the main thread does the logging.
    """

    def __init__(self, waker):
        self.count, self.signum, self._announced = 0, None, 0
        self.waker = waker  # the main thread's
        self.wakers = {waker}

    def __call__(self, signum, frame=None):
        self.count += 1
        self.signum = signum
        for waker in tuple(self.wakers):
            waker.wake()

    graceful = property(lambda self: self.count >= 1)
    immediate = property(lambda self: self.count >= 2)

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self.waker.wake_on_signals()
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP: the terminal or ssh session closed
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), self)

    def announce(self, jobs_running):
        if self.count <= self._announced:
            return
        self._announced = self.count
        name = signal.Signals(self.signum).name if self.signum else "a stop request"
        if self.count >= 2:
            LOG.warning("Received %s again: stopping the running job now", name)
        elif jobs_running:
            LOG.info("Received %s: finishing the running job, then stopping (send it again to stop "
                     "the job now)", name)
        else:
            LOG.info("Received %s: stopping", name)


# ---- Talking to the worker: errors, answers, the client, one retry policy ------

class TransientError(Exception):
    """Worth trying again later: Retrying waits and repeats what raised it."""

    retry_after = None  # seconds to wait, when the other side said so


class WorkerError(Exception):
    """A request to the worker did not succeed."""


class TransientWorkerError(WorkerError, TransientError):
    """Network trouble, a timeout, 5xx, 429, an unreadable answer."""

    def __init__(self, message, status=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # (429) until the worker's rate-limit window ends


class RunnerMaybeForgotten(TransientWorkerError):
    """A 500 to a claim: the worker answers so when it does not know the runner id
    (and when it crashes); the runner checks its identity before it polls again."""


class WorkerRejected(WorkerError):
    """A definitive no (4xx): repeating the same request will not help."""

    def __init__(self, message, status, body=None):
        super().__init__(message)
        self.status, self.body = status, body


class WorkerKeyRejected(WorkerRejected):
    """401: the worker does not accept our key."""


class UnauthorizedNotByTheWorker(WorkerKeyRejected):
    """A 401 that is not the worker's JSON (a proxy's login page, say): the runner stops as
    for a rejected key, but what to fix is the URL, not the key."""


NOT_CLAIMED_BY_US = "not claimed by this runner"
RATE_LIMIT_WINDOW_S = 60.0  # the worker's rate-limit window: no 429 asks for a longer wait
NO_SUCH_RUNNER_ID = "00000000-0000-4000-8000-000000000000"  # asks the worker about the key alone


class HttpTransport:
    """One HTTP exchange with a service that gets a key: JSON in and out, a timeout on
    everything, redirects never followed (so the key goes to the configured URL only),
    and the key taken out of every answer before anything reads it (should it be echoed)."""

    def __init__(self, secret):
        import http.client
        import urllib.error
        import urllib.request

        self._secret = secret
        self._request_class = urllib.request.Request
        self._answer_error = urllib.error.HTTPError
        self.network_errors = (OSError, ValueError, http.client.HTTPException)
        self._opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                        urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPErrorProcessor()):
            self._opener.add_handler(handler)

    def exchange(self, method, url, body, headers, timeout):
        """(status, answer bytes, Location header or None); network trouble raises one of
        ``network_errors``."""
        headers = dict(headers, Accept="application/json")
        headers["User-Agent"] = "runpack-runner/" + __version__
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = self._request_class(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                status, raw, location = response.status, response.read(), None
        except self._answer_error as answer:
            with answer:
                status, raw, location = answer.code, answer.read(), answer.headers.get("Location")
        if self._secret and self._secret.encode("utf-8") in raw:
            raw = redact(raw.decode("utf-8", "replace"), self._secret).encode("utf-8")
        if self._secret and location:
            location = redact(location, self._secret)
        return status, raw, location


def read_answer(where, status, raw, location):
    """The JSON object of a worker's answer, or the WorkerError its status means."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        body = None
    message = _answer_message(body, raw)
    if 300 <= status < 400:
        raise TransientWorkerError(
            "%s: the worker answered %d with a redirect to %s; redirects are not followed, so "
            "that the key only goes to the worker URL" % (where, status, _origin(location)), status)
    if status == 429:
        reset_ms = body.get("resetTime") if isinstance(body, dict) else None
        wait = (min(RATE_LIMIT_WINDOW_S, max(0.0, reset_ms / 1000.0 - time.time()))
                if isinstance(reset_ms, (int, float)) else None)
        raise TransientWorkerError("%s: rate limited by the worker" % where, status, wait)
    if status >= 500 or status == 408:
        raise TransientWorkerError("%s: worker error %d %s" % (where, status, message), status)
    if status == 401 and not isinstance(body, dict):  # the worker's own 401s are JSON
        raise UnauthorizedNotByTheWorker("%s: the URL answers 401 with %s, not as a Runpack worker" % (
            where, describe_answer(raw)), status)
    if status == 401:
        raise WorkerKeyRejected("%s: the worker rejected the runner key (%s)" % (where, message), status, body)
    if status >= 400:
        raise WorkerRejected("%s: %d %s" % (where, status, message), status, body)
    if not isinstance(body, dict):
        raise TransientWorkerError("%s: the worker's answer is not a JSON object: %s" % (where, describe_answer(raw)),
                                   status)
    return body


def _answer_message(body, raw):
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return "(%s)" % describe_answer(raw)


def describe_answer(raw):
    """An answer that is not the JSON expected, in words: a proxy's or a web server's page
    is "an HTML page", never a dump of its bytes."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return "an empty answer"
    if re.match(r"(?is)<!doctype html|<html|.{0,200}<(head|body|title)>", text):
        return "an HTML page"
    if text.startswith(("{", "[")):
        return "JSON of another shape: %.80s" % " ".join(text.split())
    return "text that is not JSON: %.80s" % " ".join(text.split())


def _is_json(raw):
    try:
        json.loads(raw.decode("utf-8"))
    except ValueError:
        return False
    return True


def _origin(url):
    parts = urllib.parse.urlsplit(url or "")
    return "%s://%s" % (parts.scheme, parts.netloc) if parts.netloc else repr(url)


def _reason(error):
    reason = getattr(error, "reason", None) or error
    return "%s: %s" % (type(reason).__name__, reason) if str(reason) else type(reason).__name__


def _claimed_job(answer):
    _expect(answer, "success", True, "claim")
    return _expect(answer, "job", dict, "claim")


def _expect(body, name, kind, where):
    """``body[name]``, which must be of type ``kind`` (or be ``True``, when kind is True)."""
    value = body.get(name)
    if value is not True if kind is True else not isinstance(value, kind):
        raise TransientWorkerError("%s: the worker's answer has no valid %r: %.200r" % (where, name, body))
    return value


def _listed_jobs(answer):
    jobs = _expect(answer, "jobs", list, "available")
    for job in jobs:
        if not (isinstance(job, dict) and isinstance(job.get("job_id"), str)
                and isinstance(job.get("job_type"), str) and isinstance(job.get("input_params", {}), dict)):
            raise TransientWorkerError("malformed job in the available list: %.200r" % (job,))
    return jobs


class WorkerClient:
    """The only code that knows the worker's URLs, headers, status codes and limits.

    Each verb makes exactly one request; callers decide about retrying. Every text that
    goes to the worker leaves without the key and within the worker's limits.
    """

    def __init__(self, base_url, api_key, timeout, runner_id=None):
        self.base_url, self.timeout, self.runner_id = base_url, timeout, runner_id
        self._api_key = api_key  # None: only health() can be asked
        self._transport = HttpTransport(api_key)
        # Told of every request: its endpoint, the status (None: no answer), and whether the
        # answer shows a working Runpack worker: its JSON (a 2xx the verb reads, or its own 4xx
        # error), or a 429. A proxy's error page, or a 2xx that is not the worker's, does not.
        self.on_answer = lambda endpoint, status, working: None

    def __repr__(self):
        return "WorkerClient(%r, runner_id=%r)" % (self.base_url, self.runner_id)

    # -- the verbs

    def health(self):
        self._request("GET", "/health", authorized=False)

    def register(self, name, capabilities):
        return self._request("POST", "/api/runner/register", {"name": name, "capabilities": list(capabilities)},
                             read=lambda answer: _expect(answer, "runner_id", str, "register"),
                             first_contact=True)

    def verify(self, runner_id):
        """True when the worker knows this runner id, False when it answers 404."""
        try:
            return self._request("GET", "/api/runner/verify", runner_id=runner_id,
                                 read=lambda answer: _expect(answer, "exists", True, "verify"),
                                 first_contact=True)
        except WorkerRejected as rejected:
            if rejected.status == 404 and isinstance(rejected.body, dict) and rejected.body.get("exists") is False:
                return False
            raise  # a 404 of another shape: not a Runpack worker at this URL

    def check_key(self):
        """Ask whether the worker accepts the key, without a runner id of ours: raises
        WorkerKeyRejected if not."""
        self.verify(NO_SUCH_RUNNER_ID)

    def available(self, job_types):
        query = urllib.parse.urlencode([("types[]", job_type) for job_type in job_types])
        return self._request("GET", "/api/runner/jobs/available?" + query, runner_id=self.runner_id,
                             read=_listed_jobs)

    def claim(self, job_id):
        """The claimed job, or None when it is taken, finished or gone (409)."""
        try:
            return self._request("POST", "/api/runner/jobs/%s/claim" % job_id, runner_id=self.runner_id,
                                 read=_claimed_job)
        except WorkerRejected as rejected:
            if rejected.status == 409:
                return None
            raise
        except TransientWorkerError as error:
            if error.status == 500:
                raise RunnerMaybeForgotten(str(error), error.status)
            raise

    def heartbeat(self, job_id, progress_current, progress_total, console_output, runner_id=None):
        """True while the job is still ours; False once the worker says it is not."""
        return self._job_request(job_id, "heartbeat", {
            "progress_current": progress_current, "progress_total": progress_total,
            "console_output": seal_console(console_output, self._api_key)}, runner_id)

    def seal_report(self, report):
        """The report as it is kept in a custody record and sent (see seal_report)."""
        return seal_report(report, self._api_key)

    def report(self, job_id, report, runner_id=None, timeout=None):
        """Send a sealed report (complete or error); False when the job is not ours any more."""
        action = "complete" if report["kind"] == "complete" else "error"
        return self._job_request(job_id, action, report["body"], runner_id, timeout)

    # -- one request

    def _job_request(self, job_id, action, body, runner_id, timeout=None):
        try:
            return self._request("POST", "/api/runner/jobs/%s/%s" % (job_id, action), body,
                                 runner_id=runner_id or self.runner_id, timeout=timeout,
                                 read=lambda answer: _expect(answer, "success", True, action))
        except WorkerRejected as rejected:
            if rejected.status == 400 and NOT_CLAIMED_BY_US in str(rejected):
                return False
            raise

    def _request(self, method, path, body=None, runner_id=None, timeout=None, authorized=True, read=None,
                 first_contact=False):
        """One request; ``read(answer)`` picks what the verb returns out of the answer. At the
        ``first_contact`` (register, verify), a 2xx answer that is not the worker's JSON means
        that the URL is not a Runpack worker's: a WorkerRejected, not an outage to wait out."""
        where = "%s %s" % (method, path.split("?")[0])
        headers = {}
        if authorized and self._api_key:
            headers["Authorization"] = "Bearer " + self._api_key
        if runner_id:
            headers["X-Runner-ID"] = runner_id
        endpoint = path.split("?")[0].rsplit("/", 1)[-1]  # register, available, claim, heartbeat...
        try:
            status, raw, location = self._transport.exchange(method, self.base_url + path, body, headers,
                                                             timeout or self.timeout)
        except self._transport.network_errors as error:
            self.on_answer(endpoint, None, False)
            raise TransientWorkerError("%s: cannot reach the worker (%s)" % (where, _reason(error)))
        working = False
        try:
            answer = read_answer(where, status, raw, location)
            result = read(answer) if read else answer
            working = True
            return result
        except WorkerRejected as rejected:
            working = isinstance(rejected.body, dict)  # the worker's own JSON error
            raise
        except TransientWorkerError as error:
            working = status == 429
            if first_contact and 200 <= status < 300:
                raise WorkerRejected("%s; the URL answers, but not as a Runpack worker" % error, status)
            if first_contact and status >= 500 and not _is_json(raw):
                raise TransientWorkerError("%s answers %d with %s, not as a Runpack worker; retrying in case "
                                           "this is an outage — check --worker-url" % (
                                               self.base_url, status, describe_answer(raw)), status)
            raise
        finally:
            self.on_answer(endpoint, status, working)


class RetryBackoff:
    """Exponential backoff with full jitter, capped: the n-th wait is uniform in
    [0, min(cap, first * 2^(n-1))]."""

    def __init__(self, cap, first=1.0):
        self.cap, self.first, self.failures = cap, first, 0

    def next_delay(self, error=None):
        self.failures += 1
        if error is not None and error.retry_after is not None:
            return error.retry_after + random.uniform(0, 1)
        return random.uniform(0, min(self.cap, self.first * 2 ** min(self.failures - 1, 30)))


class GaveUp(Exception):
    """Retrying stopped before an answer came; ``error`` is the last failure."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class Retrying:
    """The one retry policy for whatever is worth trying again (TransientError): back off
    exponentially with full jitter up to --retry-max (a 429 waits for the worker's reset
    time). A spell of failures is one warning, and one more for each new kind of failure in
    it (the other tries are logged at DEBUG), then one line once the worker answers again.

    ``wait(seconds)`` sleeps between tries; ``give_up(delay)`` is asked before a wait of
    ``delay`` seconds and after it (with 0): true ends the retrying with GaveUp.
    """

    def __init__(self, retry_max, wait, give_up):
        self.retry_max, self._wait, self._give_up = retry_max, wait, give_up

    def call(self, attempt, failed, recovered="The worker answers again"):
        """``attempt()``'s result, once it succeeds; ``failed`` starts each warning, ``recovered``
        the line once it works again."""
        backoff, said, started = RetryBackoff(self.retry_max), set(), time.monotonic()
        while True:
            try:
                result = attempt()
            except TransientError as error:
                delay = backoff.next_delay(error)
                if self._give_up(delay):
                    raise GaveUp(error)
                kind = _failure_kind(error)
                level = logging.DEBUG if kind in said else logging.WARNING
                said.add(kind)
                LOG.log(level, "%s: %s; trying again in %s%s", failed, error, describe_seconds(delay),
                        "" if backoff.failures > 1 else ", then with back-off up to %s (one line per kind "
                        "of failure)" % describe_seconds(self.retry_max))
                self._wait(delay)
                if self._give_up(0.0):
                    raise GaveUp(error)
                continue
            if backoff.failures:
                LOG.info("%s, after %d failed tr%s in %s", recovered, backoff.failures,
                         "ies" if backoff.failures > 1 else "y", describe_seconds(time.monotonic() - started))
            return result


def _failure_kind(error):
    """What makes two failures the same kind, for the log: their message without numbers."""
    return re.sub(r"[\d.]+", "#", str(error))


def describe_seconds(seconds):
    """A duration as every message gives one: 0.3 s, 3.2 s, 90 s, 13200 s."""
    text = "%.1f" % seconds if seconds >= 1 else "%.3f" % seconds
    return "%s s" % (text.rstrip("0").rstrip(".") or "0")


# ---- Push wake-up: the NotifyRelay subscriber --------------------------------------

RELAY_TOPIC = "runpack_notifications"
RELAY_POLL_TIMEOUT_MS = 55000  # the relay's longest hold of a poll
RELAY_READ_MARGIN_S = 10.0  # the HTTP read waits this much longer than the relay holds a poll
RELAY_RETRY_MAX_S = 30.0
RELAY_CHECK_TIMEOUT_MS = 1000  # `check`, and the first poll after trouble, ask for a short hold


class RelayKeyRejected(Exception):
    """401 from the relay: the subscribe key is wrong."""


class RelayUnavailable(TransientError):
    """The relay could not be reached or gave no usable answer."""


class RelayClient:
    """The only code that knows the NotifyRelay's URL, headers and answers."""

    def __init__(self, base_url, subscribe_key, subscriber_id, subscriber_name):
        self.base_url, self.subscriber_id, self.subscriber_name = base_url, subscriber_id, subscriber_name
        self._subscribe_key = subscribe_key
        self._transport = HttpTransport(subscribe_key)

    def poll(self, timeout_ms=RELAY_POLL_TIMEOUT_MS):
        """The message strings published on our topic, once there are some or the relay's
        hold of ``timeout_ms`` is over (then none)."""
        body = {"subscriber_id": self.subscriber_id, "subscriber_name": self.subscriber_name,
                "topics": [RELAY_TOPIC], "timeout": timeout_ms}
        try:
            status, raw, _ = self._transport.exchange(
                "POST", self.base_url + "/poll", body, {"Authorization": self._subscribe_key},
                timeout_ms / 1000.0 + RELAY_READ_MARGIN_S)
        except self._transport.network_errors as error:
            raise RelayUnavailable("cannot reach it (%s)" % _reason(error))
        if status == 401:
            raise RelayKeyRejected("it rejected the subscribe key (401)")
        try:
            answer = json.loads(raw.decode("utf-8")) if status == 200 else None
            messages = (answer.get("messages") or {}).get(RELAY_TOPIC) or []
            return [message["message"] for message in messages]
        except (ValueError, AttributeError, TypeError, KeyError):
            raise RelayUnavailable("answered %d with %s" % (status, describe_answer(raw)))


def new_job_type(message):
    """The job type of a "new_job" notification, or None for any other message."""
    try:
        notice = json.loads(message)
    except (TypeError, ValueError):
        return None
    if isinstance(notice, dict) and notice.get("type") == "new_job" and isinstance(notice.get("job_type"), str):
        return notice["job_type"]
    return None


class RelaySubscriber(threading.Thread):
    """Long-polls the relay and calls ``on_new_job(job_type)`` for every new-job notice.

    A notification only cuts the runner's wait for its next poll short: polling stays the
    truth, so a lost notification or a relay that is down costs at most a poll interval.
    A wrong key is one log line and the end of subscribing; any other trouble is a back-off
    (full jitter up to 30 s) with one warning per spell. A daemon thread: a poll held by the
    relay never holds up the runner's exit.
    """

    def __init__(self, relay, on_new_job):
        super().__init__(name="notify-relay", daemon=True)
        self.relay, self._on_new_job = relay, on_new_job
        self._ignored_one = False
        self.state = "connecting"  # then listening, retrying, or key rejected (for --listen)
        self.notices = 0  # new-job notices received

    def run(self):
        LOG.info("Listening for new jobs on NotifyRelay %s (subscriber %s)", self.relay.base_url,
                 self.relay.subscriber_id)
        backoff, answered = RetryBackoff(RELAY_RETRY_MAX_S), False
        while True:
            try:  # at first and after trouble a short poll, so that a relay that answers is known at once
                messages = self.relay.poll(RELAY_CHECK_TIMEOUT_MS if backoff.failures or not answered
                                           else RELAY_POLL_TIMEOUT_MS)
            except RelayKeyRejected as error:
                LOG.error("NotifyRelay %s: %s; no push wake-ups (polling the worker goes on). Check "
                          "NOTIFY_RELAY_SUBSCRIBE_KEY", self.relay.base_url, error)
                self.state = "key rejected"
                return
            except RelayUnavailable as error:
                self.state = "retrying"
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    LOG.warning("NotifyRelay %s: %s; polling the worker goes on, retrying the relay "
                                "with back-off", self.relay.base_url, error)
                time.sleep(delay)
                continue
            if backoff.failures:
                LOG.info("NotifyRelay answers again")
                backoff = RetryBackoff(RELAY_RETRY_MAX_S)
            self.state, answered = "listening", True
            for message in messages:
                job_type = new_job_type(message)
                if job_type is not None:
                    self.notices += 1
                    self._on_new_job(job_type)
                elif not self._ignored_one:
                    LOG.debug("NotifyRelay: ignoring a message that is not a new-job notice: %.200r", message)
                    self._ignored_one = True


# ---- The state directory: identity, lock, job records -------------------------

class StateDirectoryBusy(Exception):
    """Another runner process holds this state directory."""


def write_json_atomically(path, value):
    """Write to a temporary file, flush it to disk, then rename over ``path``."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(value, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _read_json(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


class JobRecordsUnwritable(TransientError):
    """The state directory cannot take a custody record: no claim until it can."""


class StateDirectory:
    """Where a runner keeps what must outlive its process.

    ``.runpack_runner.json`` holds the identity; ``.runpack_runner.lock`` is held while a
    runner uses the directory; ``.runpack_jobs/<job_id>.json`` is the runner's custody
    record of a job, written before the claim and removed once the worker has accepted
    the report. A record with a report is a spooled report; one without is a job whose
    run was interrupted.
    """

    IDENTITY_FILE = ".runpack_runner.json"
    LOCK_FILE = ".runpack_runner.lock"
    JOBS_DIR = ".runpack_jobs"

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.identity_path = os.path.join(self.path, self.IDENTITY_FILE)
        self.jobs_path = os.path.join(self.path, self.JOBS_DIR)
        self._lock_file = None

    def problem(self):
        """Why a runner could not use this directory, or None; changes nothing, so that
        `check` and `runner` give the same verdict (a busy directory aside: see lock)."""
        for path in (self.path, self.jobs_path):
            if os.path.exists(path) and not os.path.isdir(path):
                return "%s is not a directory" % path
            if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
                return "%s is not writable" % path
        if not os.path.isdir(self.path):
            parent = os.path.dirname(self.path)
            while not os.path.exists(parent):  # the runner makes the missing directories
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                return "%s is not a directory" % parent
            if not os.access(parent, os.W_OK | os.X_OK):
                return "%s does not exist and %s is not writable" % (self.path, parent)
        return None

    def prepare(self):
        problem = self.problem()
        try:
            if problem is None:
                os.makedirs(self.jobs_path, exist_ok=True)
        except OSError as error:
            problem = error.strerror
        if problem:
            raise ConfigurationError("cannot use the state directory %s: %s" % (self.path, problem))

    def lock(self):
        """Hold the directory's lock until the process ends (the OS frees it even on kill -9)."""
        lock_path = os.path.join(self.path, self.LOCK_FILE)
        try:
            stream = open(lock_path, "a+")
        except OSError as error:
            raise ConfigurationError("cannot use the state directory %s: %s" % (self.path, error.strerror or error))
        try:
            _lock(stream)
        except OSError as error:
            if not _held_by_another(error):
                stream.close()
                raise ConfigurationError(
                    "cannot lock the state directory %s (%s): it must be on a file system with working "
                    "locks (flock)" % (self.path, error.strerror or error))
            stream.seek(0)
            holder = stream.read().strip() or "unknown"
            stream.close()
            raise StateDirectoryBusy(
                "another runner (pid %s) is using the state directory %s; give this one its own "
                "--state-dir" % (holder, self.path))
        stream.seek(0)
        stream.truncate()
        stream.write(str(os.getpid()))
        stream.flush()
        self._lock_file = stream

    def in_use(self):
        """Whether a live runner holds the lock; asks without writing anything, with a shared
        lock (on NFS an exclusive one needs the file open for writing). A lock that cannot be
        asked counts as held: the directory is then left alone."""
        try:
            stream = open(os.path.join(self.path, self.LOCK_FILE))
        except OSError:
            return False
        try:
            _lock(stream, shared=True)
        except OSError:
            return True
        finally:
            stream.close()
        return False

    def has_job_records(self):
        return any(self.waiting_records())

    def unlock(self):
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load_identity(self):
        """The saved {runner_id, runner_name}, or None when absent or unreadable."""
        try:
            identity = _read_json(self.identity_path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            LOG.warning("Cannot read %s (%s); registering as a new runner", self.identity_path, error)
            return None
        if not (isinstance(identity, dict) and isinstance(identity.get("runner_id"), str)
                and isinstance(identity.get("runner_name"), str)):
            LOG.warning("%s does not hold a runner identity; registering as a new runner",
                        self.identity_path)
            return None
        return identity

    def save_identity(self, runner_id, runner_name):
        write_json_atomically(self.identity_path, {"runner_id": runner_id, "runner_name": runner_name})

    def save_job(self, record):
        write_json_atomically(self._job_path(record["job_id"]), record)

    def forget_job(self, job_id):
        try:
            os.remove(self._job_path(job_id))
        except FileNotFoundError:
            pass

    def job_records(self):
        """Every custody record, oldest first; unreadable ones are set aside with a warning."""
        records = []
        try:
            names = sorted(os.listdir(self.jobs_path))
        except FileNotFoundError:
            return records
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.jobs_path, name)
            try:
                record = _read_json(path)
                if not isinstance(record, dict) or not isinstance(record.get("job_id"), str):
                    raise ValueError("not a job record")
                records.append(record)
            except FileNotFoundError:  # settled by a job slot meanwhile
                continue
            except (OSError, ValueError) as error:
                LOG.warning("Job record %s is unreadable (%s); moved aside as %s.bad", path, error, name)
                os.replace(path, path + ".bad")
        return sorted(records, key=lambda record: record.get("recorded_at", 0))

    def waiting_records(self):
        """(custody records holding a report, records of jobs to run again), read without
        changing anything (job_records moves unreadable ones aside)."""
        reports = jobs = 0
        try:
            names = [name for name in os.listdir(self.jobs_path) if name.endswith(".json")]
        except OSError:
            return 0, 0
        for name in names:
            try:
                has_report = bool(_read_json(os.path.join(self.jobs_path, name)).get("report"))
            except (OSError, ValueError, AttributeError):
                continue
            reports, jobs = reports + has_report, jobs + (not has_report)
        return reports, jobs

    def _job_path(self, job_id):
        return os.path.join(self.jobs_path, "%s.json" % job_id.replace(os.sep, "_"))


class StatePool:
    """State directories ``POOL/1``, ``POOL/2``… for runners that come and go (--state-pool):
    each runner takes a free one, preferring one with job records (a runner killed mid-job left
    them: the job runs again), so that every custody record is settled by the next runner. The
    locks say which are taken: the pool must be on a file system whose locks hold across the
    machines that share it (local disks, NFSv4, Lustre mounted with flock, GPFS)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def directories(self):
        try:
            names = sorted((name for name in os.listdir(self.path)
                            if name.isdigit() and os.path.isdir(os.path.join(self.path, name))), key=int)
        except OSError:
            return []
        return [StateDirectory(os.path.join(self.path, name)) for name in names]

    def survey(self):
        """What the pool says of the runners' slots (a PoolSurvey)."""
        held, orphans = [], []
        for state in self.directories():
            records = sum(state.waiting_records())
            if state.in_use():
                held.append(records)
            elif records:
                orphans.append(records)
        return PoolSurvey(held, orphans)

    def take(self):
        """A directory of the pool, prepared and locked for this process."""
        taken = self.directories()
        for state in sorted(taken, key=lambda state: not state.has_job_records()):  # records first
            for attempt in range(2):
                try:
                    state.lock()
                    state.prepare()
                    return state
                except StateDirectoryBusy:
                    if attempt or not state.has_job_records():
                        break
                    time.sleep(POOL_PROBE_S)  # the scaler may be asking its lock: look again
        number = max([int(os.path.basename(state.path)) for state in taken] or [0])
        while True:  # all taken: a new one, racing other runners for its number
            number += 1
            state = StateDirectory(os.path.join(self.path, str(number)))
            state.prepare()
            try:
                state.lock()
                return state
            except StateDirectoryBusy:
                continue


class PoolSurvey(collections.namedtuple("PoolSurvey", "held orphans")):
    """The state pool at a glance: for each directory that a live runner holds, the jobs it
    holds (its busy slots); for each orphaned one (job records, no runner), the jobs to settle."""


POOL_PROBE_S = 0.05  # longer than the scaler holds a directory's lock to ask whether it is held


def _lock(stream, shared=False):
    if fcntl is None:
        import msvcrt

        msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(stream.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)


def _held_by_another(error):
    """Whether a lock that failed with ``error`` is held by another process (else locks do not
    work there: a file system without them, say)."""
    return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK))


def new_custody_record(listed_job, runner_id):
    """The record written before a claim; it gets the report once the job has run."""
    return {"job_id": listed_job["job_id"], "job_type": listed_job["job_type"],
            "input_params": listed_job.get("input_params", {}), "runner_id": runner_id,
            "recorded_at": time.time(), "attempts": 0, "report": None}


def new_runner_name():
    return "runner-%s-%s" % (socket.gethostname(), os.urandom(4).hex())


# ---- Job handlers: the JobHandler interface and the registry ------------------

class JobCancelled(BaseException):
    """The runner has given the job up (claim lost, time limit, shutdown): the handler
    should stop, its result would be discarded. In a job process it is raised wherever the
    handler is when the runner's stop signal (SIGUSR1) arrives; with --in-process, by
    heartbeat_callback.
    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it."""


class JobHandler:
    """A job type. Subclasses implement ``execute``.

    ``execute(input_params, heartbeat_callback) -> dict`` returns the job's output; a
    ``console_output`` key in it becomes the final console. Raise ValueError for invalid
    parameters. ``heartbeat_callback(progress_current=..., progress_total=...,
    console_output=...)`` records progress and the whole console so far. Once the job is
    given up, JobCancelled is raised (see there).

    A job type that needs optional packages or environment variables lists them, so
    that a runner without them never claims such a job (the worker keeps a failure
    forever). A package counts only once it imports in the interpreter that runs the
    jobs (see ``import_problems``): one can be installed and still fail on import.
    """

    requires_modules = ()
    requires_env = ()
    # Modules that every job of the type imports and that are slow to import (figpack: 0.5 s):
    # after the type's first job, the launcher imports them once, and later jobs start warm.
    # Each must be safe to fork after importing (no thread pool that a fork would break).
    warm_modules = ()
    install_hint = ""  # e.g. "install them with: pip install some-package"

    def execute(self, input_params, heartbeat_callback):
        raise NotImplementedError

    def unmet_requirements(self):
        """Why not, from what is seen without importing anything: packages not installed,
        environment variables not set. An empty list when nothing else stops the job type."""
        missing = [name for name in self.requires_modules if not _module_installed(name)]
        unset = [name for name in self.requires_env if not os.environ.get(name)]
        reasons = []
        if missing:
            reasons.append(self._with_install_hint("missing Python packages %s" % ", ".join(missing)))
        if unset:
            reasons.append("environment variable %s not set" % ", ".join(unset))
        return reasons

    def unavailable_reason(self):
        """None when this runner can run the job type, else why not and how to fix it. The
        packages' imports are checked only when nothing else stops the job type."""
        reasons = self.unmet_requirements()
        if not reasons and self.requires_modules:
            broken = [(name, problem) for name, problem in import_problems(self.requires_modules).items() if problem]
            if broken:
                reasons.append(self._with_install_hint("Python packages that fail to import with Python %s: %s" % (
                    sys.version.split()[0], ", ".join("%s (%s)" % pair for pair in broken))))
        return "; ".join(reasons) or None

    def _with_install_hint(self, reason):
        return "%s (%s)" % (reason, self.install_hint) if self.install_hint else reason


class FunctionJobHandler(JobHandler):
    """Adapts a plain ``def job(input_params, heartbeat_callback) -> dict`` to JobHandler."""

    def __init__(self, function):
        self.function = function

    def execute(self, input_params, heartbeat_callback):
        return self.function(input_params, heartbeat_callback)


JOB_HANDLERS = {}  # job type -> JobHandler instance: the built-in types and all registered ones


def as_job_handler(obj):
    if isinstance(obj, type):
        obj = obj()
    if callable(getattr(obj, "execute", None)):
        return obj
    if callable(obj):
        return FunctionJobHandler(obj)
    raise TypeError("%r is neither a JobHandler nor a function" % (obj,))


def register_job_type(name, handler):
    """Add a job type: a JobHandler class or instance, or a function(input_params, heartbeat_callback)."""
    JOB_HANDLERS[name] = as_job_handler(handler)
    return handler


def job_type(name):
    """Decorator form of register_job_type: ``@job_type("my_job")`` above a class or function."""
    return lambda handler: register_job_type(name, handler)


def chosen_job_types(names):
    """The job types --job-types names, all of them registered; every registered type when
    it names none."""
    unknown = [name for name in names if name not in JOB_HANDLERS]
    if unknown:
        raise ConfigurationError("--job-types names %s, which no module registers (known: %s)" % (
            ", ".join(unknown), ", ".join(sorted(JOB_HANDLERS))))
    return sorted(set(names)) if names else sorted(JOB_HANDLERS)


def job_type_availability(names=None):
    """Each of the named job types (default: all), with None when this runner can run it, else
    why not. The packages of every such type that nothing else stops are import-checked
    together, in one child process; none at all when no such job type requires any."""
    handlers = [(name, JOB_HANDLERS[name]) for name in (sorted(JOB_HANDLERS) if names is None else names)]
    import_problems(sorted({module for _, handler in handlers if isinstance(handler, JobHandler)
                            and not handler.unmet_requirements() for module in handler.requires_modules}))
    return [(name, handler.unavailable_reason()) for name, handler in handlers]


IMPORT_CHECK_TIMEOUT_S = 60.0  # importing big packages from a cold network file system is slow
IMPORT_CHECK_MARKER = "runpack-import-check: "
# Run by `python -c` with the runner's own interpreter, flags and sys.path (argv[1], JSON), so
# that it imports what a job process would; one line per module after the marker.
IMPORT_CHECK_SCRIPT = """\
import json, os, sys
sys.path[:] = json.loads(sys.argv[1])
for name in sys.argv[2:]:
    try:
        __import__(name)
        problem = None
    except BaseException as error:
        problem = ("%s: %s" % (type(error).__name__, error)).strip().splitlines()[0][:200]
    os.write(1, ("\\n" + MARKER + json.dumps([name, problem]) + "\\n").encode("utf-8"))
os._exit(0)  # a thread or atexit hook that an import left behind must not hold the answer up
""".replace("MARKER", repr(IMPORT_CHECK_MARKER))
_import_checks = {}  # module name -> None when it imports, else why not; for the life of this process
_import_checks_lock = threading.Lock()


def import_problems(names):
    """{name: None when the module imports in the interpreter that runs the jobs, else why
    not}. The names not asked about before are imported in one child process of this
    interpreter, never in the runner's own (figpack alone costs 0.5 s and 60 MB to import),
    and each answer is kept for the life of this process."""
    with _import_checks_lock:
        unchecked = [name for name in names if name not in _import_checks]
        if unchecked:
            _import_checks.update(_check_imports(unchecked))
        return {name: _import_checks[name] for name in names}


def checked_imports():
    """What import_problems has found so far: {module name: None or why it does not import}."""
    with _import_checks_lock:
        return dict(_import_checks)


def _check_imports(names):
    import subprocess

    command = ([sys.executable] + _interpreter_flags()
               + ["-c", IMPORT_CHECK_SCRIPT, json.dumps(sys.path)] + list(names))
    environment = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
    try:
        finished = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=environment, timeout=IMPORT_CHECK_TIMEOUT_S)
        output, ending = finished.stdout, "the import check %s" % describe_exit(finished.returncode)
    except subprocess.TimeoutExpired as error:
        output, ending = error.stdout or b"", "the import check did not end within %g s" % IMPORT_CHECK_TIMEOUT_S
    except OSError as error:
        output, ending = b"", "cannot start %s to check it: %s" % (sys.executable, error)
    results = {}
    for line in output.decode("utf-8", "replace").splitlines():
        if line.startswith(IMPORT_CHECK_MARKER):
            name, problem = json.loads(line[len(IMPORT_CHECK_MARKER):])
            results[name] = problem
    return {name: results.get(name, ending) for name in names}


def _module_installed(name):
    """Whether the module's top-level package can be found, without importing anything (find_spec
    of a dotted name would import its parent package)."""
    top_level = name.partition(".")[0]
    try:
        return importlib.util.find_spec(top_level) is not None
    except ValueError:  # already imported, without a __spec__
        return top_level in sys.modules


def load_handler_modules(specs):
    """Import the comma-separated modules that register job types.

    Each is ``module``, ``module:attr`` (attr is a dict of job type -> handler) or a
    path to a ``.py`` file. The working directory is importable, as with ``python -m``.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for spec in filter(None, (part.strip() for part in specs.split(","))):
        module_name, _, attribute = spec.partition(":")
        try:
            if module_name.endswith(".py"):
                name = os.path.splitext(os.path.basename(module_name))[0]
                file_spec = importlib.util.spec_from_file_location(name, module_name)
                if file_spec is None or not os.path.isfile(module_name):
                    raise ImportError("no such file")
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[name] = module
                file_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
            if attribute:
                handlers = getattr(module, attribute)
                if not isinstance(handlers, dict):
                    raise TypeError("%s is not a dict of job type -> handler" % attribute)
                for name, handler in handlers.items():
                    register_job_type(name, handler)
        except Exception as error:
            raise ConfigurationError("cannot load job handlers from %r: %s: %s"
                                     % (spec, type(error).__name__, error))


def timestamped(line):
    """A console line as the built-in jobs write them: ``[YYYY-mm-dd HH:MM:SS] line``."""
    return "[%s] %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), line)


# ---- Built-in job types --------------------------------------------------------

@job_type("hello_world")
class HelloWorldJob(JobHandler):
    """Greets ``name`` after ``processing_time`` seconds (0-300), reporting progress meanwhile."""

    MAX_PROCESSING_TIME = 300

    def execute(self, input_params, heartbeat_callback):
        name = input_params.get("name")
        if "name" not in input_params:
            raise ValueError("name is required")
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string")
        processing_time = input_params.get("processing_time")
        if "processing_time" not in input_params:
            raise ValueError("processing_time is required")
        if (isinstance(processing_time, bool) or not isinstance(processing_time, (int, float))
                or not 0 <= processing_time <= self.MAX_PROCESSING_TIME):
            raise ValueError("processing_time must be a number between 0 and %d"
                             % self.MAX_PROCESSING_TIME)
        console = [timestamped("Starting hello_world job for %s" % name),
                   timestamped("Processing time: %s second%s" % (processing_time, "s" * (processing_time != 1)))]
        heartbeat_callback(progress_current=0, progress_total=100, console_output="\n".join(console))
        step = getattr(heartbeat_callback, "heartbeat_interval", 30.0) or 30.0
        started = time.monotonic()
        while True:
            remaining = processing_time - (time.monotonic() - started)
            if remaining <= 0:
                break
            time.sleep(min(step, remaining))
            elapsed = time.monotonic() - started
            if elapsed < processing_time:
                percent = int(elapsed * 100 / processing_time)
                console.append(timestamped("Progress: %d%%" % percent))
                heartbeat_callback(progress_current=percent, progress_total=100,
                                   console_output="\n".join(console))
        console.append(timestamped("Completed!"))
        heartbeat_callback(progress_current=100, progress_total=100, console_output="\n".join(console))
        return {"message": "Hello, %s!" % name, "processing_time": processing_time,
                "console_output": "\n".join(console)}


def _required_string(input_params, name):
    value = input_params.get(name)
    if name not in input_params or value is None:
        raise ValueError("%s is required" % name)
    if not isinstance(value, str) or not value:
        raise ValueError("%s must be a non-empty string" % name)
    return value


def _is_http_url(text):
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "://" in text


def _optional_string(input_params, name):
    value = input_params.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError("%s must be a string" % name)
    return value


class InvalidParameters(ValueError):
    """The input fails one of our own checks made while a job reads its data (a path that is
    not in the NWB file, say): "Invalid parameters: ...", the caller's mistake. Any other
    ValueError from inside figpack, lindi or the data fails the job like any other error."""


FIGPACK_MIN_PYTHON = (3, 9)  # figpack installs on 3.8, then fails on import


class FigpackNwbJob(JobHandler):
    """What the figpack job types on an NWB file share: the parameters (``nwb_url``, a path in
    the file named by ``path_parameter``, optional ``dandiset_id`` and ``neurosift_url``), the
    console and its heartbeats, the upload with those parameters as the figure's description,
    and the figpack_url rule. A subclass names its view and builds it in ``make_view``.

    figpack reads FIGPACK_API_KEY to upload and FIGPACK_API_BASE_URL when it is imported;
    it is imported when such a job runs, never when the runner starts. Neither figpack nor
    lindi sets an HTTP timeout: a stalled server is ended by --job-timeout.
    """

    requires_env = ("FIGPACK_API_KEY",)
    path_parameter = "path"
    path_label = "Path"  # the console's "<path_label>: /the/path" line
    view_name = ""  # "Successfully created <view_name> view"
    upload_label = ""  # "Uploading <upload_label> to figurl..."
    absent_optional = ""  # dandiset_id and neurosift_url when not given

    def _with_install_hint(self, reason):
        if sys.version_info < FIGPACK_MIN_PYTHON:  # no pip line: what it installs does not import here
            return "%s; figpack needs Python %d.%d or newer, this runner has %s" % (
                (reason,) + FIGPACK_MIN_PYTHON + (sys.version.split()[0],))
        return super()._with_install_hint(reason)

    def title(self, path):
        raise NotImplementedError

    def make_view(self, nwb_url, path, say):
        """(the figpack view, more output); ``say(line)`` adds a console line. Raises
        InvalidParameters when the file shows the parameters wrong."""
        raise NotImplementedError

    def execute(self, input_params, heartbeat_callback):
        nwb_url = _required_string(input_params, "nwb_url")
        if not _is_http_url(nwb_url):
            raise ValueError("nwb_url must be an http:// or https:// URL")
        path = _required_string(input_params, self.path_parameter)
        if not path.startswith("/"):
            raise ValueError("%s must start with /" % self.path_parameter)
        identity = {"nwb_url": nwb_url, self.path_parameter: path}
        for name in ("dandiset_id", "neurosift_url"):
            value = _optional_string(input_params, name)
            identity[name] = self.absent_optional if value is None else value
        console = []

        def say(line):
            console.append(timestamped(line))
            heartbeat_callback(console_output="\n".join(console))

        say("Loading NWB file from: %s" % nwb_url)
        say("%s: %s" % (self.path_label, path))
        try:
            view, more_output = self.make_view(nwb_url, path, say)
            say("Successfully created %s view" % self.view_name)
            say("Uploading %s to figurl..." % self.upload_label)
            figpack_url = view.show(title=self.title(path), description=json.dumps(identity), upload=True,
                                    wait_for_input=False, open_in_browser=False)
        except InvalidParameters:
            raise
        except ValueError as error:  # from figpack, lindi or the data, not from our parameters
            raise RuntimeError("%s: %s" % (type(error).__name__, error)) from error
        if not isinstance(figpack_url, str) or not figpack_url.endswith("/index.html"):
            # The worker re-validates a cached result by fetching .../figpack.json in place of
            # index.html; any other URL would make the result count as expired at once.
            raise RuntimeError("figpack returned %r, not a URL ending in /index.html" % (figpack_url,))
        say("Successfully uploaded! URL: %s" % figpack_url)
        say("Completed!")
        return dict(identity, figpack_url=figpack_url, console_output="\n".join(console), **more_output)


def _nwb_group(nwb, path, parameter):
    """The group at ``path`` of an open NWB file, or InvalidParameters naming the parameter."""
    if path not in nwb:
        raise InvalidParameters("%s %s is not in the NWB file" % (parameter, path))
    group = nwb[path]
    if not hasattr(group, "keys"):
        raise InvalidParameters("%s %s is a dataset in the NWB file, not a group" % (parameter, path))
    return group


# figpack_experimental and figpack_nwb are not on PyPI: the extra brings what is.
EXTENSION_INSTALL_HINT = ("install them with: pip install figpack lindi h5py numpy imageio-ffmpeg, and build "
                          "%s from the figpack project's source: see the README, Built-in job types")


@job_type("figpack_nwb_raster_plot")
class FigpackRasterPlotJob(FigpackNwbJob):
    """A figpack raster plot of an NWB units table (figpack_spike_sorting's RasterPlot)."""

    requires_modules = ("figpack", "figpack_spike_sorting", "lindi")
    warm_modules = ("figpack_spike_sorting.views", "lindi")
    install_hint = ("install them with: pip install figpack figpack-spike-sorting lindi (from a checkout of "
                    "the runner: pip install '.[figpack]')")
    path_parameter, path_label = "units_path", "Units path"
    view_name, upload_label = "RasterPlot", "raster plot"
    absent_optional = None  # as the deployed raster plot reports them

    def title(self, path):
        return "Raster plot: %s" % path

    def make_view(self, nwb_url, path, say):
        from figpack_spike_sorting.views import RasterPlot

        return RasterPlot.from_nwb_units_table(nwb_url, units_path=path), {}


VIDEO_PREVIEW_MAX_FRAMES = 1000
VIDEO_DEFAULT_FPS = 30.0
PREVIEW_SLAB_VALUES = 1 << 20  # values scaled at a time: an 8 MB float64 working buffer, 1 MB uint8


@job_type("figpack_nwb_video_preview")
class FigpackVideoPreviewJob(FigpackNwbJob):
    """A figpack video of the first 1000 frames of an NWB ImageSeries (figpack_experimental's
    LossyVideo, which encodes an MP4 in show(): most of the job's time)."""

    requires_modules = ("figpack_experimental", "lindi", "numpy", "h5py")
    warm_modules = ("figpack_experimental.views", "lindi")
    install_hint = EXTENSION_INSTALL_HINT % "figpack_experimental"
    path_parameter, path_label = "image_series_path", "Image series path"
    view_name, upload_label = "LossyVideo", "video preview"

    def title(self, path):
        return "RUNPACK: Video Preview from NWB ImageSeries"

    def make_view(self, nwb_url, path, say):
        import lindi
        from figpack_experimental.views import LossyVideo

        with lindi.LindiH5pyFile.from_hdf5_file(nwb_url) as nwb:
            series = _nwb_group(nwb, path, self.path_parameter)
            data = _image_series_data(series, path)
            fps, timing = image_series_rate(series)
            total = data.shape[0]
            count = min(total, VIDEO_PREVIEW_MAX_FRAMES)
            say("Reading %s frames (%d x %d, %s) at %g fps (%s)" % (
                count if count == total else "the first %d of %d" % (count, total), data.shape[1],
                data.shape[2], "RGB" if len(data.shape) == 4 else "grayscale", fps, timing))
            frames = data[:count]
        # scaled once the file is closed: its read buffers are gone before the result is made
        return LossyVideo(preview_frames(frames), fps=fps), {"num_frames": count}


def _image_series_data(series, path):
    """The ``data`` of an ImageSeries: T×H×W or T×H×W×3 frames, at least one."""
    if "data" not in series:
        raise InvalidParameters("image_series_path %s is not an ImageSeries: it has no data" % path)
    data = series["data"]
    shape = tuple(data.shape or ())
    if not shape or 0 in shape:
        if "external_file" in series or shape == (0, 0, 0):  # as many DANDI files keep their videos
            raise InvalidParameters("image_series_path %s stores its frames in an external file%s, not in "
                                    "the NWB file: there are none to preview" % (path, _external_file_name(series)))
        raise InvalidParameters("image_series_path %s holds no frames (its data has shape %s)" % (path, shape))
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 3)):
        raise InvalidParameters("the data of image_series_path %s has shape %s, not frames x height x width "
                                "(grayscale) or frames x height x width x 3 (RGB)" % (path, shape))
    return data


def _external_file_name(series):
    """The first external_file of an ImageSeries as " (video.mp4)", or "" when it has none."""
    try:
        name = series["external_file"][0]
    except Exception:  # an odd external_file leaves the message without its name
        return ""
    return " (%s)" % (name.decode("utf-8", "replace") if isinstance(name, bytes) else name)


def image_series_rate(series):
    """(frames per second, where it came from) of an NWB ImageSeries: the rate of its
    starting_time, else 1 / the median step of its first 100 timestamps, else 30. A rate that
    is not a positive number (one timestamp, equal timestamps) gives 30 too."""
    import numpy

    if "starting_time" in series:
        rate, source = series["starting_time"].attrs.get("rate"), "from starting_time"
    elif "timestamps" in series:
        steps = numpy.diff(numpy.asarray(series["timestamps"][:100], dtype=numpy.float64))
        step = numpy.median(steps) if steps.size else 0.0
        rate, source = (1.0 / step if step > 0 else None), "from timestamps"
    else:
        rate, source = None, "no timing in the series"
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        rate = None
    if rate is None or not numpy.isfinite(rate) or rate <= 0:
        return VIDEO_DEFAULT_FPS, source + ", so the default"
    return rate, source


def preview_frames(frames):
    """Video frames (T×H×W grayscale or T×H×W×3 RGB, any real dtype) as uint8 T×H×W×3 whose
    99th percentile p is 255: clip(frames, 0, p) / p * 255, truncated, as the deployed job
    does; a video whose p is 0 (all zero) stays black instead of dividing by zero.

    At most two arrays of the frames' size live at once, plus 9 MB of working buffers: the
    frames and the result, which is the frames themselves when they are already uint8 RGB
    (scaled in place: ``frames`` may be overwritten). The deployed formula made several float64
    copies, each 8 bytes a value."""
    import numpy

    if not (frames.ndim == 3 or (frames.ndim == 4 and frames.shape[3] == 3)):
        raise ValueError("frames must be T x H x W or T x H x W x 3, not %s" % (frames.shape,))
    peak = percentile_99(frames)
    in_place = (frames.dtype == numpy.uint8 and frames.ndim == 4 and frames.flags.writeable
                and frames.flags.c_contiguous)
    result = frames if in_place else numpy.empty(frames.shape[:3] + (3,), dtype=numpy.uint8)
    if not (peak > 0 and numpy.isfinite(peak)):
        result[...] = 0
        return result
    step = _slab_frames(frames)
    buffer = numpy.empty((min(step, len(frames)),) + frames.shape[1:], dtype=numpy.float64)
    truncated = numpy.empty(buffer.shape, dtype=numpy.uint8)
    for start in range(0, len(frames), step):
        stop = min(start + step, len(frames))
        slab, values = buffer[:stop - start], truncated[:stop - start]
        slab[...] = frames[start:stop]
        numpy.clip(slab, 0, peak, out=slab)
        slab /= peak
        slab *= 255
        values[...] = slab  # truncates, as astype(uint8) does
        if frames.ndim == 4:
            result[start:stop] = values
        else:
            for channel in range(3):  # three strided copies: twice as fast as one broadcast
                result[start:stop, ..., channel] = values
    return result


def percentile_99(frames):
    """numpy.percentile(frames, 99) (0 for no frames), without numpy's copy of the frames for
    8- and 16-bit unsigned ones: their histogram, counted a slab at a time, gives the values
    around the percentile's rank, and where those are equal (in nearly every video) that value
    is the percentile exactly, however numpy interpolates; else numpy works it out."""
    import numpy

    if not frames.size:
        return 0.0
    if frames.dtype.kind == "u" and frames.dtype.itemsize <= 2:
        counts = numpy.zeros(1 << (8 * frames.dtype.itemsize), dtype=numpy.int64)
        step = _slab_frames(frames)
        for start in range(0, len(frames), step):
            counts += numpy.bincount(frames[start:start + step].ravel(), minlength=len(counts))
        rank = 99 * (frames.size - 1) // 100  # rounding in numpy's own arithmetic moves it by one at most
        below, above = numpy.searchsorted(numpy.cumsum(counts), [max(rank - 1, 0), min(rank + 2, frames.size - 1)],
                                          side="right")
        if below == above:
            return float(below)
    return float(numpy.percentile(frames, 99))


def _slab_frames(frames):
    """How many frames make a slab of about PREVIEW_SLAB_VALUES values."""
    return max(1, PREVIEW_SLAB_VALUES // max(1, frames[0].size))


@job_type("figpack_nwb_pose_estimation")
class FigpackPoseEstimationJob(FigpackNwbJob):
    """A figpack view of an NWB PoseEstimation group (figpack_nwb's PoseEstimation, which reads
    the file itself through lindi, caching under the job's own TMPDIR)."""

    requires_modules = ("figpack_nwb", "lindi")
    warm_modules = ("figpack_nwb.views", "lindi")
    install_hint = EXTENSION_INSTALL_HINT % "figpack_nwb"
    path_parameter, path_label = "path", "Pose estimation path"
    view_name, upload_label = "PoseEstimation", "pose estimation"

    def title(self, path):
        return "RUNPACK: Pose Estimation from NWB"

    def make_view(self, nwb_url, path, say):
        import lindi
        from figpack_nwb.views import PoseEstimation

        with lindi.LindiH5pyFile.from_hdf5_file(nwb_url) as nwb:  # so that a wrong path is named as such
            _nwb_group(nwb, path, self.path_parameter)
        return PoseEstimation(nwb=nwb_url, path=path, use_local_cache=True), {}


# ---- Progress and heartbeats ---------------------------------------------------

CLAIM_LOST_MESSAGE = "the worker says the job is no longer claimed by this runner"
HEARTBEAT_MIN_GAP_S = 0.5  # the worker allows 120 heartbeats a minute per runner
PROCESS_OUTPUT_MARKER = "[runpack: output of the job process]"
_UNCHANGED = object()


def _progress_number(value):
    """A progress count as the worker takes it; a handler's bad value is its bug, not a
    parameter error (hence TypeError, not ValueError)."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError("heartbeat_callback takes whole numbers or None as progress, got %r" % (value,))


def merge_console(handler_console, process_output):
    """The console the worker shows: the handler's, then whatever the job process printed."""
    if not process_output:
        return handler_console
    separator = "\n" if handler_console and not handler_console.endswith("\n") else ""
    return "%s%s%s\n%s" % (handler_console, separator, PROCESS_OUTPUT_MARKER, process_output)


class JobProgress:
    """The heartbeat_callback a handler gets: it keeps the latest progress and console,
    which the heartbeats carry, and raises JobCancelled once the runner gave the job up."""

    def __init__(self, heartbeat_interval):
        self.heartbeat_interval = heartbeat_interval
        self.progress_current = self.progress_total = None
        self.console_output = ""
        self.process_output = ""
        self.version = 0
        self.cancel_reason = None
        self.finished = False
        self._condition = threading.Condition()

    def __call__(self, progress_current=_UNCHANGED, progress_total=_UNCHANGED,
                 console_output=_UNCHANGED):
        if self.cancel_reason:
            raise JobCancelled(self.cancel_reason)
        self.update(progress_current, progress_total, console_output)

    def update(self, progress_current=_UNCHANGED, progress_total=_UNCHANGED, console_output=_UNCHANGED):
        with self._condition:
            if progress_current is not _UNCHANGED:
                self.progress_current = _progress_number(progress_current)
            if progress_total is not _UNCHANGED:
                self.progress_total = _progress_number(progress_total)
            if console_output is not _UNCHANGED:
                self.console_output = "" if console_output is None else str(console_output)
            self.version += 1
            self._condition.notify_all()

    def add_process_output(self, text):
        with self._condition:
            self.process_output = keep_console_tail(self.process_output + text)
            self.version += 1
            self._condition.notify_all()

    @property
    def console(self):
        return merge_console(self.console_output, self.process_output)

    @property
    def cancelled(self):
        return self.cancel_reason is not None

    def cancel(self, reason):
        with self._condition:
            self.cancel_reason = self.cancel_reason or reason
            self._condition.notify_all()

    def finish(self):
        with self._condition:
            self.finished = True
            self._condition.notify_all()

    def snapshot(self):
        with self._condition:
            return self.version, self.progress_current, self.progress_total, self.console

    def wait_for_change(self, seen_version, timeout=None):
        with self._condition:
            self._condition.wait_for(lambda: self.version != seen_version or self.finished, timeout)


class HeartbeatPump(threading.Thread):
    """Sends a job's heartbeats from a background thread, so that a handler that never
    calls heartbeat_callback still keeps its claim: one every ``interval`` (None: only on
    progress), and one soon after each progress update, never two within ``min_gap``
    seconds. The claim counts as the first, so a job shorter than ``min_gap`` costs no
    heartbeat at all.

    ``send(progress_current, progress_total, console_output)`` returns False once the
    job is no longer ours: the pump then cancels the job and calls ``wake``.
    """

    def __init__(self, progress, send, interval, min_gap, wake):
        super().__init__(name="heartbeats", daemon=True)
        self._progress, self._send, self._wake = progress, send, wake
        self._min_gap = min_gap
        self._interval = None if interval is None else max(interval, min_gap)
        self._sending = threading.Lock()  # held while a heartbeat is under way

    def run(self):
        sent_version, sent_at = 0, time.monotonic()
        while not self._progress.finished:
            version, current, total, console = self._progress.snapshot()
            if version == sent_version and self._interval is None:
                self._progress.wait_for_change(version)
                continue
            due = sent_at + (self._min_gap if version != sent_version else self._interval)
            now = time.monotonic()
            if now < due:
                self._progress.wait_for_change(version, due - now)
                continue
            sent_version, sent_at = version, now
            with self._sending:
                if self._progress.finished:
                    return
                ours = self._send(current, total, console)
            if not ours:
                self._progress.cancel(CLAIM_LOST_MESSAGE)
                self._wake()
                return

    def stop(self, timeout):
        """Once the progress is finished: return when no heartbeat is under way (or after
        ``timeout`` seconds), and none follows. Quicker than join(), which waits for this
        thread to wake up and see the end."""
        if self._sending.acquire(timeout=timeout):
            self._sending.release()


class WorkerHeartbeats:
    """The HeartbeatPump's ``send`` for a claimed job: one heartbeat, one log line per spell of trouble."""

    def __init__(self, client, record):
        self._client, self._record = client, record
        self._failing = False
        self.progress_sent = (None, None)

    def finish_progress(self, progress):
        """A completed job whose progress the worker shows ends at total/total there, not at
        the last update sent (66/100): one more heartbeat, unless none carried progress (an
        instant job costs nothing) or the last one said total/total already."""
        total = progress.progress_total
        if total is not None and self.progress_sent[1] is not None and self.progress_sent != (total, total):
            self(total, total, progress.console)

    def __call__(self, progress_current, progress_total, console_output):
        job_id = self._record["job_id"]
        try:
            ours = self._client.heartbeat(job_id, progress_current, progress_total, console_output,
                                          runner_id=self._record["runner_id"])
        except WorkerError as error:
            if not self._failing:
                LOG.warning("Heartbeat for job %s failed: %s; still trying", job_id, error)
            self._failing = True
            return True
        if self._failing:
            LOG.info("Heartbeats for job %s are getting through again", job_id)
        self._failing = False
        self.progress_sent = (progress_current, progress_total)
        return ours


# ---- What a job may use: the network guard and the memory limit --------------------
#
# A job's parameters are chosen by whoever submits it, and Neurosift lets anyone on the
# internet do that: without limits, a job could be pointed at the services of the runner's
# own machine and network, or at a file large enough to exhaust the node's memory. So each
# job process, before its handler runs, takes two limits that the job cannot lift:
#   - the network guard: every connection a Python socket of the job makes is checked on the
#     address it is about to reach, at that moment, after any name was resolved: names, odd
#     spellings of an address, redirects and DNS rebinding all come down to that address.
#     Public addresses are allowed; the machine itself and the networks it sits in are not,
#     unless the operator allows them with --allow-job-network;
#   - the memory limit (--job-memory-limit), with setrlimit: a job over it gets a
#     MemoryError, instead of the kernel's OOM killer choosing a victim on the node.
# Neither applies with --in-process, where jobs share the runner's process and its sockets.

# Addresses that are not on the public internet: the machine itself, the networks it sits
# in, and ranges that reach nobody in particular. Jobs may not reach them unless allowed.
DENIED_NETWORKS = tuple(ipaddress.ip_network(network) for network in (
    "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the machine itself
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, the cloud metadata service (169.254.169.254) among them
    "168.63.129.16/32",  # Azure's host services (WireServer): a metadata service outside link-local
    "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",  # protocols, tests
    "192.88.99.0/24",  # the old 6to4 relays: whoever answers there is not a public site
    "224.0.0.0/4", "240.0.0.0/4",  # multicast; reserved, broadcast among them
    "2001::/23", "2001:db8::/32", "3fff::/20",  # protocols (Teredo among them), documentation
))
# IPv6 reaches the internet in global unicast alone: every address outside it is denied, once the
# IPv4 address in it (if any) was read. Outside it: unspecified (::), loopback (::1), the old
# IPv4-compatible form (::/96), local NAT64 (64:ff9b:1::/48), discard (100::/64), segment routing
# (SRv6, 5f00::/16: a network's own routers), unique-local (fc00::/7), link-local, site-local,
# multicast, and the rest reserved.
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")  # reaches the IPv4 address in its last 32 bits
SIIT_NETWORK = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (SIIT): the same
DENIED_KINDS = ("loopback, private (RFC 1918), carrier-grade NAT, link-local and cloud metadata, "
                "IPv6 unique-local and link-local, multicast, reserved, and this machine's own addresses")


def reached_address(address):
    """The address a connection to ``address`` reaches: the IPv4 address inside an IPv4-mapped,
    NAT64, IPv4-translated or 6to4 IPv6 address, else the address itself."""
    if address.version == 4:
        return address
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if address in NAT64_NETWORK or address in SIIT_NETWORK:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def show_address(ip):
    """An address as people write it: an IPv4-mapped one as ::ffff:127.0.0.1 on every Python."""
    mapped = ip.version == 6 and ip.ipv4_mapped
    return "::ffff:%s" % mapped if mapped else str(ip)


def machine_addresses():
    """This machine's own addresses, as networks (Linux, from /proc; none elsewhere): a job
    must not reach the services that listen on them, public addresses included."""
    found = []
    try:
        with open("/proc/net/fib_trie") as stream:  # "|-- 198.51.100.7" then "/32 host LOCAL"
            node = None
            for words in (line.split() for line in stream):
                if words[:1] == ["|--"]:
                    node = words[1]
                elif words[-2:] == ["host", "LOCAL"] and node:
                    found.append(ipaddress.ip_network(node + words[0], strict=False))
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6") as stream:  # the address in 32 hex digits, then more
            found += [ipaddress.ip_network(ipaddress.IPv6Address(int(line.split()[0], 16))) for line in stream]
    except (OSError, ValueError, IndexError):
        pass
    return found


class NetworkPolicy:
    """Which addresses a job may connect to: public addresses and the networks the operator
    allowed (--allow-job-network), or any address at all (``any``)."""

    def __init__(self, allowed=(), own_addresses=machine_addresses):
        self.any = allowed == ANY_NETWORK
        self.allowed = () if self.any else tuple(allowed)
        self._own_addresses = own_addresses  # called once, at the first public address
        self._own = None

    def permits(self, address):
        if self.any:
            return True
        reached = reached_address(address)
        if any(candidate in network for network in self.allowed for candidate in (address, reached)):
            return True
        if reached.version == 6 and reached not in GLOBAL_UNICAST:
            return False
        if any(reached in network for network in DENIED_NETWORKS):
            return False
        if self._own is None:
            self._own = self._own_addresses()
        return not any(reached in network for network in self._own)

    def as_setting(self):
        """What --allow-job-network says, to pass the policy on to a job process."""
        return ANY_NETWORK if self.any else ",".join(str(network) for network in self.allowed)

    def describe(self):
        if self.any:
            return "any address (--allow-job-network any): no network guard"
        allowed = ", ".join(str(network) for network in self.allowed)
        return "public addresses%s; not %s (--allow-job-network)" % (
            " and " + allowed if allowed else "", DENIED_KINDS)


class JobNetworkDenied(BaseException):
    """A job connected to an address its runner does not let jobs reach. A BaseException,
    like JobCancelled, so that a library's retry loop (``except Exception``) does not try
    again and again; however a library reports it, the job fails with this one line. The
    wording is the same for every denied address, so that the error tells nothing of it."""

    def __init__(self, host, address):
        super().__init__(host, address)
        self.host, self.address = host, address

    def __str__(self):
        return ("%s resolves to %s, which jobs on this runner may not reach (allow it with "
                "--allow-job-network)" % (self.host, show_address(self.address)))


INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
SPECIAL_HOSTS = {"": "0.0.0.0", "<broadcast>": "255.255.255.255"}  # as Python's socket module reads them


class NetworkGuard:
    """The network guard of one job process: wraps the methods of Python's socket class that
    take an address to reach (connect, connect_ex, sendto, sendmsg), so that each is checked
    against the policy before a byte is sent, and connects to the very address it checked: a
    name is resolved here, once. It also wraps getaddrinfo, to name the host an address came
    from. A denial in the main thread, the handler's, is raised there; one in another thread
    ends the job process at once (``fail_job``): the job might wait for that thread for ever (a
    ThreadPool's worker catches Exception only), and an exception sent to the main thread by a
    signal can be lost (one that comes just before it waits). What it cannot see: sockets made
    outside Python's socket class (a C extension's own), and other programs the job starts."""

    def __init__(self, policy, resolve=socket.getaddrinfo, fail_job=None):
        self.policy = policy
        self.resolve = resolve  # socket.getaddrinfo, or a stand-in in tests
        self.names = {}  # address -> the host name last resolved to it
        self.denial = None  # the first connection refused: the job's error
        self.pid = os.getpid()  # the job process; a process it forks inherits the guard
        self.fail_job = fail_job  # ends the job process at once with the denial's report
        self._forked_denials = None  # (read, write): a pipe on which forked processes tell theirs

    def install(self):
        """Wrap the socket class for the rest of this process: a job process's alone."""
        self._forked_denials = os.pipe()
        for end in self._forked_denials:
            os.set_blocking(end, False)
        socket.socket.connect = self._guarded(socket.socket.connect, 0)
        socket.socket.connect_ex = self._guarded(socket.socket.connect_ex, 0)
        socket.socket.sendto = self._guarded(socket.socket.sendto, -1)
        socket.socket.sendmsg = self._guarded(socket.socket.sendmsg, 3)
        resolve = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            answers = resolve(host, *args, **kwargs)
            if host is not None:  # None: this machine's own addresses, for a server
                for answer in answers:
                    self.names[answer[4][0]] = _host_text(host)
            return answers
        socket.getaddrinfo = getaddrinfo

    def _guarded(self, method, position):
        """``method`` with its address argument (at ``position``; -1: the last) checked."""
        def guarded(sock, *args):
            index = position if position >= 0 else len(args) + position
            if sock.family in INET_FAMILIES and 0 <= index < len(args) and _is_inet_address(args[index]):
                args = args[:index] + (self.checked(sock.family, sock.type, args[index]),) + args[index + 1:]
            return method(sock, *args)  # anything else, None included, is no address: the socket says so
        guarded.__name__, guarded.__doc__ = method.__name__, method.__doc__
        return guarded

    def checked(self, family, kind, address):
        """The address to use in place of ``address``: the IP address it reaches, in a spelling
        that the socket reads as it was checked (never a name to resolve again), or
        JobNetworkDenied."""
        host, port = _host_text(address[0]), address[1]
        text = SPECIAL_HOSTS.get(host, host)
        ip = _plain_ip(text)
        if ip is not None:
            address = (str(ip),) + tuple(address[1:])
            host = self.names.get(str(ip), host)  # the name it was looked up by, if it was
        else:  # a name, an address spelled as only the C library reads it (127.1), or fe80::1%eth0
            answers = self.resolve(host, port, family, kind, 0, socket.AI_NUMERICHOST if "%" in text else 0)
            if not answers:
                raise socket.gaierror(socket.EAI_NONAME, "no address for %s" % host)
            address = answers[0][4]
            ip = ipaddress.ip_address(address[0].split("%")[0])
        if not self.policy.permits(ip):
            self._deny(host, ip)
        return address

    def _deny(self, host, ip):
        denial = JobNetworkDenied(host, ip)
        if os.getpid() != self.pid:  # a worker the job forked (multiprocessing): an error it passes back
            self._tell_job_process(host, ip)
            raise PermissionError(errno.EACCES, str(denial))
        if self.denial is None:
            self.denial = denial
        if self.fail_job is not None and threading.current_thread() is not threading.main_thread():
            self.fail_job()
        raise denial

    def _tell_job_process(self, host, ip):
        """From a process the job forked: its denial, for the job process to fail with, whether or
        not the process passes its error back. One line, one write of less than PIPE_BUF, so that
        the lines of processes denied at once do not mix (a name in DNS has 253 characters at most)."""
        if self._forked_denials is not None:
            try:
                os.write(self._forked_denials[1], (json.dumps([host[:253], str(ip)]) + "\n").encode("utf-8"))
            except OSError:  # the pipe is full: the job process has denials enough to read
                pass

    def first_denial(self):
        """The job's first denial: in the job process, else in a process it forked; None yet."""
        if self.denial is None and self._forked_denials is not None:
            try:
                line = os.read(self._forked_denials[0], 4096).split(b"\n")[0]
            except BlockingIOError:
                return None
            host, address = json.loads(line.decode("utf-8"))
            self.denial = JobNetworkDenied(host, ipaddress.ip_address(address))
        return self.denial


def _is_inet_address(address):
    """Whether ``address`` is the (host, port…) of an IP socket; else the socket refuses it."""
    return isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], (str, bytes, bytearray))


def _plain_ip(text):
    """The IP address ``text`` spells in a standard form, without a scope (%eth0); else None."""
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _host_text(host):
    """A host as text: bytes are read as the socket module reads them (IDNA), or byte for byte."""
    if isinstance(host, str):
        return host
    try:
        return bytes(host).decode("idna")
    except UnicodeError:
        return bytes(host).decode("latin-1")


# The memory limit counts what the kernel counts as a process's data (RLIMIT_DATA): what it
# allocates and may write, whether it has touched it yet or not. It leaves out what the address
# space (RLIMIT_AS) counts too and a job never fills: libraries' code, and the large areas that
# glibc and OpenBLAS reserve for their threads.
MEMORY_RLIMIT_NAME = "RLIMIT_DATA"
MEMORY_SHARE = 0.75  # of the runner's memory, shared among the slots: the rest is the system's
DEFAULT_MEMORY_FLOOR = 3 << 29  # 1.5 GiB: the built-in types' measured peaks (at most 0.9 GiB) fit
# numpy's OpenBLAS reserves some 40 MiB of data per thread when it is imported, one thread per CPU
# it sees: 2.5 GiB on a 64-CPU node, which every job forked from a warm launcher would carry. Job
# processes get thread pools of their share of the CPUs instead, unless the operator sized them.
THREAD_POOL_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def default_job_memory_limit(available, concurrency):
    """MEMORY_SHARE of ``available``, the memory this runner may use (see available_memory),
    shared among the slots, and at least DEFAULT_MEMORY_FLOOR; 0 (none) where the memory
    cannot be read (None)."""
    if not available:
        return 0
    return max(int(available * MEMORY_SHARE) // concurrency, DEFAULT_MEMORY_FLOOR)


def available_memory():
    """The memory this runner may use: the machine's physical memory, or the limit of its
    cgroup (v2, or v1) when lower; None where that cannot be read."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    limits = [physical]
    try:
        with open("/proc/self/cgroup") as stream:
            for line in stream:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    limits += _cgroup_limits("/sys/fs/cgroup", path, "memory.max")
                elif "memory" in controllers.split(","):
                    limits += _cgroup_limits("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    return min(limit for limit in limits if limit)


def _cgroup_limits(root, path, name):
    """The limits in the file ``name`` of a cgroup and of each cgroup above it: Slurm and
    systemd set a job's or a slice's limit above the cgroup the process is in."""
    limits = []
    while True:
        limits.append(_read_number(os.path.join(root + path, name)))
        if path in ("/", ""):
            return limits
        path = os.path.dirname(path.rstrip("/"))


def _read_number(path):
    """The number in a file such as memory.max; None for "max", or a file not there."""
    try:
        with open(path) as stream:
            return int(stream.read())
    except (OSError, ValueError):
        return None


def describe_size(size):
    """400 MiB, 4 GiB, 1.5 GiB."""
    if size >= 1 << 30:
        return "%s GiB" % ("%.1f" % (size / (1 << 30))).rstrip("0").rstrip(".")
    return "%d MiB" % round(size / (1 << 20))


class JobLimits:
    """What a job process may use: its network policy and its memory limit (bytes; 0: none).
    Made in the runner from the settings, passed on with each job, applied in the job process
    before its handler runs; it then also explains a failure that one of them caused."""

    def __init__(self, network=ANY_NETWORK, memory_limit=0, memory_source="", slots=1, available=None):
        self.network = network if isinstance(network, NetworkPolicy) else NetworkPolicy(network)
        self.memory_limit = memory_limit
        self.memory_source = memory_source  # how the default was reached, for the operator
        self.available = available  # the memory that the default is a share of; None for a limit set
        self.slots = slots
        self.threads = max(1, _usable_cpus() // slots)  # a job's share of the CPUs
        self.guard = None
        self._use_headroom = None

    @classmethod
    def from_settings(cls, settings):
        slots = getattr(settings, "concurrency", 1)
        if settings.job_memory_limit is not None:
            return cls(settings.allow_job_network, settings.job_memory_limit, slots=slots)
        available = available_memory()
        memory_limit = default_job_memory_limit(available, slots)
        source = ("the default: %d%% of %s over %d slot%s" % (MEMORY_SHARE * 100, describe_size(available), slots,
                                                              "s" * (slots != 1)) if available else "")
        if available and memory_limit == DEFAULT_MEMORY_FLOOR:
            source += ", raised to the %s that the built-in job types need" % describe_size(DEFAULT_MEMORY_FLOOR)
        return cls(settings.allow_job_network, memory_limit, source, slots, available)

    def environment(self, environ):
        """``environ`` for the launcher, whose job processes inherit it: thread pools of a job's
        share of the CPUs, where the operator has not sized them."""
        sized = dict(environ)
        for name in THREAD_POOL_VARIABLES:
            sized.setdefault(name, str(self.threads))
        return sized

    def as_spec(self):
        return {"allow_job_network": self.network.as_setting(), "memory_limit": self.memory_limit}

    @classmethod
    def from_spec(cls, spec):
        return cls(_parse_networks(spec["allow_job_network"]), spec["memory_limit"])

    def apply(self, fail_job=None):
        """In a job process, before the handler runs: lower the memory limit, guard the network
        (``fail_job``: see NetworkGuard).
        The soft limit is the job's; the hard one, which the job cannot raise, is MEMORY_HEADROOM
        above it, so that a job that ran out of memory and holds on to it still gets its report
        made and sent (see use_headroom)."""
        if self.memory_limit:
            import resource

            kind = getattr(resource, MEMORY_RLIMIT_NAME)
            _, hard = resource.getrlimit(kind)
            soft, ceiling = self.memory_limit, self.memory_limit + MEMORY_HEADROOM
            if hard != resource.RLIM_INFINITY:
                soft, ceiling = min(hard, soft), min(hard, ceiling)
            resource.setrlimit(kind, (soft, ceiling))
            headroom = (ceiling, ceiling)  # made now: there may be no memory for it later
            self._use_headroom = lambda: resource.setrlimit(kind, headroom)
        if not self.network.any:
            self.guard = NetworkGuard(self.network, fail_job=fail_job)
            self.guard.install()

    def use_headroom(self):
        """Once the handler has failed: raise the soft memory limit to the hard one."""
        if self._use_headroom is not None:
            self._use_headroom()

    def explain(self, error, input_params):
        """The error message for a job that failed with ``error`` (None: it did not fail) because
        of a limit, else None. A denial explains any failure: it may have come first, elsewhere."""
        denial = self.guard and self.guard.first_denial()
        if denial:
            parameter = _parameter_with_host(input_params, denial.host)
            return "%s%s" % (parameter + ": " if parameter else "", denial)
        if self.memory_limit and _out_of_memory(error):
            return "Job exceeded its memory limit of %s (--job-memory-limit)" % describe_size(self.memory_limit)
        return None

    def describe_memory(self):
        if not self.memory_limit:
            return "none"
        limit = "%s per job" % describe_size(self.memory_limit)
        return "%s (%s; --job-memory-limit)" % (limit, self.memory_source) if self.memory_source else limit


LINUX_RELEASE = os.uname().release if sys.platform.startswith("linux") else ""


def data_limit_counts_mmap(linux_release):
    """Whether a Linux kernel of this release ("3.10.0-1160.el7.x86_64") counts memory mapped
    with mmap in RLIMIT_DATA: from 4.7 on. Before, glibc's large allocations escape the limit."""
    version = re.match(r"(\d+)\.(\d+)", linux_release)
    return not version or (int(version.group(1)), int(version.group(2))) >= (4, 7)


def describe_job_limits(limits, in_job_processes, linux_release=LINUX_RELEASE):
    """(log level, line) for each thing an operator should know of the limits jobs run under."""
    if not in_job_processes:
        return [(logging.WARNING, "Jobs run in the runner's own process (--in-process): neither the "
                                  "network guard nor the memory limit applies to them")]
    lines = [(logging.INFO, "Jobs may reach %s" % limits.network.describe()),
             (logging.INFO, "Job memory limit: %s" % limits.describe_memory()),
             (logging.INFO, "Job thread pools: %d thread%s each (%s, where not set)" % (
                 limits.threads, "s" * (limits.threads != 1), ", ".join(THREAD_POOL_VARIABLES)))]
    if limits.network.any:
        lines[0] = (logging.WARNING, "Jobs may reach any address this machine can, its own services and "
                                     "the networks it sits in included (--allow-job-network any)")
    if limits.available and limits.memory_limit * limits.slots > limits.available:
        lines.append((logging.WARNING, "Jobs may together use more memory than this runner has: %d slots of "
                                       "%s (the default's floor) are %s, over its %s; lower --concurrency or "
                                       "set --job-memory-limit" % (
                                           limits.slots, describe_size(limits.memory_limit),
                                           describe_size(limits.memory_limit * limits.slots),
                                           describe_size(limits.available))))
    if limits.memory_limit and not data_limit_counts_mmap(linux_release):
        lines.append((logging.WARNING, "The job memory limit cannot hold on Linux %s: before 4.7, the kernel "
                                       "leaves memory mapped with mmap (glibc's large allocations) out of the "
                                       "data limit; limit jobs' memory with Slurm's --mem or a cgroup (systemd "
                                       "MemoryMax=)" % linux_release))
    return lines


def _usable_cpus():
    """The CPUs this process may run on (a Slurm job's or a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def _parameter_with_host(input_params, host):
    """The name of the URL parameter that names ``host``, else of the only URL parameter (a
    redirect led elsewhere), else None."""
    urls = {name: value for name, value in input_params.items() if isinstance(value, str) and _is_http_url(value)}
    for name, url in sorted(urls.items()):
        if (urllib.parse.urlsplit(url).hostname or "").lower() == host.lower():
            return name
    return next(iter(urls)) if len(urls) == 1 else None


def _out_of_memory(error):
    """Whether ``error``, or an error that led to it, is an allocation that failed: memory, or a
    thread's stack (near the limit, often the first allocation to fail)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, MemoryError) or isinstance(error, OSError) and error.errno == errno.ENOMEM
                or isinstance(error, RuntimeError) and re.match(r"can't (start|create) new thread", str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


# ---- Reports: what a handler's end becomes --------------------------------------

def error_report(message, console, details=None):
    """A failure as the worker takes it; ``details`` (a traceback) is for the runner's log."""
    report = {"kind": "error", "body": {"error_message": message, "console_output": console}}
    if details:
        report["traceback"] = details
    return report


def complete_report(result, console):
    """The complete report for a handler's result, or an error report saying why the
    worker could not take it (the worker would refuse it with a 400 forever)."""
    if not isinstance(result, dict):
        return error_report("Job execution failed: the handler returned %s, not a dict"
                            % type(result).__name__, console)
    output = dict(result)
    if "console_output" in output:
        console = str(output.pop("console_output") or "")
    try:
        encoded = json.dumps(output, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        return error_report("Job execution failed: the output is not JSON-serialisable (%s)"
                            % error, console)
    size = js_length(encoded)
    if size > OUTPUT_JSON_LIMIT:
        return error_report("Job execution failed: the output is %d characters of JSON, over the "
                            "worker's limit of %d" % (size, OUTPUT_JSON_LIMIT), console)
    return {"kind": "complete", "body": {"output_data": output, "console_output": console}}


FALLBACK_MESSAGE_LIMIT = 1000


def fallback_report(report, refusal):
    """What to send when the worker refused a report with a 4xx, so that the job still ends:
    a failure saying so, with the console, then without it; None once the refused report
    was already that small (however the refusals are worded, the falling back ends)."""
    body = report["body"]
    message = trim_error_message("Job execution failed: the worker refused the %s report: %s"
                                 % (report["kind"], refusal), FALLBACK_MESSAGE_LIMIT)
    if report["kind"] == "complete":
        return error_report(message, body["console_output"])
    if body["console_output"] or js_length(body["error_message"]) > FALLBACK_MESSAGE_LIMIT:
        return error_report(message, "")
    return None


def run_handler(handler, input_params, progress, limits=None):
    """Call a handler and turn whatever happens into a report; None once the runner gave it up.
    ``limits``, the JobLimits applied to this process, explain the failures they cause."""
    try:
        result = handler.execute(input_params, progress)
        # a denial the job went on after (in a worker process it forked, say) fails it all the same
        refused = limits and limits.explain(None, input_params)
        # in the try, so that a MemoryError while encoding the result is explained as well
        return error_report(refused, progress.console) if refused else complete_report(result, progress.console)
    except JobCancelled as cancelled:
        if progress.cancelled:
            return None
        return error_report("Job execution failed: %s" % (str(cancelled) or "JobCancelled"), progress.console)
    except BaseException as error:  # SystemExit and KeyboardInterrupt from a handler fail its job too
        if limits:
            limits.use_headroom()  # first: a job out of memory may still hold all of it
        explained = limits and limits.explain(error, input_params)
        if explained:
            return error_report(explained, progress.console)
        if isinstance(error, ValueError):
            return error_report("Invalid parameters: %s" % error, progress.console)
        details = traceback.format_exc()
        console = progress.console
        text = str(error) if isinstance(error, Exception) else ("%s %s" % (type(error).__name__, error)).strip()
        return error_report("Job execution failed: %s" % (text or type(error).__name__),
                            console + ("\n" if console else "") + details, details)


# ---- Job processes: the launcher that forks them warm -----------------------------
#
# A job process is forked by the launcher: a process that the runner starts fresh (fork and
# exec) at its first job, and that imports this module and the handler modules once. A job
# process so starts in a millisecond or two instead of an interpreter's 100 ms, with module
# state as fresh as a new interpreter's (the launcher itself runs no job), and the launcher
# keeps one forked ahead, waiting for its job: the spare. Once a job type whose handler
# lists ``warm_modules`` has had a job, the launcher imports them (warm imports, unless
# --no-warm-imports), so that its later jobs start with them imported. An idle runner stops
# the launcher unless it keeps something warm.
#
# Three pipes join the runner and a job process: ``go`` (the job, then nothing: when it
# closes, the runner is gone, kill -9 included, and the job's process group ends itself),
# ``channel`` (progress, the report, and last the launcher's word on how the process
# ended) and ``output`` (its stdout and stderr).

JOB_UPDATE_GAP_S = 0.1  # how often a job process passes its progress to the runner
JOB_STOP_GRACE_S = 5.0  # a job process gets JOB_STOP_SIGNAL, then SIGKILL this much later
# The runner's own signal to stop a job: a SIGTERM that systemd or Slurm sends to every process
# of the runner must not stop the job, which the runner means to finish (SIGUSR1 also ends a
# process the job started, unless it handles it).
JOB_STOP_SIGNAL = getattr(signal, "SIGUSR1", None)
JOB_TEMP_PREFIX = "runpack-job-"  # then the runner's pid: see remove_orphaned_job_dirs
LAUNCHER_COMMAND = "_launcher"  # hidden command: the launcher process, see JobLauncher
LAUNCHER_ANSWER_TIMEOUT_S = 60.0  # imports from a cold network file system can be that slow
LAUNCHER_OUTPUT_KEPT, LAUNCHER_LINES_KEPT = 4096, 20  # of what a launcher that did not start printed
FORK_ATTEMPTS, FORK_RETRY_WAIT_S = 3, 1.0  # then the runner stops: see LauncherUnavailable
LAUNCHER_PROCESS_NAME = "runpack-launch"  # what ps and top show (Linux): at most 15 bytes
JOB_PROCESS_NAME = "runpack-job"


class LauncherUnavailable(Exception):
    """No job process could be had: the launcher does not start, or cannot fork. The runner
    stops rather than fail job after job: the job stays in custody for the next start.
    ``said``: what the launcher printed, if anything (a traceback, say), for the log."""

    def __init__(self, message, said=""):
        super().__init__(message)
        self.said = said

    def __str__(self):
        return "%s; it said:\n%s" % (self.args[0], self.said) if self.said else self.args[0]

    def one_line(self):
        """The message with the last line the launcher printed, for `run`'s one-line error."""
        last = self.said.strip().splitlines()[-1:] if self.said else []
        return "%s: %s" % (self.args[0], last[0].strip()) if last else self.args[0]


class LauncherGone(Exception):
    """The launcher ended, or stopped answering, while the runner waited for it."""


class JobProcess:
    """A job process from the runner's side: its pid, and the runner's ends of its pipes,
    made before the launcher forks it."""

    def __init__(self):
        self.channel, channel_end = os.pipe()
        self.output, output_end = os.pipe()
        go_end, self.go = os.pipe()
        self.child_ends = [channel_end, output_end, go_end]  # for the launcher, then closed here
        self.pid = self.temporary_dir = None
        self.launcher = None  # the launcher's Popen, which alone can say how the process ended

    def close_child_ends(self):
        while self.child_ends:
            os.close(self.child_ends.pop())

    def hand_over(self, spec):
        """Give the waiting process its job; False when it is no longer there to take it."""
        data = (json.dumps(spec) + "\n").encode("utf-8")
        try:
            while data:
                data = data[os.write(self.go, data):]
        except BrokenPipeError:
            return False
        return True

    def lost_for_good(self):
        """True once the launcher has died and this process has ended: no exit status comes."""
        return self.launcher.poll() is not None and not _process_alive(self.pid)

    def release(self):
        """Let go of the process: closing go ends it, if it still runs. Its launcher removes
        its temporary directory once it has ended, or the runner does if that launcher is gone."""
        self.close_child_ends()
        for descriptor in (self.channel, self.output, self.go):
            os.close(descriptor)
        if self.launcher is not None and self.launcher.poll() is not None:
            shutil.rmtree(self.temporary_dir, ignore_errors=True)


class JobLauncher:
    """The runner's side of the launcher: starts it at the first job and again when it died,
    asks it to fork job processes, one ahead of need, and hands each its job. Thread-safe:
    job slots share one launcher."""

    def __init__(self, handler_specs, limits, warm=True, spare=True):
        self.handler_specs, self.warm, self.keep_spare = handler_specs, warm, spare
        self.limits = limits  # the JobLimits each job process applies
        self.process = self.control = self._answers = self._errors = None
        self._spare = None  # a JobProcess asked for, whose answer (its pid) is read when it is taken
        self._job_types = set()  # the job types that have had a job: a type is warmed up once
        self._warm_up = []  # job types the launcher is to import the warm_modules of, with the next fork
        self.warm_types = set()  # job types the running launcher has imported the warm_modules of
        self._lock = threading.Lock()

    def start_job(self, job_type, spec):
        """A job process running ``spec`` under the limits: the spare if there is one, else
        one forked now."""
        spec = dict(spec, limits=self.limits.as_spec())
        with self._lock:
            for _ in range(3):
                process = self._take_spare() or self._fork()
                if process.hand_over(spec):
                    break
                process.release()  # it died waiting (killed by someone): another one
            else:
                raise LauncherUnavailable("job processes die before they get their job")
            if job_type not in self._job_types:
                self._job_types.add(job_type)
                if self.warm and getattr(JOB_HANDLERS.get(job_type), "warm_modules", ()):
                    self._warm_up.append(job_type)
                    self._prepare_spare()  # the imports take a while: start them beside this job
            return process

    def job_ended(self):
        """Fork the next job's process now, while the runner reports and claims: forked as
        a job starts, it would take the CPU from that job."""
        with self._lock:
            self._prepare_spare()

    def _prepare_spare(self):
        if self.keep_spare and self._spare is None and self.process is not None:
            self._spare = self._ask_for_process()

    def rest(self):
        """Stop the launcher when it keeps nothing warm: an idle runner then costs what it did
        before its first job. It starts again with the next job."""
        with self._lock:
            if not self.warm_types and not self._warm_up:
                self._stop()

    def close(self):
        with self._lock:
            self._stop()

    def _take_spare(self):
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            self._read_pid(spare)
            return spare
        except LauncherGone:
            self._stop()
        except LauncherUnavailable:  # it could not fork then: maybe it can now
            pass
        spare.release()
        return None

    def _fork(self):
        """A job process forked now. The launcher is started if need be, and again if it died;
        a fork that failed (the process limit reached, say) is tried again a second later."""
        for attempt in range(1, FORK_ATTEMPTS + 1):
            process = self._ask_for_process()
            try:
                self._read_pid(process)
                return process
            except (LauncherGone, LauncherUnavailable) as error:
                process.release()
                if isinstance(error, LauncherGone):
                    self._stop()
                elif attempt < FORK_ATTEMPTS:
                    time.sleep(FORK_RETRY_WAIT_S)
                if attempt == FORK_ATTEMPTS:
                    raise LauncherUnavailable("%d attempts in a row failed, the last: %s" % (attempt, error))

    def _ask_for_process(self):
        """Ask the launcher (started if needed) to fork a job process; it answers with its pid."""
        if self.process is None:
            self._start()
        process = JobProcess()
        warm_up, self._warm_up = self._warm_up, []
        try:
            _send_with_descriptors(self.control, {"warm_up": warm_up}, process.child_ends)
            self.warm_types.update(warm_up)
        except OSError:
            pass  # the launcher is gone: reading the answer says so
        finally:
            process.close_child_ends()
        return process

    def _read_pid(self, process):
        answer = self._read_answer()
        if "error" in answer:
            raise LauncherUnavailable("the launcher cannot fork: %s" % answer["error"])
        process.pid, process.temporary_dir, process.launcher = answer["pid"], answer["temporary_dir"], self.process

    def _read_answer(self):
        try:
            line = self._answers.readline()
        except OSError as error:  # socket.timeout included
            raise LauncherGone("no answer from the launcher: %s" % (str(error) or type(error).__name__))
        if not line:
            raise LauncherGone(self._ending())
        return json.loads(line.decode("utf-8"))

    def _ending(self):
        """How the launcher ended, once its socket has closed: it exits right after."""
        import subprocess

        try:
            return "the launcher exited with status %d" % self.process.wait(JOB_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            return "the launcher closed its socket"

    def start(self):
        """Start the launcher now, if it does not run: a runner does so before it takes a job,
        so that a launcher that cannot start stops it before any job is claimed."""
        with self._lock:
            if self.process is None:
                self._start()

    def _start(self):
        import subprocess

        runner_end, launcher_end = socket.socketpair()
        command = _launcher_command() + [LAUNCHER_COMMAND, str(launcher_end.fileno()), self.handler_specs]
        errors = tempfile.TemporaryFile()  # what it prints before its job processes take their own output
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                            pass_fds=(launcher_end.fileno(),), start_new_session=True,
                                            env=self.limits.environment(dict(os.environ, PYTHONUNBUFFERED="1")))
        except OSError as error:
            runner_end.close()
            errors.close()
            raise LauncherUnavailable("cannot start the job launcher %s: %s" % (sys.executable, error))
        finally:
            launcher_end.close()
        runner_end.settimeout(LAUNCHER_ANSWER_TIMEOUT_S)
        self.control, self._answers, self._errors = runner_end, runner_end.makefile("rb"), errors
        try:
            ready = self._read_answer()  # the launcher has imported the handler modules
        except LauncherGone as gone:
            said = self._said()
            self._stop()
            raise LauncherUnavailable("the job launcher did not start: %s" % gone, said)
        missing = sorted(set(JOB_HANDLERS) - set(ready["job_types"]))
        if missing:
            self._stop()
            raise LauncherUnavailable(
                "the job launcher, started as %s, does not register the job type%s %s: it starts the way "
                "this program was started (a script, python -m package or a console script) to register "
                "the same job types, so register them at the top level of that program or of a module it "
                "imports" % (" ".join("(an import of)" if part == IMPORT_AND_RUN else part for part in command[1:-3]),
                            "s" * (len(missing) > 1), ", ".join(missing)))

    def _said(self):
        """The last lines the launcher printed (a traceback, say), for the runner's log."""
        self._errors.seek(0, os.SEEK_END)
        self._errors.seek(max(0, self._errors.tell() - LAUNCHER_OUTPUT_KEPT))
        lines = self._errors.read().decode("utf-8", "replace").strip().splitlines()
        return "\n".join("    " + line for line in lines[-LAUNCHER_LINES_KEPT:])

    def _stop(self):
        """Close the launcher (it exits when its socket closes), and the spare with it."""
        if self._spare is not None:
            self._spare.release()
            self._spare = None
        if self.process is None:
            return
        try:
            self.control.shutdown(socket.SHUT_WR)  # the launcher's cue to exit
            self.process.wait(JOB_STOP_GRACE_S)
        except Exception:  # subprocess.TimeoutExpired: it hangs in an import; OSError: it is gone
            self.process.kill()
            self.process.wait()
        self._answers.close()
        self.control.close()
        self._errors.close()
        self.process = self.control = self._answers = self._errors = None
        self.warm_types = set()


def new_job_launcher(in_process, handler_specs, limits, warm=True, spare=True):
    """The JobLauncher for job processes; None to run jobs in threads: --in-process, or no fork (Windows)."""
    if in_process or not hasattr(os, "fork"):
        return None
    return JobLauncher(handler_specs, limits, warm, spare)


def remove_orphaned_job_dirs():
    """Remove the temporary directories of jobs whose runner died without cleaning up
    (kill -9): a figpack job's can hold megabytes. Returns how many were removed."""
    root, removed = tempfile.gettempdir(), 0
    for name in os.listdir(root):
        pid = name[len(JOB_TEMP_PREFIX):].split("-")[0]
        path = os.path.join(root, name)
        if name.startswith(JOB_TEMP_PREFIX) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += not os.path.exists(path)
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _interpreter_flags():
    """The flags of this interpreter that change what a job process imports or how it runs."""
    flags = sys.flags
    named = (("-I", flags.isolated), ("-E", flags.ignore_environment), ("-s", flags.no_user_site),
             ("-B", flags.dont_write_bytecode), ("-P", getattr(flags, "safe_path", False)))
    options = [flag for flag, is_set in named if is_set] + ["-O"] * flags.optimize
    options += ["-X", "dev"] * bool(flags.dev_mode) + ["-X", "utf8"] * bool(flags.utf8_mode)
    return options + ["-W" + option for option in sys.warnoptions]


def _entry_script():
    """The script that started this process, so that the launcher registers the same job
    types: runpack_runner.py itself, the `runpack` console script, or a vendoring script (or
    folder with a __main__.py) that registers its own types and then calls main()."""
    script = sys.argv[0] if sys.argv else ""
    return os.path.abspath(script) if os.path.exists(script) else os.path.abspath(__file__)


def _entry_module():
    """The module this process was started as with ``python -m`` (``mypkg`` for
    ``mypkg.__main__``), else None: a package that vendors this file is run that way again."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name == "__main__":  # a script, or a folder or zip file run as one
        return None
    return spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name


# Imports this file as the module runpack_runner, then runs main(): unlike running it as a
# script, an import uses (and writes, where Python may) its cached bytecode. Its first line is
# what `ps` shows after `python3 -c`.
IMPORT_AND_RUN = """\
# runpack-runner job launcher: imports runpack_runner.py, then runs main()
import importlib.util, sys
spec = importlib.util.spec_from_file_location("runpack_runner", sys.argv.pop(1))
module = sys.modules["runpack_runner"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main())
"""


def _launcher_command():
    """How to start the launcher so that it registers the job types this process has: started
    as this process was (``python -m package``, or the entry script), or, when that is this
    file, an import of it (the launcher then starts faster and 7 MB lighter, without compiling
    3,000 lines). A vendoring program's top-level code so runs once more, in the launcher."""
    python = [sys.executable] + _interpreter_flags()
    script, module = _entry_script(), _entry_module()
    if os.path.abspath(__file__) == script:
        return python + ["-c", IMPORT_AND_RUN, script]
    return python + (["-m", module] if module else [script])


def _send_with_descriptors(connection, message, descriptors):
    import array

    connection.sendmsg([(json.dumps(message) + "\n").encode("utf-8")],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", descriptors))])


def _receive_with_descriptors(connection, count):
    """(message, descriptors) from _send_with_descriptors; (None, []) once the runner is gone.
    A message is one short line and the runner sends the next only after the answer, so one
    recvmsg takes it whole."""
    import array

    descriptors = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(65536, socket.CMSG_SPACE(count * descriptors.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            descriptors.frombytes(payload[:len(payload) - len(payload) % descriptors.itemsize])
    for descriptor in descriptors:
        os.set_inheritable(descriptor, False)  # not for the programs a job runs
    return (json.loads(data.decode("utf-8")) if data else None), list(descriptors)


def _name_this_process(name):
    """Name the process in ps and top (Linux; elsewhere nothing happens)."""
    try:
        descriptor = os.open("/proc/self/comm", os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(descriptor, name.encode())
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _exit_code(wait_status):
    """os.waitstatus_to_exitcode, which Python 3.8 lacks."""
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def _cancel_job(signum, frame):
    raise JobCancelled("stopped by the runner")


def _ignore_signal(signum, frame):
    """SIGTERM/SIGINT for the whole group (systemd, Slurm, Ctrl-C) are for the runner, which
    finishes the job; a Python handler, unlike SIG_IGN, is not inherited by programs the job runs."""


# The launcher's own side: `runpack_runner.py _launcher <socket descriptor> <handler modules>`.

def serve_launcher(control_descriptor, handler_specs):
    """The launcher process: forks a job process per request until the runner closes the
    socket or dies. SIGTERM and SIGINT are for the runner, which stops the launcher itself."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore_signal)
    _name_this_process(LAUNCHER_PROCESS_NAME)
    control = socket.socket(fileno=int(control_descriptor))
    try:
        load_handler_modules(handler_specs)
    except ConfigurationError as error:
        print("Error: the job launcher: %s" % error, file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)  # for the jobs
    ForkServer(control).serve()
    return EXIT_OK


class ForkServer:
    """The launcher's loop: a fork per request; once a job process has ended, its exit
    status written to its channel and its temporary directory removed (off the runner's
    way). One thread runs Python here, so that forking is safe: no lock can be held by
    another (native thread pools that a warm import starts, like numpy's, handle a fork)."""

    def __init__(self, control):
        self.control = control
        self.temporary_root = "%s%d-" % (os.path.join(tempfile.gettempdir(), JOB_TEMP_PREFIX), os.getppid())
        self.jobs = {}  # pid of a job process -> (the launcher's copy of its channel, its temporary directory)
        self.wakeup_reader, self.wakeup_writer = os.pipe()

    def serve(self):
        os.set_blocking(self.wakeup_reader, False)
        os.set_blocking(self.wakeup_writer, False)
        signal.set_wakeup_fd(self.wakeup_writer)
        signal.signal(signal.SIGCHLD, _ignore_signal)  # a Python handler: SIGCHLD wakes select
        self._answer({"ready": True, "job_types": sorted(JOB_HANDLERS)})
        while True:
            ready, _, _ = select.select([self.control, self.wakeup_reader], [], [])
            if self.wakeup_reader in ready:
                while _read_nonblocking(self.wakeup_reader):
                    pass
                self._reap()
            if self.control in ready:
                request, descriptors = _receive_with_descriptors(self.control, 3)
                if request is None:  # the runner let go: its job processes end with it
                    for _, temporary_dir in self.jobs.values():
                        shutil.rmtree(temporary_dir, ignore_errors=True)
                    return
                self._fork(request, descriptors)

    def _answer(self, message):
        self.control.sendall((json.dumps(message) + "\n").encode("utf-8"))

    def _fork(self, request, descriptors):
        channel, output, go = descriptors
        for job_type in request["warm_up"]:
            self._warm_up(job_type)
        gc.freeze()  # the job process's collections then leave the launcher's objects, and their pages, alone
        temporary_dir = self.temporary_root + os.urandom(6).hex()  # made by the process once it has a job
        try:
            with warnings.catch_warnings():  # 3.12+ warns of a fork in a process that a warm import gave threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as error:
            for descriptor in descriptors:
                os.close(descriptor)
            self._answer({"error": str(error)})
            return
        if pid == 0:
            try:
                os.setpgid(0, 0)
                self._leave_launcher()
                serve_job_process(channel, output, go, temporary_dir)
            finally:
                os._exit(EXIT_FAILURE)
        try:
            os.setpgid(pid, pid)  # as the child does: the group is there before the runner can signal it
        except OSError:  # the child got there first, or has already ended
            pass
        os.close(output)
        os.close(go)
        self.jobs[pid] = (channel, temporary_dir)
        self._answer({"pid": pid, "temporary_dir": temporary_dir})

    def _warm_up(self, job_type):
        """Import the job type's warm_modules, so that its next jobs start with them; a module
        that fails to import is the job's to report."""
        for name in getattr(JOB_HANDLERS.get(job_type), "warm_modules", ()):
            try:
                importlib.import_module(name)
            except Exception:
                pass

    def _leave_launcher(self):
        """In a job process just forked: drop what is the launcher's."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.control.close()
        for descriptor in [self.wakeup_reader, self.wakeup_writer] + [job[0] for job in self.jobs.values()]:
            os.close(descriptor)

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.jobs:
                channel, temporary_dir = self.jobs.pop(pid)
                _tell_exit_status(channel, _exit_code(status))
                shutil.rmtree(temporary_dir, ignore_errors=True)


def _read_nonblocking(descriptor):
    try:
        return os.read(descriptor, 4096)
    except BlockingIOError:
        return b""


def _tell_exit_status(channel, returncode):
    """The last message on a job's channel; never blocks the launcher (the process that
    shared the pipe's blocking mode has ended)."""
    try:
        os.set_blocking(channel, False)
        os.write(channel, (json.dumps({"exit_status": returncode}) + "\n").encode("utf-8"))
    except OSError:  # the runner stopped listening
        pass
    finally:
        os.close(channel)


# The job process's own side, in the child of a fork.

class ParentPipe:
    """The job process's end of the pipe to the runner: one JSON message per line."""

    def __init__(self, descriptor):
        self._stream = os.fdopen(descriptor, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, message):
        with self._lock:
            self._stream.write(json.dumps(message) + "\n")
            self._stream.flush()

    def __call__(self, progress_current, progress_total, console_output):
        self.send({"progress_current": progress_current, "progress_total": progress_total,
                   "console_output": console_output})
        return True


def serve_job_process(channel, output, go, temporary_dir):
    """A job process, just forked: get ready, wait for the job on ``go``, make its temporary
    directory (unguessable, so private in a shared /tmp), run its handler, pass progress and
    the report on ``channel``, exit. JOB_STOP_SIGNAL (the runner stopping the job) raises
    JobCancelled in the handler, so that its ``finally`` blocks run; SIGKILL follows if it
    does not end."""
    _become_job_process(output)
    parent = ParentPipe(channel)
    progress = JobProgress(None)
    pump = HeartbeatPump(progress, parent, None, JOB_UPDATE_GAP_S, lambda: None)
    pump.start()
    threading.Thread(target=_end_with_the_runner, args=(go,), name="runner-line", daemon=True).start()
    spec = _read_job(go)
    _name_this_process(JOB_PROCESS_NAME)
    os.mkdir(temporary_dir, 0o700)
    os.environ["TMPDIR"] = temporary_dir
    tempfile.tempdir = None  # computed again from TMPDIR
    progress.heartbeat_interval = spec["heartbeat_interval"]
    limits = JobLimits.from_spec(spec["limits"])
    limits.apply(fail_job=lambda: _report_and_exit(
        parent, progress, error_report(limits.explain(None, spec["input_params"]), progress.console)))
    _report_and_exit(parent, progress, run_handler(JOB_HANDLERS[spec["job_type"]], spec["input_params"],
                                                   progress, limits))


JOB_PROCESS_ENDING = threading.Lock()  # held by the one thread that ends the job process, never released


def _report_and_exit(parent, progress, report):
    """The job process's end, from any of its threads: the report (None: the job was given up)
    after the job's last progress and output, then exit. Two threads at once (two workers of a
    pool denied together) would mix their reports on the pipe: the second waits for the exit."""
    JOB_PROCESS_ENDING.acquire()
    progress.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    if report is not None:
        parent.send({"report": report})
    os._exit(EXIT_OK)  # threads the handler left behind must not keep the process, and the job, alive


def _become_job_process(output):
    """What a fresh job process would have: its output to ``output``, no stdin, its signal
    handlers, and random numbers of its own."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(devnull)
    os.close(output)
    signal.signal(JOB_STOP_SIGNAL, _cancel_job)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore_signal)
    numpy_random = sys.modules.get("numpy.random")  # warm: seeded once in the launcher
    if numpy_random is not None:
        numpy_random.seed()


def _read_job(go):
    """The job, one JSON line on ``go``; the process ends if go closes first (a spare let go)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(go, 1 << 16)
        if not chunk:
            os._exit(EXIT_OK)
        data += chunk
    return json.loads(data.decode("utf-8"))


def _end_with_the_runner(go):
    """The runner keeps its end of ``go`` open while the job runs: once it closes, the runner
    is gone (kill -9 included) or has let the process go, and the process ends at once, with
    every process the job started. Polled for the hang-up alone, so that the job itself,
    arriving on go, does not wake this thread."""
    watch = select.poll()
    watch.register(go, select.POLLHUP)
    while not watch.poll():
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


# ---- Job isolation: where a job's handler runs, a thread or a job process ---------

STOPPED_BY_SIGNAL = "stopped by a second shutdown signal"


class JobExecution:
    """Runs one job's handler and watches for its end, a lost claim, the time limit and a
    second shutdown signal. ``run`` returns the report, or None when the job was stopped
    without one (its claim lost, or a second signal: ``progress.cancel_reason`` says which).
    Subclasses decide where the handler runs: a thread, or a process of its own."""

    def __init__(self, job_type, input_params, progress, waker):
        self.job_type, self.input_params, self.progress = job_type, input_params, progress
        self.waker = waker  # woken by the job's end, a lost claim and shutdown signals
        self.report = None
        self.done = False

    def run(self, timeout, shutdown=None):
        deadline = time.monotonic() + timeout if timeout else None
        try:
            self.start()
            while not self.done:
                if self.progress.cancelled:
                    self.stop()
                    return None
                if shutdown is not None and shutdown.immediate:
                    self.progress.cancel(STOPPED_BY_SIGNAL)
                    self.stop()
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return self._give_up("Job execution failed: timed out after %s" % describe_seconds(timeout))
                self.wait(remaining)
            return self.outcome()
        finally:
            self.cleanup()

    def _give_up(self, message):
        self.progress.cancel(message)
        self.stop()
        return error_report(message, self.progress.console)

    def _finished(self):
        self.done = True
        self.waker.wake()

    def start(self):
        raise NotImplementedError

    def wait(self, timeout):
        self.waker.wait(timeout)

    def stop(self):
        """End the handler early (the thread flavour can only ask it to, through JobCancelled)."""

    def outcome(self):
        return self.report

    def cleanup(self):
        pass


class ThreadJobExecution(JobExecution):
    """The handler runs in a thread of the runner (``--in-process``): cheap, but a handler
    that crashes the interpreter or never returns takes the runner with it."""

    def start(self):
        threading.Thread(target=self._call_handler, name="job", daemon=True).start()

    def _call_handler(self):
        try:
            self.report = run_handler(JOB_HANDLERS[self.job_type], self.input_params, self.progress)
        finally:
            self._finished()


class ProcessJobExecution(JobExecution):
    """The handler runs in a job process of its own (see JobLauncher), in its own process
    group, with its own temporary directory: a crash, an OOM kill, a hang or a leak costs
    only this job, and stopping the job kills the whole group. The process passes progress
    and its report as JSON lines on a pipe, and the launcher how it ended; whatever it prints
    lands in the job's console. The thread that runs the job reads both pipes as it waits."""

    CHECK_S = 0.5  # how often a silent job process is looked at (its launcher may have died)

    def __init__(self, job_type, input_params, progress, waker, launcher):
        super().__init__(job_type, input_params, progress, waker)
        self.launcher = launcher
        self.process = None  # a JobProcess
        self.returncode = None  # as subprocess gives it: -N for a signal; None while unknown
        self.ended_at = None  # when the process was known to have ended
        self._pipes, self._pending = [], b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def start(self):
        spec = {"job_type": self.job_type, "input_params": self.input_params,
                "heartbeat_interval": self.progress.heartbeat_interval}
        self.process = self.launcher.start_job(self.job_type, spec)
        self._pipes = [self.process.channel, self.process.output]

    def wait(self, timeout):
        """Wait for a wake-up or what the process sends, ``timeout`` seconds at most, and pass
        that on. The job is done once its report is in, or once the process has ended and
        its pipes are closed (or a second later: a process the job started may hold them)."""
        timeout = self.CHECK_S if timeout is None else max(0.0, min(timeout, self.CHECK_S))
        ready, _, _ = select.select([self.waker] + self._pipes, [], [], timeout)
        for source in ready:
            if source is self.waker:
                self.waker.drain()
            else:
                self._read(source)
        if self.report is not None:
            self._read_output_left()
            self.done = True  # the process is done: its exit status adds nothing, cleanup ends it
            return
        if self.ended_at is None and (self.returncode is not None or self.process.lost_for_good()):
            self.ended_at = time.monotonic()
        self.done = not self._pipes or self.ended_at is not None and time.monotonic() - self.ended_at > 1.0

    def _read(self, pipe):
        chunk = os.read(pipe, 65536)
        if not chunk:
            self._pipes.remove(pipe)
        elif pipe == self.process.output:
            self.progress.add_process_output(self._decoder.decode(chunk))
        else:
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            for line in lines:
                self._receive(json.loads(line.decode("utf-8")))

    def _read_output_left(self):
        """What the process printed before it sent its report is in the pipe by now."""
        output = self.process.output
        while output in self._pipes and select.select([output], [], [], 0)[0]:
            self._read(output)

    def _receive(self, message):
        if "exit_status" in message:  # from the launcher, once the process has ended
            self.returncode = message["exit_status"]
        elif "report" in message:
            self.report = message["report"]
        else:
            self.progress.update(message["progress_current"], message["progress_total"],
                                 message["console_output"])

    def stop(self):
        if self.process is None or self.done:
            return
        _signal_group(self.process.pid, JOB_STOP_SIGNAL)
        if not self._wait_for_end(JOB_STOP_GRACE_S):
            _signal_group(self.process.pid, signal.SIGKILL)
            self._wait_for_end(JOB_STOP_GRACE_S)

    def _wait_for_end(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.done and self.ended_at is None:
            if time.monotonic() >= deadline:
                return False
            self.wait(deadline - time.monotonic())
        return True

    def outcome(self):
        if self.report is not None:
            body = self.report["body"]
            body["console_output"] = merge_console(body["console_output"], self.progress.process_output)
            return self.report
        ending = ("ended before reporting a result; how is unknown, its launcher had stopped"
                  if self.returncode is None else describe_exit(self.returncode))
        memory_limit = self.launcher.limits.memory_limit
        if memory_limit and self.returncode in CRASH_CODES:  # a library that does not check its allocations
            ending += "; it may have run out of its memory limit of %s (--job-memory-limit)" % describe_size(
                memory_limit)
        return error_report("Job execution failed: the job process %s" % ending, self.progress.console)

    def cleanup(self):
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)  # whatever the job left running
            self.process.release()
            self.launcher.job_ended()


def make_execution(launcher, job_type, input_params, progress, waker):
    """A ProcessJobExecution through ``launcher``, or a ThreadJobExecution when it is None."""
    if launcher is None:
        return ThreadJobExecution(job_type, input_params, progress, waker)
    return ProcessJobExecution(job_type, input_params, progress, waker, launcher)


def _signal_group(pid, signum):
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


CRASH_CODES = tuple(-getattr(signal, name) for name in ("SIGSEGV", "SIGABRT", "SIGBUS") if hasattr(signal, name))


def describe_exit(returncode):
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return "was killed by signal %s%s" % (name, hint)
    return "exited with code %s before reporting a result" % returncode


# ---- The job slot: one claimed job, from custody record to accepted report ------

HARD_STOP_REPORT_TIMEOUT_S = 5.0  # after a second signal, the last report may not hold up the exit
MAX_RUN_ATTEMPTS = 2  # a job whose runner process ended during its run is run once more, then failed


class ReportCourier:
    """Delivers a custody record's report until the worker accepts it or refuses it for
    good, then removes the record. A stopping runner (``runner_stopping()``) keeps trying
    for twice --retry-max, then leaves the record on disk for the next start to deliver."""

    def __init__(self, client, state, shutdown, retry_max, runner_stopping, metrics):
        self.client, self.state, self.shutdown = client, state, shutdown
        self.retry_max, self._runner_stopping = retry_max, runner_stopping
        self.metrics = metrics  # told how each job ended

    def deliver(self, record, waker):
        job_id = record["job_id"]
        retrying = Retrying(self.retry_max, lambda seconds: wait_until(waker, seconds, self._stopping_now),
                            self._give_up_when_stopping())
        while True:
            report = record["report"]
            try:
                accepted = retrying.call(lambda: self._send(record),
                                         "Delivering the report of job %s failed" % job_id)
                break
            except GaveUp as gave_up:
                LOG.warning("Could not deliver the report of job %s (%s); it stays in %s", job_id,
                            gave_up.error, self.state.jobs_path)
                return
            except WorkerKeyRejected:
                raise
            except WorkerRejected as error:
                fallback = fallback_report(report, error)
                if fallback is None:
                    LOG.error("The worker refused the report of job %s: %s", job_id, error)
                    accepted = None
                    break
                LOG.warning("The worker refused the report of job %s (%s); reporting it failed", job_id, error)
                record["report"] = self.client.seal_report(fallback)
                self.state.save_job(record)
        self.state.forget_job(job_id)
        self._log_outcome(record, accepted)
        self.metrics.job_ended(record["job_type"], report_outcome(record["report"], accepted),
                               record.get("duration"))

    def _send(self, record):
        timeout = HARD_STOP_REPORT_TIMEOUT_S if self.shutdown.immediate else None
        return self.client.report(record["job_id"], record["report"], runner_id=record["runner_id"],
                                  timeout=timeout)

    def _stopping_now(self):
        return self.shutdown.immediate

    def _give_up_when_stopping(self):
        """Retrying's give_up for one delivery: never while the runner goes on; once it
        stops, after twice --retry-max, or at once on a second signal."""
        give_up_at = None

        def give_up(delay):
            nonlocal give_up_at
            if not self._runner_stopping():
                return False
            give_up_at = give_up_at or time.monotonic() + 2 * self.retry_max
            return self.shutdown.immediate or time.monotonic() + delay > give_up_at
        return give_up

    @staticmethod
    def _log_outcome(record, accepted):
        job_id, report = record["job_id"], record["report"]
        if accepted is False:
            LOG.warning("Job %s was no longer claimed by this runner when its report arrived; "
                        "report discarded", job_id)
        elif accepted and report["kind"] == "complete":
            LOG.info("Job %s completed in %s", job_id, describe_seconds(record.get("duration", 0.0)))
        elif accepted:
            LOG.warning("Job %s failed: %s", job_id, report["body"]["error_message"].splitlines()[0])


def report_outcome(report, accepted):
    """How a job whose report was delivered ended, for --listen's runpack_jobs_total: completed,
    failed, invalid (its parameters), timed_out, discarded (no longer ours) or refused."""
    if accepted is False:
        return "discarded"
    if accepted is None:
        return "refused"
    if report["kind"] == "complete":
        return "completed"
    message = report["body"]["error_message"]
    if message.startswith("Invalid parameters"):
        return "invalid"
    return "timed_out" if message.startswith("Job execution failed: timed out after") else "failed"


class JobSlot(threading.Thread):
    """The work horse: runs one claimed job in its own thread — the job itself (in a job
    process), its heartbeats, the report kept in the custody record, its delivery — while
    the runner's loop goes on. ``on_exit(slot)`` is called last, from this thread."""

    def __init__(self, record, settings, client, state, shutdown, courier, launcher, on_exit):
        super().__init__(name="job-slot", daemon=True)
        self.record, self.settings, self.client, self.state = record, settings, client, state
        self.launcher = launcher  # a JobLauncher, or None: --in-process
        self.shutdown, self.courier, self._on_exit = shutdown, courier, on_exit
        self.fatal = None  # a WorkerKeyRejected that must stop the runner
        self.cannot_start = None  # a LauncherUnavailable: the runner stops, the job waits for its next start
        self.outcome = None  # how the job ended without a report: claim_lost, or interrupted
        self.waker = Waker()

    @property
    def job_id(self):
        return self.record["job_id"]

    def run(self):
        self.shutdown.wakers.add(self.waker)
        try:
            self._run_job()
        except WorkerKeyRejected as error:
            self.fatal = error
        except LauncherUnavailable as error:
            self.cannot_start = error
        except Exception:
            LOG.exception("Unexpected error with job %s; its record stays in %s", self.job_id,
                          self.state.jobs_path)
        finally:
            self.shutdown.wakers.discard(self.waker)
            self.waker.close()
            self._on_exit(self)

    def _run_job(self):
        record = self.record
        if self.shutdown.immediate:  # the job has not started: the next start runs it
            LOG.warning("Job %s was claimed as the runner was stopped; it runs when the runner "
                        "starts again with the state directory %s", self.job_id, self.state.path)
            return
        record["attempts"] = record.get("attempts", 0) + 1
        record["started_at"] = time.time()
        self.state.save_job(record)
        progress = JobProgress(self.settings.heartbeat_interval)
        try:
            report = self._execute(progress)
        except LauncherUnavailable:
            record["attempts"] -= 1  # it never started
            self.state.save_job(record)
            raise
        if report is None and progress.cancel_reason == CLAIM_LOST_MESSAGE:
            LOG.warning("Job %s: %s; stopped it and discarded its result", self.job_id, CLAIM_LOST_MESSAGE)
            self.state.forget_job(self.job_id)
            self.outcome = "claim_lost"
            return
        if report is None and progress.cancel_reason == STOPPED_BY_SIGNAL:
            LOG.warning("Job %s: %s; it stays claimed, and %s when the runner starts again with the "
                        "state directory %s", self.job_id, STOPPED_BY_SIGNAL,
                        "runs again" if record["attempts"] < MAX_RUN_ATTEMPTS else
                        "fails (interrupted %d times)" % record["attempts"], self.state.path)
            self.outcome = "interrupted"
            return
        if report is None:
            report = error_report("Job execution failed: the handler ended without a result", progress.console)
        if "traceback" in report:
            LOG.error("Job %s: the handler raised an exception:\n%s", self.job_id, report["traceback"])
        record["report"] = self.client.seal_report(report)
        record["duration"] = max(0.0, time.time() - record["started_at"])  # the clock may have been set back
        self.state.save_job(record)
        self.courier.deliver(record, self.waker)

    def _execute(self, progress):
        """Run the job with its heartbeats; the report, or None once the job is not ours.
        The worker's 120 heartbeats a minute are per runner, shared by all its slots:
        hence each slot's minimum gap grows with --concurrency."""
        execution = make_execution(self.launcher, self.record["job_type"], self.record["input_params"],
                                   progress, self.waker)
        send = WorkerHeartbeats(self.client, self.record)
        heartbeats = HeartbeatPump(progress, send, self.settings.heartbeat_interval,
                                   HEARTBEAT_MIN_GAP_S * self.settings.concurrency, self.waker.wake)
        heartbeats.start()
        try:
            report = execution.run(self.settings.job_timeout, self.shutdown)
        finally:
            progress.finish()
        if not self.shutdown.immediate:
            heartbeats.stop(self.settings.request_timeout)  # no heartbeat may follow the report
        if report is not None and report["kind"] == "complete":
            send.finish_progress(progress)
        return report


# ---- The runner's policies: fleets, poll pacing, batch limits, idle log -----------

class BatchLimits:
    """When a batch runner's work is over: --once/--max-jobs, --max-uptime, --idle-timeout."""

    def __init__(self, settings):
        self.max_jobs = 1 if settings.once else settings.max_jobs
        self.max_uptime, self.idle_timeout = settings.max_uptime, settings.idle_timeout
        self.jobs_started = 0
        self.started_at = self.last_busy = time.monotonic()

    def job_started(self):
        self.jobs_started += 1
        self.busy()

    def busy(self):
        self.last_busy = time.monotonic()

    def reached(self, idle):
        """(exit code, why) of the first limit reached, or None; --idle-timeout counts only
        when ``idle`` (no job running)."""
        now = time.monotonic()
        if self.max_jobs and self.jobs_started >= self.max_jobs:
            return EXIT_JOBS_DONE, "ran %d job(s), as --once/--max-jobs asked" % self.jobs_started
        if self.max_uptime and now - self.started_at >= self.max_uptime:
            return EXIT_MAX_UPTIME, "--max-uptime %s reached; taking no new job" % describe_seconds(self.max_uptime)
        if idle and self.idle_timeout and now - self.last_busy >= self.idle_timeout:
            return EXIT_IDLE, "no job for %s (--idle-timeout)" % describe_seconds(self.idle_timeout)
        return None

    def seconds_left(self, idle):
        """Seconds until --max-uptime (or, when ``idle``, --idle-timeout) comes due; None if never."""
        now, left = time.monotonic(), []
        if self.max_uptime:
            left.append(self.started_at + self.max_uptime - now)
        if idle and self.idle_timeout:
            left.append(self.last_busy + self.idle_timeout - now)
        return max(0.0, min(left)) if left else None


START_JITTER_MAX_S = 1.0  # a fleet started at once (a Slurm array) does not knock in step


class ClaimSpreading:
    """Which job of a polled list a runner claims next, so that a fleet given the same
    oldest-first list does not race for the same jobs.

    Jobs fall into ``lanes`` by a hash of their id that every runner computes alike; a
    runner claims the oldest untried job of its own lane, drawn at random. A lone runner has
    one lane and claims strictly oldest first. As in Ethernet's back-off, each lost claim
    (409: another runner won the job) doubles the lanes and draws a new one, and each list
    used without one halves them: runners that collide soon hold lanes of their own and
    take disjoint jobs from the same list.
    """

    MAX_LANES = 16

    def __init__(self):
        self.lanes, self.lane = 1, 0
        self._lost_since_poll = False

    def new_list(self):
        if not self._lost_since_poll and self.lanes > 1:
            self._draw(self.lanes // 2)
        self._lost_since_poll = False

    def lost_claim(self):
        self._draw(min(self.MAX_LANES, 2 * self.lanes))
        self._lost_since_poll = True

    def _draw(self, lanes):
        self.lanes, self.lane = lanes, random.randrange(lanes)

    def take_next(self, untried):
        """Remove the oldest job of this runner's lane from the list ``untried`` and return
        it; None when the lane has none left."""
        for index, job in enumerate(untried):
            if zlib.crc32(job["job_id"].encode("utf-8")) % self.lanes == self.lane:
                return untried.pop(index)
        return None

    @staticmethod
    def take_any(untried):
        return untried.pop(random.randrange(len(untried)))


class NoticeSpread:
    """How long a runner woken by a new-job notice waits, at random, before it polls: one
    notice wakes a whole fleet at once. As with the lanes, a claim lost after a notice
    doubles the longest wait (up to 1 s) and a claim won after one halves it (down to 50 ms),
    so that a fleet's runners soon wake one after another and the first one takes the job
    unopposed; a lone runner keeps the short wait."""

    SHORTEST_S, LONGEST_S = 0.05, 1.0

    def __init__(self):
        self.longest = self.SHORTEST_S

    def delay(self):
        return random.uniform(0, self.longest)

    def lost_claim(self):
        self.longest = min(self.LONGEST_S, 2 * self.longest)

    def won_claim(self):
        self.longest = max(self.SHORTEST_S, self.longest / 2)


class NewJobNotices:
    """Push wake-ups: the NotifyRelay subscription, and what a notice of a new job changes in
    the loop: the runner looks again at once instead of at its next poll, after a random wait
    (NoticeSpread) that the claims won and lost after notices adapt to the fleet."""

    def __init__(self, relay, waker):
        self.relay, self.waker = relay, waker  # a RelayClient, or None
        self.spread = NoticeSpread()
        self.subscriber = None  # the RelaySubscriber, once subscribed
        self.job_types = ()
        self.waiting = False  # a notice came since the last poll
        self.answering = False  # this round's poll answers a notice

    def subscribe(self, runner_id, runner_name, job_types):
        self.job_types = job_types
        if self.relay is None:
            return
        self.relay.subscriber_id = self.relay.subscriber_id or "runpack-runner-" + runner_id
        self.relay.subscriber_name = runner_name or self.relay.subscriber_id
        self.subscriber = RelaySubscriber(self.relay, self.notice)
        self.subscriber.start()

    def notice(self, job_type):
        """A notice of a new job (from any thread): look again at once. Notices that come
        while a round is under way just mark it."""
        if job_type in self.job_types:
            self.waiting = True
            self.waker.wake()

    def delay(self):
        """The random wait before the poll that answers the notices so far."""
        self.answering = True
        return self.spread.delay()

    def polled(self):
        self.waiting = False  # this poll answers every notice so far

    def round_ended(self):
        self.answering = False

    def claim_lost(self):
        if self.answering:
            self.spread.lost_claim()

    def claim_won(self):
        if self.answering:
            self.spread.won_claim()


class PollPacer:
    """Keeps a runner's polls under the worker's limit of 120 a minute per runner, whatever
    asks for them (the schedule, a stale list, notifications): at most POLLS_PER_MINUTE in
    any 60 s (10 fewer than the limit, for the worker's clock and the network's delays), and
    MIN_POLL_GAP_S apart."""

    POLLS_PER_MINUTE = 110
    MIN_POLL_GAP_S = 0.1

    def __init__(self):
        self._times = collections.deque()

    def polled(self):
        self._times.append(time.monotonic())

    def wait_before_poll(self):
        """Seconds to wait before the next poll; 0 when it may go now."""
        now = time.monotonic()
        while self._times and self._times[0] <= now - RATE_LIMIT_WINDOW_S:
            self._times.popleft()
        waits = [0.0]
        if self._times:
            waits.append(self._times[-1] + self.MIN_POLL_GAP_S - now)
        if len(self._times) >= self.POLLS_PER_MINUTE:
            waits.append(self._times[0] + RATE_LIMIT_WINDOW_S - now)
        return max(waits)


class PollWaits:
    """An idle runner's waits between empty polls: --poll-interval after a job (and at the
    start), then --poll-interval-step longer after each empty poll, up to --poll-interval-max.
    A --poll-interval above the max is the first wait only: the waits after it are the max."""

    def __init__(self, settings):
        self.first, self.step, self.most = (settings.poll_interval, settings.poll_interval_step,
                                            settings.poll_interval_max)
        self.longest = max(self.first, self.most)
        self._next = self.first

    def restart(self):
        """A job came: the next empty poll waits the first wait again."""
        self._next = self.first

    def take(self):
        """The wait after this empty poll; the one after the next is longer, up to the max."""
        wait, self._next = self._next, min(self._next + self.step, self.most)
        return wait

    def describe(self):
        """The waits from the first on, as the idle runner's first line gives them."""
        if self.first > self.most:
            return "again in %s, then every %s" % (describe_seconds(self.first), describe_seconds(self.most))
        if self.first == self.most or not self.step:
            return "every %s" % describe_seconds(self.first)
        return "every %s or more" % describe_seconds(self.first)


class IdleLog:
    """What an idle runner says: one line when it goes idle, then a summary every ten
    minutes; each empty poll only at DEBUG (--verbose)."""

    SUMMARY_INTERVAL_S = 600.0

    def __init__(self, poll_waits):
        self.poll_waits = poll_waits
        self._idle = False
        self._polls, self._counting_since = 0, None

    def busy(self):
        self._idle = False

    def empty_poll(self, next_wait):
        LOG.debug("No jobs available; next poll in %s", describe_seconds(next_wait))
        now = time.monotonic()
        if not self._idle:
            self._idle, self._polls, self._counting_since = True, 0, now
            LOG.info("No jobs available; polling %s until one comes", self.poll_waits.describe())
        self._polls += 1
        if now - self._counting_since >= self.SUMMARY_INTERVAL_S:
            LOG.info("Still no jobs: %d polls in the last %.0f minutes", self._polls,
                     (now - self._counting_since) / 60)
            self._polls, self._counting_since = 0, now


# ---- Metrics and health for long-running runners (--listen) -------------------------
#
# With --listen, a daemon thread serves GET /metrics in the Prometheus text format and GET
# /healthz (200 while the runner works, 503 with the reason once it does not), as GitLab
# Runner's --listen-address and Buildkite's health check do. Off by default: nothing of it
# is started, and http.server is not imported, unless asked for.

JOB_DURATION_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600)
# /healthz fails once the worker has not answered for this many times the longest a working
# runner goes between answers (its longest poll wait, plus a retry wait and a request timeout).
HEALTH_SILENCE_FACTOR = 2


RELAY_STATES = ("connecting", "listening", "retrying", "key rejected")  # see RelaySubscriber.state
# What the runner is at when scraped: its slots, the reports on disk, its relay subscription ("" when
# none), why it stops ("" while it does not), and whether it stops its jobs now (a second signal)
# rather than finishing them.
RunnerStatus = collections.namedtuple("RunnerStatus", "slots slots_busy reports_pending relay_state relay_notices "
                                                      "stopping stopping_now")


class JobDurations:
    """One job type's histogram of job durations: a count per bucket bound, the count, the sum."""

    def __init__(self):
        self.buckets = [0] * len(JOB_DURATION_BUCKETS_S)
        self.count, self.sum = 0, 0.0

    def observe(self, seconds):
        for index, bound in enumerate(JOB_DURATION_BUCKETS_S):
            self.buckets[index] += seconds <= bound
        self.count += 1
        self.sum += seconds

    def samples(self, job_type):
        bounds = ["%g" % bound for bound in JOB_DURATION_BUCKETS_S] + ["+Inf"]
        return ([("_bucket", {"job_type": job_type, "le": le}, count)
                 for le, count in zip(bounds, self.buckets + [self.count])]
                + [("_sum", {"job_type": job_type}, self.sum), ("_count", {"job_type": job_type}, self.count)])


class RunnerMetrics:
    """What a runner counts for --listen: jobs by type and outcome and their durations, claims
    lost to other runners, and every request to the worker by endpoint and answer. Slot
    threads, the loop and the server share it: every change is made under its lock."""

    def __init__(self):
        self.started = time.monotonic()
        self.jobs = collections.Counter()  # (job type, outcome) -> jobs
        self.durations = collections.defaultdict(JobDurations)  # job type -> its histogram
        self.requests = collections.Counter()  # (endpoint, status, or "unreachable") -> requests
        self.claims_lost = 0
        self.last_answer = None  # time.monotonic() of the last answer that showed a working worker
        self._lock = threading.Lock()

    def worker_answered(self, endpoint, status, working):
        """Every request counts by its status; only an answer that shows a working worker
        (see WorkerClient.on_answer) counts for /healthz."""
        with self._lock:
            self.requests[endpoint, "unreachable" if status is None else str(status)] += 1
            if working:
                self.last_answer = time.monotonic()

    def job_ended(self, job_type, outcome, seconds=None):
        with self._lock:
            self.jobs[job_type, outcome] += 1
            if seconds is not None:
                self.durations[job_type].observe(seconds)

    def claim_lost(self):
        with self._lock:
            self.claims_lost += 1

    def families(self, status):
        """Every metric family, the gauges from ``status`` (a RunnerStatus): a list of
        (name, type, help, [(sample name suffix, labels, value)])."""
        with self._lock:
            jobs, requests = sorted(self.jobs.items()), sorted(self.requests.items())
            durations = [samples for job_type, histogram in sorted(self.durations.items())
                         for samples in histogram.samples(job_type)]
            claims_lost = self.claims_lost
        relay = [("", {"state": state}, int(state == status.relay_state)) for state in RELAY_STATES]
        return [
            ("runpack_build_info", "gauge", "The runner's version and Python.",
             [("", {"version": __version__, "python": sys.version.split()[0]}, 1)]),
            ("runpack_uptime_seconds", "gauge", "Seconds since the runner started.",
             [("", {}, time.monotonic() - self.started)]),
            ("runpack_jobs_total", "counter", "Jobs this runner ended, by job type and outcome.",
             [("", {"job_type": job_type, "outcome": outcome}, count) for (job_type, outcome), count in jobs]),
            ("runpack_job_duration_seconds", "histogram", "How long the jobs of each type ran.", durations),
            ("runpack_slots", "gauge", "Jobs this runner runs at once (--concurrency).", [("", {}, status.slots)]),
            ("runpack_slots_busy", "gauge", "Jobs running now.", [("", {}, status.slots_busy)]),
            ("runpack_claims_lost_total", "counter", "Claims that another runner won.", [("", {}, claims_lost)]),
            ("runpack_worker_requests_total", "counter",
             "Requests to the worker, by endpoint and HTTP status (unreachable: no answer).",
             [("", {"endpoint": endpoint, "status": code}, count) for (endpoint, code), count in requests]),
            ("runpack_worker_last_answer_seconds", "gauge",
             "Seconds since the worker last answered as a working Runpack worker.",
             [("", {}, time.monotonic() - self.last_answer)] if self.last_answer is not None else []),
            ("runpack_reports_pending", "gauge", "Reports kept in the state directory, not yet accepted.",
             [("", {}, status.reports_pending)]),
            ("runpack_relay_state", "gauge", "The NotifyRelay subscription's state (1: the current one).",
             relay if status.relay_state else []),
            ("runpack_relay_notices_total", "counter", "New-job notices from NotifyRelay.",
             [("", {}, status.relay_notices)] if status.relay_state else []),
        ]


def prometheus_text(families):
    """The Prometheus text exposition format (0.0.4) of ``families`` (RunnerMetrics.families)."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
        for suffix, labels, value in samples:
            text = ",".join('%s="%s"' % (key, _label_value(labels[key])) for key in labels)
            lines.append("%s%s%s %s" % (name, suffix, "{%s}" % text if text else "", _sample_value(value)))
    return "\n".join(lines) + "\n"


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


def _host_and_port(address):
    host, port = address[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class RunnerHealth:
    """/healthz: healthy while the worker answers as a working Runpack worker (its JSON, a 429
    too) or the runner retries within its policy; not once no such answer has come for longer
    than a working runner ever goes without one (HEALTH_SILENCE_FACTOR). A proxy's error page or
    a 5xx is no such answer: it says nothing of the worker. A runner that stops gracefully stays
    healthy while it finishes its jobs (a liveness probe must not kill them), not after."""

    def __init__(self, metrics, settings, longest_poll_wait):
        self.metrics = metrics
        longest_gap = max(longest_poll_wait, settings.heartbeat_interval)  # a busy runner only beats
        self.silence_limit = HEALTH_SILENCE_FACTOR * (longest_gap + settings.retry_max + settings.request_timeout)

    def check(self, status):
        """(HTTP status, one line)."""
        if status.stopping and (status.stopping_now or not status.slots_busy):
            return 503, "stopping: %s" % status.stopping
        last = self.metrics.last_answer
        silent = time.monotonic() - (self.metrics.started if last is None else last)
        if silent > self.silence_limit:
            return 503, ("the worker has not answered as a Runpack worker for %s (more than %s); see the "
                         "runner's log" % (describe_seconds(silent), describe_seconds(self.silence_limit)))
        if status.stopping:
            return 200, "stopping: finishing %d job%s (%s)" % (
                status.slots_busy, "s" * (status.slots_busy != 1), status.stopping)
        if last is None:
            return 200, "ok: starting, the worker has not answered yet"
        return 200, "ok: the worker answered %s ago" % describe_seconds(silent)


PROMETHEUS_TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PLAIN_TEXT_TYPE = "text/plain; charset=utf-8"


class StatusServer:
    """--listen: /metrics and /healthz (GET or HEAD) on a stdlib HTTP server in a daemon thread.
    ``status()`` gives the runner's RunnerStatus at each request."""

    def __init__(self, address, metrics, health, status):
        import http.server

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self, send_body=True):
                code, body, kind = server.answer(self.path.split("?")[0])
                data = body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def do_HEAD(self):  # what a probe or `curl -I` may ask: the GET's answer without its body
                self.do_GET(send_body=False)

            def log_message(self, format, *args):  # a scrape every few seconds is no news
                pass

        self.metrics, self.health, self.status = metrics, health, status
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        server_class = type("StatusHTTPServer", (http.server.ThreadingHTTPServer,),
                            {"address_family": family, "daemon_threads": True})
        try:
            self.httpd = server_class(address, Handler)
        except OSError as error:
            raise ConfigurationError("cannot listen on %s (--listen): %s" % (
                _host_and_port(address), error.strerror or error))
        self.address = self.httpd.server_address[:2]

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, name="status-server", daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path):
        """(HTTP status, body, content type) for a GET of ``path`` (a HEAD sends all but the body)."""
        if path == "/metrics":
            return 200, prometheus_text(self.metrics.families(self.status())), PROMETHEUS_TEXT_TYPE
        if path == "/healthz":
            code, line = self.health.check(self.status())
            return code, line + "\n", PLAIN_TEXT_TYPE
        return 404, "not found: try /metrics or /healthz\n", PLAIN_TEXT_TYPE


# ---- The runner loop: identity, poll, claim, signals -------------------------------

class RunnerIdentity:
    """Who the runner is at the worker. At the start, the identity saved in the state directory
    is verified, or one registered when there is none or the worker has forgotten it; a worker
    that forgets the runner later gets it registered again, under the same name."""

    def __init__(self, client, state, retrying):
        self.client, self.state, self.retrying = client, state, retrying
        self.job_types = ()  # the capabilities it registers with
        self.reached_worker = False  # registered or verified: a batch limit before that is a failure

    @property
    def name(self):
        return (self.state.load_identity() or {}).get("runner_name")

    def establish(self, job_types):
        self.job_types = job_types
        identity = self.state.load_identity()
        if identity is None:
            self._register(new_runner_name())
        elif self.retrying.call(lambda: self.client.verify(identity["runner_id"]),
                                "Cannot verify the runner yet"):
            self.client.runner_id = identity["runner_id"]
            LOG.info("Verified runner %s (id %s)", identity["runner_name"], identity["runner_id"])
        else:
            LOG.warning("The worker no longer knows runner %s (id %s); registering again under "
                        "the same name", identity["runner_name"], identity["runner_id"])
            self._register(identity["runner_name"])
        self.reached_worker = True

    def register_again_if_forgotten(self):
        if not self.client.verify(self.client.runner_id):
            LOG.warning("The worker no longer knows this runner; registering again")
            self._register(self.name or new_runner_name())

    def _register(self, name):
        runner_id = self.retrying.call(lambda: self.client.register(name, self.job_types),
                                       "Cannot register with the worker yet")
        self.client.runner_id = runner_id
        self.state.save_identity(runner_id, name)
        LOG.info("Registered as %s (id %s)", name, runner_id)


class LeftCustodyRecords:
    """The custody records left by an earlier process or an unanswered claim, settled before
    each poll: spooled reports are delivered first, then interrupted jobs are resumed (given
    to ``start_slot``) or, after MAX_RUN_ATTEMPTS, failed."""

    def __init__(self, client, state, courier, waker, start_slot):
        self.client, self.state, self.courier, self.waker = client, state, courier, waker
        self._start_slot = start_slot

    def settle(self, running, job_types, may_go_on):
        """``running``: the ids of the jobs in slots, taken before the records are read (a slot
        forgets its record before it leaves); ``may_go_on()``: false once the runner can take
        no more (a shutdown, no free slot)."""
        records = [record for record in self.state.job_records() if record["job_id"] not in running]
        for record in sorted(records, key=lambda record: record.get("report") is None):
            if not may_go_on():
                return
            if record.get("report"):
                LOG.info("Delivering the spooled report of job %s", record["job_id"])
                self.courier.deliver(record, self.waker)
            else:
                self._resume(record, job_types)

    def _resume(self, record, job_types):
        """A record without report: the process ended during the job, or a claim went unanswered.
        A heartbeat tells whether the job is still ours; if so it is run again, once."""
        job_id, attempts = record["job_id"], record.get("attempts", 0)
        if not self.client.heartbeat(job_id, None, None, "", runner_id=record["runner_id"]):
            LOG.info("Job %s is not claimed by this runner; dropping its record", job_id)
            self.state.forget_job(job_id)
            return
        reason = "this runner no longer serves job type %s" % record["job_type"]
        if record["job_type"] in job_types:
            if attempts < MAX_RUN_ATTEMPTS:
                if attempts:
                    LOG.warning("The runner stopped while running job %s; running it again", job_id)
                self._start_slot(record)
                return
            reason = "the runner process ended while running this job, %d times" % attempts
        LOG.error("Job %s cannot be run again: %s", job_id, reason)
        record["report"] = self.client.seal_report(error_report("Job execution failed: %s" % reason, ""))
        self.state.save_job(record)
        self.courier.deliver(record, self.waker)


class Runner:
    """Registers, polls with backoff and claims down the polled list, giving each claimed
    job to a JobSlot, up to --concurrency at once; applies the batch limits and signals.

    Every claimed job has a custody record in the state directory from before the claim
    until the worker accepted its report, so no crash, restart or network outage can
    leave a job claimed with nobody to finish it.
    """

    def __init__(self, settings, client, state, relay=None):
        self.settings, self.client, self.state = settings, client, state
        self.waker = Waker()
        self.shutdown = ShutdownRequests(self.waker)
        self.limits = BatchLimits(settings)
        self.metrics = RunnerMetrics()
        client.on_answer = self.metrics.worker_answered
        self.courier = ReportCourier(client, state, self.shutdown, settings.retry_max,
                                     lambda: self._decide_stop(idle=True), self.metrics)
        self.retrying = Retrying(settings.retry_max, self._sleep_until_limit,
                                 lambda delay: self._decide_stop(idle=True))
        self.identity = RunnerIdentity(client, state, self.retrying)
        self.left_records = LeftCustodyRecords(client, state, self.courier, self.waker, self._start_slot)
        self.spreading = ClaimSpreading()
        self.notices = NewJobNotices(relay, self.waker)
        self.pacer = PollPacer()
        self.poll_waits = PollWaits(settings)
        self.idle_log = IdleLog(self.poll_waits)
        self.job_limits = JobLimits.from_settings(settings)
        self.launcher = new_job_launcher(settings.in_process, settings.handlers, self.job_limits,
                                         not settings.no_warm_imports)
        self.job_types = []
        self._slots = {}  # job id -> its JobSlot
        self._lock = threading.Lock()  # slot threads end themselves: _slots is read and changed under it
        self._fatal = None
        self._stop_code = self._stop_reason = None
        self.status_server = None  # a StatusServer, with --listen

    def run(self):
        """Serve until shut down or a batch limit is reached; returns the process exit code."""
        try:
            return self._run()
        finally:
            if self.launcher is not None:
                self.launcher.close()
            if self.status_server is not None:
                self.status_server.close()

    def status(self):
        """What --listen shows of the runner now (see RunnerStatus)."""
        subscriber = self.notices.subscriber
        stopping = ("a shutdown signal came" if self.shutdown.graceful else self._stop_reason or "")
        return RunnerStatus(self.settings.concurrency, len(self._running()), self.state.waiting_records()[0],
                            subscriber.state if subscriber else "", subscriber.notices if subscriber else 0,
                            stopping, self.shutdown.immediate)

    def _run(self):
        self.shutdown.install()
        if self.launcher is not None and remove_orphaned_job_dirs():
            LOG.info("Removed the temporary directories of jobs whose runner was killed")
        self.job_types = self._job_types_to_serve()
        if not self.job_types:
            LOG.error("This runner can run none of its job types; stopping")
            return EXIT_USAGE
        for level, line in describe_job_limits(self.job_limits, self.launcher is not None):
            LOG.log(level, "%s", line)
        try:
            if self.launcher is not None:
                self.launcher.start()  # before any claim: a launcher that cannot start leaves no job waiting
        except LauncherUnavailable as error:
            LOG.error("Cannot start job processes: %s; stopping", error)
            return EXIT_NO_JOB_PROCESSES
        if self.settings.listen:
            try:
                self.status_server = StatusServer(self.settings.listen, self.metrics,
                                                  RunnerHealth(self.metrics, self.settings, self.poll_waits.longest),
                                                  self.status)
            except ConfigurationError as error:
                LOG.error("%s; stopping", error)
                return EXIT_USAGE
            self.status_server.start()
            LOG.info("Serving /metrics and /healthz on http://%s/", _host_and_port(self.status_server.address))
        try:
            try:
                self._sleep_until_limit(random.uniform(0, min(START_JITTER_MAX_S, self.settings.poll_interval / 10)))
                self.identity.establish(self.job_types)
                self.notices.subscribe(self.client.runner_id, self.identity.name, self.job_types)
                self._serve()
            except GaveUp:
                if self._stop_code is not None and not self.identity.reached_worker:
                    LOG.error("Stopping without ever reaching the worker at %s", self.client.base_url)
                    return EXIT_FAILURE
            self._wait_for_slots()
            if self._stop_code == EXIT_JOBS_DONE and not self.shutdown.immediate:
                LOG.info("Stopping: %s", self._stop_reason)
        except UnauthorizedNotByTheWorker as error:
            LOG.error("%s; stopping. Check --worker-url (a proxy that asks for a login?)", error)
            return EXIT_USAGE
        except WorkerKeyRejected as error:
            LOG.error("%s; stopping. Check RUNPACK_RUNNER_API_KEY and start the runner again", error)
            return EXIT_KEY_REJECTED
        except WorkerRejected as error:  # only registering lets one through: the loop retries
            LOG.error("The worker refused to register this runner (%s); is %s the base URL of a "
                      "Runpack worker?", error, self.client.base_url)
            return EXIT_USAGE
        self.shutdown.announce(jobs_running=False)
        left = len(self.state.job_records())
        if left:
            LOG.warning("%d job record(s) wait in %s; they are settled when the runner starts again",
                        left, self.state.jobs_path)
        LOG.info("Runner stopped")
        if self.shutdown.immediate:
            return 128 + self.shutdown.signum
        return EXIT_OK if self.shutdown.graceful or self._stop_code is None else self._stop_code

    def _job_types_to_serve(self):
        serve = []
        for name, reason in job_type_availability(chosen_job_types(self.settings.job_types)):
            if reason:
                LOG.warning("Not serving job type %s: %s", name, reason)
            else:
                serve.append(name)
        LOG.info("Serving job types: %s", ", ".join(serve) or "none")
        return serve

    # -- the loop

    def _serve(self):
        while not self._decide_stop():
            if self._slots_full():
                self._wait_for_a_slot()
                continue
            if self.retrying.call(self._poll_round, "Cannot take jobs yet"):
                self.poll_waits.restart()
                self.idle_log.busy()
                continue
            if self._decide_stop(idle=True):
                break
            if not self.notices.waiting:
                wait = self.poll_waits.take()
                self.idle_log.empty_poll(wait)
                if self.launcher is not None and not self._running():
                    self.launcher.rest()
                self._sleep_until_limit(wait, until=lambda: self.notices.waiting)
            if self.notices.waiting:  # a fleet woken by one notice does not poll all at once
                self._sleep_until_limit(self.notices.delay())

    def _poll_round(self):
        """Settle left custody records, poll once and claim down the list; True when the
        runner should poll again at once (a job was started, or the list went stale). Any
        failure ends the round, to be retried: the loop never dies of one."""
        try:
            self.left_records.settle(self._running(), self.job_types,
                                     lambda: not (self.shutdown.graceful or self._slots_full()))
            self._sleep_until_limit(self.pacer.wait_before_poll())
            if self._decide_stop():
                return False
            self.notices.polled()
            self.pacer.polled()
            return self._work_through(self.client.available(self.job_types))
        except WorkerKeyRejected:
            raise
        except WorkerRejected as error:  # a 4xx to a poll or a claim: worth a later try, not a stop
            raise TransientWorkerError(str(error), error.status)
        except OSError as error:
            raise JobRecordsUnwritable("cannot write job records in %s (%s); claiming nothing until "
                                       "it works" % (self.state.jobs_path, error.strerror or error))
        finally:
            self.notices.round_ended()

    def _work_through(self, jobs):
        """Claim down the polled list, in the order ClaimSpreading gives, while slots are
        free; True if a job was started or a lost claim says the list is stale."""
        untried = [job for job in jobs if job["job_type"] in self.job_types]
        self.spreading.new_list()
        started = False
        while untried:
            if self._slots_full():
                self._wait_for_a_slot()
            if self._decide_stop():
                break
            listed = self.spreading.take_next(untried)
            if listed is None:  # our lane is used up: a fresh list, else any job of this one
                if self.pacer.wait_before_poll() == 0:
                    return True
                listed = self.spreading.take_any(untried)
            if listed["job_id"] in self._running():
                continue
            record = new_custody_record(listed, self.client.runner_id)
            self.state.save_job(record)
            try:
                job = self.client.claim(record["job_id"])
            except RunnerMaybeForgotten:
                self.identity.register_again_if_forgotten()
                raise  # the record is settled before the next poll: was the claim ours?
            if job is None:
                self.state.forget_job(record["job_id"])
                self.spreading.lost_claim()
                self.notices.claim_lost()
                self.metrics.claim_lost()
                if self.pacer.wait_before_poll() == 0:
                    return True
                continue
            if isinstance(job.get("input_params"), dict):
                record["input_params"] = job["input_params"]
            self._start_slot(record)
            self.notices.claim_won()
            started = True
        return started

    # -- job slots

    def _start_slot(self, record):
        LOG.info("Claimed job %s (%s)%s", record["job_id"], record["job_type"],
                 ", attempt %d" % (record["attempts"] + 1) if record.get("attempts") else "")
        self.limits.job_started()
        slot = JobSlot(record, self.settings, self.client, self.state, self.shutdown, self.courier,
                       self.launcher, self._slot_ended)
        with self._lock:
            self._slots[slot.job_id] = slot
        slot.start()

    def _slot_ended(self, slot):
        if slot.outcome is not None:
            self.metrics.job_ended(slot.record["job_type"], slot.outcome)
        with self._lock:
            self._slots.pop(slot.job_id, None)
            self._fatal = self._fatal or slot.fatal
            if slot.cannot_start is not None and self._stop_code is None:
                LOG.error("Cannot start job processes: %s; stopping. Job %s did not start: it runs when "
                          "the runner starts again with the state directory %s", slot.cannot_start,
                          slot.job_id, self.state.path)
                self._stop_code, self._stop_reason = EXIT_NO_JOB_PROCESSES, "cannot start job processes"
        self.limits.busy()
        self.waker.wake()

    def _running(self):
        """The ids of the jobs in slots now."""
        with self._lock:
            return set(self._slots)

    def _slots_full(self):
        return len(self._running()) >= self.settings.concurrency

    def _wait_for_a_slot(self):
        while self._slots_full() and not self.shutdown.graceful and self._fatal is None:
            self.waker.wait()
            self.shutdown.announce(jobs_running=True)

    def _wait_for_slots(self):
        while self._running():
            self.waker.wait()
            self.shutdown.announce(jobs_running=True)
        if self._fatal is not None:
            raise self._fatal

    # -- stopping: signals and batch limits

    def _decide_stop(self, idle=False):
        """Raise a slot's fatal error; record the stop once a batch limit is reached
        (--idle-timeout only when ``idle``). Returns True once the runner takes no new job."""
        if self._fatal is not None:
            raise self._fatal
        reached = self.limits.reached(idle=idle and not self._running())
        with self._lock:
            if reached and self._stop_code is None:
                self._stop_code, self._stop_reason = reached
                if self._stop_code != EXIT_JOBS_DONE:  # "ran N jobs" is true once they have run
                    LOG.info("Stopping: %s", self._stop_reason)
        return self.shutdown.graceful or self._stop_code is not None

    def _sleep_until_limit(self, seconds, until=lambda: False):
        """The main thread's wait, cut short by a shutdown request, by --idle-timeout or
        --max-uptime coming due, or once ``until()`` is true."""
        left = self.limits.seconds_left(idle=not self._running())
        wait_until(self.waker, seconds if left is None else min(seconds, left),
                   lambda: self.shutdown.graceful or until())
        self.shutdown.announce(jobs_running=bool(self._running()))


# ---- Running a job locally (`run`) ----------------------------------------------

class TerminalProgress:
    """Shows a local job's console lines as they come and, on a terminal, a progress
    line redrawn in place. Used as the HeartbeatPump's ``send``."""

    BAR_WIDTH = 30

    def __init__(self, stream, job_type):
        self._stream, self._job_type = stream, job_type
        self._is_terminal = stream.isatty()
        self._lines_shown = [0, 0]  # of the handler's console, of the job process's output
        self._bar_shown = False
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, progress_current, progress_total, console_output):
        with self._lock:
            self._show_new_lines(console_output)
            if self._is_terminal:
                self._stream.write(self._bar(progress_current, progress_total))
                self._bar_shown = True
            self._stream.flush()
        return True

    def finish(self, console_output):
        with self._lock:
            self._show_new_lines(console_output)
            self._stream.flush()

    def _show_new_lines(self, console_output):
        """Print the lines not shown yet, of the handler's console and of the process output
        apart: the handler may add lines above the process output as the job goes on."""
        if self._bar_shown:
            self._stream.write("\r\033[K")
            self._bar_shown = False
        handler_console, _, process_output = console_output.partition(PROCESS_OUTPUT_MARKER + "\n")
        for part, text in enumerate((handler_console, process_output)):
            lines = text.splitlines()
            for line in lines[self._lines_shown[part]:]:
                self._stream.write(line + "\n")
            self._lines_shown[part] = max(self._lines_shown[part], len(lines))

    def _bar(self, current, total):
        elapsed = "%.0f s" % (time.monotonic() - self._started)
        if current is None or not total:
            return "%s: running, %s" % (self._job_type, elapsed)
        fraction = min(1.0, max(0.0, current / total))
        filled = int(fraction * self.BAR_WIDTH)
        return "%s [%s%s] %3d%% %s" % (self._job_type, "#" * filled, "." * (self.BAR_WIDTH - filled),
                                       fraction * 100, elapsed)


def _json_object(text, source):
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigurationError("%s is not valid JSON: %s" % (source, error))
    if not isinstance(value, dict):
        raise ConfigurationError("%s must be a JSON object" % source)
    return value


def parse_run_params(assignments, params_json, params_file):
    """Merge --params-file, --params and key=value arguments (values are JSON when they parse)."""
    params = {}
    if params_file:
        try:
            if params_file == "-":
                params.update(_json_object(sys.stdin.read(), "--params-file -"))
            else:
                with open(params_file, encoding="utf-8") as stream:
                    params.update(_json_object(stream.read(), "--params-file"))
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigurationError("cannot read --params-file %s: %s"
                                     % (params_file, getattr(error, "strerror", None) or error))
    if params_json is not None:
        params.update(_json_object(params_json, "--params"))
    for assignment in assignments:
        key, value, _ = _parse_assignment(assignment)
        params[key] = value
    return params


def _parse_assignment(assignment):
    """(key, value, text) of a key=value argument: the value is the text read as JSON when
    it parses, else the text itself."""
    key, equals, text = assignment.partition("=")
    if not equals or not key:
        raise ConfigurationError("expected key=value, got %r" % assignment)
    try:
        return key, json.loads(text), text
    except ValueError:
        return key, text, text


def run_locally(job_type, input_params, settings, out=None, err=None, hint=lambda message: None):
    """Run one job here, through the same execution path as the runner; returns the exit code.
    ``hint(error message)`` may add a line of advice to a failure."""
    out, err = out or sys.stdout, err or sys.stderr
    handler = JOB_HANDLERS.get(job_type)
    if handler is None:
        err.write("Error: unknown job type %r (known: %s)\n" % (job_type, ", ".join(sorted(JOB_HANDLERS))))
        return EXIT_FAILURE
    reason = handler.unavailable_reason()
    if reason:
        err.write("Error: job type %s cannot run here: %s\n" % (job_type, reason))
        return EXIT_FAILURE
    progress = JobProgress(settings.heartbeat_interval)
    waker = Waker()
    limits = JobLimits.from_settings(settings)
    launcher = new_job_launcher(settings.in_process, settings.handlers, limits, warm=False, spare=False)
    for level, line in describe_job_limits(limits, launcher is not None):
        if level >= logging.WARNING:
            err.write("Warning: %s\n" % line)
    execution = make_execution(launcher, job_type, input_params, progress, waker)
    display = TerminalProgress(err, job_type)
    pump = HeartbeatPump(progress, display, settings.heartbeat_interval, 0.1, waker.wake)
    pump.start()
    with contextlib.redirect_stdout(err):  # stdout is for the output JSON (matters --in-process)
        try:
            report = execution.run(settings.job_timeout)
        except LauncherUnavailable as error:
            err.write("Error: cannot start a job process: %s\n" % error.one_line())
            return EXIT_FAILURE
        finally:
            progress.finish()
            if launcher is not None:
                launcher.close()
        pump.join()
    display.finish(report["body"]["console_output"])
    if report["kind"] == "complete":
        out.write(json.dumps(report["body"]["output_data"], indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    message = report["body"]["error_message"]
    err.write("Error: %s\n" % message)
    advice = hint(message)
    if advice:
        err.write("Hint: %s\n" % advice)
    return EXIT_FAILURE


def json_read_values(assignments):
    """The key=value arguments whose value was read as JSON other than a string: {key: text}."""
    parsed = (_parse_assignment(assignment) for assignment in assignments)
    return {key: text for key, value, text in parsed if not isinstance(value, str)}


def string_hint(json_read):
    """For a parameter error about a value that key=value read as JSON: how to pass a string."""
    def hint(message):
        for key, text in sorted(json_read.items()):
            if (message.startswith("Invalid parameters") and "string" in message
                    and re.search(r"\b%s\b" % re.escape(key), message)):
                return ("%s=%s was read as JSON; for the string %s, write %s='\"%s\"' or use --params"
                        % (key, text, json.dumps(text), key, text))
        return None
    return hint


def command_run(args, environ, parser):
    if args.job_type is None:
        parser.print_usage(sys.stderr)
        print("Error: name the job type to run: %s" % ", ".join(sorted(JOB_HANDLERS)), file=sys.stderr)
        return EXIT_USAGE
    settings = resolve_settings(args, RUN_SETTINGS, environ, {"heartbeat_interval": RUN_HEARTBEAT_INTERVAL_S})
    for secret_variable in SECRET_VARIABLES:  # a local job needs no key: its handler must not see one
        environ.pop(secret_variable, None)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the output JSON
        load_handler_modules(settings.handlers)
    params = parse_run_params(args.params, args.params_json, args.params_file)
    configure_logging(sys.stderr, level=logging.CRITICAL)  # the job's console says it all
    try:
        return run_locally(args.job_type, params, settings, hint=string_hint(json_read_values(args.params)))
    except KeyboardInterrupt:
        print("\nInterrupted", file=sys.stderr)
        return 128 + signal.SIGINT


# ---- Checking a machine (`check`) ----------------------------------------------

class Checklist:
    """The report of `check`: one line per item, and whether the runner could serve."""

    def __init__(self, out):
        self.out, self.problems = out, []

    def line(self, label, text):
        self.out.write("%-16s %s\n" % (label, text))

    def problem(self, label, text):
        self.line(label, "PROBLEM: " + text)
        if label not in self.problems:
            self.problems.append(label)


def command_check(args, environ, out=None):
    """What an operator runs first: can this runner serve, and if not, why and how to fix it."""
    out = out or sys.stdout
    checklist = Checklist(out)
    settings = resolve_settings(args, CHECK_SETTINGS, environ)
    checklist.line("Runpack runner", __version__)
    checklist.line("Python", "%s (%s)" % (sys.version.split()[0], sys.executable))
    _check_runner_settings(checklist, args, environ)
    checklist.line("Worker URL", settings.worker_url)
    try:
        worker_url = check_worker_url(settings.worker_url, settings.allow_insecure_http)
    except ConfigurationError as error:
        worker_url = None
        checklist.problem("Worker URL", str(error))
    state = StateDirectory(settings.state_dir)
    identity = _check_state_directory(checklist, state)
    api_key = environ.get(API_KEY_ENV, "").strip()
    try:
        check_api_key(api_key)
    except ConfigurationError as error:
        checklist.problem("Runner key", str(error))
        api_key = ""
    if api_key:
        checklist.line("Runner key", "set (%s; %d characters)" % (API_KEY_ENV, len(api_key)))
    elif "Runner key" not in checklist.problems:
        checklist.problem("Runner key", "%s is not set: export %s=<your runner key>" % (API_KEY_ENV, API_KEY_ENV))
    if worker_url:
        _check_worker(checklist, WorkerClient(worker_url, api_key or None, settings.request_timeout),
                      identity, bool(api_key))
    _check_relay(checklist, settings, environ.get(RELAY_KEY_ENV, "").strip())
    try:
        load_handler_modules(settings.handlers)
    except ConfigurationError as error:
        checklist.problem("Handlers", str(error))
    serving, chosen = [], []
    try:
        chosen = chosen_job_types(settings.job_types)
    except ConfigurationError as error:
        if "Handlers" not in checklist.problems:  # a bad setting, as for runner; else the modules' fault
            raise
        checklist.problem("Job types", str(error))
    for name, reason in job_type_availability(chosen):
        if reason is None:
            checklist.line("Job type", "%s: served" % name)
            serving.append(name)
        elif settings.job_types:  # the operator asked for it: it must be served
            checklist.problem("Job type", "%s: NOT served: %s" % (name, reason))
        else:
            checklist.line("Job type", "%s: NOT served: %s" % (name, reason))
    imports = checked_imports()
    if imports:
        verdicts = [("import", [name for name, problem in sorted(imports.items()) if problem is None]),
                    ("fail to import", [name for name, problem in sorted(imports.items()) if problem])]
        checklist.line("Imports", "%s (checked in a child process of this Python, as a job would import them)"
                       % "; ".join("%s %s" % (", ".join(names), verdict) for verdict, names in verdicts if names))
    if not serving and "Job types" not in checklist.problems:
        checklist.problem("Job types", "this runner could serve none")
    limits = JobLimits.from_settings(settings)
    _check_job_processes(checklist, new_job_launcher(False, settings.handlers, limits, warm=False, spare=False))
    for level, line in describe_job_limits(limits, True):
        checklist.line("Job limits", line)
    if checklist.problems:
        checklist.line("Result", "NOT READY: fix %s" % ", ".join(checklist.problems))
        return EXIT_FAILURE
    checklist.line("Result", "ready to serve %s" % ", ".join(serving))
    return EXIT_OK


def _check_runner_settings(checklist, args, environ):
    """The runner's own settings that check has no flags for, read from the environment as
    `runner` reads them: one that runner would refuse is a problem here."""
    for name in RUNNER_SETTINGS:
        if name not in CHECK_SETTINGS:
            try:
                resolve_settings(args, (name,), environ)
            except ConfigurationError as error:
                checklist.problem("Settings", str(error))


def _check_job_processes(checklist, launcher):
    """Start the launcher as the runner would before its first claim, and stop it."""
    if launcher is None:  # no fork here (Windows): jobs run in threads
        checklist.line("Job processes", "none on this system: jobs run in threads of the runner")
        return
    try:
        launcher.start()
        checklist.line("Job processes", "start (forked by a launcher, as the runner starts them)")
    except LauncherUnavailable as error:
        checklist.problem("Job processes", error.one_line())
    finally:
        launcher.close()


def _check_state_directory(checklist, state):
    """Report the state directory as `runner` would judge it, without creating or changing
    anything, and the identity saved in it; returns that identity, if any."""
    problem = state.problem()
    if problem:
        checklist.problem("State directory", problem)
        return None
    if not os.path.isdir(state.path):
        checklist.line("State directory", "%s (created when the runner starts)" % state.path)
        return None
    if state.in_use():
        checklist.problem("State directory", "%s is in use by another runner: give this one its own "
                          "--state-dir" % state.path)
    else:
        checklist.line("State directory", "%s (writable)" % state.path)
    identity = state.load_identity()
    if identity is None:
        checklist.line("Identity", "none yet: the runner registers when it starts")
    reports, jobs = state.waiting_records()
    if reports or jobs:
        checklist.line("Job records", "%d report%s to deliver and %d claimed job%s to run again, in %s: the "
                       "runner settles them when it starts on this state directory (do not delete it)" % (
                           reports, "s" * (reports != 1), jobs, "s" * (jobs != 1), state.jobs_path))
    return identity


def _check_worker(checklist, client, identity, key_is_set):
    try:
        started = time.monotonic()
        client.health()
        checklist.line("Worker", "reachable (%.0f ms)" % ((time.monotonic() - started) * 1000))
    except TransientWorkerError as error:
        checklist.problem("Worker", "not reachable: %s" % error)
        return
    except UnauthorizedNotByTheWorker as error:
        checklist.problem("Worker", "%s: check the worker URL" % error)
        return
    except WorkerError as error:
        checklist.problem("Worker", "answers, but not as a Runpack worker: %s" % error)
        return
    if not key_is_set:
        return
    try:
        if identity:
            known = client.verify(identity["runner_id"])
        else:
            client.check_key()
    except UnauthorizedNotByTheWorker as error:
        checklist.problem("Worker", "%s: check the worker URL" % error)
        return
    except WorkerKeyRejected:
        checklist.problem("Runner key", "the worker rejected it (401): check %s" % API_KEY_ENV)
        return
    except WorkerError as error:
        checklist.problem("Runner key", "could not be checked: %s" % error)
        return
    checklist.line("Runner key", "accepted by the worker")
    if identity:
        checklist.line("Identity", "%s (id %s): %s" % (
            identity["runner_name"], identity["runner_id"],
            "known to the worker" if known else "unknown to the worker; registers again at start"))


def _check_relay(checklist, settings, relay_key):
    """Report the NotifyRelay: not configured, or reachable with its key accepted (a poll
    that the relay holds 1 s at most, as a subscriber of its own)."""
    if not settings.notify_relay_url and not relay_key:
        checklist.line("NotifyRelay", "not configured (optional: new jobs would wake the runner at once)")
        return
    if not settings.notify_relay_url or not relay_key:
        checklist.problem("NotifyRelay", "set both NOTIFY_RELAY_BASE_URL (or --notify-relay-url) and %s"
                          % RELAY_KEY_ENV)
        return
    try:
        check_api_key(relay_key, RELAY_KEY_ENV)
        url = check_worker_url(settings.notify_relay_url, settings.allow_insecure_http, "NotifyRelay",
                               "subscribe key")
        # One subscriber id per machine: the relay keeps a queue for every id it has seen.
        RelayClient(url, relay_key, "runpack-check-" + socket.gethostname(), "runpack check").poll(
            RELAY_CHECK_TIMEOUT_MS)
    except ConfigurationError as error:
        checklist.problem("NotifyRelay", str(error))
    except RelayKeyRejected:
        checklist.problem("NotifyRelay", "%s: the relay rejected the subscribe key (401): check %s"
                          % (settings.notify_relay_url, RELAY_KEY_ENV))
    except RelayUnavailable as error:
        checklist.problem("NotifyRelay", "%s: not reachable: %s" % (settings.notify_relay_url, error))
    else:
        checklist.line("NotifyRelay", "%s: reachable, subscribe key accepted" % settings.notify_relay_url)


# ---- On a Slurm cluster: the scaler (`slurm`) -----------------------------------------
#
# `slurm` runs on a login node (any host with sbatch) and keeps the right number of runners in
# Slurm: while jobs wait at the worker for the types its runners serve, it submits batch jobs of
# runners, never more than the waiting jobs need and never more than --max-runners; the runners
# leave by themselves once idle (--idle-timeout). Each runner takes a state directory from the
# pool DIR/runners, preferring one whose runner died with a job claimed: a directory holding job
# records that no live runner holds gets a runner even when nothing else waits, so that a job
# cut off by scancel, preemption, the time limit or a node failure runs again and is reported
# once. The scaler finds its runners in squeue by a job name of its own, so that it can be
# killed and started again without doubling them.

SLURM_RUNNER_IDLE_TIMEOUT_S = 300.0  # the runners' --idle-timeout unless given: Slurm's queue empties
SLURM_COMMAND_TIMEOUT_S = 60.0  # a slurmctld that does not answer an sbatch or squeue in this long is down
SLURM_RETRY_MAX_S = 300.0  # the longest wait after sbatch or squeue failed
# A runner's batch job that may still take a job, as squeue's %T says (not COMPLETING or
# STAGE_OUT: its script has ended). Started, it may hold a state directory; waiting to start, it
# holds none and will take one; on hold, it holds none and starts only when an operator releases
# it: it counts against --max-runners, but as no room for a job.
SLURM_STARTED_STATES = ("RUNNING", "SIGNALING", "RESIZING", "SUSPENDED", "STOPPED")
SLURM_STARTING_STATES = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED")
SLURM_ON_HOLD_STATES = ("REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD")
SLURM_ACTIVE_STATES = SLURM_STARTED_STATES + SLURM_STARTING_STATES + SLURM_ON_HOLD_STATES
# A runner's batch job that ended so that the next would likely end so too: the scaler waits.
SLURM_RUNNER_FAILED_STATES = {"FAILED": "failed", "OUT_OF_MEMORY": "ran out of its memory",
                              "BOOT_FAIL": "could not start (BOOT_FAIL)"}
# The batch script: the runner as a child, so that the shell can pass Slurm's warning on as the
# runner's SIGTERM (--signal=B:USR1@margin reaches the batch shell only) and report a batch limit
# as success. Slurm's own SIGTERM (scancel, preemption, the time limit) reaches every process of
# the job, the runner too: passed on again, it would be the runner's second signal, which drops
# the running job at once instead of finishing it within KillWait or the preemption's GraceTime.
SLURM_BATCH_SCRIPT = """\
#!/bin/sh
# A Runpack runner started by the runpack_runner.py slurm scaler; the key is in the environment.
{command} &
runner=$!
trap 'kill -TERM "$runner" 2>/dev/null' USR1  # the time limit is near: finish the job, then leave
trap : TERM INT  # Slurm's SIGTERM reaches the runner itself
wait "$runner"
code=$?
while kill -0 "$runner" 2>/dev/null; do
    wait "$runner"
    code=$?
done
case $code in 5|6|7) exit 0 ;; esac  # --max-jobs, --idle-timeout, --max-uptime: normal ends
exit $code
"""


# sbatch options that would undo how the scaler finds its runners (by job name, with squeue on
# this cluster) or what it submits (one runner per batch job, the script on stdin), and the
# variables that sbatch reads as such options from the operator's environment.
SBATCH_OPTIONS_REFUSED = (("--job-name", "-J"), ("--array", "-a"), ("--clusters", "-M"), ("--wrap", None))
SBATCH_VARIABLES_REFUSED = ("SBATCH_ARRAY_INX", "SBATCH_CLUSTERS", "SLURM_CLUSTERS")
SCALER_NEEDS = "it submits one runner per batch job and finds them by their job name with squeue"
SLURM_MAX_SIGNAL_MARGIN_S = 65535  # sbatch --signal=…@seconds takes no more


def shlex_split(text, what):
    """``text`` split as a shell would (``#`` starts a comment), or ConfigurationError naming ``what``."""
    import shlex

    try:
        return shlex.split(text, comments=True)
    except ValueError as error:
        raise ConfigurationError("cannot read %s: %s" % (what, error))


def check_sbatch_options(options):
    """ConfigurationError for an option of SBATCH_OPTIONS_REFUSED, in any spelling sbatch takes."""
    for word in options:
        name = word.split("=", 1)[0]
        for flag, short in SBATCH_OPTIONS_REFUSED:
            if name.startswith("--") and len(name) > 2 and flag.startswith(name) or short and word.startswith(short):
                raise ConfigurationError("the scaler cannot take the sbatch option %s: %s; leave out %s" % (
                    word, SCALER_NEEDS, ", ".join(flag for flag, _ in SBATCH_OPTIONS_REFUSED)))


def check_sbatch_environment(environ):
    """ConfigurationError for a variable of SBATCH_VARIABLES_REFUSED in ``environ``."""
    for name in SBATCH_VARIABLES_REFUSED:
        if name in environ:
            raise ConfigurationError("the scaler cannot take %s=%s from the environment: %s; unset %s" % (
                name, environ[name], SCALER_NEEDS, ", ".join(SBATCH_VARIABLES_REFUSED)))


class SlurmUnavailable(TransientError):
    """sbatch or squeue failed, or did not answer: the scaler backs off and tries again."""


class SlurmClient:
    """The only code that runs Slurm's commands: sbatch to submit a runner, squeue to list the
    scaler's runners by their job name."""

    def __init__(self, job_name, environ):
        self.job_name, self.environ = job_name, environ

    def submit(self, script, options):
        """The id of the batch job of ``script`` (given on stdin: nothing of it is written)."""
        finished = self._run(["sbatch", "--parsable"] + list(options) + ["--job-name=" + self.job_name], script)
        job_id = finished.stdout.strip().split(";")[0]
        if not job_id:  # --test-only, say: nothing was submitted
            raise SlurmUnavailable("sbatch printed no job id (%s)" % _last_line(finished.stderr))
        return job_id

    def runners(self):
        """{job id: state} of the scaler's batch jobs that Slurm still lists, the ones that
        ended lately included (Slurm keeps them for its MinJobAge). The operator's SQUEUE_*
        variables (a partition, an account, a format) would hide runners: squeue gets none."""
        answer = self._run(["squeue", "--noheader", "--all", "--states=all", "--user=%d" % os.getuid(),
                            "--name=" + self.job_name, "--format=%i %T"],
                           environ={name: value for name, value in self.environ.items()
                                    if not name.startswith("SQUEUE_")}).stdout
        return dict(line.split()[:2] for line in answer.splitlines() if len(line.split()) >= 2)

    def _run(self, command, stdin=None, environ=None):
        import subprocess

        try:
            finished = subprocess.run(command, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      encoding="utf-8", errors="replace", env=environ or self.environ,
                                      timeout=SLURM_COMMAND_TIMEOUT_S)  # a site's message may be in any encoding
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable("%s did not answer within %s" % (command[0], describe_seconds(
                SLURM_COMMAND_TIMEOUT_S)))
        except OSError as error:
            raise SlurmUnavailable("cannot run %s: %s" % (command[0], error.strerror or error))
        if finished.returncode != 0:
            raise SlurmUnavailable("%s failed (exit %d: %s)" % (command[0], finished.returncode,
                                                               _last_line(finished.stderr or finished.stdout)))
        return finished


def _last_line(output):
    """The last line of a Slurm command's output, or "no message"."""
    lines = output.strip().splitlines()
    return lines[-1] if lines else "no message"


class ScalingDecision(collections.namedtuple("ScalingDecision", "waiting orphans running pending free submit")):
    """What the scaler sees and does in one round; says itself in one line."""

    def __str__(self):
        return "%d job%s waiting%s, %d runner%s running, %d pending, %d slot%s free: %s" % (
            self.waiting, "s" * (self.waiting != 1),
            ", %d state director%s with a job to run again" % (self.orphans, "ies" if self.orphans != 1 else "y")
            if self.orphans else "", self.running, "s" * (self.running != 1), self.pending,
            self.free, "s" * (self.free != 1), "submitting %d" % self.submit if self.submit else "submitting none")


def scaling_decision(waiting, pool, runners, concurrency, max_runners):
    """How many runners to submit, within ``max_runners`` with ``runners`` (the active ones
    in Slurm, {job id: state}): one for each orphaned directory of the ``pool`` (a PoolSurvey)
    that no runner without a directory yet (pending, or starting) will take, and enough for
    the waiting jobs that no free slot will take. A runner has ``concurrency`` slots, less the
    jobs of the directory it holds, or will take; one on hold in Slurm has none. Only a running
    runner can hold a directory: those held past the number of running ones (by a runner whose
    batch job is ending, say) are counted as the idlest, and no room, so that a pending runner
    is not taken to hold one."""
    running = sum(state in SLURM_STARTED_STATES for state in runners.values())
    starting = sum(state in SLURM_STARTING_STATES for state in runners.values())
    held = sorted(pool.held, reverse=True)[:running]
    unplaced = running + starting - len(held)
    orphans = sorted(pool.orphans)
    taken, left = orphans[:unplaced], orphans[unplaced:]
    slots_left = lambda jobs: max(0, concurrency - jobs)  # noqa: E731
    free = sum(map(slots_left, held + taken)) + (unplaced - len(taken)) * concurrency
    short = max(0, waiting - free - sum(map(slots_left, left)))
    submit = min(len(left) + -(-short // concurrency), max_runners - len(runners))
    return ScalingDecision(waiting, len(orphans), running, len(runners) - running, free, max(0, submit))


class SlurmScaler:
    """The scaler's loop: look at the waiting jobs, the orphaned state directories and the
    runners in Slurm; submit what is missing; wait --poll-interval, or less when a NotifyRelay
    notice says a job came. It never cancels a runner: runners leave when idle."""

    def __init__(self, settings, client, slurm, pool, runner_command, sbatch_options, notices):
        self.settings, self.client, self.slurm, self.pool = settings, client, slurm, pool
        self.runner_command, self.sbatch_options = runner_command, sbatch_options
        self.notices = notices
        self.waker = notices.waker
        self.shutdown = ShutdownRequests(self.waker)
        self.retrying = Retrying(SLURM_RETRY_MAX_S, self._sleep, lambda delay: self.shutdown.graceful)
        self.pacer = PollPacer()  # a burst of notices must not take its polls past the worker's limit
        self._said = None  # the last decision logged, so that an unchanged one is not logged again
        self._sbatch_failing = False  # the last sbatch failed: Retrying has said so, the decision was said
        self._submitted = set()  # the batch jobs this scaler submitted whose end it has not judged yet
        self._failed_in_a_row = 0  # runners that failed since one ended well
        self._hold_until = 0.0  # after a runner failed, no submission before this time.monotonic()

    def run(self, job_types):
        self.shutdown.install()
        LOG.info("Scaling runners of %s in Slurm: at most %d, state directories in %s",
                 ", ".join(job_types), self.settings.max_runners, self.pool.path)
        self.notices.subscribe(self.client.runner_id, None, job_types)
        while not self.shutdown.graceful:
            try:
                self.retrying.call(lambda: self._round(job_types), "Cannot scale yet", "Scaling again")
            except GaveUp:
                break
            self._sleep(self.settings.poll_interval, until=lambda: self.notices.waiting)
        LOG.info("Scaler stopped; its runners go on in Slurm and leave when idle")
        return EXIT_OK

    def _round(self, job_types):
        self._sleep(self.pacer.wait_before_poll())
        if self.shutdown.graceful:
            return
        self.notices.polled()
        # The pool and Slurm first, the waiting jobs last. A runner writes its custody record
        # before it claims, so a claim under way is a busy slot; read after squeue, the worker's
        # list has most likely dropped its job. The other way round, a claim made while squeue
        # ran counted twice, as a busy slot and as a waiting job: a runner too many.
        pool = self.pool.survey()
        runners = self.slurm.runners()
        self._judge_ended(runners)
        self.pacer.polled()
        try:
            waiting = len(self.client.available(job_types))
        except WorkerKeyRejected:
            raise
        except WorkerRejected as error:  # as for a runner's poll: worth a later try, not a stop
            raise TransientWorkerError(str(error), error.status)
        active = {job_id: state for job_id, state in runners.items() if state in SLURM_ACTIVE_STATES}
        decision = scaling_decision(waiting, pool, active, self.settings.concurrency, self.settings.max_runners)
        held = max(0.0, self._hold_until - time.monotonic()) if decision.submit else 0.0
        said = str(decision) + (" (held %s after a runner failed)" % describe_seconds(held) if held else "")
        quiet = not (decision.waiting or decision.orphans)
        acts = decision.submit and not held and not (self._sbatch_failing and said == self._said)
        if acts or quiet and said != self._said:  # what it does (once while sbatch fails); the queue emptied
            LOG.info("%s", said)
        else:
            LOG.debug("%s", said)
        self._said = said
        for _ in range(0 if held else decision.submit):
            self._sbatch_failing = True
            job_id = self.slurm.submit(SLURM_BATCH_SCRIPT.format(command=self.runner_command), self.sbatch_options)
            self._sbatch_failing = False
            self._submitted.add(job_id)
            LOG.info("Submitted runner %s", job_id)

    def _judge_ended(self, runners):
        """A runner of ours that failed (a wrong setting on the compute nodes, say) holds the
        next submission back, longer each time, so that a runner that cannot start is not
        submitted again every round; one that ended well resets that."""
        for job_id in sorted(self._submitted & set(runners)):
            state = runners[job_id]
            if state in SLURM_ACTIVE_STATES:
                continue
            self._submitted.discard(job_id)
            if state == "COMPLETED":
                self._failed_in_a_row = 0
            elif state in SLURM_RUNNER_FAILED_STATES:
                delay = min(SLURM_RETRY_MAX_S, self.settings.poll_interval * 2 ** min(self._failed_in_a_row, 20))
                LOG.log(logging.DEBUG if self._failed_in_a_row else logging.WARNING,
                        "Runner %s %s in Slurm; %s says: %s; the next runner waits %s, longer while they fail",
                        job_id, SLURM_RUNNER_FAILED_STATES[state], self._output_of(job_id),
                        _last_error(self._output_of(job_id)), describe_seconds(delay))
                self._failed_in_a_row += 1
                self._hold_until = time.monotonic() + delay

    def _output_of(self, job_id):
        return os.path.join(self.settings.state_dir, "logs", "runner-%s.out" % job_id)

    def _sleep(self, seconds, until=lambda: False):
        wait_until(self.waker, seconds, lambda: self.shutdown.graceful or until())


def _last_error(path):
    """The last error line of a runner's output (else its last line), or why there is none."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 4096))
            lines = [line.strip() for line in stream.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError as error:
        return "(cannot read it: %s)" % (error.strerror or error)
    errors = [line for line in lines if re.search(r"\bError\b|\bERROR\b", line)]
    return (errors or lines or ["(nothing)"])[-1]


def given_sbatch_options(flag_values, environ):
    """The operator's sbatch options, each value read as a shell would (``--time 04:00:00`` is
    two words): RUNPACK_SBATCH_OPTIONS, then the --sbatch-option values, so that a flag wins over
    the environment (sbatch takes the later option) as for every setting."""
    options = shlex_split(environ.get(SBATCH_OPTIONS_ENV, ""), SBATCH_OPTIONS_ENV)
    for value in flag_values or []:
        options += shlex_split(value, "--sbatch-option %s" % value)
    return options


def slurm_time_limit_seconds(text):
    """The seconds of a Slurm time limit as sbatch --time reads it ("30" minutes, "30:00",
    "2:00:00", "1-12", "1-12:30", "1-12:30:00"); None for none ("0", UNLIMITED, INFINITE) or
    a spelling not read here, which sbatch judges itself."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not all(part.isdigit() for part in parts) or days and not days.isdigit() or len(parts) > 3:
        return None
    numbers = [int(part) for part in parts]
    if days:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(numbers) == 3:  # hours:minutes:seconds
        total = (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]
    else:  # minutes, or minutes:seconds
        total = numbers[0] * 60 + (numbers[1] if len(numbers) == 2 else 0)
    return total or None


def runners_time_limit(options):
    """The seconds of the last --time / -t among sbatch ``options`` (sbatch takes the last), or None."""
    limit = None
    for index, word in enumerate(options):
        following = options[index + 1] if index + 1 < len(options) else ""
        if word.startswith("--time="):
            limit = slurm_time_limit_seconds(word[len("--time="):])
        elif word in ("--time", "-t"):
            limit = slurm_time_limit_seconds(following)
        elif word.startswith("-t") and not word.startswith("--"):
            limit = slurm_time_limit_seconds(word[2:])
    return limit


def check_time_limit(options, stop_margin):
    """ConfigurationError for a time limit that the stop margin takes whole: a runner would be
    warned as it starts, take no job, end well, and be submitted again, round after round."""
    limit = runners_time_limit(options)
    if limit is not None and limit <= stop_margin:
        raise ConfigurationError("the runners' time limit (%s) is not longer than --stop-margin (%s): they would "
                                 "stop before taking a job; give a longer --time or a shorter --stop-margin" % (
                                     describe_seconds(limit), describe_seconds(stop_margin)))


def sbatch_options(settings, header_lines):
    """What sbatch gets: the output files, the warning signal before the time limit, a CPU per
    slot, then the operator's options: the #SBATCH header lines before its first command, then
    ``settings.sbatch_options`` (given_sbatch_options); sbatch takes the later of two."""
    logs = os.path.join(os.path.abspath(settings.state_dir), "logs").replace("%", "%%")  # % is Slurm's
    options = ["--output=%s" % os.path.join(logs, "runner-%j.out"),
               "--signal=B:USR1@%d" % -(-settings.stop_margin // 1), "--cpus-per-task=%d" % settings.concurrency]
    for number, line in enumerate(header_lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            break  # sbatch reads no directive after the first command
        if line.startswith("#SBATCH"):
            options += shlex_split(line[len("#SBATCH"):], "line %d of --sbatch-header %s" % (
                number, settings.sbatch_header))
    options += settings.sbatch_options
    check_sbatch_options(options)
    return options


def slurm_runner_command(args, environ, settings, pool):
    """The runner each batch job runs: this program, started as this process was, with the
    runner settings given to the scaler on its command line (the environment, the key in it,
    passes through sbatch), and a state directory from the pool."""
    import shlex

    program = _launcher_command()
    if "-c" in program:  # this file itself: run it as a script
        program = program[:program.index("-c")] + [program[-1]]
    command = program + ["runner", "--state-pool", pool.path]
    for name in SLURM_RUNNER_SETTINGS:
        value = getattr(args, name, None)
        if value is not None:
            setting = SETTINGS_BY_NAME[name]
            command += [setting.flag] if setting.parse is _parse_boolean else [setting.flag, str(value)]
    given = lambda name: getattr(args, name, None) is not None or SETTINGS_BY_NAME[name].env in environ  # noqa: E731
    if not given("idle_timeout"):
        command += ["--idle-timeout", "%g" % SLURM_RUNNER_IDLE_TIMEOUT_S]
    if not given("poll_interval_max"):  # the scaler counts an idle runner as room: it must look as often
        command += ["--poll-interval-max", "%g" % settings.poll_interval]
    return " ".join(shlex.quote(word) for word in command)


def slurm_runner_environment(environ):
    """The environment sbatch passes on to every runner: the scaler's, less the variables of the
    settings that are each runner's own (one --listen port, one relay subscriber id each)."""
    own = {SETTINGS_BY_NAME[name].env for name in SLURM_RUNNER_OWN_SETTINGS}
    return {name: value for name, value in environ.items() if name not in own}


def command_slurm(args, environ):
    api_key = environ.get(API_KEY_ENV, "").strip()
    if not api_key:
        print(MISSING_KEY_MESSAGE.replace("runner\n", "slurm --max-runners N --state-dir DIR\n"), file=sys.stderr)
        return EXIT_USAGE
    check_api_key(api_key)
    settings = resolve_settings(args, SLURM_SETTINGS, environ)
    settings.sbatch_options = given_sbatch_options(args.sbatch_option, environ)
    worker_url = check_worker_url(settings.worker_url, settings.allow_insecure_http)
    if not settings.max_runners:
        raise ConfigurationError("give the most runners to keep in Slurm: --max-runners N")
    if settings.stop_margin > SLURM_MAX_SIGNAL_MARGIN_S:
        raise ConfigurationError("--stop-margin can be at most %d s, as sbatch --signal takes"
                                 % SLURM_MAX_SIGNAL_MARGIN_S)
    header_lines = []
    if settings.sbatch_header:
        try:
            with open(settings.sbatch_header, encoding="utf-8") as stream:
                header_lines = stream.read().splitlines()
        except (OSError, UnicodeError) as error:
            raise ConfigurationError("cannot read --sbatch-header %s: %s" % (settings.sbatch_header,
                                                                             getattr(error, "strerror", None) or error))
    options = sbatch_options(settings, header_lines)
    check_time_limit(options, settings.stop_margin)
    check_sbatch_environment(environ)
    if shutil.which("sbatch", path=environ.get("PATH")) is None:
        raise ConfigurationError("sbatch is not on PATH: run the scaler where Slurm's commands are")
    load_handler_modules(settings.handlers)
    job_types = [name for name, reason in job_type_availability(chosen_job_types(settings.job_types))
                 if reason is None]
    if not job_types:
        raise ConfigurationError("the runners could serve none of the job types here (see `check`)")
    state = StateDirectory(settings.state_dir)
    state.prepare()
    try:
        state.lock()
    except StateDirectoryBusy:
        print("Error: another scaler is using %s" % state.path, file=sys.stderr)
        return EXIT_STATE_DIR_BUSY
    os.makedirs(os.path.join(state.path, "logs"), exist_ok=True)
    relay_key = environ.get(RELAY_KEY_ENV, "").strip()
    configure_logging(sys.stdout, os.path.join(state.path, "runpack_slurm.log"), secrets=(api_key, relay_key),
                      level=logging.DEBUG if settings.verbose else logging.INFO)
    client = WorkerClient(worker_url, api_key, settings.request_timeout)
    relay = None
    if settings.notify_relay_url and relay_key:
        relay = RelayClient(check_worker_url(settings.notify_relay_url, settings.allow_insecure_http, "NotifyRelay",
                                             "subscribe key"), relay_key, None, None)
    try:
        client.runner_id = _scaler_identity(state, client, settings, job_types)
        pool = StatePool(os.path.join(state.path, "runners"))
        slurm = SlurmClient("runpack-" + client.runner_id[:8], slurm_runner_environment(environ))
        scaler = SlurmScaler(settings, client, slurm, pool,
                             slurm_runner_command(args, environ, settings, pool), options,
                             NewJobNotices(relay, Waker()))
        return scaler.run(job_types)
    except WorkerKeyRejected as error:
        LOG.error("%s; stopping. Check RUNPACK_RUNNER_API_KEY", error)
        return EXIT_KEY_REJECTED
    except WorkerRejected as error:
        LOG.error("The worker refused to register the scaler (%s); is %s the base URL of a Runpack worker?",
                  error, worker_url)
        return EXIT_USAGE


def _scaler_identity(state, client, settings, job_types):
    """The scaler's runner id (it polls the worker as a runner would, and never claims): kept in
    its directory, so that its runners' job name in Slurm, made of it, stays across restarts."""
    identity = state.load_identity()
    if identity is None:
        runner_id = Retrying(settings.retry_max, time.sleep, lambda delay: False).call(
            lambda: client.register("slurm-scaler-" + new_runner_name()[len("runner-"):], job_types),
            "Cannot register the scaler with the worker yet")
        state.save_identity(runner_id, "slurm-scaler")
        return runner_id
    return identity["runner_id"]


# ---- Command line ---------------------------------------------------------------

class EpilogAsWritten(argparse.HelpFormatter):
    """Wraps the description as usual, and keeps an epilog of exit codes as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("exit codes"):
            return "".join(indent + line for line in text.splitlines(True))
        return super()._fill_text(text, width, indent)


RUNNER_EXIT_CODES = """\
exit codes (a restart cannot fix 2, 3, 4 and 8: see systemd's RestartPreventExitStatus=):
  0        stopped by SIGINT/SIGTERM after finishing its jobs
  1        an unexpected error (traceback in the log), or a batch limit before the worker
           was ever reached
  2        a bad command line or setting, no key, an unusable state directory, or a URL
           that is not a Runpack worker's
  3        the worker rejected the key
  4        another runner holds the state directory
  5, 6, 7  --once or --max-jobs: the jobs ran; --idle-timeout: no job came; --max-uptime:
           the time was up
  8        job processes cannot be started here (the job stays for the next start)
  128+N    stopped by a second signal N
"""


SLURM_EXIT_CODES = """\
exit codes: 0 stopped by SIGINT/SIGTERM (its runners go on in Slurm); 2 a bad setting, no key,
no sbatch, or no job type the runners could serve; 3 the worker rejected the key; 4 another
scaler uses the directory
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="runpack", description="Runpack runner: serve jobs from a Runpack worker, or run one here.")
    parser.add_argument("--version", action="version", version="runpack-runner " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    runner = commands.add_parser(
        "runner", help="register with the worker and serve jobs until stopped",
        description="Serve jobs from a Runpack worker. Needs %s in the environment. The first "
                    "SIGINT/SIGTERM finishes the running job and stops; a second one stops the job "
                    "now and leaves it to the next start on the same state directory." % API_KEY_ENV,
        epilog=RUNNER_EXIT_CODES, formatter_class=EpilogAsWritten)
    add_setting_flags(runner, RUNNER_SETTINGS)
    check = commands.add_parser(
        "check", help="say whether this machine can serve jobs, and what to fix if not",
        description="Check the settings, the key, the worker and the job types; exit 0 only if "
                    "the runner could serve.")
    add_setting_flags(check, CHECK_SETTINGS)
    run = commands.add_parser(
        "run", help="run one job here, without a worker or key",
        description="Run one job locally and print its output JSON, e.g. "
                    "`run hello_world name=Alice processing_time=3`.",
        epilog="job types: %s (more with --handlers)" % ", ".join(sorted(JOB_HANDLERS)))
    run.add_argument("job_type", nargs="?", help="the job type, e.g. hello_world")
    run.add_argument("params", nargs="*", metavar="KEY=VALUE",
                     help="a parameter; the value is read as JSON when it parses (42, true, [1]), else "
                          "as a string")
    run.add_argument("--params", dest="params_json", metavar="JSON", help="parameters as a JSON object")
    run.add_argument("--params-file", metavar="FILE",
                     help="a file holding parameters as a JSON object (-: standard input)")
    add_setting_flags(run, RUN_SETTINGS, {"heartbeat_interval": RUN_HEARTBEAT_INTERVAL_S})
    slurm = commands.add_parser(
        "slurm", help="keep runners in Slurm while jobs wait (run it on a login node)",
        description="Submit Slurm batch jobs of runners while jobs wait at the worker, at most --max-runners, "
                    "each with a state directory from DIR/runners; the runners leave when idle. Needs %s in "
                    "the environment, which passes to the runners through sbatch. Runner settings given here "
                    "pass on to the runners." % API_KEY_ENV,
        epilog=SLURM_EXIT_CODES, formatter_class=EpilogAsWritten)
    add_setting_flags(slurm, SLURM_SETTINGS)
    slurm.add_argument("--sbatch-option", action="append", metavar="OPTION",
                       help="sbatch options for every runner, read as a shell would, e.g. "
                            "--sbatch-option=--partition=cpu or --sbatch-option '--time 04:00:00' "
                            "(repeatable; env %s, read the same way; the flag wins)" % SBATCH_OPTIONS_ENV)
    parser.commands = {"runner": runner, "check": check, "run": run, "slurm": slurm}
    return parser


def _locked_state_directory(settings):
    """The runner's state directory, prepared and locked: --state-dir, or one of --state-pool."""
    if settings.state_pool:
        return StatePool(settings.state_pool).take()
    state = StateDirectory(settings.state_dir)
    state.prepare()
    state.lock()
    return state


def command_runner(args, environ):
    api_key = environ.get(API_KEY_ENV, "").strip()
    if not api_key:
        print(MISSING_KEY_MESSAGE, file=sys.stderr)
        return EXIT_USAGE
    check_api_key(api_key)
    relay_key = environ.get(RELAY_KEY_ENV, "").strip()
    check_api_key(relay_key, RELAY_KEY_ENV)
    settings = resolve_settings(args, RUNNER_SETTINGS, environ)
    worker_url = check_worker_url(settings.worker_url, settings.allow_insecure_http)
    relay_url = settings.notify_relay_url and check_worker_url(
        settings.notify_relay_url, settings.allow_insecure_http, "NotifyRelay", "subscribe key")
    load_handler_modules(settings.handlers)
    chosen_job_types(settings.job_types)  # a name that no module registers is a bad setting
    try:
        state = _locked_state_directory(settings)
    except StateDirectoryBusy as error:
        print("Error: %s" % error, file=sys.stderr)
        return EXIT_STATE_DIR_BUSY
    for secret_variable in SECRET_VARIABLES:  # job handlers and the processes they start never see a key
        environ.pop(secret_variable, None)
    configure_logging(sys.stdout, os.path.join(state.path, settings.log_file), secrets=(api_key, relay_key),
                      level=logging.DEBUG if settings.verbose else logging.INFO)
    LOG.info("Runpack runner %s starting (Python %s): worker %s, state directory %s", __version__,
             sys.version.split()[0], worker_url, state.path)
    client = WorkerClient(worker_url, api_key, settings.request_timeout)
    relay = None
    if relay_url and relay_key:
        relay = RelayClient(relay_url, relay_key, settings.notify_relay_subscribe_id or None, None)
    elif relay_url or relay_key:
        LOG.warning("No push wake-ups: NotifyRelay needs both NOTIFY_RELAY_BASE_URL (or --notify-relay-url) "
                    "and %s" % RELAY_KEY_ENV)
    try:
        return Runner(settings, client, state, relay).run()
    except Exception:
        LOG.exception("Unexpected error; the runner stops (job records stay in %s)", state.jobs_path)
        return EXIT_FAILURE


def main(argv=None):
    """The command line; also the entry point for scripts that vendor this file and
    register their own job types first: ``sys.exit(runpack_runner.main())``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [LAUNCHER_COMMAND] and len(argv) == 3:  # not a user's command: see JobLauncher
        return serve_launcher(argv[1], argv[2])
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "run" and not any(arg.startswith("-") for arg in unparsed):
        args.params += unparsed  # key=value arguments given after an option
    elif unparsed:
        (parser.commands.get(args.command) or parser).error("unrecognized arguments: %s" % " ".join(unparsed))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return command_run(args, os.environ, parser.commands["run"])
        if args.command == "check":
            return command_check(args, os.environ)
        if args.command == "slurm":
            return command_slurm(args, os.environ)
        return command_runner(args, os.environ)
    except ConfigurationError as error:
        print("Error: %s" % error, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Handler modules `import runpack_runner`: let that be this module, not a second copy
    # with a registry of its own.
    sys.modules.setdefault("runpack_runner", sys.modules[__name__])
    sys.exit(main())

