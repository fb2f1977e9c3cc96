#!/usr/bin/env bash
# One load step end to end on this machine (issue 3's SOS -> SMS latency under load; issue 5's
# soak): builds release, ensures PostgreSQL and a broker from deploy/mosquitto.conf, runs
# `bracelet-sim bench` and writes target/bench/sos-latency.json (docs/performance.md).
# The rate ramp with the broker/COPY/naive limits and the plot is scripts/bench-ramp.sh.
#
# Usage: scripts/bench.sh [bench flags...]
#   scripts/bench.sh                      # the standard run: 5,000 hb/s, 60 s measured
#   scripts/bench.sh --smoke              # ~20 s, asserts zero loss (CI)
#   scripts/bench.sh --rate 8000 --duration 2m
#   scripts/bench.sh --rate 10000 --devices 100000 --connections 16 --duration 5m   # soak
# Environment: BENCH_BROKER_PORT (18840), BENCH_JSON (target/bench/sos-latency.json),
#   BENCH_PG: "dedicated" (default) runs PostgreSQL cluster "silverguard-bench" on
#   BENCH_PG_PORT (5442) with deploy/postgresql-silverguard.conf, the settings
#   docs/deployment.md recommends; "host" uses the machine's own server as it is configured.
#   BENCH_LAYOUT: "pinned" (default, but not with --smoke) runs the broker alone on one CPU
#   and PostgreSQL, the bench and silverguard on the others, as docs/deployment.md
#   recommends for a small node; "shared" lets every process run on every CPU.
# Exit status: 0 pass, 2 an SOS or a heartbeat was lost, 1 the bench could not run.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

PORT=${BENCH_BROKER_PORT:-18840}
JSON=${BENCH_JSON:-target/bench/sos-latency.json}

ensure_rust
ensure_bench_server dedicated
ensure_broker "$PORT"

log "cargo build --release -p firmware-sim -p silverguard"
cargo build --release --locked -p firmware-sim -p silverguard

mkdir -p "$(dirname "$JSON")" target/bench
# The smoke run asserts zero loss, not speed, and CI's other jobs should not find the
# machine's processes pinned.
case " $* " in *" --smoke "*) BENCH_LAYOUT=shared ;; esac
trap bench_cpu_unpin EXIT
bench_cpu_layout "$PORT"
log "bracelet-sim bench $*"
bench_run "${BENCH_ON_REST[@]}" target/release/bracelet-sim bench \
  --mqtt-url "mqtt://127.0.0.1:$PORT" \
  --pg-base "$SILVERGUARD_PG_BASE" \
  --silverguard-bin target/release/silverguard \
  --service-log target/bench/silverguard.log \
  --json "$JSON" \
  "$@"
