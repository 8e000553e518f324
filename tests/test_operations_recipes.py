"""Every recipe of docs/operations.md, taken from the markdown and run as written.

The Slurm recipes run against the fake worker and a real throw-away Slurm cluster, in a HOME of
the test's own that holds what the recipes expect there: ~/.runpack/runner.key,
~/.runpack/figpack.key and ~/runpack/runpack_runner.py (a copy of this checkout's file). What the
recipes leave to the environment comes from it: the worker's URL and short intervals (settings in
the environment pass through sbatch to the runners), and a PATH whose first python3 is the
interpreter running the tests. The systemd unit cannot run here (no systemd as PID 1): it is
checked against the runner's own parser and help. No test asserts a duration: waits are for states.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, RUNNER_KEY, run_cli
from fake_worker import FakeWorker
from slurm_cluster import TAG_VARIABLE, SlurmCluster, free_loopback_ports, require_slurm

import runpack_runner

pytestmark = pytest.mark.slow  # the runner CLI and Slurm's daemons as subprocesses

OPERATIONS_MD = os.path.join(REPO, "docs", "operations.md")
FIGPACK_KEY = "figpack-key-for-the-recipe-tests"
# The runner settings the recipes leave out, from the environment: a flag in a recipe wins over them.
FAST_ENVIRONMENT = {"RUNPACK_POLL_INTERVAL": "0.5", "RUNPACK_POLL_INTERVAL_STEP": "0.1",
                    "RUNPACK_POLL_INTERVAL_MAX": "0.5", "RUNPACK_HEARTBEAT_INTERVAL": "0.5",
                    "RUNPACK_REQUEST_TIMEOUT": "2", "RUNPACK_RETRY_MAX": "0.3"}
KEY_VARIABLES = ("RUNPACK_RUNNER_API_KEY", "FIGPACK_API_KEY")  # the recipes read them from the key files
# Ended jobs stay in squeue this long, so that `scontrol show job` still knows the first runners
# when the test looks at them.
MIN_JOB_AGE_S = 600
DRAIN_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20


# ---- The recipes, from the markdown ------------------------------------------------------------


def fenced_blocks(markdown):
    """Every fenced code block as (the heading it is under, its language, its text as written)."""
    blocks, heading, fence = [], None, None
    for line in markdown.splitlines(True):
        if fence is None:
            opening = re.match(r"^```(\S*)\s*$", line)
            if opening:
                fence = (opening.group(1), [])
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif re.match(r"^```\s*$", line):
            blocks.append((heading, fence[0], "".join(fence[1])))
            fence = None
        else:
            fence[1].append(line)
    assert fence is None, "a fence of docs/operations.md is never closed"
    return blocks


def operations_text():
    with open(OPERATIONS_MD, encoding="utf-8") as stream:
        return stream.read()


def recipe(heading, language, containing=""):
    """The one ```language block under ``heading`` (that holds ``containing``)."""
    found = [text for under, lang, text in fenced_blocks(operations_text())
             if under == heading and lang == language and containing in text]
    assert len(found) == 1, "docs/operations.md has %d ```%s blocks under %r" % (len(found), language, heading)
    return found[0]


def scaler_recipe():
    return recipe("The scaler: runners come when work comes", "sh")


def array_recipe():
    return recipe("A static job array", "sh", containing="#SBATCH")


def systemd_unit():
    return recipe("systemd", "ini", containing="[Service]")


def liveness_probe():
    return recipe("Metrics and health", "yaml")


def test_the_markdown_parser_finds_the_recipes_under_their_headings():
    assert scaler_recipe().startswith("export RUNPACK_RUNNER_API_KEY=$(cat ~/.runpack/runner.key)\n")
    assert " slurm --max-runners 8 " in scaler_recipe()
    assert array_recipe().startswith("#!/bin/bash\n#SBATCH --job-name=runpack\n")
    assert systemd_unit().startswith("# /etc/systemd/system/runpack-runner.service\n")
    assert "livenessProbe:" in liveness_probe()


# ---- A HOME laid out as the recipes expect, a cluster, a worker --------------------------------


@pytest.fixture
def worker():
    """A fake worker whose rate limit no poll of these tests reaches."""
    with FakeWorker(rate_limit=100000) as fake:
        yield fake
        assert not fake.internal_errors, "the fake worker itself failed:\n%s" % fake.internal_errors


@pytest.fixture
def cluster():
    """A Slurm cluster of this test's own: its teardown ends every job and every process started
    with its environment (the recipes' runners included)."""
    require_slurm()
    with SlurmCluster(min_job_age=MIN_JOB_AGE_S) as started:
        yield started


@pytest.fixture
def home(tmp_path):
    """A HOME with the key files and the runner's file where the recipes read them."""
    home = tmp_path / "home"
    (home / ".runpack").mkdir(parents=True)
    (home / ".runpack" / "runner.key").write_text(RUNNER_KEY + "\n")
    (home / ".runpack" / "figpack.key").write_text(FIGPACK_KEY + "\n")
    (home / "runpack").mkdir()
    shutil.copy(os.path.join(REPO, "runpack_runner.py"), str(home / "runpack" / "runpack_runner.py"))
    return home


@pytest.fixture
def python3_folder(tmp_path):
    """A folder whose python3 is the interpreter running the tests. A script that execs it, not a
    symlink: through a symlink elsewhere, a venv's python loses its venv (sys.prefix)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").write_text("#!/bin/sh\nexec %s \"$@\"\n" % shlex.quote(sys.executable))
    (folder / "python3").chmod(0o755)
    return folder


def recipe_environment(cluster, worker, home, python3_folder, **settings):
    """The cluster's environment (SLURM_CONF and its tag) with HOME, PATH, the worker's URL and
    short intervals; no key and no other Runpack setting of the machine running the tests."""
    env = {key: value for key, value in cluster.env.items()
           if key == TAG_VARIABLE or not key.startswith(("RUNPACK_", "NOTIFY_RELAY_"))}
    for variable in KEY_VARIABLES:
        env.pop(variable, None)
    env.update(FAST_ENVIRONMENT, HOME=str(home), RUNPACK_WORKER_URL=worker.url,
               PATH=str(python3_folder) + os.pathsep + env.get("PATH", os.defpath))
    env.update(settings)
    return env


class RecipeProcess:
    """A recipe run with `bash -c`, in a process group of its own, its output in a file."""

    def __init__(self, text, env, cwd, output_path):
        self.output_path = output_path
        self._output = open(output_path, "wb")
        self.process = subprocess.Popen(["bash", "-c", text], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                        stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self):
        with open(self.output_path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def stop(self, timeout=STOP_TIMEOUT_S):
        """SIGTERM to the recipe's process group, as Ctrl-C or `kill` would reach it; the exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the recipe did not exit within %ss of SIGTERM:\n%s" % (timeout, self.output))

    def close(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._output.close()


@pytest.fixture
def run_recipe(tmp_path):
    """``run_recipe(text, env)`` starts it; every recipe process group is killed at teardown."""
    started = []

    def run(text, env):
        process = RecipeProcess(text, env, str(tmp_path), str(tmp_path / ("recipe-%d.out" % len(started))))
        started.append(process)
        return process

    yield run
    for process in started:
        process.close()


# ---- Helpers -------------------------------------------------------------------------------------


def read(path):
    with open(str(path), encoding="utf-8", errors="replace") as stream:
        return stream.read()


def wait_for_path(path, recipe_process, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(str(path)):
        if recipe_process.process.poll() is not None:
            raise AssertionError("the recipe exited with %s:\n%s" % (recipe_process.process.returncode,
                                                                     recipe_process.output))
        assert time.monotonic() < deadline, "%s never appeared:\n%s" % (path, recipe_process.output)
        time.sleep(0.05)


def wait_until_completed(worker, job_ids, cluster, timeout=DRAIN_TIMEOUT_S):
    worker.wait_until(lambda: all(worker.job(job_id)["status"] == "completed" for job_id in job_ids),
                      timeout=timeout, message="jobs not completed; Slurm: %s" % cluster.jobs())


def assert_each_reported_once(worker, job_ids):
    for job_id in job_ids:
        job = worker.job(job_id)
        assert job["status"] == "completed", job
        assert [kind for kind, _ in job["reports"]] == ["complete"], "job %s: reports %s" % (job_id, job["reports"])
        assert worker.count("complete", job_id=job_id, status=200) == 1


def pool_identities(pool_path):
    """{pool directory name: runner id} of the directories a runner took in ``pool_path``."""
    pool = runpack_runner.StatePool(str(pool_path))
    return {os.path.basename(state.path): (state.load_identity() or {}).get("runner_id")
            for state in pool.directories()}


def scontrol_fields(cluster, job_id):
    """`scontrol show job`'s Key=Value fields of one job."""
    shown = cluster.run("scontrol", "show", "job", job_id).stdout
    return dict(word.split("=", 1) for word in shown.split() if "=" in word)


def sbatch_header(script):
    """The #SBATCH options of a batch script: {"--array": "1-8", ...}."""
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.split(None, 1)[1].partition("=")
            options[name] = value
    return options


# ---- The scaler ------------------------------------------------------------------------------------


def test_the_scaler_recipe_as_written_drains_jobs_through_runners_it_submits_and_exits_0_on_sigterm(
        worker, cluster, home, python3_folder, run_recipe):
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 1})
               for number in range(3)]
    env = recipe_environment(cluster, worker, home, python3_folder, RUNPACK_IDLE_TIMEOUT="2")

    scaler = run_recipe(scaler_recipe(), env)
    state_dir = home / ".runpack" / "slurm"
    wait_for_path(state_dir / ".runpack_runner.json", scaler)
    job_name = "runpack-" + runpack_runner.StateDirectory(str(state_dir)).load_identity()["runner_id"][:8]
    wait_until_completed(worker, job_ids, cluster)

    assert scaler.process.poll() is None, "the scaler exited:\n" + scaler.output
    assert_each_reported_once(worker, job_ids)
    runner_jobs = [job for job in cluster.jobs() if job.name == job_name]
    assert runner_jobs, "no batch job of the scaler in Slurm: %s" % cluster.jobs()
    runners = pool_identities(state_dir / "runners")
    assert {worker.job(job_id)["claimed_by"] for job_id in job_ids} <= set(runners.values()), \
        "jobs claimed by runners that have no state directory of the scaler's pool"
    for job in runner_jobs:  # the recipe's options reached Slurm, and this cluster met them
        fields = scontrol_fields(cluster, job.id)
        assert (fields["TimeLimit"], fields["CPUs/Task"], fields["MinMemoryNode"]) == ("04:00:00", "2", "2G"), fields
        script = cluster.run("scontrol", "write", "batch_script", job.id, "-").stdout
        assert "%s runner --state-pool " % (home / "runpack" / "runpack_runner.py") in script, script
        assert "--job-timeout 900" in script, script
    assert "submitting" in read(state_dir / "runpack_slurm.log")
    assert scaler.stop() == 0, scaler.output


# ---- The static job array ----------------------------------------------------------------------


def test_the_array_recipe_as_written_drains_the_queue_each_task_in_a_pool_directory_and_ends_completed(
        worker, cluster, home, python3_folder, tmp_path):
    """RUNPACK_MAX_JOBS=1 (the recipe gives no --max-jobs, so the environment's applies) makes each
    task leave after one job with exit 5, a batch limit the script turns into 0: the tasks end as
    they would after --idle-timeout 600 (exit 6), without ten idle minutes."""
    script = array_recipe()
    header = sbatch_header(script)
    first, last = (int(number) for number in header["--array"].split("-"))
    tasks_at_once = cluster.cpus // int(header["--cpus-per-task"])
    job_ids = [worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 1})
               for number in range(last - first + 1)]  # one per task
    script_path = tmp_path / "runpack-array.sh"
    script_path.write_text(script)
    env = recipe_environment(cluster, worker, home, python3_folder, RUNPACK_MAX_JOBS="1")

    array_id = cluster.run("sbatch", "--parsable", str(script_path), env=env, cwd=str(tmp_path)).stdout.strip()
    wait_until_completed(worker, job_ids, cluster)
    cluster.wait_for_no_jobs(timeout=60)

    tasks = {job.id: job for job in cluster.jobs() if job.id.startswith(array_id + "_")}
    assert sorted(tasks) == sorted("%s_%d" % (array_id, task) for task in range(first, last + 1)), cluster.jobs()
    assert {job.state for job in tasks.values()} == {"COMPLETED"}, tasks
    assert {job.name for job in tasks.values()} == {header["--job-name"]}
    assert_each_reported_once(worker, job_ids)
    pool = home / ".runpack" / "pool"
    runners = pool_identities(pool)
    assert sorted(runners, key=int) == [str(number) for number in range(1, len(runners) + 1)], runners
    assert 1 <= len(runners) <= tasks_at_once, "a task took a directory no other task had left free: %s" % runners
    assert {worker.job(job_id)["claimed_by"] for job_id in job_ids} <= set(runners.values())
    for name in runners:
        assert "Runpack runner" in read(pool / name / "runpack_runner.log")
    for task_id in tasks:
        output = read(tmp_path / ("slurm-%s.out" % task_id))
        used = re.findall(r"state directory (\S+)", output)
        assert len(used) == 1 and os.path.dirname(used[0]) == str(pool), output
        assert "as --once/--max-jobs asked" in output, output  # the runner exited 5; the task still COMPLETED


@pytest.mark.slow
def test_the_array_stopped_as_the_recipe_says_finishes_its_running_job_and_ends_completed(
        worker, cluster, home, python3_folder, tmp_path):
    """`scancel --batch --signal=USR1`: the script passes it on as SIGTERM, the runner finishes
    its job and leaves with 0 (a first SIGTERM), and Slurm records the tasks as COMPLETED."""
    script = array_recipe()
    job_id = worker.add_job("hello_world", {"name": "finished after the signal", "processing_time": 3})
    script_path = tmp_path / "runpack-array.sh"
    script_path.write_text(script)
    env = recipe_environment(cluster, worker, home, python3_folder)
    array_id = cluster.run("sbatch", "--parsable", str(script_path), env=env, cwd=str(tmp_path)).stdout.strip()
    worker.wait_until(lambda: worker.job(job_id)["status"] == "in_progress", timeout=60)

    for line in stop_array_commands():
        cluster.run(*shlex.split(line.replace("<array id>", array_id)))
    cluster.wait_for_no_jobs(timeout=60)

    assert worker.job(job_id)["status"] == "completed"
    assert_each_reported_once(worker, [job_id])
    tasks = [job for job in cluster.jobs() if job.id.startswith(array_id + "_")]
    started = [job for job in tasks if job.state != "CANCELLED"]  # those that had not started are cancelled
    assert started and {job.state for job in started} == {"COMPLETED"}, tasks


def stop_array_commands():
    """The scancel lines that the array recipe's text gives to stop the array."""
    block = recipe("A static job array", "sh", containing="scancel --state")
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("scancel")]


# ---- systemd ---------------------------------------------------------------------------------------


def unit_sections(text):
    """{section: [(key, value), ...]} as systemd reads a unit: only a line that starts with # or ;
    is a comment (systemd has no comment after a value), and a trailing backslash continues a line."""
    sections, current, pending = {}, None, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def service_settings():
    return dict(unit_sections(systemd_unit())["Service"])


def seconds_of_time_span(text):
    """A systemd time span such as 3700, 1h 2min or 90s, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(number + unit for number, unit in parts) == text.replace(" ", ""), text
    return sum(float(number) * units[unit] for number, unit in parts)


def exec_start_runner_settings():
    """The runner's settings from ExecStart, parsed by the runner's own parser (an unknown flag or a
    bad value fails here as it would fail the service)."""
    words = shlex.split(service_settings()["ExecStart"])
    assert os.path.basename(words[1]) == "runpack_runner.py" and words[2] == "runner", words
    args, unparsed = runpack_runner.build_parser().parse_known_args(words[2:])
    assert unparsed == [], "ExecStart: the runner does not know %s" % unparsed
    return runpack_runner.resolve_settings(args, runpack_runner.RUNNER_SETTINGS, {})


def codes_a_restart_cannot_fix():
    help_text = run_cli("runner", "--help").stdout
    match = re.search(r"a restart cannot fix ([\d, and]+):", help_text)
    assert match, help_text
    return {int(code) for code in re.findall(r"\d+", match.group(1))}


def test_the_systemd_unit_starts_the_runner_with_flags_and_values_its_parser_accepts():
    settings = exec_start_runner_settings()

    assert service_settings()["ExecStart"].startswith("/")  # systemd wants an absolute program path
    assert settings.state_dir == service_settings()["WorkingDirectory"]
    assert settings.job_timeout > 0


def test_the_systemd_unit_prevents_a_restart_on_exactly_the_exits_runner_help_says_a_restart_cannot_fix():
    prevented = {int(code) for code in service_settings()["RestartPreventExitStatus"].split()}

    assert prevented == codes_a_restart_cannot_fix()
    assert service_settings()["Restart"] == "on-failure"


def test_the_systemd_unit_sends_sigterm_to_the_runner_alone_and_waits_longer_than_the_job_timeout():
    service = service_settings()

    assert (service["KillSignal"], service["KillMode"]) == ("SIGTERM", "mixed")
    assert seconds_of_time_span(service["TimeoutStopSec"]) > exec_start_runner_settings().job_timeout


def test_the_systemd_unit_reads_its_keys_from_one_absolute_environment_file():
    [path] = shlex.split(service_settings()["EnvironmentFile"].lstrip("-"))

    assert path.startswith("/")


# ---- The liveness probe ----------------------------------------------------------------------------


def documented_listen_addresses():
    """The --listen values the "Metrics and health" prose gives, parsed as the runner parses them."""
    text = operations_text()
    section = text[text.index("## Metrics and health"):]
    section = section[:section.index("\n## ", 1)]
    prose = re.sub(r"```.*?```", "", section, flags=re.DOTALL)
    return [runpack_runner._parse_listen(value) for value in re.findall(r"`--listen ([^`]+)`", prose)]


def probe_get():
    match = re.search(r"httpGet:\s*\{path:\s*(\S+),\s*port:\s*(\d+)\}", liveness_probe())
    assert match, liveness_probe()
    return match.group(1), int(match.group(2))


def test_the_liveness_probe_asks_for_healthz_on_the_port_the_listen_text_gives():
    path, port = probe_get()
    listen = documented_listen_addresses()

    assert path == "/healthz"
    assert listen and {documented_port for _, documented_port in listen} == {port}, listen
    assert ("0.0.0.0", port) in listen, "the probe comes from the kubelet, not loopback: --listen 0.0.0.0:PORT"


def test_a_working_runner_answers_the_liveness_probe_path_with_200(worker, start_runner):
    path, _ = probe_get()
    [port] = free_loopback_ports(1)
    runner = start_runner("--listen", "127.0.0.1:%d" % port)
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as answer:
                status, body = answer.status, answer.read().decode()
            break
        except OSError:
            assert runner.process.poll() is None, runner.output
            assert time.monotonic() < deadline, "nothing listened on port %d:\n%s" % (port, runner.output)
            time.sleep(0.05)

    assert status == 200 and body.startswith("ok"), body
    assert runner.stop() == 0

