# Sourced by scripts: installs the tools the deploy tests (tests/deploy.rs) run, when they are
# missing: promtool (Debian package prometheus) and systemd-analyze (package systemd). Installing
# needs root (CI is root); otherwise the message says what to install.

ensure_tools() {
  local missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (for promtool / systemd-analyze in tests/deploy.rs)" >&2
    apt-get update -qq >&2
    # The packages' services are not started here (no systemd running); only the tools are used.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "tests/deploy.rs needs: ${missing[*]} (Debian packages); install them, e.g. sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
}
