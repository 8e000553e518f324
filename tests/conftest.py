"""Shared test fixtures: a fake worker on 127.0.0.1 and the real runner CLI as a subprocess."""

import glob
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

from fake_relay import RELAY_PUBLISH_KEY, RELAY_SUBSCRIBE_KEY, FakeRelay  # noqa: E402
from fake_worker import RUNNER_KEY, FakeWorker  # noqa: E402

REPO = os.path.dirname(TESTS)
sys.path.insert(0, REPO)  # `import runpack_runner` finds this checkout's file
RUNNER_PY = os.path.join(REPO, "runpack_runner.py")
TEST_JOB_TYPES = os.path.join(TESTS, "job_types_for_tests.py")

# Small intervals, so that no test waits for the real 10-60 s schedule.
FAST_SETTINGS = ("--poll-interval", "0.2", "--poll-interval-step", "0.1", "--poll-interval-max", "0.5",
                 "--heartbeat-interval", "0.5", "--request-timeout", "2", "--retry-max", "0.3")


def pyenv_root():
    """Where pyenv keeps its Pythons: $PYENV_ROOT, else ~/.pyenv."""
    return os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")


def find_python(name):
    """The path of an installed interpreter such as "python3.8" that really runs, or None.

    pyenv puts shims for every version on PATH that fail unless the version is selected,
    so a shim is tried first and the version's own binary second."""
    candidates = [shutil.which(name)]
    candidates += sorted(glob.glob(os.path.join(pyenv_root(), "versions", "%s*" % name[6:], "bin", name)))
    for candidate in filter(None, candidates):
        try:
            subprocess.run([candidate, "-c", "pass"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
            return candidate
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def installed_script(name):
    """The console script ``name`` installed beside the running interpreter (its venv's bin), or None.

    scripts/test.py runs the venv's python without activating the venv, so PATH may not lead there,
    or may lead to another environment's copy."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


FIGPACK_EXTRA_MODULES = ("figpack", "figpack_spike_sorting", "lindi", "h5py")


def require_figpack_extra():
    """Skip the calling test, or the module at import, unless the figpack extra imports here.

    Importing, not finding: figpack installs on Python 3.8 but raises TypeError when imported."""
    for name in FIGPACK_EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or whatever a module that does not suit this Python raises
            pytest.skip("the figpack extra cannot be imported on Python %d.%d: %s: %s: %s"
                        % (sys.version_info[0], sys.version_info[1], name, type(exc).__name__, exc),
                        allow_module_level=True)


def children_of(pid):
    """The pids of the live (not zombie) child processes of ``pid``, read from /proc."""
    children = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(name))
    return children


def descendants_of(pid):
    """The pids of the live descendants of ``pid``: children, their children, and so on."""
    found, generation = [], children_of(pid)
    while generation:
        found += generation
        generation = [grandchild for child in generation for grandchild in children_of(child)]
    return found


def process_name(pid):
    """What ps shows for ``pid`` (its /proc comm), or None once it is gone."""
    try:
        with open("/proc/%d/comm" % pid) as stream:
            return stream.read().strip()
    except OSError:
        return None


LAUNCHER_NAME = "runpack-launch"  # the launcher, and the spare it forked for the next job


def job_processes_of(runner_pid):
    """The runner's processes that run a job: named runpack-job, unlike its launcher and the
    spare that waits for the next job (runpack-launch)."""
    return [pid for pid in descendants_of(runner_pid) if process_name(pid) == "runpack-job"]


def launcher_of(runner):
    """The pid of the runner's launcher: its one child named runpack-launch (the spare, named
    so too, is the launcher's child)."""
    launchers = [pid for pid in children_of(runner.process.pid) if process_name(pid) == LAUNCHER_NAME]
    assert len(launchers) == 1, "the runner's launchers: %s" % launchers
    return launchers[0]


def read_pid(path, timeout=15):
    """The pid a job wrote to ``path``, once it has."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and open(path).read()):
        assert time.monotonic() < deadline, "the job never wrote its pid"
        time.sleep(0.02)
    return int(open(path).read())


def process_exists(pid):
    """True while ``pid`` runs; a zombie is as good as gone."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return stream.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while we read
        return False


def clean_environment(**overrides):
    """The test process's environment without RUNPACK_* and NOTIFY_RELAY_* settings, plus ``overrides``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPACK_", "NOTIFY_RELAY_"))}
    env.update(overrides)
    return env


class RunnerProcess:
    """`python runpack_runner.py runner ...` started in the background, its output in a file."""

    def __init__(self, command, env, state_dir, output_path):
        self.command, self.state_dir, self.output_path = command, str(state_dir), str(output_path)
        self._output = open(self.output_path, "wb")
        self.process = subprocess.Popen(command, env=env, cwd=self.state_dir, stdout=self._output,
                                        stderr=subprocess.STDOUT)

    @property
    def output(self):
        with open(self.output_path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def send(self, signum):
        self.process.send_signal(signum)

    def wait(self, timeout=20):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError("runner did not exit within %ss; output:\n%s" % (timeout, self.output))

    def stop(self, timeout=20):
        """First SIGTERM: the runner finishes what it does and exits."""
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
        return self.wait(timeout)

    def wait_for_output(self, text, timeout=15):
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or self.process.poll() is not None and text not in self.output:
                raise AssertionError("%r not in runner output:\n%s" % (text, self.output))
            time.sleep(0.02)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._output.close()


@pytest.fixture
def worker():
    with FakeWorker() as fake:
        yield fake
        assert not fake.internal_errors, "the fake worker itself failed:\n%s" % fake.internal_errors


@pytest.fixture
def relay(worker):
    """A fake NotifyRelay on 127.0.0.1 to which the ``worker`` fixture publishes every new job."""
    with FakeRelay() as fake:
        worker.relay_url, worker.relay_publish_key = fake.url, RELAY_PUBLISH_KEY
        yield fake
        assert not fake.internal_errors, "the fake relay itself failed:\n%s" % fake.internal_errors


def relay_environment(relay, subscribe_key=RELAY_SUBSCRIBE_KEY):
    """The environment variables that make a runner (or `check`) subscribe to ``relay``."""
    return {"NOTIFY_RELAY_BASE_URL": relay.url, "NOTIFY_RELAY_SUBSCRIBE_KEY": subscribe_key}


@pytest.fixture
def start_runner(tmp_path, worker):
    """Start the real CLI against the fake worker: ``start_runner("--handlers", path, env={...})``."""
    started = []

    def start(*extra_args, state_dir=None, env=None, python=sys.executable, fast=True,
              worker_url=None, key=RUNNER_KEY):
        state_dir = state_dir or tmp_path / "state"
        os.makedirs(str(state_dir), exist_ok=True)
        command = [python, RUNNER_PY, "runner", "--worker-url", worker_url or worker.url,
                   "--state-dir", str(state_dir)] + list(FAST_SETTINGS if fast else ()) + list(extra_args)
        environment = clean_environment(**(env or {}))
        if key is not None:
            environment["RUNPACK_RUNNER_API_KEY"] = key
        runner = RunnerProcess(command, environment, state_dir,
                               tmp_path / ("runner-%d.out" % len(started)))
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.close()


def run_cli(*args, env=None, timeout=60, python=sys.executable, cwd=None):
    """Run the CLI to completion; returns the CompletedProcess (text)."""
    return subprocess.run([python, RUNNER_PY] + list(args), env=clean_environment(**(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout, cwd=cwd)
