# Shared helpers for the quickstart and test scripts: install and start what is missing.
# Idempotent: running it again on a prepared machine changes nothing.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_UPDATED=""
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
      apt_install curl ca-certificates build-essential
      log "installing the Rust toolchain (rustup)"
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    }
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
}

# Starts PostgreSQL (installing it when missing) and exports SILVERGUARD_PG_BASE, a URL to the
# server without a database name. Uses trust auth when the server allows it, otherwise a
# dedicated role "silverguard" (created once) with a password.
ensure_postgres() {
  command -v psql >/dev/null || apt_install postgresql postgresql-client
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    local ver
    ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
    [ -n "$ver" ] || { apt_install postgresql; ver=$(ls /etc/postgresql | sort -V | tail -n1); }
    log "starting PostgreSQL $ver"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null \
      || $SUDO pg_ctlcluster "$ver" main start
    for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
    pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not start"
  fi
  if psql "postgres://postgres@127.0.0.1:5432/postgres" -qtAc 'SELECT 1' >/dev/null 2>&1; then
    export SILVERGUARD_PG_BASE="postgres://postgres@127.0.0.1:5432"
  else
    log "password auth: using role silverguard"
    $SUDO -u postgres psql -qtAc "DO \$\$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='silverguard') THEN CREATE ROLE silverguard LOGIN CREATEDB PASSWORD 'silverguard'; END IF; END\$\$" >/dev/null 2>&1 \
      || runuser -u postgres -- psql -qtAc "DO \$\$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='silverguard') THEN CREATE ROLE silverguard LOGIN CREATEDB PASSWORD 'silverguard'; END IF; END\$\$" >/dev/null
    export SILVERGUARD_PG_BASE="postgres://silverguard:silverguard@127.0.0.1:5432"
    psql "$SILVERGUARD_PG_BASE/postgres" -qtAc 'SELECT 1' >/dev/null || die "cannot log in to PostgreSQL"
  fi
}

# A PostgreSQL cluster of its own for the benchmark, on port $1, configured from
# deploy/postgresql-silverguard.conf (what docs/deployment.md recommends for a city's rate),
# so a bench measures the deployment we document and not whatever the host's server has
# (this repository's CI machine runs with autovacuum off, for one). Debian's
# postgresql-common: created once as cluster "silverguard-bench" of the newest installed
# version, its settings refreshed and the cluster restarted when the file changed.
# Exports SILVERGUARD_PG_BASE for it.
ensure_bench_postgres() {
  local port=$1 name=silverguard-bench ver conf
  command -v pg_createcluster >/dev/null || apt_install postgresql
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  [ -n "$ver" ] || { apt_install postgresql; ver=$(ls /etc/postgresql | sort -V | tail -n1); }
  if [ ! -d "/etc/postgresql/$ver/$name" ]; then
    log "creating PostgreSQL cluster $ver/$name on 127.0.0.1:$port"
    $SUDO pg_createcluster -p "$port" "$ver" "$name" -- --auth=trust >/dev/null
  fi
  conf=$(mktemp)
  printf "listen_addresses = '127.0.0.1'\nport = %s\n" "$port" > "$conf"
  if [ "${ver%%.*}" -ge 15 ]; then
    cat "$ROOT/deploy/postgresql-silverguard.conf" >> "$conf"
  else
    sed 's/^wal_compression = lz4/wal_compression = on/' "$ROOT/deploy/postgresql-silverguard.conf" >> "$conf"
  fi
  local target="/etc/postgresql/$ver/$name/conf.d/silverguard.conf"
  local restart=""
  if ! cmp -s "$conf" "$target" 2>/dev/null; then
    $SUDO mkdir -p "$(dirname "$target")"
    $SUDO cp "$conf" "$target"
    $SUDO chmod 644 "$target"
    restart=1
  fi
  rm -f "$conf"
  if ! pg_isready -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
    log "starting PostgreSQL cluster $ver/$name"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>/dev/null \
      || $SUDO pg_ctlcluster "$ver" "$name" start
  elif [ -n "$restart" ]; then
    log "restarting PostgreSQL cluster $ver/$name (settings changed)"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" restart 2>/dev/null \
      || $SUDO pg_ctlcluster "$ver" "$name" restart
  fi
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
  pg_isready -q -h 127.0.0.1 -p "$port" || die "PostgreSQL cluster $ver/$name did not start on port $port"
  export SILVERGUARD_PG_BASE="postgres://postgres@127.0.0.1:$port"
  psql "$SILVERGUARD_PG_BASE/postgres" -qtAc 'SELECT 1' >/dev/null \
    || die "cannot log in to PostgreSQL cluster $ver/$name as postgres (trust auth expected)"
}

# The PostgreSQL server a benchmark runs against, by BENCH_PG (default $1): "dedicated", the
# cluster of ensure_bench_postgres on BENCH_PG_PORT (5442); "host", the machine's own server as
# it is configured (ensure_postgres). Exports SILVERGUARD_PG_BASE.
ensure_bench_server() {
  case "${BENCH_PG:-$1}" in
    dedicated) ensure_bench_postgres "${BENCH_PG_PORT:-5442}" ;;
    host) ensure_postgres ;;
    *) die "BENCH_PG must be dedicated or host, not ${BENCH_PG:-$1}" ;;
  esac
}

# Starts a Mosquitto broker from deploy/mosquitto.conf on port $1 (not the stock broker: its
# settings lose QoS 1 messages for a subscriber that falls behind). Persistence in .run/.
ensure_broker() {
  local port=$1
  command -v mosquitto >/dev/null || apt_install mosquitto
  command -v mosquitto_pub >/dev/null || apt_install mosquitto-clients
  local dir="$RUN_DIR/mosquitto-$port"
  mkdir -p "$dir"
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    return 0
  fi
  sed -e "s|^listener 1883|listener $port 127.0.0.1|" \
      -e "s|^persistence_location .*|persistence_location $dir/|" \
      "$ROOT/deploy/mosquitto.conf" > "$dir/mosquitto.conf"
  printf 'pid_file %s/pid\nlog_dest file %s/mosquitto.log\n' "$dir" "$dir" >> "$dir/mosquitto.conf"
  # $SYS about every 2 s instead of every 10: the bench reads the broker's backlog from it
  # (firmware-sim/src/bench/broker_sys.rs).
  printf 'sys_interval 1\n' >> "$dir/mosquitto.conf"
  # Mosquitto drops privileges to "mosquitto" when started as root.
  if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then chown -R mosquitto "$dir"; fi
  log "starting Mosquitto on 127.0.0.1:$port (deploy/mosquitto.conf)"
  mosquitto -d -c "$dir/mosquitto.conf"
  for _ in $(seq 1 50); do
    mosquitto_pub -h 127.0.0.1 -p "$port" -t sg/ping -m x -q 0 2>/dev/null && return 0
    sleep 0.2
  done
  die "Mosquitto did not start on port $port (see $dir/mosquitto.log)"
}

# What the notification tests need besides Rust: Python's aiosmtpd for the real SMTP server
# they run (scripts/smtp_sink.py), and the openssl CLI for the certificates of the TLS cases.
# pip first (the machine's python3 may be pyenv's, which Debian's package would not reach);
# --break-system-packages for a Debian python3 that refuses plain pip installs (PEP 668).
ensure_smtp_tools() {
  command -v openssl >/dev/null || apt_install openssl
  command -v python3 >/dev/null || apt_install python3
  python3 -c 'import aiosmtpd' 2>/dev/null && return 0
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  log "installing aiosmtpd (pip)"
  export PIP_ROOT_USER_ACTION=ignore
  python3 -m pip install --quiet aiosmtpd \
    || python3 -m pip install --quiet --break-system-packages aiosmtpd \
    || apt_install python3-aiosmtpd
  python3 -c 'import aiosmtpd' 2>/dev/null || die "cannot install aiosmtpd for $(command -v python3)"
}

# What the console's browser test needs: Debian's headless Chromium and its WebDriver
# (chromedriver), and CJK fonts so the Chinese pages (and their screenshots) render as text.
ensure_chromium() {
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && fc-list 2>/dev/null | grep -qi 'CJK'; then
    return 0
  fi
  apt_install chromium chromium-driver fonts-noto-cjk
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || die "chromium or chromedriver missing after install"
}

# The CPU layout of a benchmark (docs/deployment.md, "Give the broker a core of its own"):
# with BENCH_LAYOUT=pinned (the default) and at least two CPUs, the bench broker on port $1
# runs alone among the bench's programs on the first CPU this shell may use, and the
# bench's own PostgreSQL cluster (its postmaster, so every process it has forked or will
# fork) on the others; the bench must then be started with "${BENCH_ON_REST[@]}" before it,
# so it and the silverguard it starts stay off the broker's CPU too. Only processes the
# scripts started are touched: with BENCH_PG=host the machine's own server is shared with
# others, so nothing is pinned. BENCH_LAYOUT=shared lets every process run on every CPU
# this shell may use, as in the rounds of docs/performance.md before the twelfth, and
# undoes a pin an interrupted run left behind. bench_cpu_unpin gives each pinned process
# back the CPU list it had; the scripts call it on exit.
BENCH_ON_REST=()
BENCH_PINNED=()   # "pid list" pairs: what to give back
bench_cpu_layout() {
  local port=$1 layout=${BENCH_LAYOUT:-pinned} cpus=() part lo hi c rest all datadir postmaster broker
  case "$layout" in
    pinned|shared) ;;
    *) die "BENCH_LAYOUT must be pinned or shared, not $layout" ;;
  esac
  command -v taskset >/dev/null || apt_install util-linux
  all=$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)
  broker=$(cat "$RUN_DIR/mosquitto-$port/pid" 2>/dev/null) || die "no pid file for the broker on port $port"
  postmaster=""
  if [ "${BENCH_PG:-dedicated}" = dedicated ]; then
    datadir=$(psql "$SILVERGUARD_PG_BASE/postgres" -qtAc 'SHOW data_directory') \
      || die "cannot ask PostgreSQL for its data directory"
    postmaster=$($SUDO head -n1 "$datadir/postmaster.pid") || die "cannot read $datadir/postmaster.pid"
  fi
  if [ "$layout" = shared ]; then
    for c in "$broker" $postmaster ${postmaster:+$(pgrep -P "$postmaster")}; do
      $SUDO taskset -a -p -c "$all" "$c" >/dev/null 2>&1 || true
    done
    log "CPU layout: shared (every process on CPU $all)"
    return 0
  fi
  if [ -z "$postmaster" ]; then
    log "CPU layout: shared (BENCH_PG=host: the machine's own server is not pinned)"
    return 0
  fi
  for part in ${all//,/ }; do
    lo=${part%-*}; hi=${part#*-}
    for ((c = lo; c <= hi; c++)); do cpus+=("$c"); done
  done
  if [ ${#cpus[@]} -lt 2 ]; then
    log "CPU layout: shared (one CPU: nothing to pin)"
    return 0
  fi
  rest=$(IFS=,; echo "${cpus[*]:1}")
  bench_cpu_pin "$broker" "${cpus[0]}" || die "cannot pin the broker ($broker) to CPU ${cpus[0]}"
  bench_cpu_pin "$postmaster" "$rest" || die "cannot pin PostgreSQL ($postmaster) to CPU $rest"
  # Running children are set here (one may exit meanwhile); new ones inherit the postmaster's.
  for c in $(pgrep -P "$postmaster"); do bench_cpu_pin "$c" "$rest" || true; done
  BENCH_ON_REST=(taskset -c "$rest")
  log "CPU layout: pinned (the broker on CPU ${cpus[0]}; PostgreSQL, the bench and silverguard on CPU $rest)"
}
# Runs the bench ("$@") as a child and waits for it, passing SIGINT, SIGTERM and SIGHUP on:
# the scripts cannot `exec` it, because their EXIT trap must give the CPUs back after it
# ends, and a signal to the script alone would otherwise leave the bench (and the
# silverguard it started) running. The bench cleans up on the first signal and ignores
# more, so a Ctrl-C that reaches both is harmless. Returns the bench's exit status.
bench_run() {
  local child status=0
  "$@" &
  child=$!
  trap 'kill -INT "$child" 2>/dev/null || true' INT
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM HUP
  # wait returns early when a trapped signal arrives; wait again until the child is gone.
  while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - INT TERM HUP
  return "$status"
}
# Pins every thread of process $1 to CPU list $2, remembering the list it had.
bench_cpu_pin() {
  local had
  had=$(taskset -c -p "$1" 2>/dev/null | awk '{print $NF}') && [ -n "$had" ] || return 1
  $SUDO taskset -a -p -c "$2" "$1" >/dev/null 2>&1 || return 1
  BENCH_PINNED+=("$1 $had")
}
bench_cpu_unpin() {
  local entry pid had c
  for entry in "${BENCH_PINNED[@]}"; do
    pid=${entry% *}; had=${entry#* }
    $SUDO taskset -a -p -c "$had" "$pid" >/dev/null 2>&1 || true
  done
  # Backends forked during the run inherited the pinned list; they get the postmaster's.
  if [ ${#BENCH_PINNED[@]} -ge 2 ]; then
    pid=${BENCH_PINNED[1]% *}; had=${BENCH_PINNED[1]#* }
    for c in $(pgrep -P "$pid"); do $SUDO taskset -a -p -c "$had" "$c" >/dev/null 2>&1 || true; done
  fi
  BENCH_PINNED=()
}
