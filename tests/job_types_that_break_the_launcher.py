"""A --handlers module that imports in the runner and fails in its job launcher: a machine where
job processes cannot start (a venv removed under a running runner, say)."""

import sys

if "_launcher" in sys.argv:
    raise RuntimeError("this module does not import in the launcher")
