# Shared by the setup scripts (sourced, run from the repository root).

# The first Python >= 3.12: $PYTHON, python3.12, pyenv's 3.12.x, then pyenv's newer ones, then
# python3 / python3.13 on PATH. Prints a command (possibly "env PYENV_VERSION=... python3").
find_python() {
  local c v
  for c in "${PYTHON:-}" python3.12; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && \
      "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$c"; return 0; }
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv versions that are not on PATH as shims
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | sort -rV) \
             $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[3-9]' | sort -V); do
      echo "env PYENV_VERSION=$v python3"; return 0
    done
  fi
  for c in python3 python3.13; do
    command -v "$c" >/dev/null 2>&1 && \
      "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}

# ensure_venv DIR LABEL: creates the virtual environment DIR with find_python unless it exists.
ensure_venv() {
  local dir=$1 label=$2 py
  [ -x "$dir/bin/python" ] && return 0
  py=$(find_python) || {
    echo "$label: mamba2_jax needs Python >= 3.12 (jax 0.12 / flax 0.12.12). None was found on" >&2
    echo "       PATH or in pyenv. Install one, or point PYTHON=/path/to/python3.12 at it." >&2
    exit 1
  }
  echo "$label: creating $dir with $($py --version 2>&1) ($py)"
  $py -m venv "$dir"
}

# install_pinned DIR FILE... -- PIP_ARGS...: pip install PIP_ARGS into DIR unless the FILEs are
# unchanged since the last successful install (a stamp named by their hash).
install_pinned() {
  local dir=$1 files=() stamp
  shift
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  shift
  stamp="$dir/.installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q "$@"
    rm -f "$dir"/.installed-*
    touch "$stamp"
  fi
}

# install_project DIR: the project itself into DIR, editable (`pip install -e .`: imports resolve to
# this checkout from any directory), without dependencies or build isolation (the pinned
# setuptools already in DIR builds it, offline), unless done for this checkout and pyproject.toml.
install_project() {
  local dir=$1 stamp
  stamp="$dir/.project-$( (pwd; cat pyproject.toml) | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    # (setuptools warns that folders named like the packages in the working directory take
    # precedence: true of any editable install, and here they are the packages themselves)
    PYTHONWARNINGS=ignore "$dir/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    rm -f "$dir"/.project-*
    touch "$stamp"
  fi
}
