"""Vendoring: a program that copies runpack_runner.py, registers its own job types and calls
main() has them served however it is started (a script beside the copy, ``python -m package``, a
console-script wrapper, a folder run as a script), by `run` and by `runner`, in job processes
whose launcher is started the way the program was. Throw-away projects in tmp_path, their real
command line, the fake worker."""

import collections
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import FAST_SETTINGS, RUNNER_PY, RunnerProcess, clean_environment
from fake_worker import RUNNER_KEY

pytestmark = pytest.mark.slow  # every test starts a vendoring program's CLI as a subprocess

EXIT_NO_JOB_PROCESSES = 8
TEXT = "to be or not to be"

# The vendoring program's job type: it says which process counted the words.
COUNT_WORDS = '''
import os


@runpack_runner.job_type("count_words")
def count_words(input_params, heartbeat_callback):
    with open("/proc/self/comm") as stream:
        process_name = stream.read().strip()
    return {"words": len(input_params["text"].split()), "pid": os.getpid(), "ppid": os.getppid(),
            "process_name": process_name}
'''

# What `python -m mypkg` runs in the bug report: it registers by importing mypkg.jobs.
PACKAGE_MAIN = '''
import sys

import mypkg.jobs  # registers count_words
from mypkg._vendor import runpack_runner

sys.exit(runpack_runner.main())
'''

# A console script as pip writes it into bin/.
CONSOLE_SCRIPT = '''#!%s
# -*- coding: utf-8 -*-
import re
import sys
from mypkg.__main__ import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
'''

Program = collections.namedtuple("Program", "command cwd env")


def write(path, source):
    os.makedirs(str(path.parent), exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip("\n"))


def vendor(path):
    """Copy this checkout's runpack_runner.py to ``path`` (its folders made as needed)."""
    os.makedirs(str(path.parent), exist_ok=True)
    shutil.copy(RUNNER_PY, str(path))


def write_package(project, jobs_prelude=""):
    """``mypkg/``: the file vendored in ``_vendor/``, count_words registered in ``jobs.py``."""
    vendor(project / "mypkg" / "_vendor" / "runpack_runner.py")
    write(project / "mypkg" / "__init__.py", "")
    write(project / "mypkg" / "_vendor" / "__init__.py", "")
    write(project / "mypkg" / "jobs.py",
          jobs_prelude + "from mypkg._vendor import runpack_runner\n" + COUNT_WORDS)


def elsewhere(tmp_path):
    """A working directory from which nothing of the project is importable."""
    path = tmp_path / "elsewhere"
    os.makedirs(str(path), exist_ok=True)
    return path


# ---- The ways a vendoring program is started -------------------------------------------------


def script_beside_the_copy(tmp_path, prelude=""):
    """The README's form: ``python myjobs_main.py`` registers and calls main()."""
    project = tmp_path / "project"
    vendor(project / "runpack_runner.py")
    write(project / "myjobs_main.py", "import sys\n" + prelude + "import runpack_runner\n" + COUNT_WORDS
          + "\nsys.exit(runpack_runner.main())\n")
    return Program([sys.executable, str(project / "myjobs_main.py")], elsewhere(tmp_path), {})


def package_run_with_dash_m(tmp_path, jobs_prelude=""):
    """The bug report's form: ``python -m mypkg`` from the project folder, types in mypkg.jobs."""
    project = tmp_path / "project"
    write_package(project, jobs_prelude)
    write(project / "mypkg" / "__main__.py", PACKAGE_MAIN)
    return Program([sys.executable, "-m", "mypkg"], project, {})


def package_registering_in_its_main(tmp_path):
    """``python -m mypkg`` whose ``__main__.py`` registers the types itself."""
    project = tmp_path / "project"
    write_package(project)
    os.remove(str(project / "mypkg" / "jobs.py"))
    write(project / "mypkg" / "__main__.py", "import sys\n\nfrom mypkg._vendor import runpack_runner\n"
          + COUNT_WORDS + "\nsys.exit(runpack_runner.main())\n")
    return Program([sys.executable, "-m", "mypkg"], project, {})


def console_script_wrapper(tmp_path):
    """An entry point ``mypkg.__main__:main``, started by its bin/ wrapper, the package found on
    PYTHONPATH from another working directory."""
    project = tmp_path / "project"
    write_package(project)
    write(project / "mypkg" / "__main__.py", '''
        import sys

        import mypkg.jobs  # registers count_words
        from mypkg._vendor import runpack_runner


        def main():
            return runpack_runner.main()


        if __name__ == "__main__":
            sys.exit(main())
    ''')
    wrapper = tmp_path / "bin" / "mypkg-runner"
    write(wrapper, CONSOLE_SCRIPT % sys.executable)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return Program([str(wrapper)], elsewhere(tmp_path), {"PYTHONPATH": str(project)})


def folder_run_as_a_script(tmp_path):
    """``python project_dir``: its ``__main__.py`` imports the jobs module beside it."""
    project = tmp_path / "project"
    vendor(project / "runpack_runner.py")
    write(project / "jobs.py", "import runpack_runner\n" + COUNT_WORDS)
    write(project / "__main__.py", "import sys\n\nimport jobs  # registers count_words\n"
          "import runpack_runner\n\nsys.exit(runpack_runner.main())\n")
    return Program([sys.executable, str(project)], elsewhere(tmp_path), {})


FORMS = [script_beside_the_copy, package_run_with_dash_m, package_registering_in_its_main,
         console_script_wrapper, folder_run_as_a_script]
FORM_IDS = [form.__name__ for form in FORMS]


# ---- Running a program's `run` and `runner` ------------------------------------------------


def run_program(program, *args, timeout=60):
    """Run ``program`` with ``args`` to completion: (its pid, the CompletedProcess, text)."""
    process = subprocess.Popen(program.command + list(args), cwd=str(program.cwd),
                               env=clean_environment(**program.env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    return process.pid, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class ProgramRunner(RunnerProcess):
    """A vendoring program's `runner` in the background: as conftest's, in the program's own
    working directory (``python -m mypkg`` finds mypkg there) instead of the state directory."""

    def __init__(self, command, env, cwd, state_dir, output_path):
        self.command, self.state_dir, self.output_path = command, str(state_dir), str(output_path)
        self._output = open(self.output_path, "wb")
        self.process = subprocess.Popen(command, env=env, cwd=str(cwd), stdout=self._output,
                                        stderr=subprocess.STDOUT)

    @property
    def log(self):
        with open(os.path.join(self.state_dir, "runpack_runner.log"), encoding="utf-8") as stream:
            return stream.read()


@pytest.fixture
def start_program_runner(tmp_path, worker):
    """Start ``program``'s `runner` against the fake worker; every one is stopped (SIGTERM, then
    a wait) at the end of the test, passed or failed."""
    started = []

    def start(program):
        state_dir = tmp_path / "state"
        os.makedirs(str(state_dir), exist_ok=True)
        command = program.command + ["runner", "--worker-url", worker.url, "--state-dir", str(state_dir)]
        env = clean_environment(RUNPACK_RUNNER_API_KEY=RUNNER_KEY, **program.env)
        runner = ProgramRunner(command + list(FAST_SETTINGS), env, program.cwd, state_dir,
                               tmp_path / ("runner-%d.out" % len(started)))
        started.append(runner)
        return runner

    yield start
    for runner in started:
        try:
            runner.stop()
        finally:
            runner.close()


def finished_job(worker, runner, job_id):
    """The job once it completed or failed; fails at once, with the runner's output, if the
    runner exits first."""
    worker.wait_until(lambda: worker.job(job_id)["status"] in ("completed", "failed")
                      or runner.process.poll() is not None, timeout=20)
    job = worker.job(job_id)
    assert job["status"] in ("completed", "failed"), "the runner exited:\n%s" % runner.output
    return job


def assert_counted_in_a_job_process(output, program_pid):
    """count_words's output: the words of TEXT, counted in a job process the launcher forked, not
    in the program's own process or by a thread of it."""
    assert output["words"] == len(TEXT.split())
    assert output["process_name"] == "runpack-job"
    assert program_pid not in (output["pid"], output["ppid"]), "not a process forked by the launcher"


# ---- Every form, by `run` and by `runner` ----------------------------------------------------


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_run_of_a_vendoring_program_runs_its_own_job_type_in_a_job_process(tmp_path, form):
    program = form(tmp_path)
    pid, result = run_program(program, "run", "count_words", "text=" + TEXT)
    assert result.returncode == 0, result.stderr
    assert_counted_in_a_job_process(json.loads(result.stdout), pid)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_runner_of_a_vendoring_program_serves_its_own_job_type_in_a_job_process(
        tmp_path, worker, start_program_runner, form):
    job_id = worker.add_job("count_words", {"text": TEXT})
    runner = start_program_runner(form(tmp_path))
    job = finished_job(worker, runner, job_id)
    assert job["status"] == "completed", (job, runner.output)
    assert_counted_in_a_job_process(job["output_data"], runner.process.pid)
    assert runner.stop() == 0


# ---- A vendoring program whose launcher cannot start ------------------------------------------

BREAK_IN_THE_LAUNCHER = '''
import sys

if "_launcher" in sys.argv:
    raise RuntimeError("mypkg.jobs does not import in the launcher")

'''


def test_a_vendoring_runner_whose_launcher_cannot_start_exits_8_before_claiming_and_logs_the_traceback(
        tmp_path, worker, start_program_runner):
    job_id = worker.add_job("count_words", {"text": TEXT})
    runner = start_program_runner(package_run_with_dash_m(tmp_path, jobs_prelude=BREAK_IN_THE_LAUNCHER))
    assert runner.wait() == EXIT_NO_JOB_PROCESSES, runner.output
    log = runner.log
    assert "Cannot start job processes: the job launcher did not start" in log
    assert "RuntimeError: mypkg.jobs does not import in the launcher" in log
    assert worker.count("claim") == 0 and worker.job(job_id)["status"] == "pending"


def test_run_of_a_vendoring_program_whose_launcher_cannot_start_says_so_in_one_line(tmp_path):
    program = package_run_with_dash_m(tmp_path, jobs_prelude=BREAK_IN_THE_LAUNCHER)
    _, result = run_program(program, "run", "count_words", "text=" + TEXT)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: cannot start a job process: the job launcher did not start"), \
        result.stderr
    assert "Traceback" not in result.stderr


# ---- Documented: the program's top-level code runs once more, in the launcher -----------------


def test_a_vendoring_programs_top_level_code_runs_again_in_the_launcher(tmp_path):
    starts = tmp_path / "starts.txt"
    record_start = "with open(%r, 'a') as _starts:\n    _starts.write(sys.argv[1] + '\\n')\n" % str(starts)
    program = script_beside_the_copy(tmp_path, prelude=record_start)
    _, result = run_program(program, "run", "count_words", "text=" + TEXT)
    assert result.returncode == 0, result.stderr
    assert starts.read_text().splitlines() == ["run", "_launcher"]
