"""Job types the tests load with --handlers: each shows one behaviour of the runner."""

import os
import time

import runpack_runner


@runpack_runner.job_type("sleepy")
def sleepy(input_params, heartbeat_callback):
    """Sleeps without ever calling heartbeat_callback: the runner must heartbeat on its own."""
    time.sleep(input_params.get("seconds", 1))
    return {"slept": input_params.get("seconds", 1)}


@runpack_runner.job_type("boom")
def boom(input_params, heartbeat_callback):
    heartbeat_callback(console_output="about to fail\n")
    raise RuntimeError("boom: " + input_params.get("why", "no reason"))


@runpack_runner.job_type("chatty")
def chatty(input_params, heartbeat_callback):
    """Calls the callback as fast as it can: heartbeats must stay coalesced."""
    deadline = time.monotonic() + input_params.get("seconds", 2)
    count = 0
    while time.monotonic() < deadline:
        count += 1
        heartbeat_callback(progress_current=count, progress_total=None, console_output="line %d" % count)
    return {"calls": count}


@runpack_runner.job_type("console_in_output")
def console_in_output(input_params, heartbeat_callback):
    return {"answer": 42, "console_output": "final console\n"}


@runpack_runner.job_type("sees_key")
def sees_key(input_params, heartbeat_callback):
    """Reports whether the runner key is visible to job handlers (it must not be)."""
    return {"key_in_environment": "RUNPACK_RUNNER_API_KEY" in os.environ}


@runpack_runner.job_type("output_of_size")
def output_of_size(input_params, heartbeat_callback):
    return {"text": "x" * input_params["characters"]}


@runpack_runner.job_type("console_of_size")
def console_of_size(input_params, heartbeat_callback):
    console = "start\n" + "\U0001F600" * input_params["emoji"] + "\nthe end"
    heartbeat_callback(console_output=console)
    return {"done": True, "console_output": console}


@runpack_runner.job_type("not_json")
def not_json(input_params, heartbeat_callback):
    return {"value": float("nan") if input_params.get("nan") else object()}


@runpack_runner.job_type("long_error")
def long_error(input_params, heartbeat_callback):
    raise RuntimeError("e" * input_params["characters"])


@runpack_runner.job_type("cancellable")
def cancellable(input_params, heartbeat_callback):
    """Loops until the runner cancels it, calling the callback (which then raises JobCancelled)."""
    deadline = time.monotonic() + input_params.get("seconds", 30)
    while time.monotonic() < deadline:
        heartbeat_callback(console_output="working")
        time.sleep(0.05)
    return {"finished": True}


class Countdown(runpack_runner.JobHandler):
    """A class-based handler, registered through a dict named in --handlers module:attr."""

    def execute(self, input_params, heartbeat_callback):
        steps = input_params.get("steps", 3)
        for step in range(steps):
            heartbeat_callback(progress_current=step + 1, progress_total=steps)
        return {"counted": steps}


EXTRA_JOB_TYPES = {"countdown": Countdown}


@runpack_runner.job_type("counted_sleep")
def counted_sleep(input_params, heartbeat_callback):
    """Appends a line to the file ``marker`` each time it starts, then sleeps without calling
    heartbeat_callback: tests count how often a job's handler was started."""
    with open(input_params["marker"], "a") as stream:
        stream.write("started in pid %d\n" % os.getpid())
    time.sleep(input_params.get("seconds", 1))
    return {"slept": input_params.get("seconds", 1)}


@runpack_runner.job_type("cancel_witness")
def cancel_witness(input_params, heartbeat_callback):
    """Writes "pid <pid>" to ``marker``, then loops calling the callback; when that raises
    JobCancelled, appends "cancelled: <reason>" to ``marker``."""
    with open(input_params["marker"], "a") as stream:
        stream.write("pid %d\n" % os.getpid())
    deadline = time.monotonic() + input_params.get("seconds", 30)
    try:
        while time.monotonic() < deadline:
            heartbeat_callback(console_output="working")
            time.sleep(0.05)
    except runpack_runner.JobCancelled as cancelled:
        with open(input_params["marker"], "a") as stream:
            stream.write("cancelled: %s\n" % cancelled)
        raise
    return {"finished": True}


@runpack_runner.job_type("long_emoji_error")
def long_emoji_error(input_params, heartbeat_callback):
    """An error message of characters outside the BMP, which JavaScript counts twice."""
    raise RuntimeError("\U0001F600" * input_params["characters"])


@runpack_runner.job_type("cancels_itself")
def cancels_itself(input_params, heartbeat_callback):
    """Raises JobCancelled although the runner did not give the job up: still exactly one report."""
    raise runpack_runner.JobCancelled("gave up by itself")


@runpack_runner.job_type("environment_witness")
def environment_witness(input_params, heartbeat_callback):
    """Reports the names of the job's environment variables and those whose name or value holds
    the text of SHA-256 ``sha256`` and ``length`` characters: a test learns whether a secret
    reached the job without the secret going to the worker (where the runner would redact it)."""
    import hashlib

    def holds_secret(text):
        return any(hashlib.sha256(text[start:start + input_params["length"]].encode("utf-8")).hexdigest()
                   == input_params["sha256"] for start in range(len(text) - input_params["length"] + 1))

    return {"names": sorted(os.environ),
            "holding_the_secret": sorted(name for name, value in os.environ.items()
                                         if holds_secret(name) or holds_secret(value))}
