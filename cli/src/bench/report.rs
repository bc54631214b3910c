//! The result of a run: each phase's metrics, the ratios between phases, and the targets from
//! issue 4 checked against them; rendered as a table for people and as JSON for programs.
//! A later phase adds its metrics by name and, if it has any, a line to [`RATIOS`] or
//! [`ABSOLUTE_TARGETS`].

use serde::Serialize;

use super::{machine::Machine, settings::Settings};
use crate::output::Table;

/// One measured number.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    /// Stable key, with its unit as suffix (`seq_p50_us`).
    pub name: &'static str,
    /// For the table.
    pub label: &'static str,
    /// The value.
    pub value: f64,
    /// `us`, `ms`, `calls/s`, `KiB`, ...
    pub unit: &'static str,
}

impl Metric {
    /// A metric.
    pub fn new(name: &'static str, label: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            name,
            label,
            value,
            unit,
        }
    }
}

/// What one phase measured.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// Stable key (`baseline-1hop`, `routed`, `sessions`, `memory`, ...).
    pub name: &'static str,
    /// One-line description.
    pub title: &'static str,
    /// Its numbers, in table order.
    pub metrics: Vec<Metric>,
}

impl PhaseReport {
    /// A metric of this phase by name.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }
}

/// Which way a limit goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    /// The value must be at most the limit.
    #[serde(rename = "<=")]
    AtMost,
    /// The value must be at least the limit.
    #[serde(rename = ">=")]
    AtLeast,
}

impl Op {
    fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Self::AtMost => value <= limit,
            Self::AtLeast => value >= limit,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Self::AtMost => "<=",
            Self::AtLeast => ">=",
        }
    }
}

/// `phase.metric`.
type MetricRef = (&'static str, &'static str);

/// A ratio's target from the issue, if it sets one.
type Target = Option<(Op, f64)>;

/// A ratio to report, and its target if the issue sets one.
struct RatioSpec {
    name: &'static str,
    label: &'static str,
    numerator: MetricRef,
    denominator: MetricRef,
    target: Option<(Op, f64)>,
}

/// The ratios, cluster over baselines (for latency lower is better, for throughput higher).
const RATIOS: &[RatioSpec] = &[
    RatioSpec {
        name: "routed_p50_over_2hop_p50",
        label: "routed p50 / 2-hop p50",
        numerator: ("routed", "seq_p50_us"),
        denominator: ("baseline-2hop", "seq_p50_us"),
        target: Some((Op::AtMost, 1.3)),
    },
    RatioSpec {
        name: "routed_p50_over_1hop_p50",
        label: "routed p50 / 1-hop p50",
        numerator: ("routed", "seq_p50_us"),
        denominator: ("baseline-1hop", "seq_p50_us"),
        target: None,
    },
    RatioSpec {
        name: "routed_p99_over_2hop_p99",
        label: "routed p99 / 2-hop p99",
        numerator: ("routed", "seq_p99_us"),
        denominator: ("baseline-2hop", "seq_p99_us"),
        target: None,
    },
    RatioSpec {
        name: "routed_mean_over_2hop_mean",
        label: "routed mean / 2-hop mean",
        numerator: ("routed", "seq_mean_us"),
        denominator: ("baseline-2hop", "seq_mean_us"),
        target: None,
    },
    RatioSpec {
        name: "routed_tput_over_2hop_tput",
        label: "routed throughput / 2-hop throughput",
        numerator: ("routed", "tput_calls_per_s"),
        denominator: ("baseline-2hop", "tput_calls_per_s"),
        target: Some((Op::AtLeast, 0.75)),
    },
    RatioSpec {
        name: "routed_tput_over_1hop_tput",
        label: "routed throughput / 1-hop throughput",
        numerator: ("routed", "tput_calls_per_s"),
        denominator: ("baseline-1hop", "tput_calls_per_s"),
        target: None,
    },
    RatioSpec {
        name: "2hop_p50_over_1hop_p50",
        label: "2-hop p50 / 1-hop p50 (cost of a hop)",
        numerator: ("baseline-2hop", "seq_p50_us"),
        denominator: ("baseline-1hop", "seq_p50_us"),
        target: None,
    },
    RatioSpec {
        name: "mcp_h1_p50_over_grpc_p50",
        label: "MCP (HTTP/1.1) p50 / gRPC p50",
        numerator: ("mcp", "h1_seq_p50_us"),
        denominator: ("mcp", "grpc_seq_p50_us"),
        target: Some((Op::AtMost, 1.5)),
    },
    RatioSpec {
        name: "mcp_h2_p50_over_grpc_p50",
        label: "MCP (HTTP/2) p50 / gRPC p50",
        numerator: ("mcp", "h2_seq_p50_us"),
        denominator: ("mcp", "grpc_seq_p50_us"),
        target: Some((Op::AtMost, 1.5)),
    },
    RatioSpec {
        name: "mcp_h1_p99_over_grpc_p99",
        label: "MCP (HTTP/1.1) p99 / gRPC p99",
        numerator: ("mcp", "h1_seq_p99_us"),
        denominator: ("mcp", "grpc_seq_p99_us"),
        target: None,
    },
    RatioSpec {
        name: "mcp_h2_p99_over_grpc_p99",
        label: "MCP (HTTP/2) p99 / gRPC p99",
        numerator: ("mcp", "h2_seq_p99_us"),
        denominator: ("mcp", "grpc_seq_p99_us"),
        target: None,
    },
    RatioSpec {
        name: "mcp_h1_tput_over_grpc_tput",
        label: "MCP (HTTP/1.1) throughput / gRPC throughput",
        numerator: ("mcp", "h1_tput_calls_per_s"),
        denominator: ("mcp", "grpc_tput_calls_per_s"),
        target: None,
    },
    RatioSpec {
        name: "mcp_h2_tput_over_grpc_tput",
        label: "MCP (HTTP/2) throughput / gRPC throughput",
        numerator: ("mcp", "h2_tput_calls_per_s"),
        denominator: ("mcp", "grpc_tput_calls_per_s"),
        target: None,
    },
    RatioSpec {
        name: "telemetry_on_over_off",
        label: "traces + metrics on / both off (throughput medians)",
        numerator: ("telemetry", "on_calls_per_s"),
        denominator: ("telemetry", "off_calls_per_s"),
        target: Some((Op::AtLeast, 0.9)),
    },
    RatioSpec {
        name: "audit_on_over_off",
        label: "every call audited / executed calls not audited (throughput medians)",
        numerator: ("audit", "on_calls_per_s"),
        denominator: ("audit", "off_calls_per_s"),
        target: Some((Op::AtLeast, 0.9)),
    },
    RatioSpec {
        name: "restore_in_place_over_cp",
        label: "restore in place / cp -a (medians)",
        numerator: ("checkpoint", "restore_in_place_ms"),
        denominator: ("checkpoint", "cp_ms"),
        target: None,
    },
];

/// Ratios a phase measured itself in alternating rounds (the median of its per-round ratios):
/// (name, label, metric, target). Where one was measured it replaces the ratio of the same name
/// computed across phases.
const PAIRED: &[(&str, &str, MetricRef, Target)] = &[
    (
        "routed_p50_over_2hop_p50",
        "routed p50 / 2-hop p50 (median of alternating rounds)",
        ("routed", "p50_vs_2hop"),
        Some((Op::AtMost, 1.3)),
    ),
    (
        "routed_tput_over_2hop_tput",
        "routed throughput / 2-hop throughput (median of alternating rounds)",
        ("routed", "tput_vs_2hop"),
        Some((Op::AtLeast, 0.75)),
    ),
    (
        "telemetry_on_over_off",
        "traces + metrics on / both off (median of alternating rounds)",
        ("telemetry", "on_vs_off"),
        Some((Op::AtLeast, 0.9)),
    ),
    (
        "audit_on_over_off",
        "every call audited / executed calls not audited (median of alternating rounds)",
        ("audit", "on_vs_off"),
        Some((Op::AtLeast, 0.9)),
    ),
    (
        "exactly_once_p50_over_plain",
        "write p50 with a request id / without (median of alternating rounds)",
        ("exactly_once", "p50_with_id_vs_without"),
        None,
    ),
    (
        "exactly_once_tput_over_plain",
        "write throughput with a request id / without (median of alternating rounds)",
        ("exactly_once", "tput_with_id_vs_without"),
        None,
    ),
    (
        "capture_one_over_tar",
        "capture after 1 change / tar -cf (median of alternating rounds)",
        ("checkpoint", "capture_one_vs_tar"),
        Some((Op::AtMost, 0.05)),
    ),
    (
        "capture_full_over_cp",
        "first capture / cp -a (median of alternating rounds)",
        ("checkpoint", "capture_full_vs_cp"),
        Some((Op::AtMost, 1.2)),
    ),
    (
        "restore_other_over_cp",
        "restore on the other worker / cp -a (median of alternating rounds)",
        ("checkpoint", "restore_other_vs_cp"),
        Some((Op::AtMost, 1.2)),
    ),
    (
        "diskpool_create_on_over_off",
        "session create p50, disk pool of 4 / no pool (median of rotating rounds)",
        ("diskpool", "on_vs_off"),
        None,
    ),
    (
        "diskpool_create_on_over_polling",
        "session create p50, disk pool of 4 / polled quota (median of rotating rounds)",
        ("diskpool", "on_vs_polling"),
        None,
    ),
];

/// Targets on absolute values: (name, label, metric, op, limit).
const ABSOLUTE_TARGETS: &[(&str, &str, MetricRef, Op, f64)] = &[
    (
        "session_create_p50_ms",
        "session create p50",
        ("sessions", "create_p50_ms"),
        Op::AtMost,
        5.0,
    ),
    (
        "exec_overhead_p50_ms",
        "sandbox overhead per exec (p50)",
        ("exec", "overhead_p50_ms"),
        Op::AtMost,
        10.0,
    ),
];

/// A ratio between two metrics of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// Stable key.
    pub name: &'static str,
    /// For the table.
    pub label: &'static str,
    /// numerator / denominator.
    pub value: f64,
    /// `phase.metric`.
    pub numerator: String,
    /// `phase.metric`.
    pub denominator: String,
}

/// A target from the issue, checked.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Stable key.
    pub name: &'static str,
    /// For the table.
    pub label: &'static str,
    /// The measured value (a ratio, or in `unit`).
    pub value: f64,
    /// `x` for ratios.
    pub unit: &'static str,
    /// `<=` or `>=`.
    pub op: Op,
    /// The limit.
    pub limit: f64,
    /// Whether the target was met.
    pub ok: bool,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// How much it measured.
    pub settings: Settings,
    /// Each phase, in run order.
    pub phases: Vec<PhaseReport>,
    /// Ratios between phases.
    pub ratios: Vec<Ratio>,
    /// The targets.
    pub targets: Vec<Check>,
}

impl Report {
    /// Derives the ratios and target checks from the phases (missing metrics are skipped).
    pub fn new(machine: Machine, settings: Settings, phases: Vec<PhaseReport>) -> Self {
        let lookup = |(phase, metric): MetricRef| {
            phases
                .iter()
                .find(|p| p.name == phase)
                .and_then(|p| p.metric(metric))
        };
        let mut ratios = Vec::new();
        let mut targets = Vec::new();
        for &(name, label, metric, target) in PAIRED {
            let Some(value) = lookup(metric) else {
                continue;
            };
            ratios.push(Ratio {
                name,
                label,
                value,
                numerator: format!("{}.{}", metric.0, metric.1),
                denominator: "median of per-round ratios".to_owned(),
            });
            if let Some((op, limit)) = target {
                targets.push(Check {
                    name,
                    label,
                    value,
                    unit: "x",
                    op,
                    limit,
                    ok: op.holds(value, limit),
                });
            }
        }
        for spec in RATIOS {
            if ratios.iter().any(|r| r.name == spec.name) {
                continue;
            }
            let (Some(num), Some(den)) = (lookup(spec.numerator), lookup(spec.denominator)) else {
                continue;
            };
            if den <= 0.0 {
                continue;
            }
            let value = num / den;
            ratios.push(Ratio {
                name: spec.name,
                label: spec.label,
                value,
                numerator: format!("{}.{}", spec.numerator.0, spec.numerator.1),
                denominator: format!("{}.{}", spec.denominator.0, spec.denominator.1),
            });
            if let Some((op, limit)) = spec.target {
                targets.push(Check {
                    name: spec.name,
                    label: spec.label,
                    value,
                    unit: "x",
                    op,
                    limit,
                    ok: op.holds(value, limit),
                });
            }
        }
        for &(name, label, metric, op, limit) in ABSOLUTE_TARGETS {
            if let Some(value) = lookup(metric) {
                targets.push(Check {
                    name,
                    label,
                    value,
                    unit: "ms",
                    op,
                    limit,
                    ok: op.holds(value, limit),
                });
            }
        }
        Self {
            machine,
            settings,
            phases,
            ratios,
            targets,
        }
    }

    /// Whether every target was met.
    pub fn all_targets_met(&self) -> bool {
        self.targets.iter().all(|t| t.ok)
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let s = &self.settings;
        let mut out = format!(
            "heist bench on {}\n{} sequential calls after {} warm-up; {} in flight for {:.1} s after {:.1} s; {} session create+close pairs; {} open sessions{}\n\n",
            self.machine.summary(),
            s.calls,
            s.warmup_calls,
            s.concurrency,
            s.throughput().as_secs_f64(),
            s.throughput_warmup().as_secs_f64(),
            s.session_iterations,
            s.sessions,
            if s.quick {
                " (--quick: numbers are rough)"
            } else {
                ""
            },
        );
        let mut table = Table::new(&["PHASE", "METRIC", "VALUE"]);
        for phase in &self.phases {
            for (i, m) in phase.metrics.iter().enumerate() {
                let name = if i == 0 { phase.name } else { "" };
                table.row(vec![
                    name.to_owned(),
                    m.label.to_owned(),
                    format_value(m.value, m.unit),
                ]);
            }
        }
        out.push_str(&table.render());
        out.push('\n');
        let mut table = Table::new(&["RATIO", "VALUE"]);
        for r in &self.ratios {
            table.row(vec![r.label.to_owned(), format_value(r.value, "x")]);
        }
        out.push_str(&table.render());
        out.push('\n');
        let mut table = Table::new(&["TARGET", "VALUE", "LIMIT", "RESULT"]);
        for t in &self.targets {
            table.row(vec![
                t.label.to_owned(),
                format_value(t.value, t.unit),
                format!("{} {}", t.op.symbol(), format_value(t.limit, t.unit)),
                if t.ok { "ok" } else { "MISSED" }.to_owned(),
            ]);
        }
        out.push_str(&table.render());
        out
    }
}

/// A value with its unit, rounded for reading.
fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "x" => format!("{value:.2}x"),
        "us" => format!("{value:.1} us"),
        "ms" => format!("{value:.2} ms"),
        "calls/s" | "sessions/s" => format!("{value:.0} {unit}"),
        "" => format!("{value:.0}"),
        _ => format!("{value:.0} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(name: &'static str, metrics: &[(&'static str, f64)]) -> PhaseReport {
        PhaseReport {
            name,
            title: "t",
            metrics: metrics
                .iter()
                .map(|&(n, v)| Metric::new(n, n, v, "us"))
                .collect(),
        }
    }

    #[test]
    fn ratios_and_targets_come_from_the_phases() {
        let phases = vec![
            phase(
                "baseline-1hop",
                &[("seq_p50_us", 50.0), ("tput_calls_per_s", 20_000.0)],
            ),
            phase(
                "baseline-2hop",
                &[("seq_p50_us", 100.0), ("tput_calls_per_s", 10_000.0)],
            ),
            phase(
                "routed",
                &[("seq_p50_us", 140.0), ("tput_calls_per_s", 8000.0)],
            ),
            phase("sessions", &[("create_p50_ms", 2.0)]),
        ];
        let report = Report::new(Machine::detect(), Settings::quick(), phases);
        let ratio = |name| {
            report
                .ratios
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.value)
        };
        assert_eq!(ratio("routed_p50_over_2hop_p50"), Some(1.4));
        assert_eq!(ratio("routed_p50_over_1hop_p50"), Some(2.8));
        assert_eq!(ratio("routed_tput_over_2hop_tput"), Some(0.8));
        assert_eq!(
            ratio("routed_p99_over_2hop_p99"),
            None,
            "missing metrics are skipped"
        );
        let checks: Vec<(&str, bool)> = report.targets.iter().map(|t| (t.name, t.ok)).collect();
        assert_eq!(
            checks,
            [
                ("routed_p50_over_2hop_p50", false),
                ("routed_tput_over_2hop_tput", true),
                ("session_create_p50_ms", true)
            ]
        );
        assert!(!report.all_targets_met());
        let table = report.render();
        assert!(
            table.contains("MISSED") && table.contains("1.40x"),
            "{table}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["targets"][0]["op"], "<=");
    }

    #[test]
    fn checkpoint_targets_come_from_the_rounds_once() {
        // The medians' ratio (1600 / 800 = 2.0) would miss; the per-round ratios decide.
        let phases = vec![phase(
            "checkpoint",
            &[
                ("tar_ms", 400.0),
                ("cp_ms", 800.0),
                ("capture_full_ms", 1600.0),
                ("capture_one_ms", 40.0),
                ("restore_other_ms", 1600.0),
                ("capture_full_vs_cp", 1.1),
                ("capture_one_vs_tar", 0.04),
                ("restore_other_vs_cp", 1.3),
            ],
        )];
        let report = Report::new(Machine::detect(), Settings::quick(), phases);
        let checks: Vec<(&str, f64, f64, bool)> = report
            .targets
            .iter()
            .map(|t| (t.name, t.value, t.limit, t.ok))
            .collect();
        assert_eq!(
            checks,
            [
                ("capture_one_over_tar", 0.04, 0.05, true),
                ("capture_full_over_cp", 1.1, 1.2, true),
                ("restore_other_over_cp", 1.3, 1.2, false),
            ]
        );
        assert!(
            report
                .ratios
                .iter()
                .filter(|r| r.name.starts_with("capture_") || r.name == "restore_other_over_cp")
                .all(|r| r.denominator == "median of per-round ratios"),
            "{:?}",
            report.ratios
        );
    }

    #[test]
    fn values_are_rounded_for_reading() {
        assert_eq!(format_value(1.234, "x"), "1.23x");
        assert_eq!(format_value(85.26, "us"), "85.3 us");
        assert_eq!(format_value(12_345.6, "calls/s"), "12346 calls/s");
        assert_eq!(format_value(2048.0, "KiB"), "2048 KiB");
    }
}
