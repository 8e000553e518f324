"""A figpack_experimental that is installed but cannot be imported (see ../../README.md)."""

import os

if os.environ.get("RUNPACK_TEST_IMPORT_LOG"):
    with open(os.environ["RUNPACK_TEST_IMPORT_LOG"], "a") as _log:
        _log.write("figpack_experimental %d\n" % os.getpid())

raise RuntimeError("figpack_experimental stand-in: broken on purpose")
