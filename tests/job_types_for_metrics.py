"""Job types the --listen tests load with --handlers: a job that runs until the test lets it end."""

import os
import time

import runpack_runner


@runpack_runner.job_type("held")
def held(input_params, heartbeat_callback):
    """Runs until the file ``gate`` exists (at most ``seconds``), without calling heartbeat_callback:
    a test looks at the runner while the job surely runs, then ends it by creating the file."""
    deadline = time.monotonic() + input_params.get("seconds", 60)
    while not os.path.exists(input_params["gate"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"released": os.path.exists(input_params["gate"])}
