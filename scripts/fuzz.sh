#!/usr/bin/env bash
# Bounded fuzzing of every cargo-fuzz target in fuzz/ on the committed corpus; fails on any
# crash or broken invariant. Usage: scripts/fuzz.sh [seconds-per-target]   (default 20)
#
# Needs the nightly toolchain (already installed, it cannot be downloaded here) and
# cargo-fuzz (installed from crates.io when missing). The committed corpus is only read:
# what libFuzzer finds goes to a scratch directory, so a CI run leaves the tree as it was.
# Long runs, minimising and adding a crash to the corpus: docs/fuzzing.md.
#
# FUZZ_SANITIZER=address|none (default none: the code is safe Rust, the targets look for
# panics and broken invariants, which need no sanitizer; see docs/fuzzing.md).
# FUZZ_TARGET_DIR (default fuzz/target): a directory outside the checkout keeps the build
# (libFuzzer's C++ included) between CI runs on the same machine.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT/fuzz"

SECONDS_PER_TARGET=${1:-20}
SANITIZER=${FUZZ_SANITIZER:-none}
case "$SECONDS_PER_TARGET" in '' | *[!0-9]*) die "seconds-per-target must be a number, got $SECONDS_PER_TARGET" ;; esac

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
T0=$(now)

ensure_rust
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  msg="the nightly toolchain is not installed (rustup toolchain list), and it cannot be downloaded on this machine: fuzzing needs it (libFuzzer's coverage instrumentation)"
  if [ "${CI:-}" = true ]; then die "$msg"; fi
  printf '\033[1;33mSKIPPED:\033[0m %s\n' "$msg" >&2
  exit 0
fi
log "nightly: $(rustup run nightly rustc --version) ($(since "$T0"))"

if ! cargo fuzz --version >/dev/null 2>&1; then
  T=$(now)
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
  log "cargo-fuzz installed in $(since "$T")"
fi
log "$(cargo fuzz --version)"

TARGETS=$(cargo +nightly fuzz list)
# Overflow checks come from fuzz/Cargo.toml's release profile; -a adds debug assertions.
FUZZ_FLAGS=(--release --debug-assertions --sanitizer "$SANITIZER"
  --target-dir "${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}")

T=$(now)
log "building the fuzz targets (sanitizer $SANITIZER)"
cargo +nightly fuzz build "${FUZZ_FLAGS[@]}"
log "built in $(since "$T")"

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
for target in $TARGETS; do
  [ -d "corpus/$target" ] || die "fuzz/corpus/$target is missing (docs/fuzzing.md says how to seed it)"
  mkdir -p "$SCRATCH/$target"
  T=$(now)
  log "fuzzing $target for ${SECONDS_PER_TARGET}s on $(find "corpus/$target" -type f | wc -l) corpus files"
  # The first corpus directory receives new inputs, the committed one is only read.
  # libFuzzer exits non-zero on a crash, leaving the input in fuzz/artifacts/$target/.
  if ! cargo +nightly fuzz run "${FUZZ_FLAGS[@]}" "$target" "$SCRATCH/$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 2>"$SCRATCH/$target.log"; then
    tail -n 60 "$SCRATCH/$target.log" >&2
    for a in "artifacts/$target"/*; do
      [ -f "$a" ] && printf 'crash input %s (base64): %s\n' "$a" "$(base64 -w0 "$a")" >&2
    done
    die "fuzz target $target failed: reproduce with (cd fuzz && cargo +nightly fuzz run -a -s $SANITIZER $target <input>), see docs/fuzzing.md"
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$SCRATCH/$target.log" | grep -o '[0-9]*$' || echo '?')
  log "$target: $runs runs, $(find "$SCRATCH/$target" -type f | wc -l) new inputs, no failure ($(since "$T"))"
done
log "fuzzing passed in $(since "$T0")"
