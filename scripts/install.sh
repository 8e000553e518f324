#!/bin/sh
# Runpack runner installer for a bare (HPC) node: POSIX sh, no sudo, safe to re-run.
#
#   curl -fsSL <url-of-this-script> | sh
#   curl -fsSL <url-of-this-script> | sh -s -- --with-figpack --prefix DIR
#   sh install.sh --from-file ./runpack_runner.py      # offline
#   sh install.sh --help
#
# It fetches runpack_runner.py, checks that it is a Python file that compiles,
# moves it atomically into the prefix and writes a small `runpack` wrapper in
# <prefix>/bin. It never asks for, reads or prints the runner's API key.

# Default download location of runpack_runner.py (the project's published raw file).
# Override with --url URL or the RUNPACK_RUNNER_URL environment variable.
DEFAULT_RUNPACK_RUNNER_URL="https://raw.githubusercontent.com/neurosift/runpack-runner/main/runpack_runner.py"

MIN_PYTHON_MAJOR=3
MIN_PYTHON_MINOR=8
FIGPACK_PACKAGES="figpack figpack-spike-sorting lindi"
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
                     there (needed only for figpack jobs; Python >= 3.$FIGPACK_MIN_PYTHON_MINOR);
                     the wrapper then uses the venv's python
  -h, --help         show this help and exit

Environment:
  PYTHON               python to use (default: python3; must be >= $MIN_PYTHON_MAJOR.$MIN_PYTHON_MINOR)
  RUNPACK_PREFIX       default for --prefix
  RUNPACK_RUNNER_URL   default for --url
EOF
}

say() {
    printf '%s\n' "$*"
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

if [ ! -s "$NEW_FILE" ]; then
    die "refusing to install: $SOURCE_DESC is empty"
fi
if ! (cd "$TMP_DIR" && "$PY_EXE" -m py_compile runpack_runner.py) >"$TMP_DIR/compile.log" 2>&1; then
    sed 's/^/    /' "$TMP_DIR/compile.log" >&2
    die "refusing to install: $SOURCE_DESC is not a Python file that compiles with Python $PY_VERSION (nothing was installed)"
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
# Move $1 (a file in $PREFIX-local temp space) into place as $2 atomically,
# and report whether it was new, updated or unchanged.
install_file() {
    src=$1
    dst=$2
    label=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        rm -f "$src"
        chmod 755 "$dst" || die "cannot chmod $dst"
        say "$label: already up to date ($dst)"
        return 0
    fi
    if [ -e "$dst" ]; then
        what="updated"
    else
        what="installed"
    fi
    chmod 755 "$src" || die "cannot chmod $src"
    mv -f "$src" "$dst" || die "cannot move the new $label into place at $dst"
    CHANGED=1
    say "$label: $what ($dst)"
}

# Copy into the prefix first, so the final rename is within one file system.
PREFIX_TMP_FILE="$PREFIX/.runpack_runner.py.tmp.$$"
cp "$NEW_FILE" "$PREFIX_TMP_FILE" || die "cannot write to $PREFIX"
install_file "$PREFIX_TMP_FILE" "$TARGET" "runpack_runner.py"

PREFIX_TMP_FILE="$BIN_DIR/.runpack.tmp.$$"
{
    say '#!/bin/sh'
    say '# Runpack runner wrapper, written by scripts/install.sh (re-run it to regenerate).'
    say "exec $(shquote "$RUN_PY") $(shquote "$TARGET") \"\$@\""
} >"$PREFIX_TMP_FILE" || die "cannot write to $BIN_DIR"
install_file "$PREFIX_TMP_FILE" "$WRAPPER" "wrapper"
PREFIX_TMP_FILE=""

if [ "$CHANGED" = 0 ]; then
    say "Already installed and up to date in $PREFIX; nothing changed (re-running is safe)."
else
    say "Runpack runner installed in $PREFIX (re-running this installer is safe)."
fi

# ---------------------------------------------------------------- next steps
QW=$(shquote "$WRAPPER")
if [ "$RUN_PY" = "$VENV_DIR/bin/python" ]; then
    FIGPACK_STEP="
  # figpack jobs (figpack_nwb_raster_plot) also need your figpack API key:
  export FIGPACK_API_KEY=..."
else
    FIGPACK_STEP=""
fi
cat <<EOF

Next steps:
  # try it locally (no API key needed):
  $QW run hello_world name=Alice processing_time=3

  # run it as a runner (put your own key in place of ...); check says what is missing:
  export RUNPACK_RUNNER_API_KEY=...$FIGPACK_STEP
  $QW check --state-dir $(shquote "$PREFIX/state")
  $QW runner --state-dir $(shquote "$PREFIX/state")

  # optional: make 'runpack' available by name
  export PATH=$(shquote "$BIN_DIR"):\$PATH
EOF
exit 0
