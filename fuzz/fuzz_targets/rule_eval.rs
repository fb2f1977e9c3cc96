//! Heartbeat streams through the rule state machines; the checks live in
//! `silverguard_core::fuzzing::rules` so `cargo test` replays the corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    silverguard_core::fuzzing::check_rule_eval(data);
});
