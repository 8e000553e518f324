"""Availability means importable: a job type's packages are import-checked once, in one child
process of the runner's interpreter for all job types together, and never in the runner itself.

The packages here are tiny modules written to a temporary folder put on sys.path; each appends
the importing process's pid to a log file, so that a test sees who imported it and how often.
"""

import os
import subprocess
import sys
import time

import pytest

import runpack_runner

HINT = "install them with: pip install example"


def write_module(folder, name, body=""):
    """A module that logs "<name> <pid>" to imports.log in ``folder`` when imported, then runs ``body``."""
    path = folder.joinpath(*name.split("."))
    if "." in name:
        path.parent.mkdir(exist_ok=True)
        init = path.parent / "__init__.py"
        if not init.exists():
            init.write_text(_LOGGING % (str(folder / "imports.log"), name.split(".")[0]))
    path.with_suffix(".py").write_text(_LOGGING % (str(folder / "imports.log"), name) + body)


_LOGGING = "import os\nwith open(%r, 'a') as _log:\n    _log.write('%s %%d\\n' %% os.getpid())\n"


def imports_logged(folder):
    """[(module, pid)] in the order they were imported."""
    log = folder / "imports.log"
    if not log.exists():
        return []
    return [(module, int(pid)) for module, pid in (line.split() for line in log.read_text().splitlines())]


def job_type_needing(*modules, env=()):
    class NeedsThem(runpack_runner.JobHandler):
        requires_modules = modules
        requires_env = env
        install_hint = HINT

        def execute(self, input_params, heartbeat_callback):
            return {}

    return NeedsThem()


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A folder on sys.path for the modules of a test; a fresh registry and import-check memory."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runpack_runner, "_import_checks", {})
    monkeypatch.setattr(runpack_runner, "JOB_HANDLERS", {"hello_world": runpack_runner.HelloWorldJob()})
    return tmp_path


@pytest.fixture
def no_child_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a child process was started: %r" % (args,))

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_no_child_process_is_started_when_no_job_type_requires_an_installed_package(modules, no_child_processes):
    runpack_runner.JOB_HANDLERS["needs_absent"] = job_type_needing("runpack_absent_module_a")
    assert runpack_runner.job_type_availability() == [
        ("hello_world", None),
        ("needs_absent", "missing Python packages runpack_absent_module_a (%s)" % HINT)]
    assert runpack_runner.checked_imports() == {}


def test_a_job_type_stopped_by_an_unset_variable_is_not_import_checked(modules, no_child_processes, monkeypatch):
    write_module(modules, "runpack_present_b")
    monkeypatch.delenv("RUNPACK_TEST_VARIABLE", raising=False)
    runpack_runner.JOB_HANDLERS["needs_variable"] = job_type_needing("runpack_present_b",
                                                                     env=("RUNPACK_TEST_VARIABLE",))
    assert dict(runpack_runner.job_type_availability())["needs_variable"] == (
        "environment variable RUNPACK_TEST_VARIABLE not set")
    assert imports_logged(modules) == []


def test_a_dotted_module_is_looked_for_without_importing_its_package(modules, no_child_processes):
    write_module(modules, "runpack_package_c.views")
    handler = job_type_needing("runpack_package_c.views")
    assert handler.unmet_requirements() == []
    assert "runpack_package_c" not in sys.modules and imports_logged(modules) == []


@pytest.mark.slow
def test_the_packages_of_all_job_types_are_checked_once_in_one_child_process(modules):
    write_module(modules, "runpack_good_d")
    write_module(modules, "runpack_good_e")
    write_module(modules, "runpack_bad_f", "raise ImportError('needs libfoo.so.1')\n")
    write_module(modules, "runpack_package_g.views")
    handlers = runpack_runner.JOB_HANDLERS
    handlers["first"] = job_type_needing("runpack_good_d", "runpack_good_e")
    handlers["second"] = job_type_needing("runpack_good_e", "runpack_bad_f")
    handlers["third"] = job_type_needing("runpack_good_d", "runpack_package_g.views")
    expected = [("first", None), ("hello_world", None),
                ("second", "Python packages that fail to import with Python %s: runpack_bad_f (ImportError: "
                           "needs libfoo.so.1) (%s)" % (sys.version.split()[0], HINT)),
                ("third", None)]
    assert runpack_runner.job_type_availability() == expected
    assert runpack_runner.job_type_availability() == expected  # remembered: no second check
    assert handlers["second"].unavailable_reason() == expected[2][1]
    logged = imports_logged(modules)
    assert sorted(module for module, _ in logged) == [
        "runpack_bad_f", "runpack_good_d", "runpack_good_e", "runpack_package_g", "runpack_package_g.views"]
    (checker,) = {pid for _, pid in logged}
    assert checker != os.getpid()
    assert not {"runpack_good_d", "runpack_bad_f", "runpack_package_g"} & set(sys.modules)


@pytest.mark.slow
def test_a_crashing_import_is_reported_with_how_the_check_ended(modules):
    write_module(modules, "runpack_good_h")
    write_module(modules, "runpack_crash_i", "os._exit(3)\n")
    problems = runpack_runner.import_problems(["runpack_good_h", "runpack_crash_i"])
    assert problems == {"runpack_good_h": None,
                        "runpack_crash_i": "the import check exited with code 3 before reporting a result"}


@pytest.mark.slow
def test_a_hanging_import_is_given_up_at_the_time_limit(modules, monkeypatch):
    monkeypatch.setattr(runpack_runner, "IMPORT_CHECK_TIMEOUT_S", 1.0)
    write_module(modules, "runpack_hang_j", "import time\ntime.sleep(60)\n")
    started = time.monotonic()
    assert runpack_runner.import_problems(["runpack_hang_j"]) == {
        "runpack_hang_j": "the import check did not end within 1 s"}
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_thread_that_an_import_leaves_running_does_not_hold_the_check_up(modules):
    write_module(modules, "runpack_thread_k",
                 "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n")
    started = time.monotonic()
    assert runpack_runner.import_problems(["runpack_thread_k"]) == {"runpack_thread_k": None}
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_the_check_does_not_see_the_runner_key(modules, monkeypatch):
    monkeypatch.setenv(runpack_runner.API_KEY_ENV, "secret-runner-key")
    write_module(modules, "runpack_peek_l", "assert 'RUNPACK_RUNNER_API_KEY' not in os.environ, 'saw the key'\n")
    assert runpack_runner.import_problems(["runpack_peek_l"]) == {"runpack_peek_l": None}
