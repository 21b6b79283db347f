#!/usr/bin/env bash
# Run a command next to a throwaway PostgreSQL server: a new cluster in a temp folder, on localhost
# on a free port, trust authentication; its URL is exported as SFT_DAGSTER_TEST_POSTGRES_URL (what
# tests/test_postgres.py uses) and the server is stopped and removed when the command ends.
#   scripts/with_postgres.sh make test
# PostgreSQL comes from the OS packages (Debian: apt-get install -y postgresql); run as root, the
# server runs as the `postgres` user the package creates.
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] && command -v pg_config >/dev/null; then bin=$(pg_config --bindir); fi
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "with_postgres: no PostgreSQL server binaries (apt-get install -y postgresql)" >&2
  exit 1
fi
data=$(mktemp -d /tmp/sft_pg.XXXXXX)
as_owner=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$data"
  as_owner=(runuser -u postgres --)
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop() {
  "${as_owner[@]}" "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap stop EXIT
"${as_owner[@]}" "$bin/initdb" -D "$data" -A trust -U postgres >"$data.initdb.log" 2>&1 || { cat "$data.initdb.log" >&2; exit 1; }
rm -f "$data.initdb.log"
"${as_owner[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-p $port -k $data -c listen_addresses=127.0.0.1" start >/dev/null
export SFT_DAGSTER_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
echo "with_postgres: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
"$@"
