"""What a newcomer runs first: the test command (scripts/test.py) and the fake worker served by hand
(python3 tests/fake_worker.py) with the submit and runner commands it prints."""

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, TESTS, clean_environment, require_figpack_extra

FAKE_WORKER_PY = os.path.join(TESTS, "fake_worker.py")
TEST_COMMAND_PY = os.path.join(REPO, "scripts", "test.py")

# never route loopback requests through a proxy
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- The suite on every Python: the figpack tests skip where figpack does not import -------------


def test_figpack_tests_skip_where_figpack_is_installed_but_does_not_import(tmp_path, monkeypatch):
    # figpack installs on Python 3.8 and then raises TypeError at import; a find_spec check passes.
    (tmp_path / "figpack.py").write_text("raise TypeError(\"'type' object is not subscriptable\")\n")
    monkeypatch.delitem(sys.modules, "figpack", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="figpack: TypeError: 'type' object is not subscriptable"):
        require_figpack_extra()


# ---- The fake worker served by hand -------------------------------------------------------------


class ServedFakeWorker:
    """`python3 tests/fake_worker.py ARGS` in the background, its stdout read line by line."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, FAKE_WORKER_PY] + list(args), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, universal_newlines=True,
                                        env=clean_environment())
        self.lines = []
        self._incoming = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._incoming.put(line.rstrip("\n"))
        self._incoming.put(None)

    def wait_for_line(self, pattern, timeout=15):
        """The first line (printed so far or later) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if re.search(pattern, line):
                    return line
            seen = len(self.lines)
            try:
                line = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError("no line matching %r; the fake printed:\n%s"
                                     % (pattern, "\n".join(self.lines)))
            self.lines.append(line)

    def interrupt(self, timeout=15):
        """Ctrl-C: the exit code and what it wrote on stderr."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout)
        return code, self.process.stderr.read()

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def served():
    started = []

    def serve(*args):
        fake = ServedFakeWorker(*args)
        started.append(fake)
        return fake

    yield serve
    for fake in started:
        fake.close()


def request_from_curl(line):
    """The urllib request that a printed `curl -X M URL -H 'N: V' -d DATA` line sends."""
    words = shlex.split(line)
    assert words[0] == "curl", line
    method, headers, data, url = "GET", {}, None, None
    index = 1
    while index < len(words):
        word = words[index]
        if word in ("-X", "-H", "-d"):
            value = words[index + 1]
            if word == "-X":
                method = value
            elif word == "-H":
                name, header_value = value.split(":", 1)
                headers[name.strip()] = header_value.strip()
            else:
                data = value.encode("utf-8")
            index += 2
        else:
            if not word.startswith("-"):
                url = word
            index += 1
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def send(request):
    """(status, JSON answer) of a request, error statuses included."""
    try:
        with _OPENER.open(request, timeout=15) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read().decode("utf-8"))


def served_and_read(served):
    """A fake served on a free port: (the fake, its URL, its curl line, its runner command line)."""
    fake = served("--port", "0")
    url = re.search(r"http://127\.0\.0\.1:\d+", fake.wait_for_line(r"^Fake Runpack worker on ")).group(0)
    curl = fake.wait_for_line(r"^\s+curl ").strip()
    runner = fake.wait_for_line(r" runner --worker-url ").strip()
    fake.wait_for_line(r"^Jobs and runners")
    return fake, url, curl, runner


@pytest.mark.slow
def test_the_served_fake_worker_takes_the_submit_it_prints_and_stops_quietly_on_ctrl_c(served):
    fake, url, curl, runner = served_and_read(served)
    printed = "\n".join(fake.lines)
    for key_line in (r"runner key\s+runner-key-", r"submit key\s+submit-key-", r"admin key\s+none"):
        assert re.search(key_line, printed), printed
    assert ("--worker-url %s " % url) in runner

    status, answer = send(request_from_curl(curl))
    assert (status, answer["status"]) == (201, "pending"), answer
    fake.wait_for_line(r"job %s hello_world .*: pending$" % answer["job_id"])

    assert fake.interrupt() == (0, "")


@pytest.mark.slow
def test_the_printed_runner_command_runs_the_printed_job(served, tmp_path):
    fake, url, curl, runner = served_and_read(served)
    status, answer = send(request_from_curl(curl))
    assert status == 201, answer

    words = shlex.split(runner)
    env = clean_environment()
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == "python3" and words[1].endswith("runpack_runner.py"), runner
    command = [sys.executable] + words[1:] + ["--state-dir", str(tmp_path), "--once"]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 5, result.stdout     # --once: the job was run

    fake.wait_for_line(r'job %s hello_world .*: completed \{"message": "Hello, Alice!"' % answer["job_id"])
    status, again = send(request_from_curl(curl))
    assert (status, again["status"]) == (200, "completed"), again
    assert again["result"]["output_data"] == {"message": "Hello, Alice!", "processing_time": 3}
    assert fake.interrupt()[0] == 0


@pytest.mark.slow
def test_a_port_in_use_is_one_line_and_exit_2(served):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        fake = served("--port", str(port))
        code = fake.process.wait(30)
        error = fake.process.stderr.read()
    assert code == 2
    assert error.startswith("fake_worker.py: cannot listen on 127.0.0.1:%d: " % port)
    assert error.count("\n") == 1 and "--port 0" in error


# ---- The test command ---------------------------------------------------------------------------

DEMO_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "demo-for-the-test-command"
version = "0"

[project.optional-dependencies]
test = ["pytest"]
figpack = []

[tool.setuptools]
py-modules = ["demo"]

[tool.pytest.ini_options]
markers = ["slow: a slow test"]
"""

DEMO_TESTS = """\
import sys

import pytest

import demo


def test_fast():
    assert demo.ANSWER == 42
    assert sys.prefix != sys.base_prefix, "not run in a virtual environment"


@pytest.mark.slow
def test_slow():
    pass
"""


@pytest.fixture
def demo_checkout(tmp_path):
    """A checkout of a tiny project with scripts/test.py, a test extra and two tests, one slow."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "tests").mkdir()
    shutil.copy(TEST_COMMAND_PY, str(checkout / "scripts" / "test.py"))
    (checkout / "pyproject.toml").write_text(DEMO_PYPROJECT)
    (checkout / "demo.py").write_text("ANSWER = 42\n")
    (checkout / "tests" / "test_demo.py").write_text(DEMO_TESTS)
    return checkout


def run_test_command(checkout, *args):
    env = clean_environment()
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([sys.executable, str(checkout / "scripts" / "test.py")] + list(args),
                            cwd=str(checkout / "tests"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    return result.returncode, result.stdout


@pytest.mark.slow
def test_the_test_command_makes_a_venv_once_reuses_it_and_passes_pytest_arguments_on(demo_checkout):
    venv = demo_checkout / (".venv-%d.%d" % sys.version_info[:2])
    extras = "test,figpack" if sys.version_info >= (3, 9) else "test"

    code, output = run_test_command(demo_checkout, "-m", "not slow")
    assert code == 0, output
    assert "installing the package with .[%s] into %s (new virtual environment)" % (extras, venv.name) in output
    assert re.search(r"^1 passed, 1 deselected", output, re.M), output
    assert (venv / "bin" / "python").exists()

    code, output = run_test_command(demo_checkout, "--python", sys.executable, "-k", "fast or slow")
    assert code == 0, output
    assert "installing" not in output and "creating" not in output, "the venv was not reused:\n" + output
    assert re.search(r"^2 passed", output, re.M), output

    with open(str(demo_checkout / "pyproject.toml"), "a") as stream:
        stream.write("# changed\n")
    code, output = run_test_command(demo_checkout, "-m", "not slow")
    assert code == 0, output
    assert "(pyproject.toml changed)" in output and "creating" not in output, output

    (demo_checkout / "tests" / "test_broken.py").write_text("def test_broken():\n    assert False\n")
    code, output = run_test_command(demo_checkout, "-m", "not slow")
    assert code == 1, output
    assert re.search(r"^1 failed, 1 passed, 1 deselected", output, re.M), output
