#!/usr/bin/env bash
# Quickstart: from a fresh Debian/Ubuntu machine to bracelets streaming into PostgreSQL and
# alerts reaching people. Installs and starts PostgreSQL and Mosquitto when missing, builds
# Silverguard, migrates, imports a registry for a small simulated fleet (elders, grid workers,
# guardians), starts a local SMTP sink that keeps every mail in .run/mail, runs silverguard
# and the fleet, and shows rows, alerts and mails arriving.
# Idempotent: run it again at any time. Ctrl-C stops the fleet, the service and the SMTP sink.
#
# Environment: QUICKSTART_DEVICES (default 50), QUICKSTART_INTERVAL (default 2s),
# QUICKSTART_SECONDS (default 0 = run until Ctrl-C), QUICKSTART_BROKER_PORT (default 18830),
# QUICKSTART_HTTP_ADDR (default 127.0.0.1:8080), QUICKSTART_SMTP_PORT (default 18825),
# SILVERGUARD_DATABASE_URL (default: database "silverguard" on 127.0.0.1:5432).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

DEVICES=${QUICKSTART_DEVICES:-50}
INTERVAL=${QUICKSTART_INTERVAL:-2s}
SECONDS_TO_RUN=${QUICKSTART_SECONDS:-0}
PORT=${QUICKSTART_BROKER_PORT:-18830}
HTTP=${QUICKSTART_HTTP_ADDR:-127.0.0.1:8080}
SMTP_PORT=${QUICKSTART_SMTP_PORT:-18825}
SCENARIOS="normal=80,sos=4,fall=4,fever=4,tachycardia=4,malformed=4"
MAILDIR="$RUN_DIR/mail"

ensure_rust
apt_install pkg-config
ensure_postgres
ensure_broker "$PORT"
ensure_smtp_tools

log "building (release)"
cargo build --release --workspace --locked -q
BIN="$ROOT/target/release"

export SILVERGUARD_DATABASE_URL="${SILVERGUARD_DATABASE_URL:-$SILVERGUARD_PG_BASE/silverguard}"
export SILVERGUARD_MQTT_URL="mqtt://127.0.0.1:$PORT"
export SILVERGUARD_HTTP_ADDR="$HTTP"
export SILVERGUARD_MQTT__CLIENT_ID="silverguard-quickstart"
# Mail goes to the local sink; SMS stays unconfigured (notify.sms.provider = "none"), so every
# SMS fails at once and falls back to email where the contact was not mailed already.
export SILVERGUARD_SMTP_URL="smtp://127.0.0.1:$SMTP_PORT?tls=none"
# Acknowledge links in the mails point at this instance.
export SILVERGUARD_ALERTS__PUBLIC_URL="http://$HTTP"

"$BIN/silverguard" migrate

# A demo community: the region tree (city > district > communities > grids), one elder per
# simulated bracelet with the people who answer for them (docs/registry.md), and console
# users. The import provisions the bracelets and binds them; running it again changes nothing.
log "importing the demo community (.run/quickstart-regions.csv, .run/quickstart-registry.csv)"
"$ROOT/scripts/quickstart_registry.sh" --regions "$DEVICES" > "$RUN_DIR/quickstart-regions.csv"
"$BIN/silverguard" import "$RUN_DIR/quickstart-regions.csv"
"$BIN/bracelet-sim" ids --devices "$DEVICES" --id-prefix qs- --scenario "$SCENARIOS" --with-scenario \
  | "$ROOT/scripts/quickstart_registry.sh" > "$RUN_DIR/quickstart-registry.csv"
"$BIN/silverguard" import "$RUN_DIR/quickstart-registry.csv"

# Console users of the demo, all with the same password (a local demo only: docs/console.md
# says how to make real ones). The grid worker and the guardian are the registry contacts the
# alerts notify, so the console shows them what their SMS and mail are about.
DEMO_PASSWORD=${QUICKSTART_PASSWORD:-silverguard-demo}
contact_by_phone() {
  psql "$SILVERGUARD_DATABASE_URL" -qtA -c "SELECT id FROM contacts WHERE phone LIKE '%$1' ORDER BY id LIMIT 1"
}
log "console users: admin, supervisor, grid1, guardian (password: $DEMO_PASSWORD)"
export SILVERGUARD_NEW_PASSWORD="$DEMO_PASSWORD"
"$BIN/silverguard" user add admin --role admin --name "管理员" >/dev/null
"$BIN/silverguard" user add supervisor --role supervisor --region qs-xh --name "街道孙科长" >/dev/null
"$BIN/silverguard" user add grid1 --role grid_worker --region qs-g0 --name "王芳" \
  --contact "$(contact_by_phone 19900001000)" >/dev/null
"$BIN/silverguard" user add guardian --role guardian --name "王伟" \
  --contact "$(contact_by_phone 19910000000)" >/dev/null
unset SILVERGUARD_NEW_PASSWORD
# A week of care work so the compliance columns are not all red: the first grid's elders were
# visited once, half of them called twice.
psql "$SILVERGUARD_DATABASE_URL" -q -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
INSERT INTO care_contacts (elder_id, kind, at, by_user_id, by_name, notes)
SELECT e.id, k.kind, now() - k.ago, u.id, u.display_name, '例行探访，老人状态良好'
  FROM elders e
  JOIN regions r ON r.id = e.region_id AND r.code = 'qs-g0'
  JOIN users u ON u.username = 'grid1'
  CROSS JOIN (VALUES ('visit', interval '1 hour'), ('call', interval '2 hours'),
                     ('call', interval '3 hours')) AS k(kind, ago)
 WHERE (k.kind = 'visit' OR e.id % 2 = 0)
   AND NOT EXISTS (SELECT 1 FROM care_contacts c WHERE c.elder_id = e.id);
SQL

pids=()
sink=""
cleanup() {
  trap - EXIT INT TERM
  # The fleet and the service first (silverguard finishes the deliveries in progress), then
  # the SMTP sink they deliver to.
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ -n "$sink" ]; then kill -TERM "$sink" 2>/dev/null || true; wait "$sink" 2>/dev/null || true; fi
  rm -f "$RUN_DIR/smtp-sink.pid"
}
trap cleanup EXIT INT TERM

# A sink left behind by an earlier run that was killed would hold the port.
if [ -f "$RUN_DIR/smtp-sink.pid" ] && kill -0 "$(cat "$RUN_DIR/smtp-sink.pid")" 2>/dev/null \
   && grep -q smtp_sink "/proc/$(cat "$RUN_DIR/smtp-sink.pid")/cmdline" 2>/dev/null; then
  kill -TERM "$(cat "$RUN_DIR/smtp-sink.pid")" 2>/dev/null || true
  sleep 0.5
fi
log "starting the SMTP sink on 127.0.0.1:$SMTP_PORT (mails: .run/mail/*.json)"
python3 "$ROOT/scripts/smtp_sink.py" --port "$SMTP_PORT" --maildir "$MAILDIR" \
  >"$RUN_DIR/smtp-sink.log" 2>&1 &
sink=$!
echo "$sink" > "$RUN_DIR/smtp-sink.pid"
for _ in $(seq 1 50); do
  grep -q listening "$RUN_DIR/smtp-sink.log" 2>/dev/null && break
  kill -0 "$sink" 2>/dev/null || { cat "$RUN_DIR/smtp-sink.log"; die "the SMTP sink exited (port $SMTP_PORT in use?)"; }
  sleep 0.2
done
grep -q listening "$RUN_DIR/smtp-sink.log" || die "the SMTP sink did not start (see .run/smtp-sink.log)"

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
"$BIN/bracelet-sim" run --devices "$DEVICES" --interval "$INTERVAL" \
  --id-prefix qs- --scenario "$SCENARIOS" --quiet \
  >"$RUN_DIR/bracelet-sim.log" 2>&1 &
pids=("$!" "${pids[@]}")
SERVICE=${pids[1]}

PSQL=(psql "$SILVERGUARD_DATABASE_URL" -qtA -F ' | ')
start=$(date +%s)
touch "$RUN_DIR/quickstart.started"
while :; do
  sleep 2
  clear 2>/dev/null || true
  echo "Silverguard quickstart — $DEVICES bracelets → Mosquitto :$PORT → silverguard → PostgreSQL → mail in .run/mail"
  echo "console: http://$HTTP/  (grid1, supervisor, guardian or admin / $DEMO_PASSWORD)"
  echo "API: http://$HTTP/api/v1/openapi.json   metrics: http://$HTTP/metrics   logs: .run/silverguard.log   Ctrl-C to stop"
  echo
  "${PSQL[@]}" -c "SELECT 'heartbeats: ' || count(*) FROM heartbeats" \
               -c "SELECT 'events:     ' || count(*) || '  (' || coalesce(string_agg(kind || '=' || n, ', '), '') || ')' FROM (SELECT kind, count(*) n FROM device_events GROUP BY kind) k" \
               -c "SELECT 'rejects:    ' || count(*) || '  (' || coalesce(string_agg(reason || '=' || n, ', '), '') || ')' FROM (SELECT reason, count(*) n FROM ingest_rejects GROUP BY reason) r" \
               -c "SELECT 'outbox:     ' || coalesce(string_agg(channel || ' ' || status || '=' || n, ', ' ORDER BY channel, status), '') FROM (SELECT channel, status, count(*) n FROM outbox GROUP BY 1, 2) o" \
               2>/dev/null || true
  echo "mails:      $(find "$MAILDIR" -maxdepth 1 -name '*.json' -newer "$RUN_DIR/quickstart.started" 2>/dev/null | wc -l) this run in .run/mail"
  echo
  echo "latest heartbeats:"
  psql "$SILVERGUARD_DATABASE_URL" -c "SELECT device_id, to_char(ts, 'HH24:MI:SS') AS at, heart_rate_bpm AS hr, spo2_pct AS spo2, systolic_mmhg || '/' || diastolic_mmhg AS bp, round(skin_temp_dc/10.0, 1) AS temp_c, steps_today AS steps, battery_pct AS bat, worn FROM heartbeats ORDER BY ts DESC LIMIT 8" 2>/dev/null || true
  echo "active alerts (silverguard alert list; details: silverguard alert show ID):"
  "$BIN/silverguard" alert list --limit 10 2>/dev/null || true
  kill -0 "$SERVICE" 2>/dev/null || { tail -n 30 "$RUN_DIR/silverguard.log"; die "silverguard exited"; }
  if [ "$SECONDS_TO_RUN" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$SECONDS_TO_RUN" ]; then break; fi
done
