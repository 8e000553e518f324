"""Offline stand-ins for the figpack raster-plot job type.

Everything here listens on loopback only (127.0.0.1 by default; any address of
127.0.0.0/8 as ``host``, all of it local on Linux) and uses the standard library
(h5py / numpy are imported lazily, inside ``make_units_nwb``), so importing
this module is cheap and works where the figpack extra is not installed.

* ``make_units_nwb``        - writes a minimal HDF5 "NWB" units table that
                              ``RasterPlot.from_nwb_units_table`` + lindi read.
* ``RangeFileServer``       - static file server honouring HTTP Range
                              (lindi reads NWB files through it), with a
                              ``stall`` switch that accepts and never answers.
* ``FigpackApiStandIn``     - the figpack upload API (create / upload /
                              signed PUT / finalize) plus GET of the
                              uploaded files, all in memory.
* ``make_image_series_nwb`` - writes NWB ImageSeries (video) groups for the
                              video-preview job type.
* ``make_pose_nwb``         - writes NWB PoseEstimation groups for the
                              pose-estimation job type.
* ``read_raster_metadata``  - reads ``data.zarr/.zmetadata`` of an uploaded
                              figure.
* ``read_view_record``      - what a stand-in extension view (see
                              figpack_extension_standins/) recorded in the
                              figure it uploaded.
* ``run_raster_subprocess`` - runs the real figpack + lindi pipeline in a
                              child interpreter (used by the self-test and
                              for measurements).

Python 3.8 compatible.
"""

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "make_units_nwb",
    "make_image_series_nwb",
    "make_pose_nwb",
    "read_view_record",
    "STANDINS",
    "RangeFileServer",
    "FigpackApiStandIn",
    "read_raster_metadata",
    "run_raster_subprocess",
    "RASTER_SCRIPT",
]

DEFAULT_HOST = "127.0.0.1"
_QUIET_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


# --------------------------------------------------------------------------
# NWB-ish units file
# --------------------------------------------------------------------------

def make_units_nwb(path, n_units=20, spikes_per_unit=200, seed=0,
                   duration_sec=60.0, first_unit_id=1):
    """Write a minimal units table readable by ``RasterPlot.from_nwb_units_table``.

    Layout (all written by h5py; lindi needs nothing more):
      /units/id                 int64[n_units]  ids first_unit_id, first_unit_id+1, ...
      /units/spike_times        float64[total]  each unit's times sorted, in [0, duration_sec)
      /units/spike_times_index  int64[n_units]  cumulative end offsets (ragged index)
    plus a few NWB-style string attributes on /units (cosmetic).

    ``first_unit_id`` defaults to 1 so an implementation that confuses the
    row index with the unit id is caught.

    Returns ``{"unit_ids": [str, ...], "total_spikes": int, "n_units": int,
    "duration_sec": float, "path": str}``. ``unit_ids`` are strings because
    that is how figpack records them (``str(id)``), so they compare directly
    with ``read_raster_metadata(...)["unit_ids"]``.
    """
    import h5py  # lazy
    import numpy as np  # lazy

    n_units = int(n_units)
    spikes_per_unit = int(spikes_per_unit)
    if n_units < 1 or spikes_per_unit < 1:
        # figpack drops units with no spikes and fails on an all-empty table
        raise ValueError("n_units and spikes_per_unit must be >= 1")
    rng = np.random.default_rng(seed)
    times = rng.uniform(0.0, float(duration_sec), size=(n_units, spikes_per_unit))
    times.sort(axis=1)
    ids = np.arange(first_unit_id, first_unit_id + n_units, dtype=np.int64)
    index = np.arange(1, n_units + 1, dtype=np.int64) * spikes_per_unit
    with h5py.File(str(path), "w") as f:
        f.attrs["namespace"] = "core"
        f.attrs["neurodata_type"] = "NWBFile"
        units = f.create_group("units")
        units.attrs["namespace"] = "core"
        units.attrs["neurodata_type"] = "Units"
        units.attrs["description"] = "synthetic units for tests"
        units.attrs["colnames"] = np.array([b"spike_times"], dtype=object)
        units.create_dataset("id", data=ids)
        units.create_dataset("spike_times", data=times.reshape(-1))
        units.create_dataset("spike_times_index", data=index)
    return {
        "unit_ids": [str(int(i)) for i in ids],
        "total_spikes": n_units * spikes_per_unit,
        "n_units": n_units,
        "duration_sec": float(duration_sec),
        "path": str(path),
    }


def make_image_series_nwb(path, series):
    """Write ImageSeries groups: ``series`` maps a group path (e.g. "/acquisition/Video") to
    a dict with

      "data"           an array (T x H x W or T x H x W x 3), or a shape for an empty one,
                       e.g. (0, 0, 0) as an ImageSeries with external frames has
      "starting_time"  (t0, rate)       -> starting_time scalar with a "rate" attribute
      "timestamps"     a 1-d array      -> timestamps
      "external_file"  [names]          -> external_file (strings) with starting_frame

    all optional but "data", written by h5py as pynwb lays them out.
    """
    import h5py  # lazy
    import numpy as np  # lazy

    with h5py.File(str(path), "w") as f:
        f.attrs["namespace"] = "core"
        f.attrs["neurodata_type"] = "NWBFile"
        for group_path, spec in series.items():
            group = f.create_group(group_path)
            group.attrs["namespace"] = "core"
            group.attrs["neurodata_type"] = "ImageSeries"
            data = spec["data"]
            if isinstance(data, tuple):
                group.create_dataset("data", shape=data, dtype=np.uint8)
            else:
                group.create_dataset("data", data=data)
            if spec.get("starting_time") is not None:
                t0, rate = spec["starting_time"]
                start = group.create_dataset("starting_time", data=float(t0))
                start.attrs["rate"] = float(rate)
                start.attrs["unit"] = "seconds"
            if spec.get("timestamps") is not None:
                group.create_dataset("timestamps", data=np.asarray(spec["timestamps"], dtype=np.float64))
            if spec.get("external_file") is not None:
                names = spec["external_file"]
                external = group.create_dataset("external_file", data=np.array(names, dtype=object),
                                                dtype=h5py.string_dtype())
                external.attrs["starting_frame"] = np.zeros(len(names), dtype=np.int64)
    return str(path)


def make_pose_nwb(path, groups):
    """Write PoseEstimation groups (ndx-pose layout): ``groups`` maps a group path (e.g.
    "/processing/behavior/PoseEstimationLeftCamera") to {node name: node}, a node being a dict
    with "data" (T x 2 or T x 3) and either "timestamps" or "starting_time": (t0, rate).
    """
    import h5py  # lazy
    import numpy as np  # lazy

    with h5py.File(str(path), "w") as f:
        f.attrs["namespace"] = "core"
        f.attrs["neurodata_type"] = "NWBFile"
        for group_path, nodes in groups.items():
            group = f.create_group(group_path)
            group.attrs["namespace"] = "ndx-pose"
            group.attrs["neurodata_type"] = "PoseEstimation"
            for name, node in nodes.items():
                series = group.create_group(name)
                series.attrs["namespace"] = "ndx-pose"
                series.attrs["neurodata_type"] = "PoseEstimationSeries"
                data = np.asarray(node["data"], dtype=np.float64)
                series.create_dataset("data", data=data)
                series.create_dataset("confidence", data=np.ones(len(data)))
                if node.get("timestamps") is not None:
                    series.create_dataset("timestamps", data=np.asarray(node["timestamps"], dtype=np.float64))
                if node.get("starting_time") is not None:
                    t0, rate = node["starting_time"]
                    start = series.create_dataset("starting_time", data=float(t0))
                    start.attrs["rate"] = float(rate)
    return str(path)


# --------------------------------------------------------------------------
# shared server plumbing
# --------------------------------------------------------------------------

class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, _QUIET_ERRORS):
            return
        ThreadingHTTPServer.handle_error(self, request, client_address)


class _LoopbackServerBase(object):
    """start()/stop()/url/context manager + a stall switch shared by both servers."""

    _handler_class = None  # set by subclasses

    def __init__(self, stall=False, stall_after=0, host=DEFAULT_HOST):
        # host: the loopback address to listen on and to name in ``url``.
        # stall: when true, connections are accepted but never answered
        # (after ``stall_after`` requests have been answered normally).
        if not ipaddress.ip_address(str(host)).is_loopback:
            raise ValueError("a stand-in listens on loopback only, not on %s" % (host,))
        self.host = str(host)
        self.stall = bool(stall)
        self.stall_after = int(stall_after)
        self.requests = []          # [{"method", "path", "headers"}] in arrival order
        self.stalled_requests = 0   # how many connections are/were held without answer
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd = None
        self._thread = None
        self._port = None
        self._answered = 0

    # -- lifecycle --------------------------------------------------------
    def start(self):
        if self._httpd is not None:
            return self
        self._release.clear()
        httpd = _QuietServer((self.host, 0), self._handler_class)
        httpd.owner = self
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="%s-%d" % (type(self).__name__, httpd.server_address[1]), daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving; releases stalled connections. Idempotent, never blocks long."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is None:
            return
        self._release.set()          # let stalled handlers return and close their socket
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def port(self):
        """Port of the running server (still answers after stop(), for messages)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def set_stall(self, stall=True, after=0):
        """Switch stalling on/off. ``after``: answer this many more requests first."""
        with self._lock:
            self.stall = bool(stall)
            self.stall_after = self._answered + int(after)

    # -- used by handlers ---------------------------------------------------
    def _record(self, handler):
        with self._lock:
            self.requests.append({
                "method": handler.command,
                "path": handler.path,
                "headers": dict(handler.headers.items()),
            })

    def _should_stall(self):
        with self._lock:
            if self.stall and self._answered >= self.stall_after:
                self.stalled_requests += 1
                return True
            self._answered += 1
            return False

    def _hold(self):
        # Keep the connection open without answering until stop().
        self._release.wait()


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackStandIn/1"

    def log_message(self, format, *args):  # silence stderr
        pass

    @property
    def owner(self):
        return self.server.owner

    def _enter(self):
        """Record the request; returns False if it must stall (and then holds)."""
        self.owner._record(self)
        if self.owner._should_stall():
            self.close_connection = True
            self.owner._hold()
            return False
        return True

    def _send_bytes(self, status, body, content_type="application/octet-stream",
                    extra_headers=None, head_only=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _send_json(self, status, obj):
        self._send_bytes(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16) if line else 0
                if size == 0:
                    # trailers until empty line
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


# --------------------------------------------------------------------------
# RangeFileServer
# --------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class _RangeHandler(_BaseHandler):

    def do_HEAD(self):
        self._serve(head_only=True)

    def do_GET(self):
        self._serve(head_only=False)

    def _resolve(self):
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        root = os.path.realpath(self.owner.directory)
        full = os.path.realpath(os.path.join(root, rel))
        if not (full == root or full.startswith(root + os.sep)) or not os.path.isfile(full):
            return None
        return full

    def _serve(self, head_only):
        if not self._enter():
            return
        full = self._resolve()
        if full is None:
            self._send_bytes(404, b"not found\n", "text/plain", head_only=head_only)
            return
        size = os.path.getsize(full)
        rng = self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if rng is not None:
            m = _RANGE_RE.match(rng)
            if m is None or (m.group(1) == "" and m.group(2) == ""):
                # multi-range or malformed: ignore (allowed by RFC 9110), send all
                pass
            else:
                a, b = m.group(1), m.group(2)
                if a == "":                   # suffix: last b bytes
                    n = int(b)
                    start, end = max(0, size - n), size - 1
                else:
                    start = int(a)
                    end = min(int(b), size - 1) if b != "" else size - 1
                if start >= size or (a != "" and b != "" and int(b) < int(a)) or size == 0:
                    self._send_bytes(416, b"", "text/plain",
                                     {"Content-Range": "bytes */%d" % size,
                                      "Accept-Ranges": "bytes"}, head_only=head_only)
                    return
                status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if head_only or length == 0:
            return
        with open(full, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                buf = f.read(min(1 << 20, remaining))
                if not buf:
                    break
                try:
                    self.wfile.write(buf)
                except _QUIET_ERRORS:
                    # lindi opens with a streamed GET and closes it after the headers
                    self.close_connection = True
                    return
                remaining -= len(buf)
                with self.owner._count_lock:
                    self.owner.bytes_served += len(buf)


class RangeFileServer(_LoopbackServerBase):
    """Serve the files of ``directory`` on ``host`` (127.0.0.1) with HTTP Range support.

    GET/HEAD; ``Range: bytes=a-b`` / ``a-`` / ``-n`` -> 206 + Content-Range;
    unsatisfiable -> 416; no Range -> 200 with Content-Length (lindi requires a
    200 + Content-Length for its first, un-ranged GET). Accept-Ranges: bytes.

    ``server.stall = True`` (or ``set_stall(True, after=n)``): new requests are
    accepted and never answered (after ``n`` more normal answers); ``stop()``
    releases them and does not block. ``requests`` records every request
    (method, path, headers); ``bytes_served`` counts body bytes written to
    sockets (a write the client aborted is not counted).
    """

    _handler_class = _RangeHandler

    def __init__(self, directory, stall=False, stall_after=0, host=DEFAULT_HOST):
        _LoopbackServerBase.__init__(self, stall=stall, stall_after=stall_after, host=host)
        self.directory = str(directory)
        self.bytes_served = 0
        self._count_lock = threading.Lock()

    def url_for(self, filename):
        return "%s/%s" % (self.url, quote(str(filename).lstrip("/")))


# --------------------------------------------------------------------------
# FigpackApiStandIn
# --------------------------------------------------------------------------

_CONTENT_TYPES = {
    "json": "application/json", "html": "text/html", "css": "text/css",
    "js": "application/javascript", "png": "image/png", "zmetadata": "application/json",
}


class _ApiHandler(_BaseHandler):

    def do_POST(self):
        if not self._enter():
            return
        body = self._read_body()
        path = urlsplit(self.path).path
        owner = self.owner
        endpoint = {"/figures/create": "create", "/upload": "upload",
                    "/figures/finalize": "finalize"}.get(path)
        if endpoint is None:
            self._send_json(404, {"success": False, "message": "no such endpoint %s" % path})
            return
        key = self.headers.get("x-api-key")
        with owner._lock:
            owner.api_keys_seen.append(key)
        failure = owner._take_failure(endpoint)
        if failure is not None:
            status, message = failure
            self._send_json(status, {"success": False, "message": message})
            return
        if owner.expected_api_key is not None and key != owner.expected_api_key:
            self._send_json(401, {"success": False, "message": "Invalid API key"})
            return
        try:
            payload = json.loads(body.decode("utf-8") or "{}")
        except ValueError:
            self._send_json(400, {"success": False, "message": "invalid JSON"})
            return
        status, answer = getattr(owner, "_api_" + endpoint)(payload)
        self._send_json(status, answer)

    def do_PUT(self):
        if not self._enter():
            return
        body = self._read_body()
        parts = urlsplit(self.path)
        status, message = self.owner._store_put(unquote(parts.path), parts.query, body)
        self._send_bytes(status, message.encode("utf-8"), "text/plain")

    def do_GET(self):
        self._get(head_only=False)

    def do_HEAD(self):
        self._get(head_only=True)

    def _get(self, head_only):
        if not self._enter():
            return
        data = self.owner._lookup(unquote(urlsplit(self.path).path))
        if data is None:
            self._send_bytes(404, b"not found\n", "text/plain", head_only=head_only)
            return
        ext = self.path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
        self._send_bytes(200, data, _CONTENT_TYPES.get(ext, "application/octet-stream"),
                         head_only=head_only)


class FigpackApiStandIn(_LoopbackServerBase):
    """The figpack upload API (server-signed mode) on ``host`` (127.0.0.1), in memory.

    POST /figures/create    -> {"success", "figure": {"figureUrl", "status": "pending", ...}}
    POST /upload            -> {"success", "mode": "server-signed",
                                "signedUrls": [{"relativePath", "signedUrl"}]}
                               signed URLs are ``<url>/figures/<id>/<path>?signature=<token>``
    PUT  <signedUrl>        -> stores the bytes (200); bad token/unknown figure -> 403
    POST /figures/finalize  -> {"success": true}; writes a figpack.json for the figure
    GET  /figures/<id>/<path> -> stored bytes, 404 otherwise (figpack.json exists
                               only after finalize).

    Figure URL: ``<url>/figures/<id>/index.html``.

    Attributes: ``figures`` {figure_url: {relative_path: bytes}} (includes the
    figpack.json written at finalize), ``figure_info`` {figure_url: dict},
    ``api_keys_seen`` (x-api-key of every API POST, in order), ``requests``
    (method, path, headers of every request).

    ``expected_api_key``: if not None, API POSTs with another key get 401.
    ``fail(endpoint, status=500, message=..., times=1)``: make the next call(s)
    of "create" / "upload" / "finalize" / "put" fail. ``stall`` as in
    RangeFileServer.
    """

    _handler_class = _ApiHandler

    def __init__(self, expected_api_key=None, stall=False, stall_after=0, host=DEFAULT_HOST):
        _LoopbackServerBase.__init__(self, stall=stall, stall_after=stall_after, host=host)
        self.expected_api_key = expected_api_key
        self.figures = {}
        self.figure_info = {}
        self.api_keys_seen = []
        self._by_id = {}        # figure id -> figure url
        self._tokens = {}       # figure id -> signature token
        self._failures = {}     # endpoint -> [status, message, times]

    # -- failure injection ------------------------------------------------
    def fail(self, endpoint, status=500, message="injected failure", times=1):
        if endpoint not in ("create", "upload", "finalize", "put"):
            raise ValueError("unknown endpoint %r" % (endpoint,))
        with self._lock:
            self._failures[endpoint] = [int(status), str(message), int(times)]

    def _take_failure(self, endpoint):
        with self._lock:
            f = self._failures.get(endpoint)
            if not f:
                return None
            f[2] -= 1
            if f[2] <= 0:
                del self._failures[endpoint]
            return f[0], f[1]

    # -- helpers --------------------------------------------------------------
    def figure_base_url(self, figure_url):
        return figure_url[: -len("index.html")] if figure_url.endswith("index.html") else figure_url

    def files_for(self, figure_url):
        """{relative_path: bytes} for a figure URL (with or without index.html)."""
        fu = figure_url if figure_url.endswith("/index.html") else figure_url.rstrip("/") + "/index.html"
        with self._lock:
            return dict(self.figures.get(fu, {}))

    # -- endpoint implementations (called from handler threads) ------------
    def _api_create(self, payload):
        fid = uuid.uuid4().hex[:16]
        figure_url = "%s/figures/%s/index.html" % (self.url, fid)
        info = {
            "figureUrl": figure_url,
            "status": "pending",
            "figpackVersion": payload.get("figpackVersion"),
            "bucket": payload.get("bucket"),
            "title": payload.get("title"),
            "totalFiles": payload.get("totalFiles"),
            "totalSize": payload.get("totalSize"),
            "createdAt": time.time(),
        }
        with self._lock:
            self._by_id[fid] = figure_url
            self._tokens[fid] = uuid.uuid4().hex
            self.figures[figure_url] = {}
            self.figure_info[figure_url] = info
        return 200, {"success": True, "figure": dict(info)}

    def _figure_id(self, figure_url):
        with self._lock:
            for fid, fu in self._by_id.items():
                if fu == figure_url:
                    return fid
        return None

    def _api_upload(self, payload):
        fid = self._figure_id(payload.get("figureUrl"))
        if fid is None:
            return 404, {"success": False, "message": "Figure not found"}
        with self._lock:
            if self.figure_info[self._by_id[fid]]["status"] != "pending":
                return 400, {"success": False, "message": "Figure is not pending"}
            token = self._tokens[fid]
        signed = []
        for f in payload.get("files") or []:
            rel = str(f.get("relativePath", ""))
            if not rel or rel.startswith("/") or ".." in rel.split("/"):
                return 400, {"success": False, "message": "bad relativePath %r" % rel}
            signed.append({
                "relativePath": rel,
                "signedUrl": "%s/figures/%s/%s?signature=%s" % (self.url, fid, quote(rel), token),
            })
        return 200, {"success": True, "mode": "server-signed", "signedUrls": signed}

    def _api_finalize(self, payload):
        figure_url = payload.get("figureUrl")
        fid = self._figure_id(figure_url)
        if fid is None:
            return 404, {"success": False, "message": "Figure not found"}
        with self._lock:
            info = self.figure_info[figure_url]
            files = self.figures[figure_url]
            info["status"] = "completed"
            info["uploadCompleted"] = time.time()
            info["uploadedFiles"] = len(files)
            info["uploadedSize"] = sum(len(v) for v in files.values())
            if "figpack.json" not in files:
                files["figpack.json"] = json.dumps(
                    dict(info, figureId=fid), indent=2).encode("utf-8")
        return 200, {"success": True, "figure": dict(info)}

    def _store_put(self, path, query, body):
        m = re.match(r"^/figures/([^/]+)/(.+)$", path)
        if m is None:
            return 404, "not found"
        fid, rel = m.group(1), m.group(2)
        failure = self._take_failure("put")
        if failure is not None:
            return failure
        with self._lock:
            token = self._tokens.get(fid)
            figure_url = self._by_id.get(fid)
            if token is None or ("signature=" + token) not in query.split("&"):
                return 403, "bad signature"
            if self.figure_info[figure_url]["status"] != "pending":
                return 403, "figure already finalized"
            self.figures[figure_url][rel] = body
        return 200, "ok"

    def _lookup(self, path):
        m = re.match(r"^/figures/([^/]+)/(.*)$", path)
        if m is None:
            return None
        fid, rel = m.group(1), m.group(2) or "index.html"
        with self._lock:
            figure_url = self._by_id.get(fid)
            if figure_url is None:
                return None
            return self.figures[figure_url].get(rel)


# --------------------------------------------------------------------------
# reading an uploaded raster plot
# --------------------------------------------------------------------------

RASTER_VIEW_TYPE = "spike_sorting.RasterPlot"


def read_raster_metadata(files):
    """Parse ``data.zarr/.zmetadata`` of an uploaded figure.

    ``files``: {relative_path: bytes} (e.g. ``FigpackApiStandIn.figures[url]``).
    Finds the zarr group whose ``view_type`` is "spike_sorting.RasterPlot"
    (the root group for a bare RasterPlot; a child group if it was wrapped in a
    layout) and returns::

        {"view_type", "unit_ids": [str], "total_spikes": int,
         "n_timestamps": int (shape of the timestamps array),
         "start_time_sec", "end_time_sec", "title", "description",
         "group": zarr path of the raster group ("" for root),
         "root_view_type"}

    Raises KeyError if there is no .zmetadata, ValueError if no raster group.
    """
    raw = files["data.zarr/.zmetadata"]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    zmeta = json.loads(raw)
    meta = zmeta.get("metadata", {})
    root_attrs = meta.get(".zattrs", {})
    groups = []
    for key, attrs in meta.items():
        if key == ".zattrs" or key.endswith("/.zattrs"):
            prefix = key[: -len(".zattrs")].rstrip("/")
            groups.append((prefix, attrs))
    groups.sort(key=lambda g: (g[0].count("/"), g[0]))
    for prefix, attrs in groups:
        if attrs.get("view_type") == RASTER_VIEW_TYPE:
            ts_key = (prefix + "/" if prefix else "") + "timestamps/.zarray"
            ts = meta.get(ts_key, {})
            shape = ts.get("shape") or [0]
            return {
                "view_type": attrs.get("view_type"),
                "unit_ids": [str(u) for u in attrs.get("unit_ids", [])],
                "total_spikes": int(attrs.get("total_spikes", 0)),
                "n_timestamps": int(shape[0]),
                "start_time_sec": attrs.get("start_time_sec"),
                "end_time_sec": attrs.get("end_time_sec"),
                "title": root_attrs.get("title"),
                "description": root_attrs.get("description"),
                "group": prefix,
                "root_view_type": root_attrs.get("view_type"),
            }
    raise ValueError("no %s group in data.zarr/.zmetadata (root view_type %r)"
                     % (RASTER_VIEW_TYPE, root_attrs.get("view_type")))


STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figpack_extension_standins")


def read_view_record(files):
    """What a stand-in view of figpack_extension_standins/ recorded in the figure it uploaded,
    with the figure's title and description: ``files`` as for read_raster_metadata. Returns
    {"view_type", "title", "description", "record"}."""
    raw = files["data.zarr/.zmetadata"]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    root = json.loads(raw).get("metadata", {}).get(".zattrs", {})
    if "standin_record" not in root:
        raise ValueError("no stand-in record in data.zarr/.zmetadata (root view_type %r)" % root.get("view_type"))
    return {"view_type": root.get("view_type"), "title": root.get("title"),
            "description": root.get("description"), "record": root["standin_record"]}


# --------------------------------------------------------------------------
# running the real pipeline in a child interpreter
# --------------------------------------------------------------------------

# argv: nwb_url units_path title description ; prints one JSON line prefixed
# with "RESULT " as the last thing it does.
RASTER_SCRIPT = r"""
import json, resource, sys, time
t0 = time.time()
from figpack_spike_sorting.views import RasterPlot
t1 = time.time()
view = RasterPlot.from_nwb_units_table(sys.argv[1], units_path=sys.argv[2])
t2 = time.time()
url = view.show(title=sys.argv[3], description=sys.argv[4], upload=True, wait_for_input=False)
t3 = time.time()
print("RESULT " + json.dumps({
    "url": url, "import_s": t1 - t0, "read_s": t2 - t1, "show_s": t3 - t2,
    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
"""


def run_raster_subprocess(nwb_url, api_url, units_path="units", title="test raster",
                          description="made by tests", api_key="test-figpack-key",
                          tmpdir=None, home=None, timeout=120, extra_env=None):
    """Run RasterPlot.from_nwb_units_table + show(upload=True) in ``sys.executable``.

    The child gets FIGPACK_API_BASE_URL=api_url, FIGPACK_API_KEY=api_key,
    NO_PROXY for loopback and the hosts of both URLs, and (if given) TMPDIR/HOME. Returns a dict:
    {"returncode", "stdout", "stderr", "elapsed_s", "result"} where "result" is
    the parsed RESULT line ({"url", "import_s", "read_s", "show_s",
    "maxrss_kb"}) or None. Raises subprocess.TimeoutExpired after ``timeout``
    (the child is killed).
    """
    env = dict(os.environ)
    for k in ("FIGPACK_API_KEY", "FIGPACK_API_BASE_URL", "FIGPACK_BUCKET", "FIGPACK_UPLOAD",
              "FIGPACK_REMOTE_ENV", "FIGPACK_DEV", "FIGPACK_INLINE", "FIGPACK_OPEN_IN_BROWSER"):
        env.pop(k, None)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    hosts = {"127.0.0.1", "localhost"} | {urlsplit(url).hostname or "127.0.0.1" for url in (nwb_url, api_url)}
    env["NO_PROXY"] = env["no_proxy"] = ",".join(sorted(hosts))
    env["FIGPACK_API_BASE_URL"] = api_url
    if api_key is not None:
        env["FIGPACK_API_KEY"] = api_key
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    if home is not None:
        env["HOME"] = str(home)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra_env:
        env.update(extra_env)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", RASTER_SCRIPT, nwb_url, units_path, title, description],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=timeout, universal_newlines=True)
    elapsed = time.time() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "elapsed_s": elapsed, "result": result}
