"""The figpack_nwb_raster_plot job type, end to end and without mocks.

The real figpack, figpack_spike_sorting and lindi run inside the real runner CLI. The NWB file
is served over HTTP Range by RangeFileServer and figures are uploaded to FigpackApiStandIn; both
listen on 127.0.0.2, the one network the runner lets its job processes reach besides public
addresses (RUNPACK_ALLOW_JOB_NETWORKS=127.0.0.2/32). The fake worker listens on 127.0.0.1, which
jobs may not reach: the runner's own requests are not guarded.
"""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import job_processes_of, launcher_of, require_figpack_extra, run_cli  # noqa: E402

require_figpack_extra()

from fake_worker import RUNNER_KEY, SUBMIT_KEY  # noqa: E402
from figpack_fixtures import (  # noqa: E402
    FigpackApiStandIn,
    RangeFileServer,
    make_units_nwb,
    read_raster_metadata,
)

pytestmark = pytest.mark.slow  # every test runs the CLI and the real figpack packages

JOB_TYPE = "figpack_nwb_raster_plot"
FIGPACK_KEY = "figpack-key-for-tests-0123456789"
STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
INSTALL_HINT = ("install them with: pip install figpack figpack-spike-sorting lindi (from a checkout of the "
                "runner: pip install '.[figpack]')")
NOT_SERVED = "Not serving job type %s: " % JOB_TYPE
TYPE_IN_POLL = "types%5B%5D=" + JOB_TYPE
PROCESS_OUTPUT_MARKER = "[runpack: output of the job process]"  # what a job process printed follows it
JOB_HOST = "127.0.0.2"  # where the stand-ins a job reaches listen: loopback, stands for an allowed network
JOB_NETWORK = JOB_HOST + "/32"  # all that jobs may reach besides public addresses; not 127.0.0.1
DENIED_MESSAGE = ("nwb_url: 127.0.0.1 resolves to 127.0.0.1, which jobs on this runner may not reach "
                  "(allow it with --allow-job-network)")

# never route this process's loopback requests through a proxy
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def units_file(tmp_path_factory):
    """units.nwb: 20 units whose ids start at 5, so that row numbers cannot pass for unit ids;
    big.nwb: 200 units, 800 000 spikes, a job long enough (about 1 s) to need heartbeats."""
    folder = tmp_path_factory.mktemp("nwb")
    info = make_units_nwb(folder / "units.nwb", n_units=20, spikes_per_unit=60, seed=7, first_unit_id=5)
    info["big"] = make_units_nwb(folder / "big.nwb", n_units=200, spikes_per_unit=4000, seed=8)
    return folder, info


@pytest.fixture
def nwb_server(units_file):
    with RangeFileServer(units_file[0], host=JOB_HOST) as server:
        yield server


@pytest.fixture
def figpack_api():
    with FigpackApiStandIn(expected_api_key=FIGPACK_KEY, host=JOB_HOST) as api:
        yield api


@pytest.fixture
def job_tmp(tmp_path):
    folder = tmp_path / "jobtmp"
    folder.mkdir()
    return folder


@pytest.fixture
def figpack_env(figpack_api, job_tmp):
    """The environment of a runner that can serve the job type, uploading to the stand-in, whose
    jobs may reach the stand-ins' network (and public addresses) only."""
    no_proxy = "127.0.0.1,%s,localhost" % JOB_HOST
    return {"FIGPACK_API_KEY": FIGPACK_KEY, "FIGPACK_API_BASE_URL": figpack_api.url,
            "RUNPACK_ALLOW_JOB_NETWORKS": JOB_NETWORK, "NO_PROXY": no_proxy, "no_proxy": no_proxy,
            "TMPDIR": str(job_tmp)}


@pytest.fixture
def python_without_site_packages(tmp_path):
    """An "interpreter" that is this one with -S: the standard library only, so the figpack extra
    is not importable (find_spec finds nothing), as on a machine where it was never installed."""
    wrapper = tmp_path / "python-S"
    wrapper.write_text('#!/bin/sh\nexec "%s" -S "$@"\n' % sys.executable)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    probe = subprocess.run([str(wrapper), "-c", "import importlib.util as u; print(u.find_spec('figpack'))"],
                           stdout=subprocess.PIPE, universal_newlines=True, timeout=30, check=True)
    assert probe.stdout.strip() == "None", "figpack is importable even with -S"
    return str(wrapper)


# Each job runs in a process of its own by default; --in-process runs it in a thread of the runner.
ISOLATION = pytest.mark.parametrize("isolation", [(), ("--in-process",)], ids=["job-process", "in-process"])


def job_console(console):
    """The lines the handler wrote, without what the job process printed (after the runner's marker)."""
    return console.split("\n" + PROCESS_OUTPUT_MARKER)[0].rstrip("\n")


def assert_console_lines(lines, texts):
    assert len(lines) == len(texts), lines
    for line, text in zip(lines, texts):
        assert re.match("^" + STAMP + re.escape(text) + "$", line), (line, text)


def status_of(worker, job_id):
    return worker.job(job_id)["status"]


def finished(worker, *job_ids):
    return lambda: all(status_of(worker, job_id) in ("completed", "failed") for job_id in job_ids)


def submit_over_http(worker, job_type, input_params):
    """POST /api/jobs/submit with the submit key, as a client would: (status, answer)."""
    request = urllib.request.Request(
        worker.url + "/api/jobs/submit", method="POST",
        data=json.dumps({"job_type": job_type, "input_params": input_params}).encode("utf-8"),
        headers={"Authorization": "Bearer " + SUBMIT_KEY, "Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=15) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read().decode("utf-8") or "null")


def assert_not_served(worker, runner, figpack_job, hello_job):
    """The type is neither registered nor polled, its job is never claimed and stays pending,
    while a hello_world job added at the same moment completes."""
    worker.wait_until(lambda: status_of(worker, hello_job) == "completed", timeout=20,
                      message="the hello_world job did not complete")
    polls_then = worker.count("available")
    worker.wait_until(lambda: worker.count("available") >= polls_then + 2, timeout=10)
    assert runner.stop() == 0
    assert status_of(worker, figpack_job) == "pending"
    assert worker.count("claim", job_id=figpack_job) == 0
    polls = [record.path for record in worker.requests if record.route == "available"]
    assert len(polls) >= 3
    assert all("types%5B%5D=hello_world" in path and TYPE_IN_POLL not in path for path in polls), polls
    (registered,) = worker.runners.values()
    assert "hello_world" in registered["capabilities"]
    assert JOB_TYPE not in registered["capabilities"]


# ---- the job through the real runner, against the fake worker ---------------------------------

@ISOLATION
def test_raster_plot_job_completes_uploads_the_figure_and_its_cached_result_is_accepted(
        worker, start_runner, nwb_server, figpack_api, figpack_env, units_file, job_tmp, isolation):
    big_url, nwb_url = nwb_server.url_for("big.nwb"), nwb_server.url_for("units.nwb")
    full = {"nwb_url": big_url, "units_path": "/units", "dandiset_id": "000123",
            "neurosift_url": "https://neurosift.app/nwb?url=" + big_url}
    bare = {"nwb_url": nwb_url, "units_path": "/units"}
    full_id = worker.add_job(JOB_TYPE, full)
    bare_id = worker.add_job(JOB_TYPE, bare)
    runner = start_runner(*isolation, env=figpack_env)
    worker.wait_until(finished(worker, full_id, bare_id), timeout=60, message="the figpack jobs did not finish")

    for job_id, params, table in ((full_id, full, units_file[1]["big"]), (bare_id, bare, units_file[1])):
        job = worker.job(job_id)
        assert job["status"] == "completed", (job["error_message"], job["console_output"])
        output = job["output_data"]
        figpack_url = output["figpack_url"]
        # the output echoes the parameters; absent optional ones are null
        assert output == {"figpack_url": figpack_url, "nwb_url": params["nwb_url"], "units_path": "/units",
                          "dandiset_id": params.get("dandiset_id"),
                          "neurosift_url": params.get("neurosift_url")}
        # a URL of the stand-in, ending in /index.html, of a figure that was finalized there
        assert figpack_url.startswith(figpack_api.url + "/figures/") and figpack_url.endswith("/index.html")
        assert figpack_api.figure_info[figpack_url]["status"] == "completed"

        # the job's own console lines, in order; whatever figpack printed may follow the runner's marker
        handler_console = job_console(job["console_output"])
        assert_console_lines(handler_console.splitlines(), [
            "Loading NWB file from: " + params["nwb_url"], "Units path: /units",
            "Successfully created RasterPlot view", "Uploading raster plot to figurl...",
            "Successfully uploaded! URL: " + figpack_url, "Completed!"])

        # heartbeats carried the console as it grew (a job shorter than 0.5 s needs none)
        for heartbeat in job["heartbeats"]:
            assert handler_console.startswith(job_console(heartbeat["console_output"]))
        if table is not units_file[1]:
            assert job["heartbeats"], "no heartbeat was sent during a job of about a second"
            assert any("Loading NWB file from" in heartbeat["console_output"] for heartbeat in job["heartbeats"])
        assert [kind for kind, _ in job["reports"]] == ["complete"]

        # what was uploaded is a raster plot of this units table
        meta = read_raster_metadata(figpack_api.figures[figpack_url])
        assert meta["view_type"] == "spike_sorting.RasterPlot"
        assert meta["unit_ids"] == table["unit_ids"]
        assert meta["total_spikes"] == meta["n_timestamps"] == table["total_spikes"]
        assert meta["title"] == "Raster plot: /units"
        assert json.loads(meta["description"]) == {key: output[key] for key in output if key != "figpack_url"}

    assert len(figpack_api.figures) == 2
    assert figpack_api.api_keys_seen and set(figpack_api.api_keys_seen) == {FIGPACK_KEY}
    assert not any(RUNNER_KEY in json.dumps(request["headers"]) for request in figpack_api.requests)
    assert any("Range" in request["headers"] for request in nwb_server.requests), "lindi read by Range"
    assert os.listdir(str(job_tmp)) == [], "figpack's build folders were left in TMPDIR"
    assert runner.stop() == 0

    # Submitting the same job again: the worker fetches figpack.json beside the figpack_url and,
    # finding it, answers with the cached result instead of deleting the job and starting anew.
    status, answer = submit_over_http(worker, JOB_TYPE, full)
    assert status == 200, answer
    assert answer["job_id"] == full_id and answer["status"] == "completed"
    assert answer["result"]["output_data"] == worker.job(full_id)["output_data"]
    manifest = urllib.parse.urlsplit(answer["result"]["output_data"]["figpack_url"]).path
    manifest = manifest[:-len("index.html")] + "figpack.json"
    assert any(request["method"] == "GET" and request["path"] == manifest
               for request in figpack_api.requests), "the worker did not re-validate the figpack URL"
    assert len(worker.jobs()) == 2


# ---- warm job processes -------------------------------------------------------------------------

# figpack_spike_sorting and lindi are pure Python: a module read from a .py file is not mapped into
# the process, so /proc/<pid>/maps cannot show them. The compiled extensions they import are mapped:
# numpy's _multiarray_umath (numpy/_core/ since numpy 2, numpy/core/ before), loaded by the `import
# numpy` of figpack_spike_sorting.views. Nothing else loads it into the launcher: the runner is
# standard library only, and its handlers import figpack in the job, not when they are registered.
NUMPY_EXTENSION = re.compile(r"/numpy/_?core/_multiarray_umath\.\S*\.so$", re.M)


def has_numpy_loaded(pid):
    with open("/proc/%d/maps" % pid) as stream:
        return NUMPY_EXTENSION.search(stream.read()) is not None


def comparable_figure(files):
    """An uploaded figure without what differs from run to run: the stand-in's figpack.json
    (figure id, URL, times), the timestamp of figpack's manifest.json, and the description,
    which names the job's dandiset_id. Everything else, the spike data in data.zarr included,
    is kept byte for byte."""
    files = dict(files)
    del files["figpack.json"]
    manifest = json.loads(files.pop("manifest.json"))
    del manifest["timestamp"]
    zmetadata = json.loads(files.pop("data.zarr/.zmetadata"))
    del zmetadata["metadata"][".zattrs"]["description"]
    files.update({"manifest.json": manifest, "data.zarr/.zmetadata": zmetadata})
    return files


def test_a_warm_raster_plot_job_uploads_the_same_figure_as_a_cold_one(
        worker, start_runner, nwb_server, figpack_api, figpack_env, units_file, tmp_path):
    """A job forked from a launcher that has figpack and lindi imported must upload what a job
    that imports them itself uploads: the first job of a runner (cold), its next two (warm),
    and a job of a runner with --no-warm-imports (cold) upload the same figure."""
    nwb_url, table = nwb_server.url_for("units.nwb"), units_file[1]

    def submit(dandiset_id):  # a distinct dandiset_id each: a new job, not the cached one
        return worker.add_job(JOB_TYPE, {"nwb_url": nwb_url, "units_path": "/units", "dandiset_id": dandiset_id})

    def uploaded_figure(job_id):
        worker.wait_until(finished(worker, job_id), timeout=60, message="the figpack job did not finish")
        job = worker.job(job_id)
        assert job["status"] == "completed", (job["error_message"], job["console_output"])
        files = figpack_api.files_for(job["output_data"]["figpack_url"])
        meta = read_raster_metadata(files)
        assert (meta["unit_ids"], meta["total_spikes"]) == (table["unit_ids"], table["total_spikes"])
        assert json.loads(meta["description"])["dandiset_id"] == job["input_params"]["dandiset_id"]
        return comparable_figure(files)

    runner = start_runner(env=figpack_env)
    cold = uploaded_figure(submit("000001"))
    # The first job had the launcher import the warm_modules while it ran; later jobs are forked
    # from it, as long as it is the same launcher.
    launcher = launcher_of(runner)
    worker.wait_until(lambda: has_numpy_loaded(launcher), timeout=60,
                      message="the launcher did not import figpack_spike_sorting after the first job")
    warm = [uploaded_figure(submit("000002")), uploaded_figure(submit("000003"))]
    assert launcher_of(runner) == launcher, "a new, cold launcher forked the later jobs"
    assert runner.stop() == 0

    # --no-warm-imports: looked at while the job's report hangs, when its launcher is surely there
    report = worker.add_fault("hang", route="complete")
    job_id = submit("000004")
    unwarmed = start_runner("--no-warm-imports", state_dir=tmp_path / "no-warm-state", env=figpack_env)
    worker.wait_until(lambda: report.hits, timeout=60, message="the job of the --no-warm-imports runner did not end")
    assert not has_numpy_loaded(launcher_of(unwarmed)), "the launcher imported figpack despite --no-warm-imports"
    report.release()
    no_warm = uploaded_figure(job_id)
    assert unwarmed.stop() == 0

    data_files = [path for path in cold if path.startswith("data.zarr/") and path != "data.zarr/.zmetadata"]
    assert data_files, "no spike data was uploaded"
    for figure in warm + [no_warm]:
        assert sorted(figure) == sorted(cold)
        for path in sorted(cold):
            assert figure[path] == cold[path], "%s differs" % path


# ---- invalid parameters ------------------------------------------------------------------------

GOOD_URL = "http://127.0.0.1:9/units.nwb"  # never fetched: validation comes first


def case(name, *args, message):
    return pytest.param(list(args), message, id=name)


URL_MESSAGE = "nwb_url must be an http:// or https:// URL"


@pytest.mark.parametrize("args, message", [
    case("no-nwb_url", "units_path=/units", message="nwb_url is required"),
    case("empty-nwb_url", "nwb_url=", "units_path=/units", message="nwb_url must be a non-empty string"),
    case("number-nwb_url", "nwb_url=5", "units_path=/units", message="nwb_url must be a non-empty string"),
    case("ftp-nwb_url", "nwb_url=ftp://x", "units_path=/units", message=URL_MESSAGE),
    case("words-nwb_url", "nwb_url=not a url", "units_path=/units", message=URL_MESSAGE),
    case("no-slashes-nwb_url", "nwb_url=http:x/units.nwb", "units_path=/units", message=URL_MESSAGE),
    case("path-nwb_url", "nwb_url=/data/units.nwb", "units_path=/units", message=URL_MESSAGE),
    case("no-host-nwb_url", "nwb_url=http://", "units_path=/units", message=URL_MESSAGE),
    case("bad-ipv6-nwb_url", "nwb_url=http://[::1/units.nwb", "units_path=/units", message=URL_MESSAGE),
    case("bad-port-nwb_url", "nwb_url=http://127.0.0.1:99999/units.nwb", "units_path=/units",
         message=URL_MESSAGE),
    case("no-units_path", "nwb_url=" + GOOD_URL, message="units_path is required"),
    case("relative-units_path", "nwb_url=" + GOOD_URL, "units_path=units", message="units_path must start with /"),
    case("list-units_path", "nwb_url=" + GOOD_URL, "units_path=[1]", message="units_path must be a non-empty string"),
    case("number-dandiset_id", "nwb_url=" + GOOD_URL, "units_path=/units", "dandiset_id=123",
         message="dandiset_id must be a string"),
    case("list-neurosift_url", "nwb_url=" + GOOD_URL, "units_path=/units", 'neurosift_url=["x"]',
         message="neurosift_url must be a string"),
    case("object-neurosift_url", "nwb_url=" + GOOD_URL, "units_path=/units", "neurosift_url={}",
         message="neurosift_url must be a string"),
])
def test_invalid_parameters_fail_naming_the_parameter(args, message):
    result = run_cli("run", JOB_TYPE, *args, env={"FIGPACK_API_KEY": "k"})
    assert result.returncode == 1, result.stdout + result.stderr
    error, *hint = result.stderr.strip().splitlines()  # a value that key=value read as JSON gets a Hint line
    assert error == "Error: Invalid parameters: " + message
    assert all(line.startswith("Hint: ") for line in hint), hint
    assert result.stdout == ""


def test_invalid_parameters_fail_the_job_at_the_worker(worker, start_runner, figpack_env, figpack_api):
    cases = {
        "nwb_url is required": {"units_path": "/units"},
        "nwb_url must be an http:// or https:// URL": {"nwb_url": "ftp://x", "units_path": "/units"},
        "units_path must start with /": {"nwb_url": GOOD_URL, "units_path": "units"},
        "dandiset_id must be a string": {"nwb_url": GOOD_URL, "units_path": "/units", "dandiset_id": 123},
    }
    job_ids = {message: worker.add_job(JOB_TYPE, params) for message, params in cases.items()}
    runner = start_runner(env=figpack_env)
    worker.wait_until(finished(worker, *job_ids.values()), timeout=20)
    for message, job_id in job_ids.items():
        job = worker.job(job_id)
        assert job["status"] == "failed"
        assert job["error_message"] == "Invalid parameters: " + message
    assert figpack_api.requests == []
    assert runner.stop() == 0


# ---- a runner that cannot run the job type does not take it -------------------------------------

def test_without_the_figpack_extra_the_type_is_not_served_and_its_job_stays_pending(
        worker, start_runner, python_without_site_packages, nwb_server):
    figpack_job = worker.add_job(JOB_TYPE, {"nwb_url": nwb_server.url_for("units.nwb"), "units_path": "/units"})
    hello_job = worker.add_job("hello_world", {"name": "NoExtra", "processing_time": 0})
    runner = start_runner(python=python_without_site_packages, env={"FIGPACK_API_KEY": FIGPACK_KEY})
    assert_not_served(worker, runner, figpack_job, hello_job)
    assert (NOT_SERVED + "missing Python packages figpack, figpack_spike_sorting, lindi (%s)" % INSTALL_HINT
            in runner.output), runner.output
    assert "Serving job types: hello_world" in runner.output
    assert nwb_server.requests == []


def test_without_figpack_api_key_the_type_is_not_served_and_its_job_stays_pending(
        worker, start_runner, nwb_server, figpack_api, monkeypatch):
    monkeypatch.delenv("FIGPACK_API_KEY", raising=False)
    figpack_job = worker.add_job(JOB_TYPE, {"nwb_url": nwb_server.url_for("units.nwb"), "units_path": "/units"})
    hello_job = worker.add_job("hello_world", {"name": "NoKey", "processing_time": 0})
    runner = start_runner(env={"FIGPACK_API_BASE_URL": figpack_api.url})
    assert_not_served(worker, runner, figpack_job, hello_job)
    assert NOT_SERVED + "environment variable FIGPACK_API_KEY not set" in runner.output, runner.output
    assert nwb_server.requests == [] and figpack_api.requests == []


def test_a_local_run_without_the_extra_or_the_key_says_why_and_exits_1(python_without_site_packages,
                                                                         monkeypatch):
    monkeypatch.delenv("FIGPACK_API_KEY", raising=False)
    params = ("nwb_url=" + GOOD_URL, "units_path=/units")
    no_extra = run_cli("run", JOB_TYPE, *params, env={"FIGPACK_API_KEY": "k"}, python=python_without_site_packages)
    assert no_extra.returncode == 1
    assert no_extra.stderr.strip() == (
        "Error: job type %s cannot run here: missing Python packages figpack, figpack_spike_sorting, "
        "lindi (%s)" % (JOB_TYPE, INSTALL_HINT))
    no_key = run_cli("run", JOB_TYPE, *params)
    assert no_key.returncode == 1
    assert no_key.stderr.strip() == ("Error: job type %s cannot run here: environment variable "
                                     "FIGPACK_API_KEY not set" % JOB_TYPE)


# ---- failures while the job runs ----------------------------------------------------------------

@ISOLATION
def test_a_stalled_nwb_server_fails_the_job_at_the_time_limit_and_the_runner_goes_on(
        worker, start_runner, figpack_env, figpack_api, units_file, isolation):
    with RangeFileServer(units_file[0], stall=True, host=JOB_HOST) as stalled:
        stuck = worker.add_job(JOB_TYPE, {"nwb_url": stalled.url_for("units.nwb"), "units_path": "/units"})
        runner = start_runner("--job-timeout", "3", *isolation, env=figpack_env)
        worker.wait_until(lambda: status_of(worker, stuck) == "in_progress", timeout=15)
        worker.wait_until(finished(worker, stuck), timeout=15, message="the time limit did not end the job")
        job = worker.job(stuck)
        assert job["status"] == "failed"
        assert job["error_message"] == "Job execution failed: timed out after 3 s"
        assert "Loading NWB file from: " + stalled.url_for("units.nwb") in job["console_output"]
        assert stalled.stalled_requests >= 1, "the job never reached the NWB server"

        # the runner is healthy: it takes and completes the next job while the server still stalls
        # (--in-process: the stuck read goes on in a thread of the runner; else its process is gone)
        after = worker.add_job("hello_world", {"name": "After", "processing_time": 0.2})
        worker.wait_until(lambda: status_of(worker, after) == "completed", timeout=15,
                          message="the runner did not take another job after the time limit")
        if "--in-process" not in isolation:
            assert job_processes_of(runner.process.pid) == [], "the timed-out job process is still there"
        runner.send(signal.SIGTERM)
        assert runner.wait(timeout=10) == 0, runner.output
    assert "Runner stopped" in runner.output
    assert figpack_api.requests == []


def test_an_nwb_url_outside_the_allowed_network_fails_the_job_before_any_request_and_the_runner_goes_on(
        worker, start_runner, figpack_api, figpack_env, units_file):
    """The NWB server on 127.0.0.1, loopback that RUNPACK_ALLOW_JOB_NETWORKS=127.0.0.2/32 leaves
    out: the job process may not connect to it, so the job fails with the guard's one line, the
    server never sees a request and nothing is uploaded; the runner then takes the next job."""
    with RangeFileServer(units_file[0]) as denied:
        assert denied.url.startswith("http://127.0.0.1:")
        job_id = worker.add_job(JOB_TYPE, {"nwb_url": denied.url_for("units.nwb"), "units_path": "/units"})
        runner = start_runner(env=figpack_env)
        worker.wait_until(finished(worker, job_id), timeout=60, message="the figpack job did not finish")
        job = worker.job(job_id)
        assert job["status"] == "failed"
        assert job["error_message"] == DENIED_MESSAGE, (job["error_message"], job["console_output"])
        assert [kind for kind, _ in job["reports"]] == ["error"]
        after = worker.add_job("hello_world", {"name": "After", "processing_time": 0})
        worker.wait_until(lambda: status_of(worker, after) == "completed", timeout=15,
                          message="the runner did not take another job after the denied one")
        assert runner.stop() == 0, runner.output
    assert denied.requests == [], "the job reached the NWB server on 127.0.0.1"
    assert figpack_api.requests == []


def test_a_figpack_api_failure_fails_the_job_with_the_servers_message_and_a_traceback(
        worker, start_runner, nwb_server, figpack_api, figpack_env, job_tmp):
    figpack_api.fail("create", status=500, message="quota exceeded for this key")
    job_id = worker.add_job(JOB_TYPE, {"nwb_url": nwb_server.url_for("units.nwb"), "units_path": "/units"})
    runner = start_runner(env=figpack_env)
    worker.wait_until(finished(worker, job_id), timeout=60)
    job = worker.job(job_id)
    assert job["status"] == "failed"
    assert job["error_message"].startswith("Job execution failed: ")
    assert "quota exceeded for this key" in job["error_message"]
    console = job["console_output"]
    assert re.search(STAMP + "Uploading raster plot to figurl...\n", console)
    assert "Traceback (most recent call last)" in console
    assert "quota exceeded for this key" in console.split("Traceback (most recent call last)")[1]
    assert "Successfully uploaded" not in console
    assert figpack_api.figures == {}
    assert os.listdir(str(job_tmp)) == []
    assert runner.stop() == 0


def test_a_data_error_inside_figpack_is_an_execution_failure_not_invalid_parameters(
        worker, start_runner, figpack_api, figpack_env, tmp_path):
    """Valid parameters, but a units table without a single spike: figpack raises a ValueError
    deep inside. That is not the caller's parameter mistake; it must say where it failed."""
    import h5py
    import numpy

    folder = tmp_path / "nospikes"
    folder.mkdir()
    with h5py.File(str(folder / "empty.nwb"), "w") as nwb:
        units = nwb.create_group("units")
        units.create_dataset("id", data=numpy.array([1, 2], dtype=numpy.int64))
        units.create_dataset("spike_times", data=numpy.zeros(0))
        units.create_dataset("spike_times_index", data=numpy.array([0, 0], dtype=numpy.int64))
    with RangeFileServer(folder, host=JOB_HOST) as server:
        job_id = worker.add_job(JOB_TYPE, {"nwb_url": server.url_for("empty.nwb"), "units_path": "/units"})
        runner = start_runner(env=figpack_env)
        worker.wait_until(finished(worker, job_id), timeout=60)
        assert runner.stop() == 0
    job = worker.job(job_id)
    assert job["status"] == "failed"
    assert job["error_message"].startswith("Job execution failed: "), job["error_message"]
    assert "Traceback (most recent call last)" in job["console_output"]
    assert figpack_api.requests == []


# ---- a local run --------------------------------------------------------------------------------

@ISOLATION
def test_a_local_run_prints_the_output_json_on_stdout_and_each_console_line_once_on_stderr(
        nwb_server, figpack_api, figpack_env, isolation):
    nwb_url = nwb_server.url_for("units.nwb")
    result = run_cli("run", JOB_TYPE, "nwb_url=" + nwb_url, "units_path=/units", "dandiset_id=000123",
                     *isolation, env=figpack_env)
    assert result.returncode == 0, result.stderr
    # stdout is for the output JSON alone (`run ... | jq`): figpack's own prints go elsewhere
    output = json.loads(result.stdout)
    assert output["figpack_url"] in figpack_api.figures
    assert (output["nwb_url"], output["dandiset_id"], output["neurosift_url"]) == (nwb_url, "000123", None)
    # the terminal shows the job's console lines as they come: each once, in order
    shown = [line for line in result.stderr.splitlines() if re.match(STAMP, line)]
    assert_console_lines(shown, [
        "Loading NWB file from: " + nwb_url, "Units path: /units", "Successfully created RasterPlot view",
        "Uploading raster plot to figurl...", "Successfully uploaded! URL: " + output["figpack_url"],
        "Completed!"])
    figpack_lines = [line for line in result.stderr.splitlines() if not re.match(STAMP, line) and line]
    assert len(figpack_lines) == len(set(figpack_lines)), "lines shown twice:\n" + result.stderr
