# Sourced by the scripts (from the checkout's root): where Nixery's Python lives, how an installed
# Nix is found, and how what needs root is installed or asked for.
#
# Python: a virtual environment in the checkout, .venv, made with the system's Python (Debian's
# /usr/bin/python3: bookworm's 3.11, trixie's 3.13, as shipped). Debian's Python is "externally
# managed" (PEP 668) and ships no pip; a venv is where pip may install, and needs only Debian's
# python3-venv. .venv/bin/nixery is the installed command; the scripts run .venv/bin/python.

VENV="$PWD/.venv"
# Where the official installer puts Nix's commands (multi-user, then single-user), for a shell
# that has not put them on PATH (a `sudo`, a service: the installer's profile.d is not read).
NIX_PROFILE_BINS=(/nix/var/nix/profiles/default/bin "${HOME:-/nonexistent}/.nix-profile/bin")

is_root() { [ "$(id -u)" = 0 ]; }

# NixOS has no apt and its own way to run services: say so rather than fail on a missing command.
stop_on_nixos() {
  [ -e /etc/NIXOS ] || return 0
  cat >&2 <<'EOF'
These scripts install with Debian's apt. On NixOS, use the NixOS module (services.nixery, see
docs/nixos.md) or run the flake's package from this checkout:
  nix run . --extra-experimental-features 'nix-command flakes'
and for the tests, the dev shell: nix develop, then python3 -m pytest.
EOF
  exit 1
}

# Puts an installed Nix on PATH when it is not there yet; true if Nix's commands are found.
find_nix() {
  command -v nix-build >/dev/null && return 0
  local dir
  for dir in "${NIX_PROFILE_BINS[@]}"; do
    if [ -x "$dir/nix-build" ]; then
      export PATH="$PATH:$dir"
      return 0
    fi
  done
  return 1
}

# The Python the venv is made with: Debian's own where there is one (not a pyenv or other Python
# earlier on PATH), else the first python3 on PATH. Empty if there is none.
system_python() {
  if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3 || true; fi
}

# True if `$1` can make a venv with pip in it (Debian splits ensurepip out into python3-venv).
can_make_venv() {
  [ -n "$1" ] && "$1" -c 'import ensurepip, venv' 2>/dev/null
}

# Installs the Debian packages given that are not installed. As root with apt, installs them;
# otherwise says what root must run (ROOT_FIX, if the caller sets it, else apt-get), and exits.
install_debs() {
  local missing=() deb
  for deb in "$@"; do
    dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "missing: ${missing[*]} (Debian package names); these scripts install with apt, which is not here:" \
      "install their equivalents, then run this again" >&2
    exit 1
  fi
  if ! is_root; then
    echo "missing Debian packages: ${missing[*]}. As root, run:" \
      "${ROOT_FIX:-apt-get install --no-install-recommends ${missing[*]}}; then run this again as $(id -un)" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Makes .venv (if missing, or made by another Python) and installs the checkout into it, editable,
# with the extra `$1` (empty, gcs or test). Skipped when setup.py has not changed since the last
# install of that extra (or of `test`, which holds them all): pip is not asked on every start.
ensure_venv() {
  local extra=$1 python stamp kind writable=yes
  python=$(system_python)
  stamp="$python $("$python" -c 'import sys; print(sys.version.split()[0])') $(sha256sum setup.py | cut -c1-64)"
  if [ -x "$VENV/bin/python" ]; then
    for kind in "${extra:-base}" test; do
      [ "$(cat "$VENV/.installed-$kind" 2>/dev/null)" = "$stamp" ] && return 0
    done
  fi
  if [ -e "$VENV" ]; then [ -w "$VENV" ] || writable=no; else [ -w "$PWD" ] || writable=no; fi
  if [ $writable = no ]; then
    echo "$VENV needs (re)installing and $(id -un) may not write it: run $PWD/scripts/install-deps" \
      "as the user who owns it (or root)" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.python" 2>/dev/null)" != "${stamp% *}" ]; then
    echo "making $VENV with $python"
    "$python" -m venv --clear "$VENV"
    echo "${stamp% *}" > "$VENV/.python"
  fi
  echo "installing Nixery${extra:+[$extra]} into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
  echo "$stamp" > "$VENV/.installed-${extra:-base}"
}
