#!/usr/bin/env bash
# Issue 5's benchmark, end to end on this machine: the limits (broker pass-through,
# psql \copy, a naive INSERT-per-message bridge) and a ramp of offered heartbeat rates
# against `silverguard serve`, in one run; then the plot (docs/performance.md).
#
# Usage: scripts/bench-ramp.sh [bench flags...]
#   scripts/bench-ramp.sh                                   # 100k bracelets, 5k..60k hb/s
#   scripts/bench-ramp.sh --devices 200000 --connections 32
#   scripts/bench-ramp.sh --steps 5000,10000 --duration 10s # anything `bracelet-sim bench` takes
# Environment: BENCH_BROKER_PORT (18840), BENCH_JSON (target/bench/ramp.json),
#   BENCH_PNG (target/bench/ramp.png; pass docs/performance-ramp.png to update the docs),
#   BENCH_PG: "dedicated" (default) runs PostgreSQL cluster "silverguard-bench" on
#   BENCH_PG_PORT (5442) with deploy/postgresql-silverguard.conf, the settings
#   docs/deployment.md recommends; "host" uses the machine's own server as it is configured.
#   BENCH_LAYOUT: "pinned" (default) runs the broker alone on one CPU and PostgreSQL, the
#   bench and silverguard on the others, as docs/deployment.md recommends for a small node;
#   "shared" lets every process run on every CPU (scripts/lib.sh, bench_cpu_layout).
# Exit status: 0 pass, 2 an SOS or a heartbeat was lost, 1 the bench could not run.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

PORT=${BENCH_BROKER_PORT:-18840}
JSON=${BENCH_JSON:-target/bench/ramp.json}
PNG=${BENCH_PNG:-target/bench/ramp.png}

ensure_rust
ensure_bench_server dedicated
ensure_broker "$PORT"
command -v python3 >/dev/null || apt_install python3
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip

log "cargo build --release -p firmware-sim -p silverguard"
cargo build --release --locked -p firmware-sim -p silverguard

mkdir -p "$(dirname "$JSON")" "$(dirname "$PNG")" target/bench
trap bench_cpu_unpin EXIT
bench_cpu_layout "$PORT"
log "bracelet-sim bench (ramp) $*"
status=0
# The bench on one runtime thread, as in every run of docs/performance.md since the fourth
# round: it leaves more of the two cores to the broker, PostgreSQL and silverguard.
# After the ramp, up to three refinement steps (--refine, the default) halve the gap between
# the highest sustained rate and the first one that was not.
TOKIO_WORKER_THREADS="${TOKIO_WORKER_THREADS:-1}" bench_run "${BENCH_ON_REST[@]}" target/release/bracelet-sim bench \
  --mqtt-url "mqtt://127.0.0.1:$PORT" \
  --pg-base "$SILVERGUARD_PG_BASE" \
  --silverguard-bin target/release/silverguard \
  --service-log target/bench/ramp-silverguard.log \
  --devices 100000 --connections 16 \
  --steps 5000,10000,15000,20000,25000,30000,40000,50000,60000 \
  --warmup 5s --duration 20s --sos-rate 2 --idle-sos 10 \
  --baselines all \
  --json "$JSON" \
  "$@" || status=$?
[ "$status" -le 2 ] && [ -s "$JSON" ] || exit "$status"
export PIP_ROOT_USER_ACTION=ignore
python3 scripts/bench-plot.py "$JSON" "$PNG"
exit "$status"
