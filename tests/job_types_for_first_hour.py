"""Job types for the first-hour tests (tests/test_first_hour.py)."""

import time

import runpack_runner


@runpack_runner.job_type("two_thirds")
def two_thirds(input_params, heartbeat_callback):
    """Reports 66/100, then works on without reporting, then completes."""
    heartbeat_callback(progress_current=66, progress_total=100, console_output="two thirds")
    time.sleep(input_params.get("seconds", 1.0))
    return {"done": True}
