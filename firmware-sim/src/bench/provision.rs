//! The bench fleet in the registry, through the service's own admin commands (so the bench
//! exercises what an operator would do): load devices with `silverguard device add
//! --from-file -`, SOS devices with `silverguard import` of a TOML file that gives each its
//! own elder and grid worker.

use std::fmt::Write as _;
use std::path::Path;

use super::service::ServiceCmd;
use super::sos::SosTarget;
use super::BenchError;

/// Load device ids: `bench-hb-000000` ...
pub fn load_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bench-hb-{i:06}")).collect()
}

/// SOS devices and the unique grid-worker phone of each: `bench-sos-000000` → `13900000000`.
pub fn sos_targets(n: usize) -> Vec<SosTarget> {
    (0..n)
        .map(|i| SosTarget {
            device_id: format!("bench-sos-{i:06}"),
            // 139 + 8 digits: a valid mainland mobile, unique per device up to 10^8.
            phone: format!("139{i:08}"),
            index: i as u64,
        })
        .collect()
}

/// The registry import file for the SOS devices (docs/registry.md, TOML form).
pub fn sos_import_toml(targets: &[SosTarget]) -> String {
    let mut s = String::from(
        "# Written by `bracelet-sim bench`: one elder per SOS device, each with a grid worker\n\
         # whose phone belongs to no one else, so each SMS names the SOS it answers.\n",
    );
    for t in targets {
        // Infallible: writing into a String.
        let _ = write!(
            s,
            "\n[[elders]]\nref = \"BENCH-{id}\"\nname = \"Bench elder {id}\"\nlanguage = \"zh-CN\"\n\
             devices = [\"{dev}\"]\ncontacts = [\n  {{ role = \"grid_worker\", name = \"Bench worker {id}\", phone = \"{phone}\" }},\n]\n",
            id = t.index,
            dev = t.device_id,
            phone = t.phone,
        );
    }
    s
}

/// The heartbeat interval the load devices are provisioned with: what they really report
/// at in the fastest step, as a real fleet would be configured. The service's silence sweeper
/// reads each device once per `interval × silence_factor`, so a longer interval than the
/// devices keep would flatter the service. Raised only where the slowest step would leave
/// devices more than 5 intervals apart (the default silence factor is 15).
pub fn heartbeat_interval_s(devices: usize, step_rates: &[f64]) -> u64 {
    let fastest = step_rates.iter().copied().fold(0.0_f64, f64::max);
    let slowest = step_rates.iter().copied().fold(f64::INFINITY, f64::min);
    if fastest <= 0.0 || !slowest.is_finite() {
        return 60;
    }
    let fast = (devices as f64 / fastest).floor().max(1.0);
    let slow_gap = devices as f64 / slowest;
    fast.max((slow_gap / 5.0).ceil()) as u64
}

/// Provisions both fleets; `import_file` is where the TOML is written.
pub async fn provision(
    svc: &ServiceCmd,
    load: &[String],
    heartbeat_interval_s: u64,
    sos: &[SosTarget],
    import_file: &Path,
) -> Result<(), BenchError> {
    let mut list = String::with_capacity(load.len() * 16);
    for id in load {
        list.push_str(id);
        list.push('\n');
    }
    let interval = heartbeat_interval_s.max(1).to_string();
    svc.run(
        &[
            "device",
            "add",
            "--from-file",
            "-",
            "--model",
            "bench",
            "--interval-s",
            &interval,
        ],
        Some(list.as_bytes()),
    )
    .await?;
    std::fs::write(import_file, sos_import_toml(sos))
        .map_err(|e| BenchError::io(&format!("writing {}", import_file.display()), e))?;
    let file = import_file.to_string_lossy().into_owned();
    svc.run(&["import", &file, "--format", "toml"], None)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topics::is_valid_device_id;

    #[test]
    fn ids_and_phones_are_unique_and_valid() {
        let ids = load_ids(3);
        assert_eq!(
            ids,
            ["bench-hb-000000", "bench-hb-000001", "bench-hb-000002"]
        );
        let t = sos_targets(150);
        assert!(t.iter().all(|t| is_valid_device_id(&t.device_id)));
        assert_eq!(t[42].phone, "13900000042");
        let mut phones: Vec<_> = t.iter().map(|t| t.phone.clone()).collect();
        phones.sort();
        phones.dedup();
        assert_eq!(phones.len(), 150);
    }

    #[test]
    fn import_file_is_valid_toml_with_one_elder_per_device() {
        let text = sos_import_toml(&sos_targets(2));
        let doc: toml_check::Doc = toml_check::parse(&text);
        assert_eq!(doc.elders, 2);
        assert!(text.contains("devices = [\"bench-sos-000001\"]"));
        assert!(text.contains("phone = \"13900000001\""));
        assert!(text.contains("role = \"grid_worker\""));
    }

    /// Just enough structure checking without a TOML dependency in the simulator.
    mod toml_check {
        pub struct Doc {
            pub elders: usize,
        }
        pub fn parse(text: &str) -> Doc {
            let mut elders = 0;
            let mut open_brackets = 0i32;
            for line in text.lines().map(str::trim) {
                if line == "[[elders]]" {
                    assert_eq!(open_brackets, 0);
                    elders += 1;
                    continue;
                }
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                open_brackets +=
                    line.matches('[').count() as i32 - line.matches(']').count() as i32;
                if open_brackets == 0 && !line.starts_with(']') && !line.starts_with('{') {
                    assert!(line.contains(" = "), "not a key = value line: {line}");
                }
            }
            assert_eq!(open_brackets, 0);
            Doc { elders }
        }
    }
}

#[cfg(test)]
mod interval_tests {
    use super::heartbeat_interval_s;

    #[test]
    fn devices_are_provisioned_with_the_interval_they_keep_in_the_fastest_step() {
        // 100,000 devices at 48,000/s report every 2.08 s.
        assert_eq!(heartbeat_interval_s(100_000, &[40_000.0, 48_000.0]), 2);
        assert_eq!(heartbeat_interval_s(10_000, &[1_000.0]), 10);
        // Far faster than one a second still means a 1 s interval.
        assert_eq!(heartbeat_interval_s(1_000, &[50_000.0]), 1);
        // A slow first step (every 20 s) must not look silent: 20 / 5 = 4 s.
        assert_eq!(heartbeat_interval_s(100_000, &[5_000.0, 50_000.0]), 4);
    }
}
