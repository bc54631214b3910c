//! `heistctl bench --quick` end to end: the real binary starts its baselines and a real local
//! cluster (the `coordinator` and `worker` binaries next to heistctl, which `make test` builds
//! first), and the JSON report has every phase, with positive numbers, ratios and target checks.
//! It checks that the harness works, never how fast anything is.

use std::{path::Path, process::Command};

use serde_json::Value as Json;

/// Phases and the metrics each must report.
const PHASES: &[(&str, &[&str])] = &[
    ("baseline-1hop", CALL_METRICS),
    ("baseline-2hop", CALL_METRICS),
    ("routed", ROUTED_METRICS),
    (
        "exactly_once",
        &[
            "p50_with_id_vs_without",
            "p50_with_id_vs_without_min",
            "p50_with_id_vs_without_max",
            "tput_with_id_vs_without",
            "tput_with_id_vs_without_min",
            "tput_with_id_vs_without_max",
        ],
    ),
    (
        "sessions",
        &[
            "create_p50_ms",
            "create_p99_ms",
            "close_p50_ms",
            "close_p99_ms",
        ],
    ),
    (
        "diskpool",
        &[
            "on_create_p50_ms",
            "on_create_p99_ms",
            "off_create_p50_ms",
            "off_create_p99_ms",
            "polling_create_p50_ms",
            "on_close_p50_ms",
            "off_close_p50_ms",
            "polling_close_p50_ms",
            "on_vs_off",
            "on_vs_off_min",
            "on_vs_off_max",
            "on_vs_polling",
            "pairs",
        ],
    ),
    (
        "memory",
        &[
            "coordinator_idle_kib",
            "worker_idle_kib",
            "coordinator_open_kib",
            "worker_open_kib",
            "open_sessions",
        ],
    ),
    (
        "checkpoint",
        &[
            "tar_ms",
            "cp_ms",
            "capture_full_ms",
            "capture_one_ms",
            "restore_other_ms",
            "restore_in_place_ms",
            "capture_full_vs_cp",
            "capture_full_vs_cp_min",
            "capture_full_vs_cp_max",
            "capture_full_vs_cp_synced",
            "capture_full_vs_cp_synced_min",
            "capture_full_vs_cp_synced_max",
            "capture_one_vs_tar",
            "capture_one_vs_tar_min",
            "capture_one_vs_tar_max",
            "restore_other_vs_cp",
            "restore_other_vs_cp_min",
            "restore_other_vs_cp_max",
        ],
    ),
    (
        "scaling",
        &[
            "workers_1_calls_per_s",
            "workers_2_calls_per_s",
            "workers_4_calls_per_s",
            "workers_4_vs_1",
        ],
    ),
    (
        "telemetry",
        &[
            "on_calls_per_s",
            "off_calls_per_s",
            "on_vs_off",
            "on_vs_off_min",
            "on_vs_off_max",
            "on_cpu_us_per_call",
            "off_cpu_us_per_call",
            "on_vs_off_cpu_per_call",
            "spans_received",
        ],
    ),
    (
        "audit",
        &[
            "on_calls_per_s",
            "off_calls_per_s",
            "on_vs_off",
            "on_vs_off_min",
            "on_vs_off_max",
            "on_cpu_us_per_call",
            "off_cpu_us_per_call",
            "on_vs_off_cpu_per_call",
            "records_written",
        ],
    ),
    (
        "churn",
        &[
            "pairs",
            "coordinator_warm_kib",
            "coordinator_collected_kib",
            "worker_collected_kib",
            "disk_warm_kib",
            "disk_collected_kib",
            "coordinator_collected_vs_warm",
            "disk_collected_vs_warm",
        ],
    ),
];

const CALL_METRICS: &[&str] = &[
    "seq_p50_us",
    "seq_p99_us",
    "seq_mean_us",
    "tput_calls_per_s",
    "loaded_p50_us",
];

/// The call metrics, and the ratios to the 2-hop baseline measured in alternating rounds.
const ROUTED_METRICS: &[&str] = &[
    "seq_p50_us",
    "tput_calls_per_s",
    "p50_vs_2hop",
    "p50_vs_2hop_min",
    "p50_vs_2hop_max",
    "tput_vs_2hop",
    "tput_vs_2hop_min",
    "tput_vs_2hop_max",
];

/// Ratios a phase measures itself in alternating rounds (not across phases).
const PAIRED_RATIOS: &[&str] = &[
    "routed_p50_over_2hop_p50",
    "routed_tput_over_2hop_tput",
    "telemetry_on_over_off",
    "audit_on_over_off",
    "exactly_once_p50_over_plain",
    "exactly_once_tput_over_plain",
    "diskpool_create_on_over_off",
    "diskpool_create_on_over_polling",
    "capture_one_over_tar",
    "capture_full_over_cp",
    "restore_other_over_cp",
];

const RATIOS: &[&str] = &[
    "routed_p50_over_2hop_p50",
    "routed_p50_over_1hop_p50",
    "routed_tput_over_2hop_tput",
    "routed_tput_over_1hop_tput",
    "capture_one_over_tar",
    "capture_full_over_cp",
    "restore_other_over_cp",
    "telemetry_on_over_off",
    "audit_on_over_off",
    "exactly_once_p50_over_plain",
    "exactly_once_tput_over_plain",
    "diskpool_create_on_over_off",
    "diskpool_create_on_over_polling",
];

const TARGETS: &[&str] = &[
    "routed_p50_over_2hop_p50",
    "routed_tput_over_2hop_tput",
    "session_create_p50_ms",
    "capture_one_over_tar",
    "capture_full_over_cp",
    "restore_other_over_cp",
    "telemetry_on_over_off",
    "audit_on_over_off",
];

#[test]
fn quick_bench_reports_every_phase_with_ratios_and_targets() {
    let heistctl = Path::new(env!("CARGO_BIN_EXE_heistctl"));
    let bin_dir = heistctl.parent().expect("heistctl has a parent directory");
    for name in ["coordinator", "worker"] {
        assert!(
            bin_dir.join(name).is_file(),
            "{} is missing: run `cargo build --workspace --bins` first (`make test` does)",
            bin_dir.join(name).display()
        );
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let json_path = tmp.path().join("bench.json");
    let out = Command::new(heistctl)
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .expect("run heistctl bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "heistctl bench failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    for heading in ["PHASE", "RATIO", "TARGET", "routed p50 / 2-hop p50"] {
        assert!(
            stdout.contains(heading),
            "no {heading:?} in the table:\n{stdout}"
        );
    }

    let text = std::fs::read_to_string(&json_path).expect("the JSON report was written");
    let report: Json = serde_json::from_str(&text).expect("the report is JSON");

    let machine = &report["machine"];
    assert!(
        machine["nproc"].as_u64().is_some_and(|n| n >= 1),
        "{machine}"
    );
    assert!(machine["cpu_model"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(machine["kernel"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(report["settings"]["quick"], true);

    let phases = report["phases"].as_array().expect("phases");
    for (name, required) in PHASES {
        let phase = phases
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("phase {name} missing from {text}"));
        let metrics = phase["metrics"].as_array().expect("metrics");
        for metric in metrics {
            let key = metric["name"].as_str().expect("metric name");
            let value = metric["value"].as_f64().expect("metric value");
            assert!(value.is_finite(), "{name}.{key} = {value}");
            // Per-session growth is a difference of two RSS readings and may be <= 0.
            if !key.contains("delta") {
                assert!(value > 0.0, "{name}.{key} = {value} is not positive");
            }
        }
        for key in *required {
            assert!(
                metrics.iter().any(|m| m["name"] == *key),
                "{name} has no {key}: {phase}"
            );
        }
    }

    let ratios = report["ratios"].as_array().expect("ratios");
    for key in RATIOS {
        let ratio = ratios
            .iter()
            .find(|r| r["name"] == *key)
            .unwrap_or_else(|| panic!("ratio {key} missing from {text}"));
        let value = ratio["value"].as_f64().expect("ratio value");
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
        if PAIRED_RATIOS.contains(key) {
            assert_eq!(
                ratio["denominator"], "median of per-round ratios",
                "{key} is not from alternating rounds: {ratio}"
            );
        }
    }

    let targets = report["targets"].as_array().expect("targets");
    for key in TARGETS {
        let target = targets
            .iter()
            .find(|t| t["name"] == *key)
            .unwrap_or_else(|| panic!("target {key} missing from {text}"));
        assert!(target["ok"].is_boolean(), "{target}");
        assert!(
            target["value"].as_f64().is_some_and(|v| v > 0.0),
            "{target}"
        );
    }
}
