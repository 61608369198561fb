# Sourced by scripts: makes sure a PostgreSQL server is reachable and exports DATABASE_URL.
#   1. DATABASE_URL already set: use it.
#   2. A server on 127.0.0.1:5432 (user postgres, trust auth): use it.
#   3. Otherwise: start a throwaway cluster with the local initdb/pg_ctl in a temp directory
#      (installing Debian's postgresql package first if it is missing and we are root), and
#      stop it when the calling script exits.
# TEST_POSTGRES=throwaway forces 3 (to test this script itself).

pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) /usr/bin /usr/local/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

pg_accepts() { # url
  if command -v psql >/dev/null 2>&1; then
    psql "$1" -Atqc 'select 1' >/dev/null 2>&1
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ] && [ "${TEST_POSTGRES:-}" != throwaway ]; then
    echo "postgres: using DATABASE_URL"
    return 0
  fi
  local local_url="postgres://postgres@127.0.0.1:5432/postgres"
  if [ "${TEST_POSTGRES:-}" != throwaway ] && pg_accepts "$local_url"; then
    export DATABASE_URL="$local_url"
    echo "postgres: using the server on 127.0.0.1:5432"
    return 0
  fi

  local bindir
  if ! bindir=$(pg_bindir); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "postgres: no server and no initdb; installing Debian's postgresql package"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      bindir=$(pg_bindir) || { echo "postgres: initdb still missing after install" >&2; return 1; }
    else
      echo "postgres: no server on 127.0.0.1:5432 and no initdb found." >&2
      echo "  Install PostgreSQL (Debian/Ubuntu: sudo apt-get install postgresql) or set DATABASE_URL." >&2
      return 1
    fi
  fi

  PG_TMP=$(mktemp -d /tmp/tally-pg.XXXXXX)
  local port=$(( 20000 + RANDOM % 20000 ))
  local run_as=()
  if [ "$(id -u)" = 0 ]; then
    # initdb and postgres refuse to run as root.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$PG_TMP"
    run_as=(runuser -u postgres --)
  fi
  "${run_as[@]}" "$bindir/initdb" -D "$PG_TMP/data" -U postgres --auth=trust -E UTF8 >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; return 1; }
  "${run_as[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w \
    -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$PG_TMP/server.log" >&2; return 1; }
  PG_STOP=("${run_as[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -m fast stop)
  trap 'stop_throwaway_postgres' EXIT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "postgres: started a throwaway cluster on 127.0.0.1:$port ($PG_TMP)"
}

# Drops the tally_test_* databases made since unix time $1 (their names start with it). Keeps
# the throwaway cluster's trap: a throwaway cluster goes whole.
drop_test_databases() {
  local since=$1 name made dropped=0
  if [ -n "${PG_TMP:-}" ]; then stop_throwaway_postgres; return 0; fi
  if ! command -v psql >/dev/null 2>&1; then
    echo "note: the tests' databases (tally_test_*) stay on $DATABASE_URL (no psql to drop them); tally drops those older than two hours at the next run" >&2
    return 0
  fi
  for name in $(psql "$DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'tally\_test\_%'" 2>/dev/null); do
    made=${name#tally_test_}; made=${made%%_*}
    if [ "$made" -ge "$since" ] 2>/dev/null; then
      psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 && dropped=$((dropped + 1))
    fi
  done
  echo "postgres: dropped the $dropped test database(s) this run made"
}

stop_throwaway_postgres() {
  if [ -n "${PG_TMP:-}" ]; then
    "${PG_STOP[@]}" >/dev/null 2>&1 || true
    rm -rf "$PG_TMP"
  fi
}
