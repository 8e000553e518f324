"""Self-tests of tests/figpack_fixtures.py.

The stand-in servers are checked with the standard library only; the
end-to-end tests run the REAL figpack + figpack_spike_sorting + lindi in a
child interpreter against the loopback stand-ins (no mocks) and skip cleanly
where that extra is not installed.
"""

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import require_figpack_extra  # noqa: E402
from figpack_fixtures import (  # noqa: E402
    FigpackApiStandIn,
    RangeFileServer,
    make_units_nwb,
    read_raster_metadata,
    run_raster_subprocess,
)

API_KEY = "test-figpack-key"

# never route loopback requests of this process through a proxy
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method, url, data=None, headers=None, timeout=5):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _NO_PROXY_OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def _post_json(url, obj, key=API_KEY):
    status, _, body = _http("POST", url, json.dumps(obj).encode(),
                            {"Content-Type": "application/json", "x-api-key": key})
    return status, json.loads(body.decode() or "null")


# ---------------------------------------------------------------- RangeFileServer

def test_range_file_server_ranges(tmp_path):
    payload = bytes(range(256)) * 40  # 10240 bytes
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(payload)
    (tmp_path / "secret.txt").write_bytes(b"outside the served directory")
    with RangeFileServer(served) as fs:
        url = fs.url_for("blob.bin")
        assert url.startswith("http://127.0.0.1:")

        status, headers, body = _http("GET", url, headers={"Range": "bytes=100-199"})
        assert status == 206
        assert headers["Content-Range"] == "bytes 100-199/10240"
        assert headers["Content-Length"] == "100"
        assert headers["Accept-Ranges"] == "bytes"
        assert body == payload[100:200]

        status, headers, body = _http("GET", url, headers={"Range": "bytes=10200-"})
        assert (status, body) == (206, payload[10200:])
        status, headers, body = _http("GET", url, headers={"Range": "bytes=-16"})
        assert (status, body) == (206, payload[-16:])
        assert headers["Content-Range"] == "bytes 10224-10239/10240"
        status, headers, body = _http("GET", url, headers={"Range": "bytes=10000-99999"})
        assert (status, body) == (206, payload[10000:])

        status, headers, body = _http("GET", url, headers={"Range": "bytes=20000-20010"})
        assert status == 416 and headers["Content-Range"] == "bytes */10240"

        status, headers, body = _http("GET", url)
        assert (status, body) == (200, payload)
        assert headers["Content-Length"] == "10240"

        status, headers, body = _http("HEAD", url)
        assert status == 200 and body == b""
        assert headers["Content-Length"] == "10240" and headers["Accept-Ranges"] == "bytes"

        assert _http("GET", fs.url + "/missing.bin")[0] == 404
        assert _http("GET", fs.url + "/%2e%2e/secret.txt")[0] == 404
        assert _http("GET", fs.url + "/../secret.txt")[0] == 404
        assert [r["headers"].get("Range") for r in fs.requests[:1]] == ["bytes=100-199"]
        assert fs.bytes_served > 0


@pytest.mark.slow
def test_range_file_server_stall_does_not_block_stop(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    fs = RangeFileServer(tmp_path).start()
    try:
        assert _http("GET", fs.url_for("a.bin"))[0] == 200
        fs.stall = True
        with pytest.raises((socket.timeout, urllib.error.URLError)):
            _NO_PROXY_OPENER.open(fs.url_for("a.bin"), timeout=0.5)
        assert fs.stalled_requests == 1
    finally:
        t0 = time.time()
        fs.stop()
        assert time.time() - t0 < 3


@pytest.mark.slow
def test_range_file_server_stall_after(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"y" * 10)
    with RangeFileServer(tmp_path) as fs:
        fs.set_stall(True, after=2)
        assert _http("GET", fs.url_for("a.bin"))[0] == 200
        assert _http("GET", fs.url_for("a.bin"))[0] == 200
        with pytest.raises((socket.timeout, urllib.error.URLError)):
            _NO_PROXY_OPENER.open(fs.url_for("a.bin"), timeout=0.5)
        fs.set_stall(False)
        assert _http("GET", fs.url_for("a.bin"))[0] == 200


def test_a_server_given_another_loopback_host_listens_there_alone_and_names_it_in_its_urls(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"z" * 10)
    with RangeFileServer(tmp_path, host="127.0.0.2") as fs, FigpackApiStandIn(host="127.0.0.2") as api:
        assert fs.url_for("a.bin") == "http://127.0.0.2:%d/a.bin" % fs.port
        assert api.url == "http://127.0.0.2:%d" % api.port
        assert _http("GET", fs.url_for("a.bin"))[2] == b"z" * 10
        status, ans = _post_json(api.url + "/figures/create", {"title": "t"})
        assert status == 200 and ans["figure"]["figureUrl"].startswith("http://127.0.0.2:%d/" % api.port)
        with pytest.raises(ConnectionRefusedError):  # not on 127.0.0.1, the default host
            socket.create_connection(("127.0.0.1", fs.port), timeout=2).close()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::"])
def test_a_server_refuses_a_host_that_is_not_loopback(tmp_path, host):
    with pytest.raises(ValueError, match="loopback only"):
        RangeFileServer(tmp_path, host=host)
    with pytest.raises(ValueError, match="loopback only"):
        FigpackApiStandIn(host=host)


# ---------------------------------------------------------------- FigpackApiStandIn

def test_api_stand_in_protocol_by_hand():
    with FigpackApiStandIn(expected_api_key=API_KEY) as api:
        status, ans = _post_json(api.url + "/figures/create", {"title": "t"}, key="wrong")
        assert status == 401 and ans["success"] is False

        status, ans = _post_json(api.url + "/figures/create",
                                 {"figpackVersion": "x", "bucket": "b", "totalFiles": 1,
                                  "totalSize": 5, "title": "t"})
        assert status == 200 and ans["success"] is True
        fig_url = ans["figure"]["figureUrl"]
        assert ans["figure"]["status"] == "pending"
        assert fig_url.startswith(api.url + "/figures/") and fig_url.endswith("/index.html")
        base = fig_url[: -len("index.html")]

        status, ans = _post_json(api.url + "/upload", {
            "figureUrl": fig_url,
            "files": [{"relativePath": "index.html", "size": 5},
                      {"relativePath": "data.zarr/.zmetadata", "size": 2}]})
        assert status == 200 and ans["mode"] == "server-signed"
        signed = {s["relativePath"]: s["signedUrl"] for s in ans["signedUrls"]}
        assert set(signed) == {"index.html", "data.zarr/.zmetadata"}
        assert all(u.startswith(api.url + "/") for u in signed.values())

        assert _http("PUT", signed["index.html"], b"<html")[0] == 200
        assert _http("PUT", signed["data.zarr/.zmetadata"], b"{}")[0] == 200
        assert _http("PUT", base + "index.html?signature=forged", b"evil")[0] == 403

        assert _http("GET", fig_url)[2] == b"<html"
        assert _http("GET", base + "figpack.json")[0] == 404  # not before finalize
        assert _http("GET", base + "nope.txt")[0] == 404

        status, ans = _post_json(api.url + "/figures/finalize", {"figureUrl": fig_url})
        assert status == 200 and ans["success"] is True
        status, headers, body = _http("GET", base + "figpack.json")
        assert status == 200 and json.loads(body.decode())["status"] == "completed"
        assert _http("PUT", signed["index.html"], b"late")[0] == 403

        assert api.figures[fig_url]["index.html"] == b"<html"
        assert api.api_keys_seen == ["wrong", API_KEY, API_KEY, API_KEY]
        assert any(r["method"] == "PUT" for r in api.requests)

        api.fail("create", status=503, message="quota exceeded")
        status, ans = _post_json(api.url + "/figures/create", {"title": "t"})
        assert status == 503 and ans == {"success": False, "message": "quota exceeded"}
        assert _post_json(api.url + "/figures/create", {"title": "t"})[0] == 200


# ---------------------------------------------------------------- real figpack

@pytest.fixture
def isolated_dirs(tmp_path):
    """Fresh TMPDIR and HOME for the child, to prove figpack leaves nothing behind."""
    d = {"data": tmp_path / "data", "tmp": tmp_path / "tmp", "home": tmp_path / "home"}
    for p in d.values():
        p.mkdir()
    return d


def test_make_units_nwb_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    info = make_units_nwb(tmp_path / "u.nwb", n_units=3, spikes_per_unit=5, seed=1)
    assert info["unit_ids"] == ["1", "2", "3"] and info["total_spikes"] == 15
    with h5py.File(str(tmp_path / "u.nwb"), "r") as f:
        assert list(f["units/id"][()]) == [1, 2, 3]
        assert list(f["units/spike_times_index"][()]) == [5, 10, 15]
        st = f["units/spike_times"][()]
        assert st.shape == (15,)
        assert all((st[i * 5:(i + 1) * 5][1:] >= st[i * 5:(i + 1) * 5][:-1]).all() for i in range(3))


@pytest.mark.slow
def test_real_figpack_upload_end_to_end(isolated_dirs):
    require_figpack_extra()
    d = isolated_dirs
    info = make_units_nwb(d["data"] / "units.nwb", n_units=12, spikes_per_unit=50, seed=3)
    with RangeFileServer(d["data"]) as fs, FigpackApiStandIn(expected_api_key=API_KEY) as api:
        run = run_raster_subprocess(fs.url_for("units.nwb"), api.url, title="raster T",
                                    description="raster D", tmpdir=d["tmp"], home=d["home"],
                                    timeout=120)
        assert run["returncode"] == 0, run["stderr"][-3000:]
        url = run["result"]["url"]
        assert url.endswith("/index.html") and url.startswith(api.url + "/figures/")

        files = api.figures[url]
        for name in ("index.html", "manifest.json", "figpack.json", "extension_manifest.json",
                     "extension-figpack-spike-sorting.js", "data.zarr/.zmetadata"):
            assert name in files, sorted(files)
        assert any(n.startswith("data.zarr/_consolidated_") for n in files)
        assert any(n.startswith("assets/") for n in files)

        meta = read_raster_metadata(files)
        assert meta["view_type"] == "spike_sorting.RasterPlot"
        assert meta["unit_ids"] == info["unit_ids"]
        assert meta["total_spikes"] == info["total_spikes"] == meta["n_timestamps"]
        assert (meta["title"], meta["description"]) == ("raster T", "raster D")

        assert set(api.api_keys_seen) == {API_KEY}
        assert api.figure_info[url]["status"] == "completed"
        # the result can be re-validated over HTTP
        status, _, body = _http("GET", url[: -len("index.html")] + "figpack.json")
        assert status == 200 and json.loads(body.decode())["figureUrl"] == url
        assert _http("GET", url)[2] == files["index.html"]
        # lindi really read the file with Range requests
        assert any("Range" in r["headers"] for r in fs.requests)

    # figpack built in $TMPDIR/figpack_upload_* and removed it (and its manifest temp file)
    assert os.listdir(str(d["tmp"])) == []
    assert os.listdir(str(d["home"])) == []


@pytest.mark.slow
def test_real_figpack_error_paths(isolated_dirs):
    require_figpack_extra()
    d = isolated_dirs
    make_units_nwb(d["data"] / "units.nwb", n_units=2, spikes_per_unit=10)
    with RangeFileServer(d["data"]) as fs, FigpackApiStandIn(expected_api_key=API_KEY) as api:
        # no key: OSError after the NWB was read and the bundle built, before any API call
        run = run_raster_subprocess(fs.url_for("units.nwb"), api.url, api_key=None,
                                    tmpdir=d["tmp"], home=d["home"])
        assert run["returncode"] != 0
        assert "OSError: FIGPACK_API_KEY environment variable must be set" in run["stderr"]
        assert api.requests == [] and fs.requests != []

        # an API failure surfaces as a plain Exception carrying the server's message
        api.fail("create", status=500, message="quota exceeded")
        run = run_raster_subprocess(fs.url_for("units.nwb"), api.url,
                                    tmpdir=d["tmp"], home=d["home"])
        assert run["returncode"] != 0
        assert "Exception: Failed to create figure: quota exceeded" in run["stderr"]
        assert api.figures == {}
    assert os.listdir(str(d["tmp"])) == []
