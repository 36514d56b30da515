#!/usr/bin/env bash
# What an SSH tunnel costs: the same syncs direct and through a local sshd, side by side, on a
# throwaway cluster. Usage: bench/ssh-tunnel.sh [ROWS] (default 1000000), from the repository
# root after `cargo build --release`. Needs openssh-server; run as root, the cluster and sshd
# run as the postgres user. The figures in docs/performance.md come from this script.
set -euo pipefail
ROWS=${1:-1000000}
PGDELTA=${PGDELTA:-$PWD/target/release/pgdelta}
BIN=$(pg_config --bindir 2>/dev/null || true)
[ -x "$BIN/initdb" ] || BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
D=$(mktemp -d /tmp/pgdelta-ssh-bench.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  [ -f "$D/sshd.pid" ] && kill "$(cat "$D/sshd.pid")" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$D/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$D"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres: "$D"
chmod 755 "$D"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SSH_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$BIN/initdb" -D "$D/data" -A trust -U postgres >/dev/null
as_pg "$BIN/pg_ctl" -D "$D/data" -l "$D/pg.log" -w start \
  -o "-p $PORT -k $D -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c shared_buffers=1GB" >/dev/null
cd "$D"
ssh-keygen -q -t ed25519 -N '' -f host_key
ssh-keygen -q -t ed25519 -N '' -f client_key
cp client_key.pub authorized_keys
cat > sshd_config <<EOC
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $D/host_key
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
EOC
[ "$(id -u)" = 0 ] && chown postgres: host_key host_key.pub authorized_keys sshd_config
as_pg /usr/sbin/sshd -f "$D/sshd_config"
echo "[127.0.0.1]:$SSH_PORT $(cat host_key.pub)" > known_hosts
USER_AT=$([ "$(id -u)" = 0 ] && echo postgres || id -un)
P="psql -q -h 127.0.0.1 -p $PORT -U postgres"
SRC=$OLDPWD/src/tools/workload.rs
DDL=$(sed -n '/pub const ORDERS_DDL/,/)";/p' "$SRC" | sed '1s/.*"CREATE/CREATE/; $s/)";/)/')
SEED=$(sed -n '/pub fn seed_sql/,/^}/p' "$SRC" | sed -n '/"INSERT/,/AS i"/p' | sed 's/^ *"//; s/"$//; s/{rows}/'"$ROWS"'/')
for db in src direct tunnel; do $P -d postgres -c "CREATE DATABASE $db"; done
for db in src direct tunnel; do $P -d "$db" -c "$DDL"; done
$P -d src -c "$SEED"
$P -d src -c "VACUUM ANALYZE orders"
run() { # destination database, extra flags...
  local dst=$1; shift
  /usr/bin/time -f "%e s" "$PGDELTA" sync --source "postgres://postgres@127.0.0.1:$PORT/src" \
    --destination "postgres://postgres@127.0.0.1:$PORT/$dst" --table orders --target orders --key id \
    --state "$D/$dst.redb" --read-sessions 1 "$@" 2>&1 | tail -1
}
T=(--source-ssh "$USER_AT@127.0.0.1:$SSH_PORT" --destination-ssh "$USER_AT@127.0.0.1:$SSH_PORT"
   --ssh-key "$D/client_key" --ssh-known-hosts "$D/known_hosts")
echo "rows: $ROWS"
echo "initial load            direct $(run direct)   tunnel $(run tunnel "${T[@]}")"
for i in 1 2 3; do
  echo "no-change (delta read)  direct $(run direct)   tunnel $(run tunnel "${T[@]}")"
done
for i in 1 2 3; do
  echo "no-change (full read)   direct $(run direct --full-read)   tunnel $(run tunnel "${T[@]}" --full-read)"
done
