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

export SILVERGUARD_TEST_PG_BASE="$SILVERGUARD_PG_BASE"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
cargo test --workspace --locked -- "$@"
log "all tests passed"
