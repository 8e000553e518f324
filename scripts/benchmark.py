#!/usr/bin/env python3
"""Benchmarks of the Runpack runner, run by hand: ``python3 scripts/benchmark.py COMMAND``.

Commands:
  core      the runner's own costs: import time, a local run, idle memory, and draining a queue
            of instant jobs (requests per job, jobs per second, with and without worker latency,
            one job at a time and four at once, job processes and --in-process, the ratio of the
            two, and the CPU a job costs).
  figpack   the figpack_nwb_raster_plot job type: real figpack + lindi, called directly in a fresh
            interpreter versus run as jobs by the real runner CLI against the fake worker, the
            first job cold and later ones warm (or not: --no-warm-imports, --in-process); wall
            time and the memory of the runner and its launcher. Needs the figpack extra and h5py.
  fleet     many runners on one queue: draining it with one runner versus eight (jobs per second,
            lost claims, polls, 429s), how a fleet comes back after a worker outage (spread, not
            lockstep), how soon an idle runner picks a single job up, with and without the
            NotifyRelay push wake-up (the fake relay from tests/), and how many claims a fleet
            woken by one notice loses (the herd).
  slurm     the Slurm scaler on a throw-away cluster: from a job submitted to an empty cluster to
            its claim (polling and NotifyRelay), and a burst of 100 jobs through 1, 2 and 4 runners.
  listen    what --listen costs: a runner's idle memory and CPU per job with and without it, and
            the time of a GET /metrics and /healthz.
  limits    what the network guard and the memory limit of job processes cost: a TCP connect to
            127.0.0.1 with and without the guard (in µs), and the small raster-plot job through
            the runner with the guard and the limit, without the guard, and without the limit.
  video     the figpack_nwb_video_preview job type's own cost, the part before show() (opening the
            NWB file over HTTP Range, reading up to 1000 frames, scaling them to uint8 RGB): wall
            time and peak memory on a synthetic 1000-frame 240x320 video, grayscale and RGB, versus
            the deployed formula. Needs numpy, h5py and lindi; LossyVideo is the test stand-in.

Every server involved (the fake worker, the fake relay, the NWB Range server, the figpack API
stand-in from tests/) listens on 127.0.0.1 only; nothing leaves the machine. This file uses the
standard library only at import time: a command imports what it needs when it runs. More commands
are added with another ``add_parser`` in ``build_parser`` and a ``command_*`` function.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
RUNNER_PY = os.path.join(REPO, "runpack_runner.py")


# ---- shared helpers ----------------------------------------------------------------------------

def proc_status_kib(pid, field):
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB, or None off Linux."""
    try:
        with open("/proc/%d/status" % pid) as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_tree(pid):
    """``pid`` and its descendants, read from /proc (empty off Linux)."""
    parents = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open("/proc/%s/stat" % name) as stream:
                parents[int(name)] = int(stream.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, added = {pid}, True
    while added:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        added = bool(more)
    return tree


def tree_cpu_seconds(pid):
    """CPU seconds (user + system) used so far by ``pid``, its descendants and the children they
    have reaped: the whole cost of a runner, its launcher and every job process."""
    total = 0
    for member in process_tree(pid):
        try:
            with open("/proc/%d/stat" % member) as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
            total += sum(int(field) for field in fields[11:15])  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / float(os.sysconf("SC_CLK_TCK"))


def proportional_kib(pid):
    """The PSS of ``pid`` in KiB: its RSS with each shared page divided among the processes that
    share it, so that a launcher and the spare it forked are not counted twice. None off Linux."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as stream:
            for line in stream:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def mib(kib):
    return "-" if kib is None else "%.0f MiB" % (kib / 1024.0)


def seconds(value):
    return "-" if value is None else "%.2f s" % value


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def wait_for(predicate, timeout, what, step=0.005, describe=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ss waiting for %s%s"
                               % (timeout, what, "\n" + describe() if describe else ""))
        time.sleep(step)


def tail(path, size=4000):
    with open(path, encoding="utf-8", errors="replace") as stream:
        return stream.read()[-size:]


def print_table(header, rows, left=(0,)):
    """A plain-text table; the columns numbered in ``left`` are left-aligned, the others right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, ["-" * width for width in widths]] + rows:
        print("  ".join(str(cell).ljust(width) if i in left else str(cell).rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))


# ---- figpack -----------------------------------------------------------------------------------

FIGPACK_JOB_TYPE = "figpack_nwb_raster_plot"
FIGPACK_KEY = "benchmark-figpack-key"
RUNNER_MODES = {"runner": (), "runner --no-warm-imports": ("--no-warm-imports",),
                "runner --in-process": ("--in-process",)}  # job processes, warm or not / threads
RUNNER_FLAGS = ("--poll-interval", "0.05", "--poll-interval-step", "0", "--poll-interval-max", "0.05",
                "--heartbeat-interval", "0.5", "--request-timeout", "10", "--retry-max", "0.5")


def figpack_environment(api_url, tmpdir):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RUNPACK_", "FIGPACK_")) and key.lower() not in (
               "http_proxy", "https_proxy", "all_proxy")}
    env.update(FIGPACK_API_KEY=FIGPACK_KEY, FIGPACK_API_BASE_URL=api_url, NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", TMPDIR=tmpdir, PYTHONDONTWRITEBYTECODE="1",
               RUNPACK_ALLOW_JOB_NETWORKS="127.0.0.1/32")  # the NWB server and the figpack API stand-in
    return env


def figpack_direct(fixtures, nwb_url, api, tmpdir):
    """figpack called directly: a fresh interpreter runs from_nwb_units_table + show(upload=True)."""
    run = fixtures.run_raster_subprocess(nwb_url, api.url, units_path="/units", title="Raster plot: /units",
                                         description="benchmark", api_key=FIGPACK_KEY, tmpdir=tmpdir,
                                         timeout=600)
    if run["returncode"] != 0 or not run["result"]:
        raise RuntimeError("direct figpack run failed:\n%s" % run["stderr"][-3000:])
    result = run["result"]
    return {"wall_s": run["elapsed_s"], "url": result["url"], "maxrss_kib": result["maxrss_kb"],
            "import_s": result["import_s"], "read_s": result["read_s"], "show_s": result["show_s"]}


def figpack_through_runner(fake_worker, nwb_url, api, tmpdir, label, mode_flags=(), jobs=3, args_timeout=600):
    """The same work as jobs of one runner process, idle first, then ``jobs`` jobs added at the
    worker one after the other: the first starts cold, the later ones warm (unless
    --no-warm-imports or --in-process). Each job's wall time runs from add_job to the worker
    holding the completed result. While a job runs, the peak RSS (VmHWM) of the runner's other
    processes (launcher and job processes) is sampled; after the last, with the runner idle,
    their RSS (the launcher keeping figpack warm)."""
    state = tempfile.mkdtemp(prefix="runner-", dir=tmpdir)
    job_tmp = os.path.join(state, "tmp")
    os.mkdir(job_tmp)
    env = figpack_environment(api.url, job_tmp)
    env["RUNPACK_RUNNER_API_KEY"] = fake_worker.RUNNER_KEY
    with fake_worker.FakeWorker(rate_limit=10 ** 6) as worker:
        log_path = os.path.join(state, "runner.out")
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, RUNNER_PY, "runner", "--worker-url", worker.url,
                                        "--state-dir", state] + list(RUNNER_FLAGS) + list(mode_flags),
                                       env=env, cwd=state, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: worker.count("available") >= 5, 30, "the runner's first polls",
                     describe=lambda: tail(log_path))
            time.sleep(0.3)
            rss_idle = proc_status_kib(process.pid, "VmRSS")
            walls, urls, peaks = [], [], {}
            for number in range(jobs):
                # distinct parameters on every run: the worker would otherwise hand back the known job
                params = {"nwb_url": nwb_url, "units_path": "/units", "dandiset_id": "%s-%d" % (label, number)}
                started = time.monotonic()
                job_id = worker.add_job(FIGPACK_JOB_TYPE, params)

                def job_done():
                    if worker.job(job_id)["status"] in ("completed", "failed"):
                        return True
                    for member in process_tree(process.pid) - {process.pid}:
                        peak = proc_status_kib(member, "VmHWM")
                        if peak is not None:
                            peaks[member] = max(peak, peaks.get(member, 0))
                    return False

                wait_for(job_done, args_timeout, "the job", describe=lambda: tail(log_path) + "\n" + worker.describe())
                walls.append(time.monotonic() - started)
                job = worker.job(job_id)
                if job["status"] != "completed":
                    raise RuntimeError("the job failed: %s\n%s" % (job["error_message"], job["console_output"]))
                urls.append(job["output_data"]["figpack_url"])
            polls = worker.count("available")
            wait_for(lambda: worker.count("available") >= polls + 3, 30, "the runner to go idle")
            rss_after = proc_status_kib(process.pid, "VmRSS")
            others = process_tree(process.pid) - {process.pid}
            others_idle = sum(proportional_kib(member) or 0 for member in others)
            launcher_idle = max([proc_status_kib(member, "VmRSS") or 0 for member in others] or [0])
            rss_peak = proc_status_kib(process.pid, "VmHWM")
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    with open(log_path, encoding="utf-8", errors="replace") as stream:
        output = stream.read()
    shutil.rmtree(state, ignore_errors=True)
    if exit_code != 0:
        raise RuntimeError("the runner exited %s:\n%s" % (exit_code, output[-3000:]))
    return {"walls_s": walls, "urls": urls, "rss_idle_kib": rss_idle, "rss_after_kib": rss_after,
            "rss_peak_kib": rss_peak, "others_idle_kib": others_idle, "launcher_idle_kib": launcher_idle,
            "job_process_peak_kib": max(peaks.values()) if peaks else None}


def check_upload(fixtures, api, url, table):
    meta = fixtures.read_raster_metadata(api.files_for(url))
    if meta["unit_ids"] != table["unit_ids"] or meta["total_spikes"] != table["total_spikes"]:
        raise RuntimeError("the uploaded raster plot at %s does not match the table" % url)


def command_figpack(args):
    sys.path.insert(0, TESTS)
    try:
        import fake_worker
        import figpack_fixtures as fixtures
        import figpack_spike_sorting  # noqa: F401  (only to fail early)
        import h5py  # noqa: F401
        import lindi  # noqa: F401
    except ImportError as error:
        print("Error: %s; install the figpack extra and h5py: pip install '.[figpack]' h5py" % error,
              file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="runpack-bench-")
    try:
        data = os.path.join(workdir, "data")
        os.mkdir(data)
        tables = [
            ("small", fixtures.make_units_nwb(os.path.join(data, "small.nwb"), n_units=args.small_units,
                                              spikes_per_unit=args.small_spikes, seed=1)),
            ("large", fixtures.make_units_nwb(os.path.join(data, "large.nwb"), n_units=args.large_units,
                                              spikes_per_unit=args.large_spikes, seed=2)),
        ]
        print("figpack_nwb_raster_plot: %d repetitions, Python %s, %d CPUs" % (
            args.repeat, sys.version.split()[0], os.cpu_count() or 0))
        results = {}
        with fixtures.RangeFileServer(data) as nwb_server, \
                fixtures.FigpackApiStandIn(expected_api_key=FIGPACK_KEY) as api:
            # one untimed run first, so that the first timed one does not pay for a cold disk cache
            figpack_direct(fixtures, nwb_server.url_for("small.nwb"), api, workdir)
            for name, table in tables:
                url = nwb_server.url_for(os.path.basename(table["path"]))
                runs = results[name] = {"table": table, "direct": []}
                runs.update((mode, []) for mode in RUNNER_MODES)
                for repetition in range(args.repeat):
                    direct = figpack_direct(fixtures, url, api, workdir)
                    check_upload(fixtures, api, direct["url"], table)
                    runs["direct"].append(direct)
                    print("  %s #%d direct: %s (import %.2f s, read %.2f s, show %.2f s), peak RSS %s" % (
                        name, repetition + 1, seconds(direct["wall_s"]), direct["import_s"], direct["read_s"],
                        direct["show_s"], mib(direct["maxrss_kib"])))
                    for mode, flags in RUNNER_MODES.items():
                        job = figpack_through_runner(fake_worker, url, api, workdir,
                                                     "%s-%s-%d" % (name, mode, repetition), flags, args.jobs)
                        for job_url in job["urls"]:
                            check_upload(fixtures, api, job_url, table)
                        runs[mode].append(job)
                        print("  %s #%d %s: jobs %s; runner RSS idle %s, after %s, peak %s; its other processes "
                              "after: PSS %s, the launcher's RSS %s; job process peak %s" % (
                                  name, repetition + 1, mode, " ".join(seconds(wall) for wall in job["walls_s"]),
                                  mib(job["rss_idle_kib"]), mib(job["rss_after_kib"]), mib(job["rss_peak_kib"]),
                                  mib(job["others_idle_kib"]), mib(job["launcher_idle_kib"]),
                                  mib(job["job_process_peak_kib"])))
                    sys.stdout.flush()
        print()
        rows = []
        for name, runs in results.items():
            table = runs["table"]
            direct = median(run["wall_s"] for run in runs["direct"])
            rows.append([name, "{:,}".format(table["total_spikes"]), "direct", seconds(direct), "-", "1.00",
                         "-", "-", "-", mib(median(run["maxrss_kib"] for run in runs["direct"]))])
            for mode in RUNNER_MODES:
                jobs = runs[mode]
                later = median(wall for job in jobs for wall in job["walls_s"][1:])
                job_peak = median(job["job_process_peak_kib"] for job in jobs)
                rows.append([
                    "", "", mode, seconds(median(job["walls_s"][0] for job in jobs)), seconds(later),
                    "%.2f" % (later / direct),
                    mib(median(job["rss_idle_kib"] for job in jobs)),
                    mib(median(job["rss_after_kib"] for job in jobs)),
                    "%s (%s)" % (mib(median(job["others_idle_kib"] for job in jobs)),
                                 mib(median(job["launcher_idle_kib"] for job in jobs))),
                    mib(job_peak) if job_peak else "(in runner)",
                ])
        print_table(["table", "spikes", "how", "first job", "later jobs", "ratio", "runner RSS idle",
                     "after", "launcher after: PSS (RSS)", "job peak RSS"], rows, left=(0, 2))
        print("\nMedians of %d runs. direct: a fresh `python3 -c` doing from_nwb_units_table + show(upload=True), "
              "its peak RSS from ru_maxrss. runner: %d jobs one after the other through one runner process, "
              "each from add_job at the fake worker until the worker holds the completed result (the runner "
              "polls every 0.05 s); ratio: later jobs / direct. RSS from /proc: the runner's VmRSS idle before "
              "the first job and after the last; launcher after: the PSS of its other processes then (the "
              "launcher and its spare, figpack warm) and the launcher's own RSS; job peak RSS: VmHWM of job "
              "processes, sampled."
              % (args.repeat, args.jobs))
        if args.json:
            with open(args.json, "w") as stream:
                json.dump({name: dict(runs, table={k: v for k, v in runs["table"].items() if k != "unit_ids"})
                           for name, runs in results.items()}, stream, indent=2)
            print("raw figures written to %s" % args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---- core: import time, memory, requests per job, drain throughput -----------------------------

def bench_import(repeats):
    """Milliseconds of `import runpack_runner` (cumulative, -X importtime), bytecode cached."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    timings = []
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(RUNNER_PY, folder)
        for _ in range(repeats + 1):  # the first run writes the bytecode cache
            result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import runpack_runner"],
                                    cwd=folder, env=env, stderr=subprocess.PIPE, universal_newlines=True,
                                    check=True)
            line = [row for row in result.stderr.splitlines() if row.rstrip().endswith("| runpack_runner")][0]
            timings.append(int(line.split("|")[1]) / 1000.0)
    return median(timings[1:])


def bench_local_run(repeats, *flags):
    """Wall milliseconds of `runpack_runner.py run hello_world name=A processing_time=0`, and of
    `python3 -c pass` for comparison."""
    runs, baseline = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run([sys.executable, RUNNER_PY, "run", "hello_world", "name=A", "processing_time=0"]
                       + list(flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - started)
    return median(runs) * 1000, median(baseline) * 1000


def start_runner_process(worker_url, state_dir, *flags, **extra_env):
    """A runner polling every 0.5 to 1 s (later ``flags`` win), its output in its state directory's log."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPACK_", "NOTIFY_RELAY_"))}
    env["RUNPACK_RUNNER_API_KEY"] = fake_worker_module().RUNNER_KEY
    env.update(extra_env)
    command = [sys.executable, RUNNER_PY, "runner", "--worker-url", worker_url, "--state-dir", state_dir,
               "--poll-interval", "0.5", "--poll-interval-max", "1"] + list(flags)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_drain(jobs, latency_s=0.0, flags=()):
    """Draining a queue of instant hello_world jobs: jobs per second from the first claim to the
    last report, the requests the runner made per job, and the CPU milliseconds per job of the
    runner's process tree and of the fake worker (this process). ``latency_s`` delays every
    answer of the worker, as a worker across the Internet would."""
    with fake_worker_module().FakeWorker() as worker, tempfile.TemporaryDirectory() as state_dir:
        ids = [worker.add_job("hello_world", {"name": "n%d" % i, "processing_time": 0}) for i in range(jobs)]
        if latency_s:
            worker.add_fault("slow", times=None, delay=latency_s)
        runner = start_runner_process(worker.url, state_dir, *flags)
        try:
            wait_for(lambda: worker.count("claim") >= 1, 60, "the first claim")
            started, runner_cpu, worker_cpu = time.perf_counter(), tree_cpu_seconds(runner.pid), os.times()
            wait_for(lambda: runner.poll() is not None or all(worker.job(j)["status"] == "completed"
                                                               for j in ids),
                     1200, "the queue to drain", step=0.02)
            if runner.poll() is not None:
                raise RuntimeError("the runner exited with %s while draining (flags %s)" % (runner.returncode, flags))
            elapsed = time.perf_counter() - started
            runner_cpu = tree_cpu_seconds(runner.pid) - runner_cpu
            worker_cpu = sum(os.times()[:2]) - sum(worker_cpu[:2])
            routes = [record.route for record in worker.requests]
            last = max(i for i, route in enumerate(routes) if route == "complete")
            per_job = dict((route, routes[:last + 1].count(route) / float(jobs))
                           for route in ("available", "claim", "heartbeat", "complete"))
            per_job.update(runner_cpu_ms=runner_cpu * 1000 / jobs, worker_cpu_ms=worker_cpu * 1000 / jobs)
        finally:
            runner.terminate()
            runner.wait(60)
    return jobs / elapsed, per_job


def bench_idle_memory(settle_s, flags=()):
    """RSS of a runner that has registered and polls an empty queue, and how many processes it has
    beside itself (none: no launcher before the first job)."""
    with fake_worker_module().FakeWorker() as worker, tempfile.TemporaryDirectory() as state_dir:
        runner = start_runner_process(worker.url, state_dir, *flags)
        try:
            wait_for(lambda: worker.count("available") >= 2, 60, "two polls")
            time.sleep(settle_s)
            return proc_status_kib(runner.pid, "VmRSS"), len(process_tree(runner.pid)) - 1
        finally:
            runner.terminate()
            runner.wait(60)


def fake_worker_module():
    sys.path.insert(0, TESTS)
    import fake_worker

    return fake_worker


DRAIN_MODES = ((), ("--in-process",), ("--concurrency", "4"), ("--concurrency", "4", "--in-process"))


def command_core(args):
    print("Runpack runner core benchmark: Python %s, %d cores" % (sys.version.split()[0], os.cpu_count()))
    print("import runpack_runner: %.1f ms" % bench_import(args.repeat))
    run_ms, python_ms = bench_local_run(args.repeat)
    run_in_process_ms, _ = bench_local_run(args.repeat, "--in-process")
    print("run hello_world processing_time=0: %.0f ms (--in-process %.0f ms; python3 -c pass %.0f ms)"
          % (run_ms, run_in_process_ms, python_ms))
    rss, children = bench_idle_memory(1.0)
    print("runner RSS, idle after registering: %s (%d other processes)" % (mib(rss), children))
    rows = []
    for latency_ms in (0, args.latency_ms):
        # the modes take turns, so that a busy spell of this shared machine hits them all alike
        runs = {flags: [] for flags in DRAIN_MODES}
        for _ in range(args.drains):
            for flags in DRAIN_MODES:
                runs[flags].append(bench_drain(args.jobs, latency_ms / 1000.0, flags))
        for flags in DRAIN_MODES:
            rate = median(run[0] for run in runs[flags])
            in_process = median(run[0] for run in runs[tuple(flags) + ("--in-process",)]) \
                if "--in-process" not in flags else None
            rows.append(["%d ms" % latency_ms, " ".join(flags) or "(defaults)", "%.1f" % rate,
                         "%.2f" % (rate / in_process) if in_process else "-"]
                        + ["%.2f" % median(run[1][route] for run in runs[flags])
                           for route in ("available", "claim", "heartbeat", "complete")]
                        + ["%.1f" % median(run[1][cpu] for run in runs[flags])
                           for cpu in ("runner_cpu_ms", "worker_cpu_ms")])
    print("\nDraining %d instant hello_world jobs (worker latency added to every answer; medians of %d drains):"
          % (args.jobs, args.drains))
    print_table(["latency", "flags", "jobs/s", "vs --in-process", "polls/job", "claims/job", "heartbeats/job",
                 "reports/job", "runner CPU ms/job", "worker CPU ms/job"], rows, left=(0, 1))
    print("\nrunner CPU: the runner, its launcher and every job process, user + system; worker CPU: the fake "
          "worker, in this process.")
    return 0


# ---- fleet: one queue and many runners, restarts after an outage, push wake-up -----------------

def start_fleet(worker, count, workdir, *flags, **extra_env):
    """``count`` runners, one state directory each, started at once; returns once each has polled."""
    state_dirs = [os.path.join(workdir, "state-%d" % number) for number in range(count)]
    runners = [start_runner_process(worker.url, state_dir, *flags, **extra_env) for state_dir in state_dirs]

    def exited():
        return [number for number, runner in enumerate(runners) if runner.poll() is not None]

    wait_for(lambda: len(polling_runners(worker)) >= count or exited(), 60, "every runner's first poll", step=0.02,
             describe=lambda: tail(os.path.join(state_dirs[0], "runpack_runner.log")))
    if exited():
        stop_fleet(runners)
        number = exited()[0]
        raise RuntimeError("a runner exited at start with code %s:\n%s" % (
            runners[number].returncode, tail(os.path.join(state_dirs[number], "runpack_runner.log"))))
    return runners


def stop_fleet(runners):
    for runner in runners:
        if runner.poll() is None:
            runner.terminate()
    for runner in runners:
        runner.wait(60)


def polling_runners(worker):
    return {record.runner_id for record in worker.requests if record.route == "available"}


def bench_fleet_drain(runner_count, jobs, latency_s):
    """A queue of instant hello_world jobs added at once to ``runner_count`` idle runners: jobs per
    second from the first claim to the last report, lost claims (409), polls per job, and 429s."""
    with fake_worker_module().FakeWorker() as worker, tempfile.TemporaryDirectory() as workdir:
        runners = start_fleet(worker, runner_count, workdir, "--in-process")
        try:
            if latency_s:
                worker.add_fault("slow", times=None, delay=latency_s)
            added = time.monotonic()
            for number in range(jobs):
                worker.add_job("hello_world", {"name": "n%d" % number, "processing_time": 0})
            wait_for(lambda: len(worker.jobs(status="completed")) == jobs, 1200, "the queue to drain", step=0.05,
                     describe=worker.describe)
        finally:
            stop_fleet(runners)
        records = [record for record in worker.requests if record.at >= added]
        first_claim = min(record.at for record in records if record.route == "claim")
        last_report = max(record.at for record in records if record.route == "complete" and record.status == 200)
        return {"runners": runner_count, "jobs": jobs, "latency_ms": latency_s * 1000,
                "jobs_per_s": jobs / (last_report - first_claim),
                "lost_claims_per_job": worker.count("claim", status=409) / float(jobs),
                "polls_per_job": sum(record.route == "available" and record.at <= last_report
                                     for record in records) / float(jobs),
                "answers_429": worker.count(status=429),
                "runners_that_completed": len({job["claimed_by"] for job in worker.jobs()})}


def bench_restart_spread(runner_count, outage_s, bucket_s=0.1):
    """Idle runners, the worker down for ``outage_s``, then back: when does each runner's first
    request come after that, and how many requests share the busiest ``bucket_s``?"""
    with fake_worker_module().FakeWorker() as worker, tempfile.TemporaryDirectory() as workdir:
        runners = start_fleet(worker, runner_count, workdir, "--in-process", "--retry-max", "2")
        try:
            time.sleep(2.0)  # idle polling for a while, as a fleet would be
            worker.go_down()
            time.sleep(outage_s)
            back = time.monotonic()
            worker.come_up()
            wait_for(lambda: len({record.runner_id for record in worker.requests if record.at >= back
                                  and record.runner_id}) >= runner_count,
                     60, "every runner's first request after the outage", step=0.02)
            time.sleep(1.0)  # the requests that follow, for the buckets
        finally:
            stop_fleet(runners)
        after = [record for record in worker.requests if record.at >= back and record.runner_id]
        firsts = {}
        for record in after:
            firsts.setdefault(record.runner_id, record.at - back)
        window = max(firsts.values()) + 1.0
        buckets = {}
        for record in after:
            if record.at - back <= window:
                bucket = int((record.at - back) / bucket_s)
                buckets[bucket] = buckets.get(bucket, 0) + 1
        return {"runners": runner_count, "outage_s": outage_s, "first_request_s": sorted(firsts.values()),
                "spread_s": max(firsts.values()) - min(firsts.values()),
                "busiest_bucket_requests": max(buckets.values()), "bucket_s": bucket_s,
                "requests_in_window": sum(buckets.values()), "window_s": window}


def bench_pickup(jobs, interval_s, with_relay):
    """Single jobs added at random moments to an idle runner whose poll interval is at its cap
    ``interval_s``: seconds from add_job (which publishes to the relay, if any) to the claim."""
    sys.path.insert(0, TESTS)
    import fake_relay

    relay = fake_relay.FakeRelay().start() if with_relay else None
    extra_env = {}
    worker = fake_worker_module().FakeWorker().start()
    if relay is not None:
        worker.relay_url, worker.relay_publish_key = relay.url, fake_relay.RELAY_PUBLISH_KEY
        extra_env = {"NOTIFY_RELAY_BASE_URL": relay.url, "NOTIFY_RELAY_SUBSCRIBE_KEY": fake_relay.RELAY_SUBSCRIBE_KEY}
    latencies = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            runners = start_fleet(worker, 1, workdir, "--in-process", "--poll-interval", str(interval_s),
                                  "--poll-interval-max", str(interval_s), **extra_env)
            try:
                if relay is not None:
                    wait_for(lambda: relay.held_polls >= 1, 30, "the runner's subscription")
                for number in range(jobs):
                    time.sleep(random.uniform(0, interval_s))
                    added = time.monotonic()
                    job_id = worker.add_job("hello_world", {"name": "pickup-%d" % number, "processing_time": 0})
                    wait_for(lambda: worker.job(job_id)["status"] == "completed", 3 * interval_s + 30,
                             "job %d" % number, step=0.01)
                    claims = [record.at for record in worker.requests
                              if record.route == "claim" and record.job_id == job_id]
                    latencies.append(claims[0] - added)
            finally:
                stop_fleet(runners)
    finally:
        worker.stop()
        if relay is not None:
            relay.stop()
    return {"relay": with_relay, "interval_s": interval_s, "latencies_s": latencies,
            "p50_s": statistics.median(latencies), "max_s": max(latencies)}


def bench_herd(runner_count, jobs, interval_s, latency_s):
    """Single jobs added at random moments to ``runner_count`` idle runners that all subscribe to
    the relay, so that each notice wakes the whole fleet: lost claims per job, and the pickup."""
    sys.path.insert(0, TESTS)
    import fake_relay

    relay = fake_relay.FakeRelay().start()
    worker = fake_worker_module().FakeWorker().start()
    worker.relay_url, worker.relay_publish_key = relay.url, fake_relay.RELAY_PUBLISH_KEY
    extra_env = {"NOTIFY_RELAY_BASE_URL": relay.url, "NOTIFY_RELAY_SUBSCRIBE_KEY": fake_relay.RELAY_SUBSCRIBE_KEY}
    latencies = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            runners = start_fleet(worker, runner_count, workdir, "--in-process", "--poll-interval", str(interval_s),
                                  "--poll-interval-max", str(interval_s), **extra_env)
            try:
                wait_for(lambda: relay.held_polls >= runner_count, 30, "every runner's subscription")
                if latency_s:
                    worker.add_fault("slow", times=None, delay=latency_s)
                claims_before = worker.count("claim")
                for number in range(jobs):
                    time.sleep(random.uniform(1.0, 2.0))
                    added = time.monotonic()
                    job_id = worker.add_job("hello_world", {"name": "herd-%d" % number, "processing_time": 0})
                    wait_for(lambda: worker.job(job_id)["status"] == "completed", 3 * interval_s + 30,
                             "job %d" % number, step=0.01)
                    latencies.append(min(record.at for record in worker.requests
                                         if record.route == "claim" and record.job_id == job_id) - added)
                lost = worker.count("claim", status=409)
                claims = worker.count("claim") - claims_before
            finally:
                stop_fleet(runners)
    finally:
        worker.stop()
        relay.stop()
    return {"runners": runner_count, "latency_ms": latency_s * 1000, "jobs": jobs, "claims": claims,
            "lost_claims_per_job": lost / float(jobs), "p50_s": statistics.median(latencies), "max_s": max(latencies)}


def command_fleet(args):
    print("Runpack runner fleet benchmark: Python %s, %d cores" % (sys.version.split()[0], os.cpu_count()))
    results = {"drain": [], "restart": None, "pickup": []}
    for latency_ms in (0, args.latency_ms):
        for count in (1, args.runners):
            results["drain"].append(bench_fleet_drain(count, args.jobs, latency_ms / 1000.0))
            sys.stdout.flush()
    print("\nDraining %d instant hello_world jobs added at once to idle --in-process runners (one state "
          "directory each, polling every 0.5-1 s), worker latency added to every answer:" % args.jobs)
    rows = [["%d ms" % run["latency_ms"], "%d" % run["runners"], "%d" % run["runners_that_completed"],
             "%.1f" % run["jobs_per_s"], "%.2f" % run["lost_claims_per_job"], "%.3f" % run["polls_per_job"],
             "%d" % run["answers_429"]] for run in results["drain"]]
    print_table(["latency", "runners", "took jobs", "jobs/s", "lost claims/job", "polls/job", "429s"], rows)
    print("(took jobs: runners that completed at least one; jobs/s: from the first claim to the last report; "
          "lost claims: claims answered 409, another runner was first; polls: from adding the jobs to the last "
          "report)")
    for one, fleet in zip(results["drain"][::2], results["drain"][1::2]):
        print("%d runners / one runner at %d ms: %.1fx" % (fleet["runners"], fleet["latency_ms"],
                                                          fleet["jobs_per_s"] / one["jobs_per_s"]))
    if any(run["answers_429"] for run in results["drain"]):
        print("WARNING: the worker answered 429: a runner went over its rate limit")
    sys.stdout.flush()

    restart = results["restart"] = bench_restart_spread(args.runners, args.outage)
    print("\nRestart after a %g s worker outage: %d idle runners (--poll-interval 0.5, --retry-max 2)"
          % (args.outage, args.runners))
    print("first request of each runner after the worker came back: %s s"
          % ", ".join("%.2f" % offset for offset in restart["first_request_s"]))
    print("spread between the first and the last runner: %.2f s; busiest %d ms: %d of the %d requests of "
          "the next %.1f s (in lockstep, all %d runners would land in one)"
          % (restart["spread_s"], restart["bucket_s"] * 1000, restart["busiest_bucket_requests"],
             restart["requests_in_window"], restart["window_s"], args.runners))
    sys.stdout.flush()

    for with_relay in (False, True):
        results["pickup"].append(bench_pickup(args.pickup_jobs, args.pickup_interval, with_relay))
    print("\nPickup of single jobs added at random moments to an idle runner whose poll interval is at its "
          "cap (%g s here, not the default 60 s, to keep the run short), from add_job to the claim:"
          % args.pickup_interval)
    print_table(["wake-up", "jobs", "p50", "max"],
                [["NotifyRelay" if run["relay"] else "polling only", "%d" % len(run["latencies_s"]),
                  "%.3f s" % run["p50_s"], "%.3f s" % run["max_s"]] for run in results["pickup"]])
    sys.stdout.flush()

    results["herd"] = [bench_herd(args.runners, args.pickup_jobs, args.pickup_interval, latency_ms / 1000.0)
                       for latency_ms in (0, args.latency_ms)]
    print("\nA herd: single jobs added at random moments to %d idle runners that all subscribe to the relay "
          "(each notice wakes them all), from add_job to the claim:" % args.runners)
    print_table(["latency", "runners", "jobs", "lost claims/job", "p50", "max"],
                [["%d ms" % run["latency_ms"], "%d" % run["runners"], "%d" % run["jobs"],
                  "%.2f" % run["lost_claims_per_job"], "%.3f s" % run["p50_s"], "%.3f s" % run["max_s"]]
                 for run in results["herd"]])
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)
        print("raw figures written to %s" % args.json)
    return 0


# ---- video: the video preview's own cost, before show() ----------------------------------------

# argv: repo, stand-ins folder, nwb_url, image series path, "runner" or "deployed". Everything the job
# imports is imported first; then the measured part runs with the peak RSS reset (Linux clear_refs 5),
# then its two parts are timed apart. Prints one line "RESULT {json}".
VIDEO_SCRIPT = r"""
import json, sys, time
sys.path[:0] = sys.argv[1:3]
nwb_url, path, how = sys.argv[3:6]
import lindi, numpy
import runpack_runner
from figpack_experimental.views import LossyVideo

def status_kib(field):
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def read_frames():
    with lindi.LindiH5pyFile.from_hdf5_file(nwb_url) as nwb:
        return nwb[path]["data"][:1000]

def deployed_scaling(data):
    p = numpy.percentile(data, 99)
    scaled = (numpy.clip(data, 0, p) / p * 255).astype(numpy.uint8)
    return scaled if scaled.ndim == 4 else numpy.repeat(scaled[..., numpy.newaxis], 3, axis=-1)

def deployed_view():
    with lindi.LindiH5pyFile.from_hdf5_file(nwb_url) as nwb:
        series = nwb[path]
        rate = series["starting_time"].attrs["rate"]
        data = series["data"][:1000]
    return LossyVideo(deployed_scaling(data), fps=rate if rate > 0 else 30)

with lindi.LindiH5pyFile.from_hdf5_file(nwb_url) as nwb:  # lindi's first read imports the rest of lindi
    nwb[path]["data"][:1]                                   # and zarr: not part of a job's cost
rss_before = status_kib("VmRSS")
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False

peak_reset = reset_peak()
started = time.perf_counter()
if how == "runner":
    view, _ = runpack_runner.JOB_HANDLERS["figpack_nwb_video_preview"].make_view(nwb_url, path, lambda line: None)
else:
    view = deployed_view()
wall = time.perf_counter() - started
peak = status_kib("VmHWM")
shape = list(view.data.shape)
del view
started = time.perf_counter()
frames = read_frames()
read = time.perf_counter() - started
capped_bytes = frames.nbytes
rss_before_scaling = status_kib("VmRSS")
reset_peak()
started = time.perf_counter()
(runpack_runner.preview_frames if how == "runner" else deployed_scaling)(frames)
scale = time.perf_counter() - started
print("RESULT " + json.dumps({"wall_s": wall, "read_s": read, "scale_s": scale, "rss_before_kib": rss_before,
                              "peak_kib": peak, "peak_reset": peak_reset, "capped_bytes": capped_bytes,
                              "scale_growth_kib": status_kib("VmHWM") - rss_before_scaling, "shape": shape}),
      flush=True)
"""
VIDEO_KINDS = {"runner": "runpack_runner (make_view)", "deployed": "deployed formula"}


def video_run(nwb_url, path, how):
    """One measured preview in a fresh interpreter: {"wall_s", "read_s", "scale_s", "peak_kib", ...}."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in (
        "http_proxy", "https_proxy", "all_proxy")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONDONTWRITEBYTECODE="1")
    standins = os.path.join(TESTS, "figpack_extension_standins", "working")
    result = subprocess.run([sys.executable, "-c", VIDEO_SCRIPT, REPO, standins, nwb_url, path, how], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("the %s preview of %s failed:\n%s" % (how, path, result.stderr[-3000:]))


def command_video(args):
    sys.path.insert(0, TESTS)
    try:
        import figpack_fixtures as fixtures
        import h5py  # noqa: F401
        import lindi  # noqa: F401
        import numpy
    except ImportError as error:
        print("Error: %s; install numpy, h5py and lindi: pip install '.[figpack]' h5py" % error, file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="runpack-bench-")
    try:
        rng = numpy.random.default_rng(0)
        size = (args.frames, args.height, args.width)
        drift = numpy.linspace(0, 60, args.frames, dtype=numpy.float32)[:, None, None]
        gray = (rng.integers(0, 160, size=size, dtype=numpy.uint8) + drift).astype(numpy.uint8)
        color = rng.integers(0, 220, size=size + (3,), dtype=numpy.uint8)
        series = {"/acquisition/Gray": {"data": gray, "starting_time": (0.0, 30.0)},
                  "/acquisition/Color": {"data": color, "starting_time": (0.0, 30.0)}}
        fixtures.make_image_series_nwb(os.path.join(workdir, "video.nwb"), series)
        del gray, color
        print("figpack_nwb_video_preview before show(): %d frames of %dx%d, %d repetitions, Python %s, numpy %s, "
              "%d CPUs" % (args.frames, args.height, args.width, args.repeat, sys.version.split()[0],
                           numpy.__version__, os.cpu_count() or 0))
        results, rows = {}, []
        with fixtures.RangeFileServer(workdir) as server:
            url = server.url_for("video.nwb")
            for path, label in (("/acquisition/Gray", "grayscale uint8"), ("/acquisition/Color", "RGB uint8")):
                for how, kind in VIDEO_KINDS.items():
                    runs = results.setdefault(path, {}).setdefault(how, [])
                    for repetition in range(args.repeat):
                        run = video_run(url, path, how)
                        runs.append(run)
                        print("  %s, %s #%d: %s (read %s, scale %s), peak RSS %s above the %s before "
                              "(scaling alone: %s)" % (
                                  label, kind, repetition + 1, seconds(run["wall_s"]), seconds(run["read_s"]),
                                  seconds(run["scale_s"]), mib(run["peak_kib"] - run["rss_before_kib"]),
                                  mib(run["rss_before_kib"]), mib(run["scale_growth_kib"])))
                        sys.stdout.flush()
                    capped = runs[0]["capped_bytes"] / 1024.0
                    growth = median(run["peak_kib"] - run["rss_before_kib"] for run in runs)
                    rows.append([label, kind, "x".join(map(str, runs[0]["shape"])),
                                 seconds(median(run["wall_s"] for run in runs)),
                                 seconds(median(run["read_s"] for run in runs)),
                                 seconds(median(run["scale_s"] for run in runs)),
                                 mib(capped), mib(growth), "%.1f" % (growth / capped),
                                 mib(median(run["scale_growth_kib"] for run in runs))])
        print()
        print_table(["video", "how", "preview", "before show()", "read", "scale", "capped frames",
                     "peak RSS growth", "in capped frames", "scaling alone"], rows, left=(0, 1, 2))
        print("\nMedians of %d runs, each in a fresh interpreter with numpy, lindi and the runner imported and "
              "the file opened once before. before show(): what the job does before LossyVideo.show() (open the "
              "file over HTTP Range on 127.0.0.1, read up to 1000 frames, scale, build the view: the test "
              "stand-in, which does nothing until show()); read and scale: the two parts timed apart. Peak RSS "
              "growth: VmHWM after the part (reset first%s) minus VmRSS before it; scaling alone: the same for "
              "the scaling of frames already read (lindi keeps about twice the frames it read, which the "
              "scaling may reuse)."
              % (args.repeat, "" if all(run["peak_reset"] for by_how in results.values()
                                       for runs in by_how.values() for run in runs)
                 else "; NOT reset here, so it may hold the import's peak"))
        if args.json:
            with open(args.json, "w") as stream:
                json.dump(results, stream, indent=2)
            print("raw figures written to %s" % args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---- listen: what --listen costs ------------------------------------------------------------------

def bench_scrape(scrapes):
    """Milliseconds per GET /metrics and per GET /healthz of an idle runner with --listen 0."""
    import urllib.request

    with fake_worker_module().FakeWorker() as worker, tempfile.TemporaryDirectory() as state_dir:
        log = os.path.join(state_dir, "runpack_runner.log")
        runner = start_runner_process(worker.url, state_dir, "--listen", "0")
        try:
            wait_for(lambda: os.path.exists(log) and "/healthz on http://" in open(log).read(), 60, "--listen")
            base = re.search(r"on (http://[\d.:]+)/", open(log).read()).group(1)
            timings = {}
            for path in ("/metrics", "/healthz"):
                started = time.perf_counter()
                for _ in range(scrapes):
                    with urllib.request.urlopen(base + path, timeout=10) as answer:
                        answer.read()
                timings[path] = (time.perf_counter() - started) * 1000 / scrapes
            return timings
        finally:
            runner.terminate()
            runner.wait(60)


def command_listen(args):
    print("--listen: Python %s, %d cores; medians of %d runs each, taking turns" % (
        sys.version.split()[0], os.cpu_count(), args.repeat))
    modes = {"without --listen": (), "--listen 0": ("--listen", "0")}
    memory, drains = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for _ in range(args.repeat):
        for mode, flags in modes.items():
            memory[mode].append(bench_idle_memory(1.0, flags)[0])
            drains[mode].append(bench_drain(args.jobs, 0.0, flags))
    print_table(["", "idle RSS", "jobs/s", "runner CPU ms/job"], [
        [mode, mib(median(memory[mode])), "%.1f" % median(run[0] for run in drains[mode]),
         "%.2f" % median(run[1]["runner_cpu_ms"] for run in drains[mode])] for mode in modes], left=(0,))
    scrape = bench_scrape(args.scrapes)
    print("\nGET /metrics: %.2f ms, GET /healthz: %.2f ms (mean of %d each, idle runner, loopback)" % (
        scrape["/metrics"], scrape["/healthz"], args.scrapes))
    return 0


# ---- slurm: the scaler on a real, throw-away Slurm cluster ----------------------------------------

def start_scaler(worker, cluster, state_dir, *flags, **extra_env):
    env = dict(cluster.env, RUNPACK_RUNNER_API_KEY=fake_worker_module().RUNNER_KEY, **extra_env)
    log = open(os.path.join(os.path.dirname(state_dir), "scaler.out"), "wb")
    return subprocess.Popen([sys.executable, RUNNER_PY, "slurm", "--state-dir", state_dir, "--worker-url", worker.url]
                            + list(flags), env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bench_slurm_pickup(jobs, interval_s, with_relay):
    """Seconds from a job added at the worker to its claim, on a cluster with none of the
    scaler's runners (they left, idle): the scaler's look, sbatch, Slurm's start, the runner's
    start and first poll."""
    sys.path.insert(0, TESTS)
    import fake_relay
    from slurm_cluster import SlurmCluster

    latencies = []
    relay = fake_relay.FakeRelay().start() if with_relay else None
    extra_env = {"NOTIFY_RELAY_SUBSCRIBE_KEY": fake_relay.RELAY_SUBSCRIBE_KEY} if relay else {}
    relay_flags = ("--notify-relay-url", relay.url) if relay else ()
    try:
        with SlurmCluster() as cluster, fake_worker_module().FakeWorker() as worker, \
                tempfile.TemporaryDirectory() as workdir:
            if relay is not None:
                worker.relay_url, worker.relay_publish_key = relay.url, fake_relay.RELAY_PUBLISH_KEY
            scaler = start_scaler(worker, cluster, os.path.join(workdir, "slurm"), "--max-runners", "2",
                                  "--poll-interval", str(interval_s), "--poll-interval-max", "1",
                                  "--idle-timeout", "1", *relay_flags, **extra_env)
            try:
                if relay is not None:
                    wait_for(lambda: relay.held_polls >= 1, 30, "the scaler's subscription")
                for number in range(jobs):
                    wait_for(lambda: not cluster.active_jobs(), 60, "the runners to leave")
                    time.sleep(random.uniform(0, interval_s))
                    added = time.monotonic()
                    job_id = worker.add_job("hello_world", {"name": "pickup-%d" % number, "processing_time": 0})
                    wait_for(lambda: worker.job(job_id)["status"] == "completed", 120, "job %d" % number, step=0.01)
                    claims = [record.at for record in worker.requests
                              if record.route == "claim" and record.job_id == job_id]
                    latencies.append(claims[0] - added)
            finally:
                stop_process(scaler)
    finally:
        if relay is not None:
            relay.stop()
    return latencies


def bench_slurm_drain(jobs, max_runners, seconds_per_job):
    """Seconds from a burst of ``jobs`` added at once to the last one completed, through at most
    ``max_runners`` runners that the scaler starts in an empty cluster."""
    sys.path.insert(0, TESTS)
    from slurm_cluster import SlurmCluster

    with SlurmCluster() as cluster, fake_worker_module().FakeWorker(rate_limit=10 ** 6) as worker, \
            tempfile.TemporaryDirectory() as workdir:
        scaler = start_scaler(worker, cluster, os.path.join(workdir, "slurm"), "--max-runners", str(max_runners),
                              "--poll-interval", "1", "--poll-interval-max", "0.5", "--poll-interval-step", "0",
                              "--idle-timeout", "2")
        try:
            wait_for(lambda: os.path.exists(os.path.join(workdir, "slurm", "runpack_slurm.log")), 30, "the scaler")
            started = time.monotonic()
            ids = [worker.add_job("hello_world", {"name": "burst-%d" % i, "processing_time": seconds_per_job})
                   for i in range(jobs)]
            most = 0
            while not all(worker.job(job_id)["status"] == "completed" for job_id in ids):
                most = max(most, len(cluster.active_jobs()))
                if time.monotonic() - started > 1200:
                    raise RuntimeError("the burst did not drain in 20 minutes")
                time.sleep(0.2)
            return time.monotonic() - started, most
        finally:
            stop_process(scaler)


def command_slurm(args):
    print("slurm scaler: Python %s, %d cores, a single-node Slurm with 8 CPUs advertised" % (
        sys.version.split()[0], os.cpu_count()))
    rows = []
    for with_relay in (False, True):
        latencies = bench_slurm_pickup(args.pickups, args.interval, with_relay)
        rows.append(["NotifyRelay" if with_relay else "polling every %g s" % args.interval,
                     seconds(statistics.median(latencies)), seconds(max(latencies))])
    print("\nA job submitted to an empty cluster, until claimed (%d jobs each):" % args.pickups)
    print_table(["the scaler's wake-up", "p50", "max"], rows, left=(0,))
    rows = []
    for max_runners in (1, 2, 4):
        elapsed, most = bench_slurm_drain(args.jobs, max_runners, args.job_seconds)
        rows.append([str(max_runners), seconds(elapsed), "%.1f" % (args.jobs / elapsed), str(most)])
    print("\nA burst of %d hello_world jobs of %g s each, from an empty cluster:" % (args.jobs, args.job_seconds))
    print_table(["--max-runners", "drained in", "jobs/s", "most runners at once"], rows)
    return 0


# ---- limits: the network guard's and the memory limit's cost ---------------------------------------

# Run in a fresh interpreter, which the guard then wraps for good: connects to a listening socket on
# 127.0.0.1, by address, unguarded, then guarded (the network allowed), then by the name localhost.
CONNECT_COST_SCRIPT = """\
import json, socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
import runpack_runner as rr
count = int(sys.argv[2])
server = socket.create_server(("127.0.0.1", 0), backlog=count)
port = server.getsockname()[1]
def accept():
    while True:
        connection, _ = server.accept()
        connection.close()
threading.Thread(target=accept, daemon=True).start()
def per_connect(host):
    best = None
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            socket.create_connection((host, port)).close()
        elapsed = (time.perf_counter() - started) / count
        best = elapsed if best is None else min(best, elapsed)
    return best * 1e6
result = {"unguarded_us": per_connect("127.0.0.1"), "unguarded_name_us": per_connect("localhost")}
rr.NetworkGuard(rr.NetworkPolicy(rr._parse_networks("127.0.0.1/32"))).install()
result.update(guarded_us=per_connect("127.0.0.1"), guarded_name_us=per_connect("localhost"))
print(json.dumps(result))
"""

LIMIT_MODES = {"guard and memory limit (defaults)": (),
               "no guard (--allow-job-network any)": ("--allow-job-network", "any"),
               "no memory limit (--job-memory-limit 0)": ("--job-memory-limit", "0")}


def bench_connect_cost(connects):
    run = subprocess.run([sys.executable, "-c", CONNECT_COST_SCRIPT, REPO, str(connects)],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True, timeout=600)
    return json.loads(run.stdout)


def command_limits(args):
    cost = bench_connect_cost(args.connects)
    print("TCP connect + close to 127.0.0.1, best of 5 x %d, Python %s:" % (args.connects, sys.version.split()[0]))
    print_table(["connect to", "unguarded", "guarded", "guard's cost"], [
        [label, "%.1f µs" % cost["unguarded" + key], "%.1f µs" % cost["guarded" + key],
         "%+.1f µs" % (cost["guarded" + key] - cost["unguarded" + key])]
        for label, key in (("127.0.0.1", "_us"), ("localhost (resolved)", "_name_us"))])
    sys.path.insert(0, TESTS)
    try:
        import fake_worker
        import figpack_fixtures as fixtures
        import figpack_spike_sorting  # noqa: F401  (only to fail early)
    except ImportError as error:
        print("Error: %s; install the figpack extra: pip install '.[figpack]'" % error, file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="runpack-bench-")
    try:
        data = os.path.join(workdir, "data")
        os.mkdir(data)
        fixtures.make_units_nwb(os.path.join(data, "small.nwb"), n_units=20, spikes_per_unit=200, seed=1)
        walls = {mode: [] for mode in LIMIT_MODES}
        with fixtures.RangeFileServer(data) as nwb_server, \
                fixtures.FigpackApiStandIn(expected_api_key=FIGPACK_KEY) as api:
            url = nwb_server.url_for("small.nwb")
            for repetition in range(args.repeat):
                for mode, flags in LIMIT_MODES.items():  # interleaved, so that drift falls on every mode
                    job = figpack_through_runner(fake_worker, url, api, workdir, "limits-%d-%d" % (
                        repetition, len(walls[mode])), flags, args.jobs)
                    walls[mode] += job["walls_s"][1:]
        reference = median(walls["no guard (--allow-job-network any)"])
        print("\nfigpack_nwb_raster_plot, 20 units x 200 spikes, later (warm) jobs through the runner, "
              "%d runs x %d jobs:" % (args.repeat, args.jobs - 1))
        print_table(["how", "median", "vs no guard"], [
            [mode, seconds(median(values)), "%+.1f%%" % (100 * (median(values) / reference - 1))]
            for mode, values in walls.items()], left=(0,))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---- command line ------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="benchmark.py", description="Benchmarks of the Runpack runner.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    figpack = commands.add_parser(
        "figpack", help="the figpack_nwb_raster_plot job: direct figpack versus through the runner",
        description="Time a raster plot of a small and a large units table, made by figpack directly "
                    "and as a job of the real runner against the fake worker, all on 127.0.0.1.")
    figpack.add_argument("--repeat", type=int, default=2, help="runs of each kind per table (default 2)")
    figpack.add_argument("--jobs", type=int, default=4, help="jobs per runner run (default 4)")
    figpack.add_argument("--small-units", type=int, default=20)
    figpack.add_argument("--small-spikes", type=int, default=200, help="spikes per unit of the small table")
    figpack.add_argument("--large-units", type=int, default=300)
    figpack.add_argument("--large-spikes", type=int, default=6700, help="spikes per unit of the large table")
    figpack.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    figpack.set_defaults(func=command_figpack)
    core = commands.add_parser(
        "core", help="import time, memory, requests per job and drain throughput of the runner",
        description="The runner's own costs, against the fake worker on 127.0.0.1.")
    core.add_argument("--repeat", type=int, default=5, help="runs of each timing (default 5)")
    core.add_argument("--jobs", type=int, default=200, help="jobs in the drained queue (default 200)")
    core.add_argument("--drains", type=int, default=3, help="drains of each kind (default 3)")
    core.add_argument("--latency-ms", type=int, default=50,
                      help="delay added to every worker answer in the second drain series (default 50)")
    core.set_defaults(func=command_core)
    fleet = commands.add_parser(
        "fleet", help="one runner versus a fleet on one queue, restarts after an outage, push wake-up",
        description="Many runners against the fake worker (and the fake NotifyRelay) on 127.0.0.1.")
    fleet.add_argument("--runners", type=int, default=8, help="runners in the fleet (default 8)")
    fleet.add_argument("--jobs", type=int, default=400, help="jobs in the drained queue (default 400)")
    fleet.add_argument("--latency-ms", type=int, default=50,
                       help="delay added to every worker answer in the second drain series (default 50)")
    fleet.add_argument("--outage", type=float, default=5.0, help="seconds the worker is down (default 5)")
    fleet.add_argument("--pickup-jobs", type=int, default=10, help="single jobs per pickup series (default 10)")
    fleet.add_argument("--pickup-interval", type=float, default=5.0,
                       help="the idle runner's poll interval in the pickup series (default 5)")
    fleet.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    fleet.set_defaults(func=command_fleet)
    listen = commands.add_parser(
        "listen", help="what --listen costs: idle memory, CPU per job, a scrape",
        description="A runner with and without --listen against the fake worker on 127.0.0.1.")
    listen.add_argument("--repeat", type=int, default=3, help="runs of each kind (default 3)")
    listen.add_argument("--jobs", type=int, default=200, help="jobs per drain (default 200)")
    listen.add_argument("--scrapes", type=int, default=200, help="GETs of each path (default 200)")
    listen.set_defaults(func=command_listen)
    slurm = commands.add_parser(
        "slurm", help="the Slurm scaler: pickup from an empty cluster, and a burst's drain with 1, 2, 4 runners",
        description="The scaler against the fake worker (and relay) on 127.0.0.1 and a throw-away Slurm cluster "
                    "(needs slurmctld and slurmd, and root: see tests/slurm_cluster.py).")
    slurm.add_argument("--pickups", type=int, default=5, help="single jobs per pickup series (default 5)")
    slurm.add_argument("--interval", type=float, default=10.0, help="the scaler's --poll-interval (default 10)")
    slurm.add_argument("--jobs", type=int, default=100, help="jobs in the burst (default 100)")
    slurm.add_argument("--job-seconds", type=float, default=1.0, help="each burst job's processing_time (default 1)")
    slurm.set_defaults(func=command_slurm)
    limits = commands.add_parser(
        "limits", help="the cost of the network guard and of the memory limit of job processes",
        description="A guarded TCP connect against an unguarded one, and the small raster-plot job through "
                    "the runner with and without the guard and the memory limit, all on 127.0.0.1.")
    limits.add_argument("--connects", type=int, default=2000, help="connects per timing (default 2000)")
    limits.add_argument("--repeat", type=int, default=3, help="runner runs of each kind (default 3)")
    limits.add_argument("--jobs", type=int, default=6, help="jobs per runner run (default 6)")
    limits.set_defaults(func=command_limits)
    video = commands.add_parser(
        "video", help="the video preview before show(): time and peak memory, ours versus the deployed formula",
        description="Read and scale the first 1000 frames of a synthetic NWB ImageSeries served on 127.0.0.1, "
                    "as the figpack_nwb_video_preview job does before show(), in a fresh interpreter per run.")
    video.add_argument("--repeat", type=int, default=3, help="runs of each kind (default 3)")
    video.add_argument("--frames", type=int, default=1000, help="frames of the synthetic video (default 1000)")
    video.add_argument("--height", type=int, default=240)
    video.add_argument("--width", type=int, default=320)
    video.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    video.set_defaults(func=command_video)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
