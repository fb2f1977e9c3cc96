#!/usr/bin/env bash
# Runs every test against real PostgreSQL and Mosquitto, installing and starting them when
# missing. Usage: scripts/test.sh   (idempotent; CI runs exactly this via .ci/run)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_rust
ensure_postgres
# Each integration test starts its own broker from deploy/mosquitto.conf on a free port.
command -v mosquitto >/dev/null || apt_install mosquitto
command -v mosquitto_pub >/dev/null || apt_install mosquitto-clients
# The notification tests run a real SMTP server (aiosmtpd) and make TLS certificates.
ensure_smtp_tools
# The console's browser test drives headless Chromium through chromedriver.
ensure_chromium
# The HTTPS test runs nginx from deploy/nginx-silverguard.conf in front of the service.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || apt_install nginx

export SILVERGUARD_TEST_PG_BASE="$SILVERGUARD_PG_BASE"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
cargo test --workspace --locked -- "$@"
# The bench's smoke version: a few seconds of load with SOS on top, end to end through the
# built binaries, asserting zero loss (not speed; performance runs are scripts/bench.sh).
SMOKE_PORT=${SILVERGUARD_SMOKE_BROKER_PORT:-18841}
ensure_broker "$SMOKE_PORT"
mkdir -p target/bench
log "bracelet-sim bench --smoke"
cargo run -q --locked -p firmware-sim --bin bracelet-sim -- bench --smoke \
  --mqtt-url "mqtt://127.0.0.1:$SMOKE_PORT" \
  --pg-base "$SILVERGUARD_PG_BASE" \
  --silverguard-bin target/debug/silverguard \
  --service-log target/bench/smoke-silverguard.log \
  --json target/bench/smoke.json
# Both binaries are built now (bracelet-sim by the smoke run above).
log "README --help transcripts"
python3 scripts/readme-help.py --check
# Bounded fuzzing of both cargo-fuzz targets on the committed corpus (docs/fuzzing.md). The
# build is kept outside the checkout so that CI on the same machine reuses it: cold, installing
# cargo-fuzz and building libFuzzer costs a few minutes; warm, about a minute.
log "bounded fuzzing"
FUZZ_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/silverguard/fuzz-target}" \
  scripts/fuzz.sh "${SILVERGUARD_FUZZ_SECONDS:-15}"
log "all tests passed"
