"""The figpack_nwb_video_preview and figpack_nwb_pose_estimation job types, end to end.

The real h5py, lindi, numpy and figpack run inside the real runner CLI against the fake worker;
the NWB files are served over HTTP Range by RangeFileServer and the figures are uploaded to
FigpackApiStandIn, both on 127.0.0.2: loopback that stands for a network the operator lets jobs
reach (RUNPACK_ALLOW_JOB_NETWORKS=127.0.0.2/32), while the fake worker, on 127.0.0.1, is reached
by the runner alone. figpack_experimental and figpack_nwb, which are not on our
package index, are the stand-ins of figpack_extension_standins/, put on the job's sys.path through
PYTHONPATH in the runner's environment only: their views record what they were given in the figure
they upload (read_view_record).

Most behaviours are shown by one job each of a single batch: one runner serves every job of the
batch once (module fixture ``batch``), and each test looks at its own job.
"""

import hashlib
import json
import os
import re
import signal
import sys
import tracemalloc
import types

import pytest

np = pytest.importorskip("numpy")

import runpack_runner  # noqa: E402
from conftest import RunnerProcess, clean_environment, job_processes_of, run_cli, RUNNER_PY, FAST_SETTINGS  # noqa: E402
from fake_worker import RUNNER_KEY, FakeWorker  # noqa: E402
from figpack_fixtures import (  # noqa: E402
    STANDINS,
    FigpackApiStandIn,
    RangeFileServer,
    make_image_series_nwb,
    make_pose_nwb,
    read_view_record,
)

VIDEO = "figpack_nwb_video_preview"
POSE = "figpack_nwb_pose_estimation"
RASTER = "figpack_nwb_raster_plot"
FIGPACK_KEY = "figpack-key-for-tests-0123456789"
STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
PROCESS_OUTPUT_MARKER = "[runpack: output of the job process]"
JOB_HOST = "127.0.0.2"  # where the stand-ins a job reaches listen: loopback, stands for an allowed network
JOB_NETWORK = JOB_HOST + "/32"  # all that jobs may reach besides public addresses; not 127.0.0.1
WORKING = os.path.join(STANDINS, "working")
BROKEN_EXTENSION = os.path.join(STANDINS, "broken_extension")
BROKEN_FIGPACK = os.path.join(STANDINS, "broken_figpack")
EXTRA_HINT = ("install them with: pip install figpack lindi h5py numpy imageio-ffmpeg, and build %s from the "
              "figpack project's source: see the README, Built-in job types")

try:
    import figpack  # noqa: F401
    import h5py  # noqa: F401
    import lindi  # noqa: F401
    HAVE_FIGPACK = True
except Exception:  # figpack 0.4.1 raises TypeError on import under Python 3.8
    HAVE_FIGPACK = False
needs_figpack = pytest.mark.skipif(not HAVE_FIGPACK, reason="needs figpack, lindi and h5py that import")


def deployed_preview(data):
    """What the deployed job makes of the frames (clip / p * 255 as uint8, grayscale repeated);
    it divides by zero where p == 0, which is not asked of it here."""
    frames = np.asarray(data[:1000])
    p = np.percentile(frames, 99)
    scaled = (np.clip(frames, 0, p) / p * 255).astype(np.uint8)
    return scaled if scaled.ndim == 4 else np.repeat(scaled[..., np.newaxis], 3, axis=-1)


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def job_console(console):
    """The lines the handler wrote, without what the job process printed (after the runner's marker)."""
    return console.split("\n" + PROCESS_OUTPUT_MARKER)[0].rstrip("\n")


def assert_console_lines(console, texts):
    lines = job_console(console).splitlines()
    assert len(lines) == len(texts), lines
    for line, text in zip(lines, texts):
        assert re.match("^" + STAMP + re.escape(text) + "$", line), (line, text)


def figpack_environment(api_url, job_tmp, *path):
    """The environment of a runner that uploads to the stand-in API, with ``path`` on PYTHONPATH,
    whose jobs may reach the stand-ins' network (and public addresses) only."""
    no_proxy = "127.0.0.1,%s,localhost" % JOB_HOST
    env = {"FIGPACK_API_KEY": FIGPACK_KEY, "FIGPACK_API_BASE_URL": api_url, "TMPDIR": str(job_tmp),
           "RUNPACK_ALLOW_JOB_NETWORKS": JOB_NETWORK, "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return env


# ---- the frames of a preview (pure helpers, no figpack) -------------------------------------------

def test_grayscale_frames_become_rgb_scaled_to_their_99th_percentile_as_deployed():
    frames = np.random.default_rng(1).integers(0, 5000, size=(30, 12, 16)).astype(np.uint16)
    preview = runpack_runner.preview_frames(frames.copy())
    assert preview.dtype == np.uint8 and preview.shape == (30, 12, 16, 3)
    assert np.array_equal(preview, deployed_preview(frames))
    assert np.array_equal(preview[..., 0], preview[..., 2]) and preview.max() == 255


def test_rgb_uint8_frames_are_scaled_in_place():
    frames = np.random.default_rng(2).integers(0, 120, size=(10, 8, 9, 3)).astype(np.uint8)
    expected = deployed_preview(frames)
    preview = runpack_runner.preview_frames(frames)
    assert preview is frames
    assert np.array_equal(preview, expected)


def test_float_frames_with_negative_values_are_clipped_at_zero():
    frames = np.random.default_rng(3).normal(0, 1, size=(6, 5, 4)).astype(np.float32)
    preview = runpack_runner.preview_frames(frames)
    assert np.array_equal(preview, deployed_preview(frames))
    assert (preview[frames <= 0] == 0).all()


@pytest.mark.parametrize("frames", [np.zeros((5, 4, 6), np.uint8), np.zeros((5, 4, 6, 3), np.float64),
                                    -np.ones((3, 4, 6), np.int16)], ids=["zeros", "rgb-zeros", "negative"])
def test_an_all_zero_video_stays_black_without_dividing_by_zero(frames):
    with np.errstate(all="raise"):
        preview = runpack_runner.preview_frames(frames)
    assert preview.dtype == np.uint8 and preview.shape == frames.shape[:3] + (3,)
    assert not preview.any()


@pytest.mark.parametrize("shape, dtype, percentile_copy", [
    ((400, 60, 80), np.uint8, False), ((400, 60, 80), np.uint16, False), ((300, 60, 80, 3), np.uint8, False),
    ((150, 60, 80, 3), np.float32, True)], ids=["gray-uint8", "gray-uint16", "rgb-uint8", "rgb-float32"])
def test_scaling_holds_no_more_than_the_frames_and_the_result(monkeypatch, shape, dtype, percentile_copy):
    """Besides the frames (the caller's), the result at most, which uint8 RGB frames are themselves;
    and for other than 8- or 16-bit unsigned frames numpy's copy of them for the 99th percentile,
    which comes and goes before the result exists. Slabs of 64 Ki values are worked on at a time."""
    monkeypatch.setattr(runpack_runner, "PREVIEW_SLAB_VALUES", 1 << 16)
    # 0..250: with 0..199 the 99th percentile would fall between two values, where numpy's copy is needed
    frames = np.random.default_rng(4).integers(0, 251, size=shape).astype(dtype)
    in_place = dtype == np.uint8 and len(shape) == 4
    result_bytes = 0 if in_place else int(np.prod(shape[:3])) * 3
    tracemalloc.start()
    try:
        preview = runpack_runner.preview_frames(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (preview is frames) == in_place
    slab = (1 << 16) * (8 + 1 + 8)  # float64 values, their uint8 truncations, a histogram's intp copy
    allowance = slab + (1 << 20)  # and numpy's small change
    assert peak <= max(frames.nbytes if percentile_copy else 0, result_bytes) + allowance, (peak, frames.nbytes)


@pytest.mark.parametrize("frames", [
    np.random.default_rng(5).integers(0, 256, size=(50, 30, 40)).astype(np.uint8),  # equal neighbours
    np.random.default_rng(6).integers(0, 60000, size=(7, 9, 11)).astype(np.uint16),  # numpy interpolates
    np.arange(101, dtype=np.uint8).reshape(101, 1, 1),  # rank (n - 1) * 0.99 a whole number
    np.full((3, 2, 2, 3), 7, np.uint16), np.zeros((1, 1, 1), np.uint8),
    np.random.default_rng(7).normal(size=(5, 6, 7)), np.random.default_rng(8).integers(-9, 9, (4, 5, 6)),
], ids=["uint8", "uint16-sparse", "uint8-whole-rank", "uint16-constant", "single-zero", "float64", "int64"])
def test_the_99th_percentile_is_numpys_exactly(frames):
    assert runpack_runner.percentile_99(frames) == float(np.percentile(frames, 99))


def test_other_frame_shapes_are_refused():
    with pytest.raises(ValueError, match="T x H x W or T x H x W x 3"):
        runpack_runner.preview_frames(np.zeros((3, 4, 5, 4), np.uint8))


def test_the_nwb_writers_lay_out_image_series_and_pose_estimation_as_pynwb_does(tmp_path):
    h5 = pytest.importorskip("h5py")
    make_image_series_nwb(tmp_path / "v.nwb", {
        "/acquisition/A": {"data": np.ones((2, 3, 4), np.uint16), "starting_time": (1.5, 25.0)},
        "/acquisition/B": {"data": (0, 0, 0), "external_file": ["b.mp4"], "timestamps": [0.0, 0.1]}})
    make_pose_nwb(tmp_path / "p.nwb", {"/processing/behavior/P": {"nose": {"data": np.zeros((5, 2)),
                                                                           "starting_time": (0.0, 60.0)}}})
    with h5.File(str(tmp_path / "v.nwb"), "r") as nwb:
        a, b = nwb["/acquisition/A"], nwb["/acquisition/B"]
        assert a.attrs["neurodata_type"] == "ImageSeries" and a["data"].shape == (2, 3, 4)
        assert a["starting_time"][()] == 1.5 and a["starting_time"].attrs["rate"] == 25.0
        assert b["data"].shape == (0, 0, 0) and list(b["timestamps"][:]) == [0.0, 0.1]
        assert [name.decode() for name in b["external_file"][:]] == ["b.mp4"]
        assert list(b["external_file"].attrs["starting_frame"]) == [0]
    with h5.File(str(tmp_path / "p.nwb"), "r") as nwb:
        pose = nwb["/processing/behavior/P"]
        assert pose.attrs["neurodata_type"] == "PoseEstimation"
        assert pose["nose"].attrs["neurodata_type"] == "PoseEstimationSeries"
        assert pose["nose/data"].shape == (5, 2) and pose["nose/starting_time"].attrs["rate"] == 60.0


# ---- the batch: every job below, served once by one runner -----------------------------------------

GRAY = np.random.default_rng(10).integers(0, 4000, size=(40, 24, 32)).astype(np.uint16)
COLOR = np.random.default_rng(11).integers(0, 180, size=(300, 16, 20, 3)).astype(np.uint8)
# 12.5 Hz for the first 100 timestamps, then 50 Hz: only the first 100 count
COLOR_STAMPS = 1.0 + np.concatenate([np.arange(100) * 0.08, 7.92 + np.arange(1, 201) * 0.02])
LONG = (np.arange(1205, dtype=np.int64)[:, None, None] % 251 + np.zeros((1, 6, 8), np.int64)).astype(np.uint8)
BLACK = np.zeros((12, 6, 8), np.float32)
NODES = ("left_ear", "nose", "right_ear")
POSE_PATH = "/processing/behavior/PoseEstimationLeftCamera"
DISAGREEING_PATH = "/processing/behavior/PoseEstimationDisagreeing"
GOOD_URL = "http://127.0.0.1:9/video.nwb"  # never fetched: validation comes first


def write_batch_files(folder):
    make_image_series_nwb(os.path.join(folder, "video.nwb"), {
        "/acquisition/Gray": {"data": GRAY, "starting_time": (2.0, 25.0)},
        "/acquisition/Color": {"data": COLOR, "timestamps": COLOR_STAMPS},
        "/acquisition/Long": {"data": LONG},
        "/acquisition/Black": {"data": BLACK, "timestamps": np.full(12, 5.0)},
        "/acquisition/External": {"data": (0, 0, 0), "external_file": ["behavior_video.mp4"],
                                  "starting_time": (0.0, 30.0)},
        "/acquisition/RGBA": {"data": np.zeros((4, 6, 8, 4), np.uint8)},
    })
    rng = np.random.default_rng(12)
    make_pose_nwb(os.path.join(folder, "pose.nwb"), {
        POSE_PATH: {name: {"data": rng.normal(size=(90, 2)), "timestamps": np.arange(90) / 30.0}
                    for name in NODES},
        DISAGREEING_PATH: {"nose": {"data": rng.normal(size=(20, 2)), "starting_time": (0.0, 30.0)},
                           "tail": {"data": rng.normal(size=(20, 2)), "starting_time": (0.0, 60.0)}},
    })


def video(path, **params):
    return dict({"nwb_url": "VIDEO_URL", "image_series_path": path}, **params)


BATCH = {
    "gray": (VIDEO, video("/acquisition/Gray", dandiset_id="000123", neurosift_url="https://neurosift.app/x")),
    "color": (VIDEO, video("/acquisition/Color")),
    "long": (VIDEO, video("/acquisition/Long")),
    "black": (VIDEO, video("/acquisition/Black")),
    "external": (VIDEO, video("/acquisition/External")),
    "rgba": (VIDEO, video("/acquisition/RGBA")),
    "missing": (VIDEO, video("/acquisition/Nope")),
    "dataset": (VIDEO, video("/acquisition/Gray/data")),
    "pose": (POSE, {"nwb_url": "POSE_URL", "path": POSE_PATH, "dandiset_id": "000456"}),
    "pose-disagreeing": (POSE, {"nwb_url": "POSE_URL", "path": DISAGREEING_PATH}),
    "pose-missing": (POSE, {"nwb_url": "POSE_URL", "path": "/processing/behavior/PoseEstimationRightCamera"}),
}

INVALID = {  # case -> (job type, parameters, the error after "Invalid parameters: ")
    "video-no-nwb_url": (VIDEO, {"image_series_path": "/a"}, "nwb_url is required"),
    "video-number-nwb_url": (VIDEO, {"nwb_url": 5, "image_series_path": "/a"}, "nwb_url must be a non-empty string"),
    "video-ftp-nwb_url": (VIDEO, {"nwb_url": "ftp://x/v.nwb", "image_series_path": "/a"},
                          "nwb_url must be an http:// or https:// URL"),
    "video-no-path": (VIDEO, {"nwb_url": GOOD_URL}, "image_series_path is required"),
    "video-list-path": (VIDEO, {"nwb_url": GOOD_URL, "image_series_path": ["/a"]},
                        "image_series_path must be a non-empty string"),
    "video-relative-path": (VIDEO, {"nwb_url": GOOD_URL, "image_series_path": "acquisition/Video"},
                            "image_series_path must start with /"),
    "video-number-dandiset_id": (VIDEO, {"nwb_url": GOOD_URL, "image_series_path": "/a", "dandiset_id": 123},
                                 "dandiset_id must be a string"),
    "pose-no-path": (POSE, {"nwb_url": GOOD_URL}, "path is required"),
    "pose-number-path": (POSE, {"nwb_url": GOOD_URL, "path": 5}, "path must be a non-empty string"),
    "pose-object-neurosift_url": (POSE, {"nwb_url": GOOD_URL, "path": "/a", "neurosift_url": {}},
                                  "neurosift_url must be a string"),
    "pose-empty-nwb_url": (POSE, {"nwb_url": "", "path": "/a"}, "nwb_url must be a non-empty string"),
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every job of BATCH and INVALID, served by one runner (job processes, two at once) with the
    working stand-ins on its PYTHONPATH; the finished jobs, the uploads and the job TMPDIR."""
    if not HAVE_FIGPACK:
        pytest.skip("needs figpack, lindi and h5py that import")
    folder = tmp_path_factory.mktemp("batch")
    data, job_tmp, state = folder / "data", folder / "jobtmp", folder / "state"
    for made in (data, job_tmp, state):
        made.mkdir()
    write_batch_files(str(data))
    with FakeWorker(rate_limit=10 ** 6) as worker, RangeFileServer(data, host=JOB_HOST) as files, \
            FigpackApiStandIn(expected_api_key=FIGPACK_KEY, host=JOB_HOST) as api:
        urls = {"VIDEO_URL": files.url_for("video.nwb"), "POSE_URL": files.url_for("pose.nwb")}
        params = {name: (job_type, {key: urls.get(value, value) for key, value in given.items()})
                  for name, (job_type, given) in BATCH.items()}
        params.update((name, (job_type, given)) for name, (job_type, given, _) in INVALID.items())
        ids = {name: worker.add_job(job_type, given) for name, (job_type, given) in params.items()}
        env = clean_environment(**figpack_environment(api.url, job_tmp, WORKING))
        env["RUNPACK_RUNNER_API_KEY"] = RUNNER_KEY
        runner = RunnerProcess([sys.executable, RUNNER_PY, "runner", "--worker-url", worker.url, "--state-dir",
                                str(state), "--concurrency", "2"] + list(FAST_SETTINGS), env, state,
                               folder / "runner.out")
        try:
            worker.wait_until(lambda: all(worker.job(job_id)["status"] in ("completed", "failed")
                                          for job_id in ids.values()), timeout=120,
                              message="the batch did not finish:\n" + runner.output)
            assert runner.stop() == 0, runner.output
        finally:
            runner.close()
        assert not worker.internal_errors
        yield types.SimpleNamespace(
            jobs={name: worker.job(job_id) for name, job_id in ids.items()}, params=params,
            figures={url: dict(files_) for url, files_ in api.figures.items()}, api_url=api.url,
            job_tmp=job_tmp, runner_output=runner.output, file_requests=list(files.requests))


def completed(batch, name):
    job = batch.jobs[name]
    assert job["status"] == "completed", (job["error_message"], job["console_output"])
    return job


def uploaded(batch, name):
    """The stand-in view's record and the figure's title and description, for a completed job."""
    url = completed(batch, name)["output_data"]["figpack_url"]
    assert url.startswith(batch.api_url + "/figures/") and url.endswith("/index.html")
    return read_view_record(batch.figures[url])


def failed_with(batch, name):
    job = batch.jobs[name]
    assert job["status"] == "failed", job
    return job["error_message"]


@pytest.mark.slow
@needs_figpack
def test_a_grayscale_video_preview_uploads_its_first_frames_as_rgb_with_the_deployed_output(batch):
    job = completed(batch, "gray")
    output = job["output_data"]
    nwb_url = batch.params["gray"][1]["nwb_url"]
    assert output == {"figpack_url": output["figpack_url"], "nwb_url": nwb_url,
                      "image_series_path": "/acquisition/Gray", "dandiset_id": "000123",
                      "neurosift_url": "https://neurosift.app/x", "num_frames": 40}
    figure = uploaded(batch, "gray")
    assert figure["title"] == "RUNPACK: Video Preview from NWB ImageSeries"
    assert json.loads(figure["description"]) == {key: output[key] for key in (
        "nwb_url", "image_series_path", "dandiset_id", "neurosift_url")}
    record = figure["record"]
    assert (record["shape"], record["dtype"], record["min"], record["max"]) == ([40, 24, 32, 3], "uint8", 0, 255)
    assert record["channels_equal"] and record["sha256"] == sha256(deployed_preview(GRAY))
    assert record["fps"] == 25.0
    assert_console_lines(job["console_output"], [
        "Loading NWB file from: " + nwb_url, "Image series path: /acquisition/Gray",
        "Reading 40 frames (24 x 32, grayscale) at 25 fps (from starting_time)",
        "Successfully created LossyVideo view", "Uploading video preview to figurl...",
        "Successfully uploaded! URL: " + output["figpack_url"], "Completed!"])
    for heartbeat in job["heartbeats"]:  # each carried the whole console so far
        assert job_console(job["console_output"]).startswith(job_console(heartbeat["console_output"]))


@pytest.mark.slow
@needs_figpack
def test_an_rgb_video_is_previewed_as_it_is_at_the_rate_of_its_first_100_timestamps(batch):
    record = uploaded(batch, "color")["record"]
    assert record["shape"] == [300, 16, 20, 3] and record["max"] == 255 and not record["channels_equal"]
    assert record["sha256"] == sha256(deployed_preview(COLOR))
    assert record["fps"] == pytest.approx(12.5) and record["fps_type"] == "float"
    assert completed(batch, "color")["output_data"]["num_frames"] == 300
    assert "at 12.5 fps (from timestamps)" in batch.jobs["color"]["console_output"]


@pytest.mark.slow
@needs_figpack
def test_a_video_of_more_than_1000_frames_is_previewed_by_its_first_1000_at_the_default_rate(batch):
    job = completed(batch, "long")
    record = uploaded(batch, "long")["record"]
    assert record["shape"] == [1000, 6, 8, 3] and job["output_data"]["num_frames"] == 1000
    assert record["sha256"] == sha256(deployed_preview(LONG[:1000]))
    assert record["fps"] == 30.0
    assert "Reading the first 1000 of 1205 frames (6 x 8, grayscale) at 30 fps (no timing in the series, " \
           "so the default)" in job["console_output"]


@pytest.mark.slow
@needs_figpack
def test_an_all_zero_video_is_previewed_black_and_equal_timestamps_give_the_default_rate(batch):
    record = uploaded(batch, "black")["record"]
    assert record["shape"] == [12, 6, 8, 3] and (record["min"], record["max"]) == (0, 0)
    assert record["fps"] == 30.0
    assert "at 30 fps (from timestamps, so the default)" in batch.jobs["black"]["console_output"]


@pytest.mark.slow
@needs_figpack
@pytest.mark.parametrize("name, message", [
    ("external", "image_series_path /acquisition/External stores its frames in an external file "
                 "(behavior_video.mp4), not in the NWB file: there are none to preview"),
    ("missing", "image_series_path /acquisition/Nope is not in the NWB file"),
    ("dataset", "image_series_path /acquisition/Gray/data is a dataset in the NWB file, not a group"),
    ("rgba", "the data of image_series_path /acquisition/RGBA has shape (4, 6, 8, 4), not frames x height x "
             "width (grayscale) or frames x height x width x 3 (RGB)"),
    ("pose-missing", "path /processing/behavior/PoseEstimationRightCamera is not in the NWB file"),
], ids=["external-file", "missing-path", "dataset-path", "rgba", "pose-missing-path"])
def test_what_the_file_shows_wrong_about_the_parameters_is_named_as_invalid_parameters(batch, name, message):
    assert failed_with(batch, name) == "Invalid parameters: " + message
    assert "Traceback" not in batch.jobs[name]["console_output"]


@pytest.mark.slow
@needs_figpack
@pytest.mark.parametrize("name", sorted(INVALID))
def test_wrong_parameters_fail_naming_the_parameter_before_any_request(batch, name):
    assert failed_with(batch, name) == "Invalid parameters: " + INVALID[name][2]
    assert batch.jobs[name]["console_output"] == ""


@pytest.mark.slow
@needs_figpack
def test_a_pose_estimation_view_is_made_of_the_nwb_url_and_path_and_uploaded(batch):
    job = completed(batch, "pose")
    output = job["output_data"]
    nwb_url = batch.params["pose"][1]["nwb_url"]
    assert output == {"figpack_url": output["figpack_url"], "nwb_url": nwb_url, "path": POSE_PATH,
                      "dandiset_id": "000456", "neurosift_url": ""}
    figure = uploaded(batch, "pose")
    assert figure["title"] == "RUNPACK: Pose Estimation from NWB"
    assert json.loads(figure["description"]) == {"nwb_url": nwb_url, "path": POSE_PATH,
                                                 "dandiset_id": "000456", "neurosift_url": ""}
    record = figure["record"]
    assert (record["nwb"], record["path"], record["use_local_cache"]) == (nwb_url, POSE_PATH, True)
    assert record["nodes"] == {name: [90, 2] for name in NODES}
    assert (record["timing"], record["num_timestamps"]) == ("timestamps", 90)
    # lindi cached in the job's own TMPDIR, which went with the job process
    assert record["cache_dir"].startswith(str(batch.job_tmp) + os.sep + runpack_runner.JOB_TEMP_PREFIX)
    assert not os.path.exists(record["cache_dir"])
    assert_console_lines(job["console_output"], [
        "Loading NWB file from: " + nwb_url, "Pose estimation path: " + POSE_PATH,
        "Successfully created PoseEstimation view", "Uploading pose estimation to figurl...",
        "Successfully uploaded! URL: " + output["figpack_url"], "Completed!"])


@pytest.mark.slow
@needs_figpack
def test_a_value_error_from_the_pose_view_fails_the_job_it_is_not_invalid_parameters(batch):
    message = failed_with(batch, "pose-disagreeing")
    assert message == "Job execution failed: ValueError: the nodes of %s disagree on timing" % DISAGREEING_PATH
    console = batch.jobs["pose-disagreeing"]["console_output"]
    assert "Traceback (most recent call last)" in console and "Uploading" not in console


@pytest.mark.slow
@needs_figpack
def test_the_batch_read_by_range_uploaded_once_per_completed_job_and_left_no_temporary_files(batch):
    done = [name for name, job in batch.jobs.items() if job["status"] == "completed"]
    assert sorted(done) == ["black", "color", "gray", "long", "pose"]
    assert len(batch.figures) == len(done)
    assert any("Range" in request["headers"] for request in batch.file_requests)
    assert os.listdir(str(batch.job_tmp)) == []
    assert "Serving job types: %s, %s, %s, hello_world" % (POSE, RASTER, VIDEO) in batch.runner_output


# ---- a runner that cannot run them does not take them ---------------------------------------------

def assert_not_served(worker, runner, not_served, served=()):
    """Jobs of the ``not_served`` types stay pending and are never polled for or claimed, while a
    hello_world job added at the same moment completes; ``served`` types are registered."""
    pending = [worker.add_job(job_type, {"nwb_url": GOOD_URL, "path": "/a", "image_series_path": "/a",
                                         "units_path": "/units"}) for job_type in not_served]
    hello = worker.add_job("hello_world", {"name": "Other", "processing_time": 0})
    worker.wait_until(lambda: worker.job(hello)["status"] == "completed", timeout=30,
                      message="the hello_world job did not complete")
    polls_then = worker.count("available")
    worker.wait_until(lambda: worker.count("available") >= polls_then + 2, timeout=10)
    assert runner.stop() == 0, runner.output
    for job_id in pending:
        assert worker.job(job_id)["status"] == "pending"
        assert worker.count("claim", job_id=job_id) == 0
    polls = [record.path for record in worker.requests if record.route == "available"]
    assert all("types%5B%5D=" + job_type not in path for path in polls for job_type in not_served), polls
    (registered,) = worker.runners.values()
    assert not set(not_served) & set(registered["capabilities"])
    assert set(served) <= set(registered["capabilities"]), registered["capabilities"]


def imports_logged(path):
    """{pid: [modules]} that the stand-ins logged as imported (RUNPACK_TEST_IMPORT_LOG)."""
    logged = {}
    if os.path.exists(str(path)):
        with open(str(path)) as stream:
            for line in stream:
                module, pid = line.split()
                logged.setdefault(int(pid), []).append(module)
    return logged


@pytest.mark.slow
@needs_figpack
def test_without_the_extension_packages_the_two_types_are_not_served_and_their_jobs_stay_pending(
        worker, start_runner, tmp_path):
    runner = start_runner(env=figpack_environment("http://127.0.0.1:9", tmp_path))
    assert_not_served(worker, runner, (VIDEO, POSE), served=(RASTER,))
    assert ("Not serving job type %s: missing Python packages figpack_experimental (%s)"
            % (VIDEO, EXTRA_HINT % "figpack_experimental")) in runner.output
    assert ("Not serving job type %s: missing Python packages figpack_nwb (%s)"
            % (POSE, EXTRA_HINT % "figpack_nwb")) in runner.output


@pytest.mark.slow
@needs_figpack
def test_without_figpack_api_key_no_figpack_type_is_served_and_no_import_is_checked(
        worker, start_runner, tmp_path, monkeypatch):
    monkeypatch.delenv("FIGPACK_API_KEY", raising=False)
    log = tmp_path / "imports.log"
    runner = start_runner(env={"PYTHONPATH": WORKING, "RUNPACK_TEST_IMPORT_LOG": str(log)})
    assert_not_served(worker, runner, (VIDEO, POSE, RASTER))
    for job_type in (VIDEO, POSE, RASTER):
        assert ("Not serving job type %s: environment variable FIGPACK_API_KEY not set" % job_type
                in runner.output), runner.output
    assert imports_logged(log) == {}


@pytest.mark.slow
@needs_figpack
def test_an_extension_that_fails_to_import_is_not_served_and_only_one_child_process_imported_it(
        worker, start_runner, tmp_path):
    log = tmp_path / "imports.log"
    env = figpack_environment("http://127.0.0.1:9", tmp_path, BROKEN_EXTENSION, WORKING)
    runner = start_runner(env=dict(env, RUNPACK_TEST_IMPORT_LOG=str(log)))
    assert_not_served(worker, runner, (VIDEO,), served=(POSE, RASTER))
    assert ("Not serving job type %s: Python packages that fail to import with Python %s: figpack_experimental "
            "(RuntimeError: figpack_experimental stand-in: broken on purpose) (%s)"
            % (VIDEO, sys.version.split()[0], EXTRA_HINT % "figpack_experimental")) in runner.output
    # one child process checked the packages of every figpack type together; the runner imported none
    (checker,) = imports_logged(log)
    assert sorted(imports_logged(log)[checker]) == ["figpack_experimental", "figpack_nwb"]
    assert checker != runner.process.pid


@pytest.mark.slow
@needs_figpack
def test_a_figpack_that_fails_to_import_as_on_python_3_8_serves_no_figpack_type(worker, start_runner, tmp_path):
    runner = start_runner(env=figpack_environment("http://127.0.0.1:9", tmp_path, BROKEN_FIGPACK, WORKING))
    assert_not_served(worker, runner, (VIDEO, POSE, RASTER))
    assert ("Not serving job type %s: Python packages that fail to import with Python %s: figpack "
            "(TypeError: 'type' object is not subscriptable) (install them with: pip install "
            "figpack figpack-spike-sorting lindi (from a checkout of the runner: pip install '.[figpack]'))"
            % (RASTER, sys.version.split()[0])) in runner.output
    for job_type in (VIDEO, POSE):
        line = re.search("Not serving job type %s: .*" % job_type, runner.output).group(0)
        assert "fail to import" in line and "TypeError: 'type' object is not subscriptable" in line, line


@pytest.mark.slow
@needs_figpack
def test_check_and_a_local_run_say_which_package_fails_to_import_and_how_to_install_it(tmp_path):
    env = figpack_environment("http://127.0.0.1:9", tmp_path, BROKEN_EXTENSION, WORKING)
    check = run_cli("check", "--worker-url", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "state"), env=env)
    reason = ("Python packages that fail to import with Python %s: figpack_experimental (RuntimeError: "
              "figpack_experimental stand-in: broken on purpose) (%s)"
              % (sys.version.split()[0], EXTRA_HINT % "figpack_experimental"))
    assert "Job type         %s: NOT served: %s\n" % (VIDEO, reason) in check.stdout, check.stdout
    assert "Job type         %s: served\n" % POSE in check.stdout
    assert re.search(r"^Imports +figpack, figpack_nwb, figpack_spike_sorting, h5py, lindi, numpy import; "
                     r"figpack_experimental fail to import \(checked in a child process", check.stdout, re.M), \
        check.stdout
    run = run_cli("run", VIDEO, "nwb_url=" + GOOD_URL, "image_series_path=/a", env=env)
    assert run.returncode == 1
    assert run.stderr.strip() == "Error: job type %s cannot run here: %s" % (VIDEO, reason)


# ---- failures while the job runs ----------------------------------------------------------------

@pytest.mark.slow
@needs_figpack
def test_a_stalled_nwb_server_fails_both_job_types_at_the_time_limit(worker, start_runner, tmp_path):
    with RangeFileServer(tmp_path, stall=True, host=JOB_HOST) as stalled, \
            FigpackApiStandIn(host=JOB_HOST) as api:
        stuck = [worker.add_job(VIDEO, {"nwb_url": stalled.url_for("video.nwb"), "image_series_path": "/a"}),
                 worker.add_job(POSE, {"nwb_url": stalled.url_for("pose.nwb"), "path": "/a"})]
        runner = start_runner("--job-timeout", "3", "--concurrency", "2",
                              env=figpack_environment(api.url, tmp_path, WORKING))
        worker.wait_until(lambda: all(worker.job(job_id)["status"] == "failed" for job_id in stuck), timeout=30,
                          message="the time limit did not end the jobs")
        for job_id in stuck:
            job = worker.job(job_id)
            assert job["error_message"] == "Job execution failed: timed out after 3 s"
            assert "Loading NWB file from: " + stalled.url in job["console_output"]
        assert stalled.stalled_requests >= 2
        assert job_processes_of(runner.process.pid) == [], "a timed-out job process is still there"
        runner.send(signal.SIGTERM)
        assert runner.wait(timeout=15) == 0, runner.output
        assert api.requests == []
