#!/bin/sh
# Runpack runner installer for a bare (HPC) node: POSIX sh, no sudo, safe to re-run.
#
#   curl -fsSL <url-of-this-script> | sh
#   curl -fsSL <url-of-this-script> | sh -s -- --with-figpack --prefix DIR
#   sh install.sh --from-file ./runpack_runner.py      # offline
#   sh install.sh --help
#
# It fetches runpack_runner.py, checks that it is this runner (its docstring, its
# __version__ line, that it compiles and that --version names the same version),
# moves it atomically into the prefix and writes a small `runpack` wrapper in
# <prefix>/bin. It never asks for, reads or prints the runner's API key.

# Default download location of runpack_runner.py (the project's published raw file).
# Override with --url URL or the RUNPACK_RUNNER_URL environment variable.
DEFAULT_RUNPACK_RUNNER_URL="https://raw.githubusercontent.com/neurosift/runpack-runner/main/runpack_runner.py"

MIN_PYTHON_MAJOR=3
MIN_PYTHON_MINOR=8
# What --with-figpack installs: the figpack_nwb_raster_plot job type's packages.
FIGPACK_PACKAGES="figpack figpack-spike-sorting lindi"
# What it cannot install: the video-preview and pose job types also need figpack's extension
# packages, which are not on PyPI and are built from the figpack project's source.
FIGPACK_SOURCE_URL="https://github.com/flatironinstitute/figpack"
FIGPACK_EXTENSION_PACKAGES="figpack lindi h5py numpy imageio-ffmpeg"
# figpack installs on older Pythons but fails to import there.
FIGPACK_MIN_PYTHON_MINOR=9

set -u
umask 022

PROG="install.sh"

usage() {
    cat <<EOF
Usage: sh install.sh [options]

Install the Runpack runner (runpack_runner.py and a 'runpack' wrapper) without sudo.
Running it again is safe: it updates what changed and says when nothing did.

Options:
  --from-file PATH   install this local runpack_runner.py (works offline)
  --url URL          download runpack_runner.py from URL
                     (default: \$RUNPACK_RUNNER_URL, else
                      $DEFAULT_RUNPACK_RUNNER_URL)
  --prefix DIR       install into DIR (default: \$RUNPACK_PREFIX, else
                     \$HOME/.local/share/runpack); the wrapper goes in DIR/bin
  --with-figpack     also create DIR/venv and pip install
                     $FIGPACK_PACKAGES
                     there (Python >= 3.$FIGPACK_MIN_PYTHON_MINOR); the wrapper then uses the venv's python.
                     That serves figpack_nwb_raster_plot only: see below
  -h, --help         show this help and exit

What --with-figpack does not install:
$(figpack_extension_steps pip)

Environment:
  PYTHON               python to use (default: python3; must be >= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR)
  RUNPACK_PREFIX       default for --prefix
  RUNPACK_RUNNER_URL   default for --url
EOF
}

say() {
    printf '%s\n' "$*"
}

# The packages the figpack video-preview and pose job types need that --with-figpack does not
# install, and how to install them with the pip command $1.
figpack_extension_steps() {
    cat <<EOF
  figpack_nwb_video_preview and figpack_nwb_pose_estimation need figpack's extension
  packages figpack_experimental (video) and figpack_nwb (pose). They are not on PyPI, so
  this installer cannot install them: build them from the figpack project's source
  (needs git and npm), and install the other packages they need:
    git clone $FIGPACK_SOURCE_URL
    cd figpack/extension_packages/figpack_experimental && npm install && npm run build && $1 install .
    cd ../figpack_nwb && npm install && npm run build && $1 install .
    $1 install $FIGPACK_EXTENSION_PACKAGES
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    usage >&2
    exit 2
}

# Quote a word for display in a copy-pasteable shell command.
shquote() {
    case $1 in
        '' | *[!A-Za-z0-9_./=:@%+,-]*)
            printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
            ;;
        *)
            printf '%s' "$1"
            ;;
    esac
}

# ---------------------------------------------------------------- options
FROM_FILE=""
URL=""
URL_GIVEN=0
FROM_FILE_GIVEN=0
PREFIX="${RUNPACK_PREFIX:-}"
WITH_FIGPACK=0

need_value() {
    # $1 = option name, $2 = number of remaining args (including the option)
    if [ "$2" -lt 2 ]; then
        usage_error "option $1 needs a value"
    fi
}

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --from-file)
            need_value "$1" $#
            FROM_FILE=$2
            FROM_FILE_GIVEN=1
            shift 2
            ;;
        --from-file=*)
            FROM_FILE=${1#*=}
            FROM_FILE_GIVEN=1
            shift
            ;;
        --url)
            need_value "$1" $#
            URL=$2
            URL_GIVEN=1
            shift 2
            ;;
        --url=*)
            URL=${1#*=}
            URL_GIVEN=1
            shift
            ;;
        --prefix)
            need_value "$1" $#
            PREFIX=$2
            shift 2
            ;;
        --prefix=*)
            PREFIX=${1#*=}
            shift
            ;;
        --with-figpack)
            WITH_FIGPACK=1
            shift
            ;;
        *)
            usage_error "unknown option: $1"
            ;;
    esac
done

if [ "$FROM_FILE_GIVEN" = 1 ] && [ "$URL_GIVEN" = 1 ]; then
    usage_error "use either --from-file or --url, not both"
fi
if [ "$FROM_FILE_GIVEN" = 1 ] && [ -z "$FROM_FILE" ]; then
    usage_error "option --from-file needs a non-empty value"
fi
if [ "$URL_GIVEN" = 1 ] && [ -z "$URL" ]; then
    usage_error "option --url needs a non-empty value"
fi
if [ "$URL_GIVEN" = 0 ]; then
    URL="${RUNPACK_RUNNER_URL:-$DEFAULT_RUNPACK_RUNNER_URL}"
fi
if [ -z "$PREFIX" ]; then
    if [ -z "${HOME:-}" ]; then
        die "HOME is not set; pass --prefix DIR (or set RUNPACK_PREFIX)"
    fi
    PREFIX="$HOME/.local/share/runpack"
fi
# A literal ~ (e.g. from --prefix=~/dir, which the shell does not expand) means $HOME.
if [ -n "${HOME:-}" ]; then
    case $PREFIX in
        \~) PREFIX=$HOME ;;
        \~/*) PREFIX="$HOME/${PREFIX#\~/}" ;;
    esac
fi

# ---------------------------------------------------------------- python
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    die "Python $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR or newer is required, but '$PY' was not found. Install python3 (or load it, e.g. 'module load python'), or set PYTHON=/path/to/python3."
fi
PY_VERSION=$("$PY" -c 'import sys; print("%d.%d.%d" % tuple(sys.version_info[:3]))' 2>/dev/null) || PY_VERSION=""
PY_MAJOR=${PY_VERSION%%.*}
PY_REST=${PY_VERSION#*.}
PY_MINOR=${PY_REST%%.*}
case "$PY_MAJOR:$PY_MINOR" in
    *[!0-9:]* | :* | *:)
        die "could not run '$PY' to find its version. Python $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR or newer is required; set PYTHON=/path/to/python3."
        ;;
esac
if [ "$PY_MAJOR" -lt "$MIN_PYTHON_MAJOR" ] ||
    { [ "$PY_MAJOR" -eq "$MIN_PYTHON_MAJOR" ] && [ "$PY_MINOR" -lt "$MIN_PYTHON_MINOR" ]; }; then
    die "Python $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR or newer is required, but '$PY' is Python $PY_VERSION. Install a newer python3 (or load one, e.g. 'module load python'), or set PYTHON=/path/to/python3."
fi
# The real interpreter behind '$PY' (resolves shims), so the wrapper works without PATH.
PY_EXE=$("$PY" -c 'import sys; print(sys.executable or "")' 2>/dev/null) || PY_EXE=""
if [ -z "$PY_EXE" ] || [ ! -x "$PY_EXE" ]; then
    PY_EXE=$(command -v "$PY")
fi
say "Using Python $PY_VERSION: $PY_EXE"
if [ "$WITH_FIGPACK" = 1 ] && [ "$PY_MAJOR" -eq 3 ] && [ "$PY_MINOR" -lt "$FIGPACK_MIN_PYTHON_MINOR" ]; then
    die "--with-figpack needs Python 3.$FIGPACK_MIN_PYTHON_MINOR or newer (figpack does not import on Python $PY_VERSION); set PYTHON=/path/to/python3.$FIGPACK_MIN_PYTHON_MINOR or newer, or install without --with-figpack (nothing was installed)"
fi

# ---------------------------------------------------------------- temp dir
TMP_DIR=""
# shellcheck disable=SC2317,SC2329  # invoked by the EXIT trap below (2317: shellcheck < 0.11)
cleanup() {
    if [ -n "$TMP_DIR" ] && [ -d "$TMP_DIR" ]; then
        rm -rf "$TMP_DIR"
    fi
    if [ -n "${PREFIX_TMP_FILE:-}" ] && [ -e "$PREFIX_TMP_FILE" ]; then
        rm -f "$PREFIX_TMP_FILE"
    fi
}
PREFIX_TMP_FILE=""
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TMP_BASE="${TMPDIR:-/tmp}"
TMP_DIR=$(mktemp -d "$TMP_BASE/runpack-install.XXXXXX" 2>/dev/null) || TMP_DIR=""
if [ -z "$TMP_DIR" ]; then
    TMP_DIR="$TMP_BASE/runpack-install.$$"
    rm -rf "$TMP_DIR"
    (umask 077 && mkdir "$TMP_DIR") || die "cannot create a temporary directory in $TMP_BASE (set TMPDIR to a writable directory)"
fi
NEW_FILE="$TMP_DIR/runpack_runner.py"

# ---------------------------------------------------------------- fetch
download() {
    # $1 = url, $2 = destination file
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$2" "$1"
    else
        "$PY_EXE" -c '
import shutil, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
        shutil.copyfileobj(r, f)
except Exception as e:
    sys.exit("    %s" % e)
' "$1" "$2"
    fi
}

if [ "$FROM_FILE_GIVEN" = 1 ]; then
    if [ ! -e "$FROM_FILE" ]; then
        die "--from-file: no such file: $FROM_FILE"
    fi
    if [ ! -f "$FROM_FILE" ]; then
        die "--from-file: not a regular file: $FROM_FILE"
    fi
    SOURCE_DESC="$FROM_FILE"
    cp "$FROM_FILE" "$NEW_FILE" || die "cannot read $FROM_FILE"
else
    SOURCE_DESC="$URL"
    say "Downloading runpack_runner.py from $URL"
    if ! download "$URL" "$NEW_FILE"; then
        die "download failed: $URL (check the URL and this node's network access, or use --from-file PATH)"
    fi
fi

# ---------------------------------------------------------------- is it the runner?
# A download gone wrong (an HTML error page, another project's file) must never take the
# installed runner's place: the file must be this runner before anything is touched.
if [ -e "$PREFIX/runpack_runner.py" ]; then
    KEPT="the installed $PREFIX/runpack_runner.py is unchanged"
else
    KEPT="nothing was installed"
fi
refuse() {
    die "refusing to install $SOURCE_DESC: $1; $KEPT"
}

# The version in a runner file's `__version__ = "X.Y.Z"` line, or nothing.
runner_version() {
    sed -n 's/^__version__ = "\([^"]*\)"[[:space:]]*$/\1/p' "$1" | head -n 1
}

if [ ! -s "$NEW_FILE" ]; then
    refuse "it is empty"
fi
# Its first line that is neither blank nor a comment: the module docstring.
FIRST_LINE=$(awk 'NF && !/^[[:space:]]*#/ { print; exit }' "$NEW_FILE")
case $FIRST_LINE in
    '"""Runpack runner:'*) ;;
    '<'*) refuse "it is an HTML page (an error page from the server?), not runpack_runner.py" ;;
    *) refuse "it is not runpack_runner.py (it does not start with the docstring \"\"\"Runpack runner: ...)" ;;
esac
NEW_VERSION=$(runner_version "$NEW_FILE")
if [ -z "$NEW_VERSION" ]; then
    refuse "it is not runpack_runner.py (it has no __version__ = \"...\" line)"
fi
if ! (cd "$TMP_DIR" && "$PY_EXE" -m py_compile runpack_runner.py) >"$TMP_DIR/compile.log" 2>&1; then
    refuse "it does not compile with Python $PY_VERSION (a truncated download?): $(grep . "$TMP_DIR/compile.log" | tail -n 1)"
fi
VERSION_SAID=$(cd "$TMP_DIR" && "$PY_EXE" runpack_runner.py --version </dev/null 2>/dev/null | head -n 1)
if [ "$VERSION_SAID" != "runpack-runner $NEW_VERSION" ]; then
    if [ -n "$VERSION_SAID" ]; then
        VERSION_SAID="'$(printf '%s' "$VERSION_SAID" | cut -c 1-60)'"
    else
        VERSION_SAID="nothing"
    fi
    refuse "it is not runpack_runner.py (its --version printed $VERSION_SAID, not 'runpack-runner $NEW_VERSION')"
fi

# ---------------------------------------------------------------- prefix
mkdir -p "$PREFIX/bin" || die "cannot create $PREFIX/bin (choose a writable --prefix)"
PREFIX=$(CDPATH='' cd -- "$PREFIX" && pwd -P) || die "cannot enter $PREFIX"
BIN_DIR="$PREFIX/bin"
TARGET="$PREFIX/runpack_runner.py"
WRAPPER="$BIN_DIR/runpack"
VENV_DIR="$PREFIX/venv"
CHANGED=0

# ---------------------------------------------------------------- figpack venv
RUN_PY="$PY_EXE"
if [ "$WITH_FIGPACK" = 1 ]; then
    if [ -x "$VENV_DIR/bin/python" ]; then
        say "venv: $VENV_DIR already exists; reusing it"
    else
        say "venv: creating $VENV_DIR"
        if ! "$PY_EXE" -m venv "$VENV_DIR"; then
            rm -rf "$VENV_DIR"
            die "could not create a venv with '$PY_EXE -m venv' (on Debian/Ubuntu the python3-venv package is needed; or set PYTHON to a python that has venv)"
        fi
        CHANGED=1
    fi
    say "venv: pip install $FIGPACK_PACKAGES"
    "$VENV_DIR/bin/python" -m pip install --upgrade pip >/dev/null 2>&1 ||
        say "venv: (could not upgrade pip; continuing with the bundled one)"
    # shellcheck disable=SC2086  # the package list is meant to be split into words
    if ! "$VENV_DIR/bin/python" -m pip install $FIGPACK_PACKAGES; then
        die "pip install $FIGPACK_PACKAGES failed in $VENV_DIR (needs network access to PyPI); re-run this installer to retry"
    fi
    RUN_PY="$VENV_DIR/bin/python"
elif [ -x "$VENV_DIR/bin/python" ]; then
    say "venv: keeping $VENV_DIR from an earlier --with-figpack install"
    RUN_PY="$VENV_DIR/bin/python"
fi

# ---------------------------------------------------------------- install
# Move $1 (a file in $PREFIX-local temp space) into place as $2 atomically, and set
# OUTCOME to installed, updated or unchanged.
install_file() {
    src=$1
    dst=$2
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        rm -f "$src"
        chmod 755 "$dst" || die "cannot chmod $dst"
        OUTCOME=unchanged
        return 0
    fi
    if [ -e "$dst" ]; then
        OUTCOME=updated
    else
        OUTCOME=installed
    fi
    chmod 755 "$src" || die "cannot chmod $src"
    mv -f "$src" "$dst" || die "cannot move the new $(basename "$dst") into place at $dst"
    CHANGED=1
}

OLD_VERSION=""
if [ -f "$TARGET" ]; then
    OLD_VERSION=$(runner_version "$TARGET")
fi
# Copy into the prefix first, so the final rename is within one file system.
PREFIX_TMP_FILE="$PREFIX/.runpack_runner.py.tmp.$$"
cp "$NEW_FILE" "$PREFIX_TMP_FILE" || die "cannot write to $PREFIX"
install_file "$PREFIX_TMP_FILE" "$TARGET"
case $OUTCOME in
    unchanged) say "runpack-runner $NEW_VERSION, unchanged: already up to date ($TARGET)" ;;
    updated) say "runpack-runner ${OLD_VERSION:-(unknown version)} → $NEW_VERSION: updated ($TARGET)" ;;
    *) say "runpack-runner $NEW_VERSION: installed ($TARGET)" ;;
esac

PREFIX_TMP_FILE="$BIN_DIR/.runpack.tmp.$$"
{
    say '#!/bin/sh'
    say '# Runpack runner wrapper, written by scripts/install.sh (re-run it to regenerate).'
    say "exec $(shquote "$RUN_PY") $(shquote "$TARGET") \"\$@\""
} >"$PREFIX_TMP_FILE" || die "cannot write to $BIN_DIR"
install_file "$PREFIX_TMP_FILE" "$WRAPPER"
PREFIX_TMP_FILE=""
if [ "$OUTCOME" = unchanged ]; then
    say "wrapper: already up to date ($WRAPPER)"
else
    say "wrapper: $OUTCOME ($WRAPPER)"
fi

if [ "$CHANGED" = 0 ]; then
    say "Already installed and up to date in $PREFIX; nothing changed (re-running is safe)."
else
    say "Runpack runner installed in $PREFIX (re-running this installer is safe)."
fi

# ---------------------------------------------------------------- next steps
QW=$(shquote "$WRAPPER")
QP=$(shquote "$PREFIX")
STATE_DIR="$PREFIX/state"
if [ "$RUN_PY" = "$VENV_DIR/bin/python" ]; then
    FIGPACK_STEP="
  # figpack jobs also need your figpack API key:
  export FIGPACK_API_KEY=..."
    VENV_FILES=" $(shquote "$VENV_DIR")"
else
    FIGPACK_STEP=""
    VENV_FILES=""
fi
cat <<EOF

Next steps:
  # try it locally (no API key needed):
  $QW run hello_world name=Alice processing_time=3

  # run it as a runner (put your own key in place of ...); check says what is missing:
  export RUNPACK_RUNNER_API_KEY=...$FIGPACK_STEP
  $QW check --state-dir $(shquote "$STATE_DIR")
  $QW runner --state-dir $(shquote "$STATE_DIR")

  # optional: make 'runpack' available by name
  export PATH=$(shquote "$BIN_DIR"):\$PATH
EOF
if [ -n "$FIGPACK_STEP" ]; then
    cat <<EOF

figpack: $(shquote "$VENV_DIR") has $FIGPACK_PACKAGES,
  which serve figpack_nwb_raster_plot. Not installed:
$(figpack_extension_steps "$(shquote "$RUN_PY") -m pip")
EOF
fi
cat <<EOF

To uninstall: stop the runner, then remove what this installer wrote (not the whole prefix,
which may hold state directories):
  rm -rf $(shquote "$TARGET") $(shquote "$WRAPPER") $(shquote "$PREFIX/__pycache__")/runpack_runner.*.pyc$VENV_FILES
  rmdir $(shquote "$PREFIX/__pycache__") $(shquote "$BIN_DIR") $QP   # removes only empty folders
A state directory such as $(shquote "$STATE_DIR") keeps, in .runpack_jobs/, the records of
claimed jobs that its runner must still finish (the worker never times a job out): remove it
only when
  ls $(shquote "$STATE_DIR/.runpack_jobs")
lists nothing; if it lists files, start the runner on that directory once to settle them.
EOF
exit 0
