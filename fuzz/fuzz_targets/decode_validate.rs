//! Topic + protobuf payload through validation; the checks live in
//! `silverguard_core::fuzzing::decode` so `cargo test` replays the corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    silverguard_core::fuzzing::check_decode_validate(data);
});
