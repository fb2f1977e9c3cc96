#!/usr/bin/env bash
# Quickstart: from a fresh Debian/Ubuntu machine to bracelets streaming into PostgreSQL.
# Installs and starts PostgreSQL and Mosquitto when missing, builds Silverguard, migrates,
# provisions a small simulated fleet, runs silverguard with it, and shows the rows arriving.
# Idempotent: run it again at any time. Ctrl-C stops the fleet and the service.
#
# Environment: QUICKSTART_DEVICES (default 50), QUICKSTART_INTERVAL (default 2s),
# QUICKSTART_SECONDS (default 0 = run until Ctrl-C), QUICKSTART_BROKER_PORT (default 18830),
# QUICKSTART_HTTP_ADDR (default 127.0.0.1:8080).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

DEVICES=${QUICKSTART_DEVICES:-50}
INTERVAL=${QUICKSTART_INTERVAL:-2s}
SECONDS_TO_RUN=${QUICKSTART_SECONDS:-0}
PORT=${QUICKSTART_BROKER_PORT:-18830}
HTTP=${QUICKSTART_HTTP_ADDR:-127.0.0.1:8080}

ensure_rust
apt_install pkg-config
ensure_postgres
ensure_broker "$PORT"

log "building (release)"
cargo build --release --workspace --locked -q
BIN="$ROOT/target/release"

export SILVERGUARD_DATABASE_URL="${SILVERGUARD_DATABASE_URL:-$SILVERGUARD_PG_BASE/silverguard}"
export SILVERGUARD_MQTT_URL="mqtt://127.0.0.1:$PORT"
export SILVERGUARD_HTTP_ADDR="$HTTP"
export SILVERGUARD_BIN="$BIN/silverguard"
export SILVERGUARD_MQTT__CLIENT_ID="silverguard-quickstart"

"$BIN/silverguard" migrate

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

log "starting silverguard (logs: .run/silverguard.log)"
"$BIN/silverguard" serve >"$RUN_DIR/silverguard.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://$HTTP/readyz" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { tail -n 30 "$RUN_DIR/silverguard.log"; die "silverguard exited"; }
  sleep 0.2
done
curl -fsS "http://$HTTP/readyz" >/dev/null || die "silverguard is not ready (see .run/silverguard.log)"

log "starting $DEVICES simulated bracelets every $INTERVAL (normal, plus SOS, fall, fever, tachycardia, malformed)"
"$BIN/bracelet-sim" run --provision --devices "$DEVICES" --interval "$INTERVAL" \
  --id-prefix qs- --scenario "normal=80,sos=4,fall=4,fever=4,tachycardia=4,malformed=4" --quiet \
  >"$RUN_DIR/bracelet-sim.log" 2>&1 &
pids+=($!)

PSQL=(psql "$SILVERGUARD_DATABASE_URL" -qtA -F ' | ')
start=$(date +%s)
while :; do
  sleep 2
  clear 2>/dev/null || true
  echo "Silverguard quickstart — $DEVICES bracelets → Mosquitto :$PORT → silverguard → PostgreSQL"
  echo "metrics: http://$HTTP/metrics   logs: .run/silverguard.log   Ctrl-C to stop"
  echo
  "${PSQL[@]}" -c "SELECT 'heartbeats: ' || count(*) FROM heartbeats" \
               -c "SELECT 'events:     ' || count(*) || '  (' || coalesce(string_agg(kind || '=' || n, ', '), '') || ')' FROM (SELECT kind, count(*) n FROM device_events GROUP BY kind) k" \
               -c "SELECT 'rejects:    ' || count(*) || '  (' || coalesce(string_agg(reason || '=' || n, ', '), '') || ')' FROM (SELECT reason, count(*) n FROM ingest_rejects GROUP BY reason) r" \
               2>/dev/null || true
  echo
  echo "latest heartbeats:"
  psql "$SILVERGUARD_DATABASE_URL" -c "SELECT device_id, to_char(ts, 'HH24:MI:SS') AS at, heart_rate_bpm AS hr, spo2_pct AS spo2, systolic_mmhg || '/' || diastolic_mmhg AS bp, skin_temp_dc/10.0 AS temp_c, steps_today AS steps, battery_pct AS bat, worn FROM heartbeats ORDER BY ts DESC LIMIT 8" 2>/dev/null || true
  kill -0 "${pids[0]}" 2>/dev/null || { tail -n 30 "$RUN_DIR/silverguard.log"; die "silverguard exited"; }
  if [ "$SECONDS_TO_RUN" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$SECONDS_TO_RUN" ]; then break; fi
done
