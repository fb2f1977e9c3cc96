//! The checks behind the fuzz targets in `fuzz/` (docs/fuzzing.md), shared with `cargo test`.
//!
//! Each target is one function here that turns raw bytes into calls of the code under test
//! and asserts what must hold for every input, against an independent model rather than
//! "it did not panic". The cargo-fuzz targets are thin wrappers around them, and the unit
//! test below replays both committed corpora through the same functions on stable, so an
//! input that once failed keeps being checked without nightly.
//!
//! Not an API: the byte layouts change whenever the checks need them to (then regenerate
//! the seeds: `cargo run -p silverguard-core --example fuzz_seeds`).

pub mod bytes;
pub mod decode;
pub mod rules;
pub mod seeds;

pub use decode::check_decode_validate;
pub use rules::check_rule_eval;

pub type Check = fn(&[u8]);

/// The fuzz targets by name (also the corpus directories under `fuzz/corpus/`).
pub const TARGETS: [(&str, Check); 2] = [
    ("decode_validate", check_decode_validate),
    ("rule_eval", check_rule_eval),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn seeds_pass_their_checks() {
        for (target, check) in TARGETS {
            let seeds = seeds::seeds(target);
            assert!(seeds.len() >= 10, "{target}");
            for (name, bytes) in seeds {
                eprintln!("{target}/{name}");
                check(&bytes);
            }
        }
    }

    /// Replays every committed corpus file (seeds and what libFuzzer found) on stable.
    #[test]
    fn committed_corpora_replay_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, check) in TARGETS {
            let dir = root.join(target);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(
                files.len() >= seeds::seeds(target).len(),
                "{} holds {} files, fewer than the seeds",
                dir.display(),
                files.len()
            );
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                let r = std::panic::catch_unwind(|| check(&bytes));
                assert!(r.is_ok(), "{} fails its check", f.display());
            }
        }
    }
}
