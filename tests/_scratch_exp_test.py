import os, pytest, sys
sys.path.insert(0, "/work/main/tests")
from test_fleet import *

@pytest.mark.parametrize("mode", ["lanes"] * 8 + ["head"] * 3 + ["head_norepoll"] * 3)
def test_exp(worker, start_runner, tmp_path, mode):
    extra = () if mode == "lanes" else ("--handlers", "/tmp/fleetexp/head_racing.py")
    env = {"NO_REPOLL": "1"} if mode == "head_norepoll" else {}
    runners = [start_runner("--in-process", *extra, env=env, state_dir=tmp_path / ("state-%d" % n)) for n in range(8)]
    worker.wait_until(lambda: len({r.runner_id for r in requests_to(worker, "available")}) == 8, timeout=30)
    ids = [worker.add_job("hello_world", {"name": "n%d" % n, "processing_time": 0}) for n in range(120)]
    worker.wait_until(all_completed(worker, ids), timeout=60)
    for r in runners:
        assert r.stop() == 0
    by = {worker.job(j)["claimed_by"] for j in ids}
    print("\n%s: runners %d lost %d polls %d 429s %d" % (mode, len(by), worker.count("claim", status=409),
          worker.count("available"), worker.count(status=429)))
