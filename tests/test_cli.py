"""The command line without a worker: local runs, settings, packaging and the module's footprint."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, RUNNER_PY, TEST_JOB_TYPES, clean_environment, installed_script, run_cli


@pytest.mark.slow
def test_local_run_prints_the_output_json_and_console(tmp_path):
    result = run_cli("run", "hello_world", "name=Alice", "processing_time=1.5", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "Hello, Alice!", "processing_time": 1.5}
    assert "Starting hello_world job for Alice" in result.stderr
    assert "Progress: " in result.stderr and "Completed!" in result.stderr
    assert os.listdir(str(tmp_path)) == [], "a local run leaves no files behind"


@pytest.mark.slow
def test_local_run_takes_params_as_json_and_from_a_file(tmp_path):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"name": "File", "processing_time": 5}))
    result = run_cli("run", "hello_world", "--params-file", str(params), "--params", '{"name": "Json"}',
                     "processing_time=0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "Hello, Json!", "processing_time": 0}


@pytest.mark.slow
def test_local_run_shows_a_progress_line_on_a_terminal():
    script = shutil.which("script")
    if script is None:
        pytest.skip("util-linux `script` is needed to give the run a terminal")
    command = "%s %s run hello_world name=Tty processing_time=1.2" % (sys.executable, RUNNER_PY)
    result = subprocess.run([script, "-qec", command, "/dev/null"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60, env=clean_environment())
    assert result.returncode == 0, result.stdout
    assert re.search(rb"\r\x1b\[K\[[^\r]*Progress: \d+%\r\nhello_world \[#+\.*\] +\d+% ", result.stdout)
    assert b'"message": "Hello, Tty!"' in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["name=Alice"], "Error: Invalid parameters: processing_time is required"),
    (["processing_time=1"], "Error: Invalid parameters: name is required"),
    (["name=Alice", "processing_time=301"], "Error: Invalid parameters: processing_time must be a number between 0 and 300"),
    (["name=Alice", "processing_time=true"], "Error: Invalid parameters: processing_time must be a number between 0 and 300"),
    (["name=Alice", "processing_time=soon"], "Error: Invalid parameters: processing_time must be a number between 0 and 300"),
    (["name=", "processing_time=1"], "Error: Invalid parameters: name must be a non-empty string"),
])
def test_local_run_with_invalid_parameters_prints_one_line_and_exits_1(args, message):
    result = run_cli("run", "hello_world", *args)
    assert result.returncode == 1
    assert result.stderr.strip() == message
    assert result.stdout == ""


@pytest.mark.slow
def test_local_run_of_an_unknown_job_type_prints_one_line_and_exits_1():
    result = run_cli("run", "no_such_job")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: unknown job type 'no_such_job' (known: ")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["run", "hello_world", "--params", "{oops"], "Error: --params is not valid JSON"),
    (["run", "hello_world", "--params", "[1]"], "Error: --params must be a JSON object"),
    (["run", "hello_world", "--params-file", "/nonexistent.json"], "Error: cannot read --params-file"),
    (["run", "hello_world", "justaword"], "Error: expected key=value, got 'justaword'"),
    (["run", "hello_world", "--handlers", "no_such_module_xyz"], "Error: cannot load job handlers from 'no_such_module_xyz'"),
    (["run", "hello_world", "--job-timeout", "soon"], "Error: --job-timeout must be a number of seconds, got 'soon'"),
])
def test_bad_command_line_input_is_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_runner_without_key_says_how_to_set_it_and_exits_2():
    result = run_cli("runner")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: RUNPACK_RUNNER_API_KEY environment variable is not set\n")
    assert "export RUNPACK_RUNNER_API_KEY=" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("env, message", [
    ({"RUNPACK_POLL_INTERVAL": "often"}, "Error: RUNPACK_POLL_INTERVAL must be a number of seconds above 0, got 'often'"),
    ({"RUNPACK_RETRY_MAX": "0"}, "Error: RUNPACK_RETRY_MAX must be a number of seconds above 0, got '0'"),
    ({"RUNPACK_REQUEST_TIMEOUT": "0"}, "Error: RUNPACK_REQUEST_TIMEOUT must be a number of seconds above 0"),
    ({"RUNPACK_JOB_TIMEOUT": "1e10"}, "Error: RUNPACK_JOB_TIMEOUT must be a number of seconds, got '1e10'"),
    ({"RUNPACK_WORKER_URL": "https://example.org/?x=1"}, "Error: the worker URL must look like"),
    ({"RUNPACK_WORKER_URL": "https://user:pw@example.org"}, "Error: the worker URL must look like"),
    ({"RUNPACK_HEARTBEAT_INTERVAL": "-1"}, "Error: RUNPACK_HEARTBEAT_INTERVAL must be a number of seconds"),
    ({"RUNPACK_WORKER_URL": "ftp://example.org"}, "Error: the worker URL must look like https://host[:port]"),
    ({"RUNPACK_WORKER_URL": "http://example.org"}, "Error: refusing to send the runner key over plain http to example.org"),
    ({"RUNPACK_ALLOW_INSECURE_HTTP": "maybe"}, "Error: RUNPACK_ALLOW_INSECURE_HTTP must be true or false"),
])
def test_bad_settings_are_one_line_and_exit_2(env, message, tmp_path):
    env = dict(env, RUNPACK_RUNNER_API_KEY="secret-key-for-settings-test")
    result = run_cli("runner", "--state-dir", str(tmp_path), env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "secret-key-for-settings-test" not in result.stderr + result.stdout


@pytest.mark.slow
def test_an_unwritable_log_file_is_one_line_and_exit_2(tmp_path):
    result = run_cli("runner", "--state-dir", str(tmp_path), "--log-file", "/nonexistent/dir/runner.log",
                     env={"RUNPACK_RUNNER_API_KEY": "some-key"})
    assert result.returncode == 2
    assert result.stderr == "Error: cannot write the log file /nonexistent/dir/runner.log: No such file or directory\n"


@pytest.mark.slow
def test_flags_win_over_environment_variables(tmp_path):
    result = run_cli("run", "hello_world", "name=A", "processing_time=0", "--job-timeout", "5",
                     env={"RUNPACK_JOB_TIMEOUT": "not a number"})
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_python_dash_m_runs_the_module():
    result = subprocess.run([sys.executable, "-m", "runpack_runner", "run", "hello_world", "name=M",
                             "processing_time=0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=clean_environment(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello, M!"


@pytest.mark.slow
def test_installed_console_script_runs_a_job():
    runpack = installed_script("runpack")
    if runpack is None:
        pytest.skip("the package is not installed beside %s (pip install .); scripts/test.py installs it"
                    % sys.executable)
    result = subprocess.run([runpack, "run", "hello_world", "name=Pip", "processing_time=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            env=clean_environment(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello, Pip!"


@pytest.mark.slow
def test_a_vendoring_script_registers_its_job_type_and_runs_main(tmp_path):
    shutil.copy(RUNNER_PY, str(tmp_path / "runpack_runner.py"))
    (tmp_path / "my_runner.py").write_text(
        "import sys\n"
        "import runpack_runner\n\n"
        "@runpack_runner.job_type('double')\n"
        "class Double(runpack_runner.JobHandler):\n"
        "    def execute(self, input_params, heartbeat_callback):\n"
        "        return {'doubled': input_params['x'] * 2}\n\n"
        "sys.exit(runpack_runner.main())\n")
    result = subprocess.run([sys.executable, "my_runner.py", "run", "double", "x=21"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            env=clean_environment(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"doubled": 42}


@pytest.mark.slow
def test_handlers_file_given_by_path_registers_job_types():
    result = run_cli("run", "countdown", "--handlers", TEST_JOB_TYPES + ":EXTRA_JOB_TYPES", "steps=2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"counted": 2}


@pytest.mark.slow
def test_importing_the_module_loads_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import runpack_runner; "
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            universal_newlines=True, env=clean_environment(), check=True, timeout=60)
    loaded = {name.split(".")[0] for name in result.stdout.split()} - {"runpack_runner"}
    stdlib = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else None
    if stdlib is None:
        pytest.skip("sys.stdlib_module_names needs Python 3.10+")
    assert loaded <= stdlib, loaded - stdlib
    assert not loaded & {"figpack", "figpack_spike_sorting", "numpy", "h5py", "zarr", "lindi"}


@pytest.mark.slow
def test_vermin_confirms_python_3_8_as_the_minimum():
    vermin = installed_script("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed beside %s (pip install '.[test]')" % sys.executable)
    result = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.8-", RUNNER_PY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout


def test_the_readme_lists_every_setting_with_its_flag_and_environment_variable():
    import runpack_runner

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as stream:
        readme = stream.read()
    for setting in runpack_runner.SETTINGS:
        assert "| `%s` | `%s` |" % (setting.flag, setting.env) in readme, setting.name
