"""A --handlers module that imports in the runner and fails in its job launcher: a machine where
job processes cannot start. With BREAK_LAUNCHER_WHEN set, only once the file it names exists: a
venv removed under a running runner, say."""

import os
import sys

_when = os.environ.get("BREAK_LAUNCHER_WHEN")
if "_launcher" in sys.argv and (not _when or os.path.exists(_when)):
    raise RuntimeError("this module does not import in the launcher")
