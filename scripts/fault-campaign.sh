#!/usr/bin/env bash
# The long fault campaign (issue 6, docs/reliability.md "The fault campaign"): the tests of
# tests/integration/faults.rs with a bigger fleet and longer streams, each fault injected
# three times per stream, for several rounds, against release builds; then, with
# --throughput, the several-instances benchmark (1, 2 and 3 `silverguard serve` sharing the
# stream). Every test prints a FAULT-RESULT line; they are collected into
# target/fault-campaign/results.jsonl and summed up at the end.
#
# Usage: scripts/fault-campaign.sh [--scale N] [--rounds R] [--only NAME] [--throughput]
#                                  [--throughput-only]
#   scripts/fault-campaign.sh                      # scale 10, 3 rounds (over an hour; not run yet)
#   scripts/fault-campaign.sh --scale 3 --rounds 1 --only kill_9
#   scripts/fault-campaign.sh --throughput-only    # just the 1 vs 2 vs 3 instances bench
# Environment: BENCH_BROKER_PORT (18842) for the throughput bench; BENCH_STEPS (the ramp,
#   default 8000,12000,16000,20000,24000: past one instance's ceiling on a 2-core
#   machine), BENCH_DEVICES (20000).
# Exit status: 0 every round passed, 1 a test failed or something could not run.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

SCALE=10
ROUNDS=3
ONLY=""
FAULTS=1
THROUGHPUT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --throughput) THROUGHPUT=1; shift ;;
    --throughput-only) THROUGHPUT=1; FAULTS=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

OUT=target/fault-campaign
mkdir -p "$OUT"

ensure_rust
ensure_postgres
command -v mosquitto >/dev/null || apt_install mosquitto
command -v mosquitto_pub >/dev/null || apt_install mosquitto-clients
ensure_smtp_tools
# The PostgreSQL fault runs a private cluster with the server binaries (initdb, pg_ctl).
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || apt_install postgresql

failed=0
if [ "$FAULTS" -eq 1 ]; then
  export SILVERGUARD_TEST_PG_BASE="$SILVERGUARD_PG_BASE"
  export SILVERGUARD_FAULT_SCALE="$SCALE"
  log "cargo test --release --test integration --no-run"
  cargo test --release --locked --test integration --no-run
  : > "$OUT/results.jsonl"
  for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS: faults at scale $SCALE ${ONLY:+(only $ONLY)}"
    # One test at a time: each fault wants the machine to itself.
    if cargo test --release --locked --test integration "faults::${ONLY}" \
        -- --nocapture --test-threads=1 2>&1 | tee "$OUT/round-$round.log"; then
      :
    else
      failed=1
      log "round $round failed (see $OUT/round-$round.log)"
    fi
    grep -h '^FAULT-RESULT ' "$OUT/round-$round.log" | sed 's/^FAULT-RESULT //' \
      | sed "s/^{/{\"round\":$round,/" >> "$OUT/results.jsonl" || true
  done
  python3 - "$OUT/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'fault':<34} {'rd':>2} {'hb published':>12} {'stored':>8} {'dup':>4} {'SOS':>5} "
      f"{'alerts':>6} {'notif.':>6} {'resent':>6} {'failed att.':>11} {'recovery s':>10}")
for r in rows:
    print(f"{r['fault']:<34} {r['round']:>2} {r['heartbeats_published']:>12} "
          f"{r['heartbeats_stored']:>8} {r['heartbeat_duplicates']:>4} {r['sos_published']:>5} "
          f"{r['sos_alerts']:>6} {r['notifications_sent']:>6} "
          f"{r['sms_resent'] + r['emails_resent']:>6} {r['failed_delivery_attempts']:>11} "
          f"{r['recovery_s']:>10.1f}")
    for n in r.get("notes", []):
        print(f"    {n}")
EOF
fi

if [ "$THROUGHPUT" -eq 1 ]; then
  PORT=${BENCH_BROKER_PORT:-18842}
  STEPS=${BENCH_STEPS:-8000,12000,16000,20000,24000}
  DEVICES=${BENCH_DEVICES:-20000}
  ensure_broker "$PORT"
  log "cargo build --release -p firmware-sim -p silverguard"
  cargo build --release --locked -p firmware-sim -p silverguard
  for n in 1 2 3; do
    log "bench: $n instance(s) sharing the stream, ramp $STEPS hb/s"
    # Exit 2 (a loss) is a finding to report, not a reason to skip the other runs.
    target/release/bracelet-sim bench \
      --mqtt-url "mqtt://127.0.0.1:$PORT" \
      --pg-base "$SILVERGUARD_PG_BASE" \
      --silverguard-bin target/release/silverguard \
      --service-log "$OUT/instances-$n-silverguard.log" \
      --devices "$DEVICES" --connections 8 --steps "$STEPS" \
      --warmup 5s --duration 15s --sos-rate 1 --idle-sos 5 \
      --instances "$n" --json "$OUT/instances-$n.json" \
      | tee "$OUT/instances-$n.txt" || failed=1
  done
  python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
runs = {}
for n in (1, 2, 3):
    p = os.path.join(out, f"instances-{n}.json")
    if os.path.exists(p):
        runs[n] = json.load(open(p))
if 1 not in runs:
    sys.exit("no single-instance run to compare with")
base = runs[1]["heartbeats"]["committed_per_s"]
print()
print("instances  best committed/s  vs 1 instance  sg CPU (all)  peak RSS (all)  "
      "per instance committed/s (best step)  SOS p99 ms  lost")
for n, r in sorted(runs.items()):
    best = max(r["steps"], key=lambda s: s["committed_per_s"])
    each = " | ".join(f"{i['committed_per_s']:.0f}" for i in best.get("instances", []))
    u = r["usage"]
    cpu = best.get("service_cpu_percent")
    cpu = "-" if cpu is None else "%.0f %%" % cpu
    rss = u.get("service_peak_rss_mib")
    rss = "-" if rss is None else "%.0f MiB" % rss
    rate = r["heartbeats"]["committed_per_s"]
    p99 = r["sos_loaded"]["latency"].get("p99_ms") or 0
    print(f"{n:>9}  {rate:>16.0f}  {rate / base:>12.2f}x  {cpu:>12}  {rss:>14}  "
          f"{each:>36}  {p99:>10.0f}  {r['heartbeats']['lost']:>4}")
EOF
fi

exit "$failed"
