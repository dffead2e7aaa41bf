# Shared by scripts/test and scripts/demo: install what herd needs on a fresh
# machine (Debian packages when root, a .venv with the project), idempotently.
# Sourced, not run: sets HERD_PY to the venv's python.
set -euo pipefail
HERD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

herd_apt_install() {
  # usage: herd_apt_install CMD:PACKAGE ...  (installs PACKAGE when CMD is missing)
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd="${pair%%:*}"; pkg="${pair#*:}"
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
      missing+=("$pkg")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "herd: missing Debian packages ${missing[*]} and not root: install them, or some tests will say why they cannot run" >&2
    return 0
  fi
  echo "herd: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${missing[@]}" >&2
}

herd_venv() {
  local venv="$HERD_ROOT/.venv" stamp
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  stamp="$venv/.herd-installed-$(sha256sum "$HERD_ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -e "$HERD_ROOT[test]" >&2
    rm -f "$venv"/.herd-installed-*
    touch "$stamp"
  fi
  HERD_PY="$venv/bin/python"
  export PATH="$venv/bin:$PATH"
}
