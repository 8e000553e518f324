"""Job types that misbehave on purpose: the runner's job isolation must contain them."""

import ctypes
import logging
import os
import signal
import sys
import time

import runpack_runner


@runpack_runner.job_type("exit_hard")
def exit_hard(input_params, heartbeat_callback):
    os._exit(input_params.get("code", 3))


@runpack_runner.job_type("segfault")
def segfault(input_params, heartbeat_callback):
    ctypes.string_at(0)


@runpack_runner.job_type("killed")
def killed(input_params, heartbeat_callback):
    """As the kernel's OOM killer would do."""
    os.kill(os.getpid(), signal.SIGKILL)


@runpack_runner.job_type("memory_hog")
def memory_hog(input_params, heartbeat_callback):
    hoard = bytearray(input_params.get("megabytes", 300) * 1024 * 1024)
    for offset in range(0, len(hoard), 4096):
        hoard[offset] = 1
    return {"held_megabytes": len(hoard) // (1024 * 1024)}


@runpack_runner.job_type("printer")
def printer(input_params, heartbeat_callback):
    heartbeat_callback(console_output="handler console line")
    print("printed on stdout")
    print("printed on stderr", file=sys.stderr)
    logging.getLogger("some.library").warning("logged by a library")
    return {"printed": 3}


@runpack_runner.job_type("stubborn")
def stubborn(input_params, heartbeat_callback):
    """Never calls the callback and ignores the runner's stop signal: only SIGKILL ends it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with open(input_params["pid_file"], "w") as stream:
        stream.write(str(os.getpid()))
    time.sleep(input_params.get("seconds", 60))
    return {"finished": True}


@runpack_runner.job_type("whoami")
def whoami(input_params, heartbeat_callback):
    return {"pid": os.getpid()}


@runpack_runner.job_type("nap")
def nap(input_params, heartbeat_callback):
    """Sleeps quietly (SIGTERM ends it at once), after writing its pid where the test can see it."""
    if "pid_file" in input_params:
        with open(input_params["pid_file"], "w") as stream:
            stream.write(str(os.getpid()))
    time.sleep(input_params.get("seconds", 1))
    return {"napped": input_params.get("seconds", 1)}


@runpack_runner.job_type("leaves_thread")
def leaves_thread(input_params, heartbeat_callback):
    """Returns at once but leaves a non-daemon thread running, as some libraries do."""
    import threading

    threading.Thread(target=time.sleep, args=(3600,)).start()
    return {"answer": 42}


@runpack_runner.job_type("exits")
def exits(input_params, heartbeat_callback):
    sys.exit(3)


RUNS_IN_THIS_PROCESS = {"count": 0}


@runpack_runner.job_type("module_state")
def module_state(input_params, heartbeat_callback):
    """Counts its runs in a module global: a job process as fresh as a new interpreter says 1."""
    RUNS_IN_THIS_PROCESS["count"] += 1
    return {"count": RUNS_IN_THIS_PROCESS["count"], "pid": os.getpid()}


@runpack_runner.job_type("forks")
def forks(input_params, heartbeat_callback):
    """Forks a child that outlives the job and keeps its pipes open, as a daemon a job starts would."""
    child = os.fork()
    if child == 0:
        time.sleep(input_params.get("seconds", 60))
        os._exit(0)
    with open(input_params["pid_file"], "w") as stream:
        stream.write(str(child))
    return {"child": child}


@runpack_runner.job_type("warm_probe")
class WarmProbe(runpack_runner.JobHandler):
    """Says whether its warm module was imported before it started. colorsys: a module that
    neither the runner nor anything it imports needs."""

    warm_modules = ("colorsys",)

    def execute(self, input_params, heartbeat_callback):
        return {"warm": "colorsys" in sys.modules}
