//! Writes the fuzz targets' seed inputs into `fuzz/corpus/<target>/seed-<name>`
//! (docs/fuzzing.md). Run after changing an input layout in `silverguard_core::fuzzing`:
//! `cargo run -p silverguard-core --example fuzz_seeds [corpus dir]`.

use std::path::PathBuf;

use silverguard_core::fuzzing::{seeds, TARGETS};

fn main() -> std::io::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"));
    for (target, _) in TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let seeds = seeds::seeds(target);
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{}: {} seeds", dir.display(), seeds.len());
    }
    Ok(())
}
