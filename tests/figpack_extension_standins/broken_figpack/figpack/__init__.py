"""A figpack that fails on import as figpack 0.4.1 does on Python 3.8, where its
``tuple[str, int]`` annotations raise (see ../../README.md)."""

import os

if os.environ.get("RUNPACK_TEST_IMPORT_LOG"):
    with open(os.environ["RUNPACK_TEST_IMPORT_LOG"], "a") as _log:
        _log.write("figpack %d\n" % os.getpid())

raise TypeError("'type' object is not subscriptable")
