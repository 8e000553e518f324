"""What an operator sets and reads: --job-types, a worker URL that answers with an HTML error page,
the exit codes and the systemd recipe, the job records `check` finds, and durations in messages."""

import json
import os
import re
import urllib.parse

import pytest

from conftest import REPO, RUNNER_KEY, TEST_JOB_TYPES, run_cli
from fake_worker import _HTTPService, _Reply

import runpack_runner

pytestmark = pytest.mark.slow  # most tests start the runner CLI as a subprocess

HANDLERS = ("--handlers", TEST_JOB_TYPES)
WITH_KEY = {"RUNPACK_RUNNER_API_KEY": RUNNER_KEY}
NOT_IMPLEMENTED_PAGE = b"<html><body>Not Implemented</body></html>"
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Sign in</body></html>"


# ---- Helpers ----------------------------------------------------------------------


class NotImplementedServer(_HTTPService):
    """Answers every request 501 with an HTML page, as a web server that is not a Runpack worker
    (or a proxy in front of one that is down) would; records the requests like the fake worker."""

    def _serve(self, handler, incoming):
        self._send(handler, incoming.record, _Reply(501, raw=NOT_IMPLEMENTED_PAGE, content_type="text/html"))


@pytest.fixture
def not_implemented_server():
    with NotImplementedServer() as server:
        yield server


class LoginPageServer(_HTTPService):
    """Answers every request 401 with an HTML sign-in page, as a proxy that asks for a login would."""

    def _serve(self, handler, incoming):
        self._send(handler, incoming.record, _Reply(401, raw=LOGIN_PAGE, content_type="text/html"))


@pytest.fixture
def no_figpack_key(monkeypatch):
    """The figpack job types cannot be served without FIGPACK_API_KEY: each one would log why."""
    monkeypatch.delenv("FIGPACK_API_KEY", raising=False)


def log_text(runner):
    with open(os.path.join(runner.state_dir, "runpack_runner.log"), encoding="utf-8") as stream:
        return stream.read()


def polled_types(worker):
    """The types[] of every poll the worker saw, one list per poll."""
    return [urllib.parse.parse_qs(urllib.parse.urlsplit(record.path).query).get("types[]", [])
            for record in worker.requests if record.route == "available"]


def check_lines(result, label):
    """The lines of `check`'s report for one item (``Job type``, ``Result``...)."""
    return [line for line in result.stdout.splitlines() if line.startswith(label + " ")]


def snapshot(folder):
    """Every file under ``folder``, by relative path, with its bytes."""
    files = {}
    for root, _, names in os.walk(str(folder)):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                files[os.path.relpath(path, str(folder))] = stream.read()
    return files


def runner_help():
    result = run_cli("runner", "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def exit_codes_listed(help_text):
    """The codes of the `exit codes` list at the end of `runner --help`: {"0", ..., "128+N"}."""
    listing = help_text[help_text.index("\nexit codes"):]
    codes = set()
    for line in listing.splitlines()[1:]:
        match = re.match(r"  (\d+(?:, \d+)*|128\+N)  ", line)
        if match:
            codes.update(match.group(1).split(", "))
    return codes


def codes_a_restart_cannot_fix(help_text):
    match = re.search(r"a restart cannot fix ([\d, and]+):", help_text)
    assert match, "runner --help does not say which exit codes a restart cannot fix"
    return {int(code) for code in re.findall(r"\d+", match.group(1))}


# ---- --job-types ------------------------------------------------------------------


def test_job_types_serves_advertises_and_polls_only_the_named_type(worker, start_runner, no_figpack_key):
    hello = worker.add_job("hello_world", {"name": "chosen", "processing_time": 0})
    other = worker.add_job("sleepy", {"seconds": 0})
    runner = start_runner(*HANDLERS, "--job-types", "hello_world")
    worker.wait_until(lambda: worker.job(hello)["status"] == "completed", timeout=20)
    polls_after_the_job = worker.count("available") + 1
    worker.wait_until(lambda: worker.count("available") >= polls_after_the_job)
    assert runner.stop() == 0
    assert [row["capabilities"] for row in worker.runners.values()] == [["hello_world"]]
    assert polled_types(worker) and all(types == ["hello_world"] for types in polled_types(worker))
    assert worker.job(other)["status"] == "pending" and worker.count("claim", job_id=other) == 0
    log = log_text(runner)
    assert "Serving job types: hello_world\n" in log
    assert "Not serving job type" not in log, "types it was not asked to serve are not worth a warning"


def test_without_job_types_the_runner_warns_about_each_figpack_type_it_cannot_serve(worker, start_runner,
                                                                                    no_figpack_key):
    runner = start_runner(*HANDLERS)
    worker.wait_until(lambda: worker.count("available") >= 1)
    assert runner.stop() == 0
    assert "Not serving job type figpack_nwb_raster_plot: " in log_text(runner)
    assert "sleepy" in polled_types(worker)[0] and "hello_world" in polled_types(worker)[0]


def test_an_unknown_job_type_stops_the_runner_with_exit_2_and_one_line_naming_the_known_ones(worker, tmp_path):
    state_dir = tmp_path / "state"
    result = run_cli("runner", "--worker-url", worker.url, "--state-dir", str(state_dir), *HANDLERS,
                     "--job-types", "hello_world,nope", env=WITH_KEY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: --job-types names nope, which no module registers (known: ")
    known = lines[0].partition("(known: ")[2]
    assert "hello_world" in known and "sleepy" in known and "figpack_nwb_raster_plot" in known
    assert "Traceback" not in result.stdout + result.stderr
    assert worker.count() == 0 and not state_dir.exists(), "a bad setting is refused before anything starts"


def test_check_stops_at_an_unknown_job_type_with_exit_2_and_one_line_like_the_runner(worker, tmp_path):
    result = run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path), *HANDLERS,
                     "--job-types", "nope", env=WITH_KEY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], "one line"
    assert result.stderr.startswith("Error: --job-types names nope, which no module registers (known: ")
    assert "hello_world" in result.stderr and "sleepy" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_check_is_not_ready_when_a_named_job_type_cannot_be_served(worker, tmp_path, no_figpack_key):
    result = run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path),
                     "--job-types", "hello_world,figpack_nwb_raster_plot", env=WITH_KEY)
    assert result.returncode == 1, result.stdout
    assert "Job type         hello_world: served" in result.stdout
    problem = [line for line in check_lines(result, "Job type") if "figpack_nwb_raster_plot" in line]
    assert problem and problem[0].startswith("Job type         PROBLEM: figpack_nwb_raster_plot: NOT served: ")
    assert "FIGPACK_API_KEY" in problem[0]
    assert check_lines(result, "Result")[0].startswith("Result           NOT READY: fix ")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_check_is_ready_to_serve_exactly_the_named_job_types(worker, tmp_path, no_figpack_key, how):
    chosen = ("--job-types", "hello_world") if how == "flag" else ()
    env = dict(WITH_KEY, RUNPACK_JOB_TYPES="hello_world") if how == "environment" else WITH_KEY
    result = run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path), *HANDLERS, *chosen,
                     env=env)
    assert result.returncode == 0, result.stdout
    assert check_lines(result, "Job type") == ["Job type         hello_world: served"]
    assert check_lines(result, "Result") == ["Result           ready to serve hello_world"]


@pytest.mark.parametrize("variable, value", [
    ("RUNPACK_LISTEN", "abc"), ("RUNPACK_POLL_INTERVAL", "abc"), ("RUNPACK_ONCE", "maybe")])
def test_check_is_not_ready_when_a_runner_setting_in_the_environment_is_one_the_runner_refuses(
        worker, tmp_path, variable, value):
    env = dict(WITH_KEY, **{variable: value})
    refused = run_cli("runner", "--worker-url", worker.url, "--state-dir", str(tmp_path / "state"), env=env)
    assert refused.returncode == 2
    result = run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path / "state"), *HANDLERS,
                     env=env)
    assert result.returncode == 1, result.stdout
    assert check_lines(result, "Settings") == ["Settings         PROBLEM: " + refused.stderr.strip()[len("Error: "):]]
    assert check_lines(result, "Result") == ["Result           NOT READY: fix Settings"]


# ---- A worker URL that answers with an HTML error page ------------------------------


def test_a_worker_url_answering_501_with_html_is_one_plain_warning_line(start_runner, not_implemented_server):
    url = not_implemented_server.url
    runner = start_runner(worker_url=url)
    not_implemented_server.wait_until(lambda: not_implemented_server.count("register") >= 5)
    assert runner.stop() == 0
    said = ("%s answers 501 with an HTML page, not as a Runpack worker; retrying in case this is an outage "
            "— check --worker-url" % url)
    lines = [line for line in runner.output.splitlines() if said in line]
    assert len(lines) == 1 and "] WARNING: " in lines[0], runner.output
    for text in (runner.output, log_text(runner)):
        assert "b'" not in text and 'b"' not in text, "no bytes repr"
        assert "Not Implemented" not in text and "<html" not in text, "the page is named, not dumped"


def test_verbose_logs_each_retry_of_the_same_failure_at_debug(start_runner, not_implemented_server):
    runner = start_runner("--verbose", worker_url=not_implemented_server.url)
    not_implemented_server.wait_until(lambda: not_implemented_server.count("register") >= 5)
    assert runner.stop() == 0
    lines = [line for line in log_text(runner).splitlines() if "answers 501 with an HTML page" in line]
    assert [line for line in lines if "] WARNING: " in line] == lines[:1], "one warning, the first"
    assert len([line for line in lines if "] DEBUG: " in line]) >= 3, "every later try at DEBUG"


def test_a_worker_url_answering_401_with_a_login_page_exits_2_saying_so_not_that_the_key_was_rejected(
        start_runner):
    with LoginPageServer() as proxy:
        runner = start_runner(worker_url=proxy.url)
        assert runner.wait() == 2
        assert proxy.count("register") == 1, "not retried"
    errors = [line for line in runner.output.splitlines() if "] ERROR: " in line]
    assert len(errors) == 1, runner.output
    assert errors[0].endswith("ERROR: POST /api/runner/register: the URL answers 401 with an HTML page, not as a "
                              "Runpack worker; stopping. Check --worker-url (a proxy that asks for a login?)")
    assert "rejected the runner key" not in runner.output and "((" not in runner.output


def test_check_says_a_401_login_page_is_not_the_worker(tmp_path):
    with LoginPageServer() as proxy:
        result = run_cli("check", "--worker-url", proxy.url, "--state-dir", str(tmp_path), env=WITH_KEY)
    assert result.returncode == 1
    assert "Worker           PROBLEM: GET /health: the URL answers 401 with an HTML page, not as a Runpack worker: " \
           "check the worker URL" in check_lines(result, "Worker")
    assert "rejected" not in result.stdout


# ---- Exit codes and the systemd recipe -----------------------------------------------


def test_runner_help_lists_every_exit_code_and_names_restart_prevent_exit_status():
    text = runner_help()
    assert exit_codes_listed(text) == {"0", "1", "2", "3", "4", "5", "6", "7", "8", "128+N"}
    assert "RestartPreventExitStatus" in text
    constants = {getattr(runpack_runner, name) for name in dir(runpack_runner) if name.startswith("EXIT_")}
    assert {str(code) for code in constants} == exit_codes_listed(text) - {"128+N"}


def test_the_systemd_recipe_prevents_a_restart_on_exactly_the_codes_help_says_a_restart_cannot_fix():
    with open(os.path.join(REPO, "docs", "operations.md"), encoding="utf-8") as stream:
        recipe = re.findall(r"^RestartPreventExitStatus=(.*)$", stream.read(), re.MULTILINE)
    assert len(recipe) == 1, recipe
    prevented = {int(code) for code in recipe[0].split()}
    assert prevented == codes_a_restart_cannot_fix(runner_help()) == {2, 3, 4, 8}


def test_the_readme_exit_code_table_lists_the_codes_runner_help_lists():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as stream:
        rows = re.findall(r"^\| `([^`]+)` \|", stream.read(), re.MULTILINE)
    assert {row.replace(" ", "") for row in rows} == exit_codes_listed(runner_help())


# ---- Job records that `check` finds ---------------------------------------------------


def test_check_counts_the_job_records_waiting_and_changes_nothing_on_disk(worker, tmp_path):
    state_dir = tmp_path / "state"
    jobs = state_dir / ".runpack_jobs"
    jobs.mkdir(parents=True)
    spooled = runpack_runner.new_custody_record(
        {"job_id": "job-with-report", "job_type": "hello_world", "input_params": {}}, "runner-1")
    spooled["report"] = {"kind": "complete", "body": {"output_data": {"ok": True}, "console_output": ""}}
    claimed = runpack_runner.new_custody_record(
        {"job_id": "job-to-run-again", "job_type": "hello_world", "input_params": {}}, "runner-1")
    for record in (spooled, claimed):
        (jobs / ("%s.json" % record["job_id"])).write_text(json.dumps(record))
    before = snapshot(state_dir)
    result = run_cli("check", "--worker-url", worker.url, "--state-dir", str(state_dir), env=WITH_KEY)
    assert result.returncode == 0, result.stdout
    records = check_lines(result, "Job records")
    assert len(records) == 1, result.stdout
    assert records[0].startswith("Job records      1 report to deliver and 1 claimed job to run again, in %s"
                                 % jobs)
    assert snapshot(state_dir) == before, "check changes nothing in the state directory"


# ---- Durations in messages --------------------------------------------------------------


def test_a_completed_job_is_logged_with_its_duration_in_seconds(worker, start_runner):
    job_id = worker.add_job("hello_world", {"name": "timed", "processing_time": 0})
    runner = start_runner("--once")
    assert runner.wait() == 5
    assert re.search(r"\] INFO: Job %s completed in \d+(\.\d+)? s$" % job_id, runner.output, re.MULTILINE), \
        runner.output


@pytest.mark.parametrize("seconds", [0.00004, 0.3, 1, 3.25, 90, 13200, 30 * 24 * 3600])
def test_every_duration_is_a_plain_number_of_seconds(seconds):
    assert re.match(r"^\d+(\.\d+)? s$", runpack_runner.describe_seconds(seconds))
