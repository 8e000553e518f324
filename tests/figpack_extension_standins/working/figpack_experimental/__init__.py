"""Stand-in for figpack_experimental (see ../../README.md). Like a real figpack extension package it
imports figpack when it is imported."""

import os

if os.environ.get("RUNPACK_TEST_IMPORT_LOG"):
    with open(os.environ["RUNPACK_TEST_IMPORT_LOG"], "a") as _log:
        _log.write("figpack_experimental %d\n" % os.getpid())

import figpack  # noqa: E402,F401
