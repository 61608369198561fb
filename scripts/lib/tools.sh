# Sourced by scripts: installs the tools tests run, when they are missing: promtool (Debian
# package prometheus) and systemd-analyze (package systemd) for tests/deploy.rs; chromium and
# chromium-driver, and axe-core from npm, for tests/browser.rs; DuckDB from PyPI, for the
# archive's tests (a data team's reader of its Parquet files); moto from PyPI, an S3 server for
# the archive's S3 test. Installing needs root (CI is
# root); otherwise the message says what to install.

ensure_tools() {
  local missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  # tests/browser.rs: Debian's Chromium and its WebDriver.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  ensure_axe || return 1
  ensure_duckdb || return 1
  ensure_moto || return 1
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (promtool and systemd-analyze for tests/deploy.rs, chromium for tests/browser.rs)" >&2
    apt-get update -qq >&2
    # The packages' services are not started here (no systemd running); only the tools are used.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "tests/deploy.rs and tests/browser.rs need: ${missing[*]} (Debian packages); install them, e.g. sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
}

# axe-core, the accessibility checker tests/browser.rs injects into each page: fetched from npm
# once, pinned, into target/tools (not shipped: users never need it).
AXE_CORE_VERSION=4.10.2
ensure_axe() {
  local dir=target/tools/axe-core-$AXE_CORE_VERSION
  [ -f "$dir/node_modules/axe-core/axe.min.js" ] && { export TALLY_AXE_JS="$PWD/$dir/node_modules/axe-core/axe.min.js"; return 0; }
  if ! command -v npm >/dev/null 2>&1; then
    echo "tests/browser.rs needs npm to fetch axe-core $AXE_CORE_VERSION (Debian: apt-get install npm)" >&2
    return 1
  fi
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" "axe-core@$AXE_CORE_VERSION" >&2 \
    || { echo "npm could not fetch axe-core@$AXE_CORE_VERSION" >&2; return 1; }
  export TALLY_AXE_JS="$PWD/$dir/node_modules/axe-core/axe.min.js"
}

# Python packages the archive's tests run, fetched from PyPI once, pinned, as wheels only (never
# a build from source), into target/tools (not shipped): tests find each through an environment
# variable. pip_tool DIR VARIABLE WHAT -- REQUIREMENT...
pip_tool() {
  local dir=$1 variable=$2 what=$3
  shift 4
  # The marker is written last: a half-finished install is installed again.
  if [ ! -f "$dir/.installed" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      echo "$what needs python3 with pip to fetch $* (Debian: apt-get install python3-pip)" >&2
      return 1
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    # pip's complaints about packages installed elsewhere on the machine are not ours.
    python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: --target "$dir" "$@" >&2 2>/dev/null \
      || { echo "pip could not fetch $* from PyPI ($what); check the network, or install it and set $variable" >&2; return 1; }
    touch "$dir/.installed"
  fi
  export "$variable=$PWD/$dir"
}

# DuckDB, which the archive's tests read its Parquet files with (a data team's reader).
DUCKDB_VERSION=1.1.3
ensure_duckdb() {
  pip_tool "target/tools/duckdb-$DUCKDB_VERSION" TALLY_DUCKDB_PYTHONPATH \
    "the archive's tests (they read Parquet with DuckDB)" -- "duckdb==$DUCKDB_VERSION"
}

# moto, an S3-compatible server, which the archive's S3 test writes to on loopback: the S3
# backend and the server (flask), not every AWS service moto has.
MOTO_VERSION=5.2.6
ensure_moto() {
  pip_tool "target/tools/moto-$MOTO_VERSION" TALLY_MOTO_PYTHONPATH \
    "the archive's S3 test (moto serves S3)" -- "moto[s3]==$MOTO_VERSION" "flask<4" "flask-cors<7"
}
