#!/usr/bin/env bash
# Install (Debian's package) and start a PostgreSQL for the tests on 127.0.0.1:5432,
# unless one already answers there. Local TCP connections are trusted: a throwaway
# test server, reachable from loopback only. Tests then connect as `root`, a superuser.
set -euo pipefail

if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "ci: PostgreSQL already answers on 127.0.0.1:5432"
  exit 0
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "ci: installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
conf=/etc/postgresql/$version/main
if ! grep -q "payment-service tests" "$conf/pg_hba.conf"; then
  # First match wins in pg_hba.conf: these lines go on top.
  { echo "# payment-service tests: trust local TCP connections"
    echo "host all all 127.0.0.1/32 trust"
    echo "host all all ::1/128 trust"
    cat "$conf/pg_hba.conf"; } > "$conf/pg_hba.conf.new"
  mv "$conf/pg_hba.conf.new" "$conf/pg_hba.conf"
  chown postgres:postgres "$conf/pg_hba.conf"
fi
# Several service instances, their pools and a database per test: more than 100.
cat > "$conf/conf.d/payment-service-tests.conf" <<CONF
listen_addresses = '127.0.0.1'
max_connections = 400
shared_buffers = 256MB
CONF

pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main restart
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
pg_isready -h 127.0.0.1 -p 5432
psql -h 127.0.0.1 -U postgres -d postgres -qtAc \
  "SELECT 1 FROM pg_roles WHERE rolname = 'root'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE ROLE root SUPERUSER LOGIN"
echo "ci: PostgreSQL $version on 127.0.0.1:5432 ($(psql -h 127.0.0.1 -U root -d postgres -qtAc 'SHOW server_version'))"
