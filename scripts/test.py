#!/usr/bin/env python3
"""Run the test suite in a virtual environment of its own, on a fresh machine too.

    python3 scripts/test.py [--python PATH] [--reinstall] [PYTEST ARGUMENTS ...]

The first run makes ``.venv-X.Y/`` in the checkout (X.Y: the interpreter's version, so that each
Python has its own) and installs the package there, editable, with the extras that install on that
Python: every extra pyproject.toml declares (``.[test,figpack,...]``, so that no test skips for want
of a package), or only ``.[test]`` before 3.9, which figpack needs. Later runs reuse it and
install again only when pyproject.toml, the interpreter or the extras change (a stamp file in the
venv records them), or with ``--reinstall``. Then it runs ``python -m pytest -q`` there, from the
checkout, with every other argument passed on: ``python3 scripts/test.py -m "not slow"``.

A venv is used because pip refuses to install into a system Python that is "externally managed"
(Debian, Ubuntu), and so that the suite never depends on what else that Python has.
``--python PATH`` runs the suite under another interpreter (CI runs 3.8, the default and 3.13).

Standard library only.
"""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")
STAMP_NAME = ".runpack-test-stamp.json"
MIN_PYTHON = (3, 8)
FIGPACK_MIN_PYTHON = (3, 9)     # figpack installs on 3.8 but does not import there
PROBE = "import json, os, sys; print(json.dumps([list(sys.version_info[:3]), os.path.realpath(sys.executable)]))"

USAGE = __doc__.split("\n\n")[1].strip()


def say(message):
    print("test.py: %s" % message, flush=True)


def fail(message, code=2):
    print("test.py: error: %s" % message, file=sys.stderr, flush=True)
    sys.exit(code)


def parse_arguments(argv):
    """(python, reinstall, pytest arguments): our options come first; the rest is pytest's."""
    python, reinstall = sys.executable, False
    while argv:
        if argv[0] == "--python":
            if len(argv) < 2:
                fail("--python needs the path of an interpreter\n" + USAGE)
            python, argv = argv[1], argv[2:]
        elif argv[0].startswith("--python="):
            python, argv = argv[0][len("--python="):], argv[1:]
        elif argv[0] == "--reinstall":
            reinstall, argv = True, argv[1:]
        elif argv[0] == "--":
            argv = argv[1:]
            break
        else:
            break
    return python, reinstall, list(argv)


def describe_interpreter(python):
    """(version tuple, real path) of ``python``, which must run and be new enough."""
    try:
        result = subprocess.run([python, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        fail("cannot run the interpreter %s: %s" % (python, exc))
    if result.returncode != 0:
        fail("cannot run the interpreter %s:\n%s" % (python, result.stderr.strip()))
    version, real_path = json.loads(result.stdout)
    version = tuple(version)
    if version[:2] < MIN_PYTHON:
        fail("%s is Python %s; the runner and its tests need Python %d.%d or newer"
             % (python, ".".join(map(str, version)), MIN_PYTHON[0], MIN_PYTHON[1]))
    return version, real_path


def declared_extras():
    """The extras of pyproject.toml's [project.optional-dependencies] table, "test" first."""
    names, in_table = [], False
    with open(PYPROJECT, encoding="utf-8") as stream:
        for line in stream:
            if re.match(r"\[[^\]]*\]\s*$", line):
                in_table = line.strip() == "[project.optional-dependencies]"
                continue
            key = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*=", line) if in_table else None
            if key:
                names.append(key.group(1))
    return ["test"] + [name for name in names if name != "test"]


def extras_for(version):
    return ",".join(declared_extras()) if version[:2] >= FIGPACK_MIN_PYTHON else "test"


def wanted_stamp(version, real_path):
    with open(PYPROJECT, "rb") as stream:
        pyproject_sha256 = hashlib.sha256(stream.read()).hexdigest()
    return {"python": real_path, "version": ".".join(map(str, version)), "extras": extras_for(version),
            "pyproject_sha256": pyproject_sha256}


def read_stamp(path):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def venv_python_runs(venv_python):
    try:
        return subprocess.run([venv_python, "-c", "pass"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def make_venv(python, venv_dir):
    say("creating %s with %s" % (os.path.relpath(venv_dir, REPO), python))
    result = subprocess.run([python, "-m", "venv", "--clear", venv_dir])
    if result.returncode != 0:
        fail("could not create a virtual environment with '%s -m venv' (on Debian and Ubuntu "
             "install the python3-venv package, or pass --python PATH of a Python that has venv)" % python)


def install(venv_python, venv_dir, extras, reason):
    say("installing the package with .[%s] into %s (%s)" % (extras, os.path.relpath(venv_dir, REPO), reason))
    command = [venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--editable", ".[%s]" % extras]
    if subprocess.run(command, cwd=REPO).returncode != 0:
        fail("pip install failed (it needs PyPI the first time); run this command again to retry", 1)


def prepare_venv(python, reinstall):
    """The venv's python, created or brought up to date for ``python``."""
    version, real_path = describe_interpreter(python)
    venv_dir = os.path.join(REPO, ".venv-%d.%d" % version[:2])
    venv_python = os.path.join(venv_dir, "bin", "python")
    stamp_path = os.path.join(venv_dir, STAMP_NAME)
    wanted, stamp = wanted_stamp(version, real_path), read_stamp(stamp_path)

    if stamp is None or stamp.get("python") != real_path or not venv_python_runs(venv_python):
        make_venv(python, venv_dir)
        reason = "new virtual environment"
    elif reinstall:
        reason = "--reinstall"
    elif stamp != wanted:
        reason = "pyproject.toml changed" if stamp.get("pyproject_sha256") != wanted["pyproject_sha256"] \
            else "the extras changed"
    else:
        return venv_python, version, wanted["extras"]
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    install(venv_python, venv_dir, wanted["extras"], reason)
    with open(stamp_path, "w", encoding="utf-8") as stream:
        json.dump(wanted, stream, indent=1)
    return venv_python, version, wanted["extras"]


def main(argv=None):
    python, reinstall, pytest_arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    venv_python, version, extras = prepare_venv(python, reinstall)
    if extras == "test":
        say("Python %d.%d: only the test extra (figpack needs Python %d.%d), so the figpack tests skip"
            % (version[0], version[1], FIGPACK_MIN_PYTHON[0], FIGPACK_MIN_PYTHON[1]))
    command = [venv_python, "-m", "pytest", "-q"] + pytest_arguments
    say("Python %s: %s" % (".".join(map(str, version)), " ".join(shlex.quote(word) for word in command)))
    os.chdir(REPO)
    os.execv(venv_python, command)


if __name__ == "__main__":
    main()
