//! The report of a relocation, rebuilt from its journal.
//!
//! Everything in it comes from the journal (times, states, attempts, what
//! each step measured and produced) and from the plan (endpoint map, config
//! files), so `fluidcloud report ID` gives the same answer any time later.
//! Downtime is measured, not estimated: from the moment `stop-source`
//! started to the moment `cutover` succeeded.

use std::collections::BTreeMap;

use fluidcloud_viaduct::journal::{Entry, Outcome, Record};
use fluidcloud_viaduct::{Journal as _, SqliteJournal, StepState};
use serde::{Deserialize, Serialize};

use super::clock::Moment;
use super::{EndpointChange, Relocation};
use crate::error::Result;

/// One artifact a step produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactReport {
    /// Output name.
    pub name: String,
    /// The site holding it.
    pub site: String,
    /// Where.
    pub locator: String,
    /// Size in bytes.
    pub size: Option<u64>,
    /// The checksum that proved it equal to its source.
    pub checksum: Option<String>,
}

/// One step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLine {
    /// Step id.
    pub id: String,
    /// Migrator.
    pub migrator: String,
    /// Site it ran on.
    pub site: String,
    /// Last state.
    pub state: StepState,
    /// Attempts over all runs.
    pub attempts: u32,
    /// Seconds of its last attempt (start to end), when it ended.
    pub seconds: Option<f64>,
    /// Bytes read at the source.
    pub bytes_read: u64,
    /// Bytes sent between sites.
    pub bytes_sent: u64,
    /// Bytes written at the target.
    pub bytes_written: u64,
    /// Bytes written per second of its last attempt.
    pub throughput: Option<f64>,
    /// Outputs.
    pub outputs: Vec<ArtifactReport>,
    /// The last error, if it failed or retried.
    pub error: Option<String>,
    /// When its last attempt started, in seconds after the relocation's
    /// first start ([`Report::started_unix_ms`]): with `seconds`, its bar
    /// on a time line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
}

/// A config file as rewritten.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigDiff {
    /// At the source.
    pub source: String,
    /// At the target.
    pub target: String,
    /// Unified diff source → target (empty when unchanged or missing).
    pub diff: String,
}

/// A part of the downtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DowntimeStage {
    /// `final delta and verify`, `start and boot check`.
    pub stage: String,
    /// Seconds.
    pub seconds: f64,
}

/// How the final delta of a warm relocation found what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalDelta {
    /// Disks whose final delta read only the ranges the source's change
    /// tracking recorded.
    pub disks_tracked: u64,
    /// Disks whose final delta compared every chunk (no tracking at the
    /// source, or no trusted record of the pre-copy).
    pub disks_rehashed: u64,
    /// Bytes the source's guests wrote between the start of the pre-copy
    /// and their stop, as change tracking saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_bytes: Option<u64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Relocation id.
    pub id: String,
    /// Service.
    pub service: String,
    /// Source site.
    pub from: String,
    /// Target sites.
    pub targets: Vec<String>,
    /// `succeeded`, `failed`, `cancelled`, `rolled-back`, `running` or
    /// `interrupted` (the process died; `resume` continues).
    pub status: String,
    /// Wall time of all runs, first start to last end, in seconds.
    pub seconds: f64,
    /// When the first run started (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<i64>,
    /// When the downtime began, in seconds after the first start: with
    /// `downtime_seconds`, the window on a time line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_start: Option<f64>,
    /// Downtime as the service sees it, in seconds, once cut over: from
    /// the last source instance seen stopped by its driver to the last
    /// target instance seen running and passing its boot check (journal
    /// times of `stop-source` → `cutover` for runs that recorded neither).
    pub downtime_seconds: Option<f64>,
    /// Where the downtime went.
    #[serde(default)]
    pub downtime_stages: Vec<DowntimeStage>,
    /// How the final delta found what changed on each disk.
    #[serde(default)]
    pub final_delta: FinalDelta,
    /// Bytes the plan said it would move.
    pub bytes_to_move: u64,
    /// Totals of all steps.
    pub bytes_read: u64,
    /// Totals of all steps.
    pub bytes_written: u64,
    /// Steps in workflow order.
    pub steps: Vec<StepLine>,
    /// Old endpoint → new.
    pub endpoint_map: Vec<EndpointChange>,
    /// Config files and their diffs.
    pub config: Vec<ConfigDiff>,
    /// What steps warn about (an address left in a guest, in a format
    /// fluidcloud does not adapt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The final delta's facts: each final step's (`final:`, `sync:`) last
/// `tracked` (steps that say nothing, such as a re-conversion, are not
/// counted), and the
/// change tracking's `changed_bytes`.
fn final_delta(entries: &[Entry]) -> FinalDelta {
    let mut tracked: BTreeMap<&str, bool> = BTreeMap::new();
    let mut out = FinalDelta::default();
    for e in entries {
        if let Record::Output { step, output } = &e.record {
            let last = step.starts_with("final:") || step.starts_with("sync:");
            if let Some(t) = output
                .facts
                .get("tracked")
                .and_then(serde_json::Value::as_bool)
                && last
            {
                tracked.insert(step, t);
            }
            if let Some(b) = output
                .facts
                .get("changed_bytes")
                .and_then(serde_json::Value::as_u64)
            {
                out.changed_bytes = Some(b);
            }
        }
    }
    out.disks_tracked = tracked.values().filter(|t| **t).count() as u64;
    out.disks_rehashed = tracked.len() as u64 - out.disks_tracked;
    out
}

/// The journal's entries, or none when it does not exist yet.
///
/// # Errors
/// A journal that cannot be opened or read.
pub fn entries(path: &std::path::Path) -> Result<Vec<Entry>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let j = SqliteJournal::open(path).map_err(viaduct_err)?;
    j.replay().map_err(viaduct_err)
}

/// Where a relocation stands, from its journal: `planned` (never ran),
/// `interrupted` (a run started and did not finish: the process died, or
/// still runs — callers that know better say so), `succeeded`, `failed`,
/// `cancelled`, `rolled-back` or `rollback-failed`.
pub fn status(entries: &[Entry]) -> String {
    let mut status = "planned";
    let mut rollback = false;
    for e in entries {
        match &e.record {
            Record::RunStarted { mode, .. } => {
                rollback = matches!(mode, fluidcloud_viaduct::journal::RunMode::Rollback);
                status = "interrupted";
            }
            Record::RunFinished { outcome } => {
                status = match (rollback, outcome) {
                    (true, Outcome::Succeeded) => "rolled-back",
                    (true, _) => "rollback-failed",
                    (false, Outcome::Succeeded) => "succeeded",
                    (false, Outcome::Failed) => "failed",
                    (false, Outcome::Cancelled) => "cancelled",
                };
            }
            _ => {}
        }
    }
    status.to_owned()
}

/// A viaduct error as a conduit error.
pub fn viaduct_err(e: fluidcloud_viaduct::Error) -> crate::Error {
    crate::Error::Site {
        site: "local state".into(),
        source: fluidcloud_plugins::Error::Precondition(e.to_string()),
    }
}

/// The config diffs a step recorded in its facts: `config-transfer`'s
/// one file, `guest-adapt`'s files inside a guest (`guest_diffs`).
fn config_facts(o: &fluidcloud_plugins::StepOutput) -> Vec<ConfigDiff> {
    let text = |k: &str| o.facts.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let one = (|| {
        Some(ConfigDiff {
            source: text("config_source")?,
            target: text("config_target")?,
            diff: text("config_diff")?,
        })
    })();
    let guest = o
        .facts
        .get("guest_diffs")
        .and_then(|v| serde_json::from_value::<Vec<ConfigDiff>>(v.clone()).ok())
        .unwrap_or_default();
    one.into_iter().chain(guest).collect()
}

/// When the first `guest-adapt:` step began and the last one ended (ms).
fn guest_span(entries: &[Entry]) -> Option<(i64, i64)> {
    let mut span: Option<(i64, i64)> = None;
    for e in entries {
        if let Record::Transition { step, to, .. } = &e.record
            && step.starts_with("guest-adapt:")
        {
            let (a, b) = span.unwrap_or((i64::MAX, i64::MIN));
            span = Some(match to {
                StepState::Running => (a.min(e.at_ms), b),
                StepState::Succeeded => (a, b.max(e.at_ms)),
                _ => (a, b),
            });
        }
    }
    span.filter(|(a, b)| a <= b)
}

/// Builds the report of `r` from its journal entries. `diff` renders a
/// unified diff of two texts (the caller's choice of implementation).
pub fn build(
    r: &Relocation,
    entries: &[Entry],
    diff: &dyn Fn(&str, &str, &str) -> String,
) -> Report {
    #[derive(Default)]
    struct Acc {
        state: Option<StepState>,
        attempts: u32,
        started: Option<i64>,
        ended: Option<i64>,
        output: Option<fluidcloud_plugins::StepOutput>,
        error: Option<String>,
    }
    let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
    let status = status(entries);
    let (mut first, mut last) = (None::<i64>, None::<i64>);
    for e in entries {
        first = Some(first.map_or(e.at_ms, |f: i64| f.min(e.at_ms)));
        last = Some(last.map_or(e.at_ms, |l: i64| l.max(e.at_ms)));
        match &e.record {
            Record::RunStarted { .. } | Record::RunFinished { .. } => {}
            Record::Transition {
                step,
                to,
                attempt,
                error,
                ..
            } => {
                let a = acc.entry(step.as_str()).or_default();
                a.state = Some(*to);
                a.attempts = a.attempts.max(*attempt);
                if *to == StepState::Running {
                    a.started = Some(e.at_ms);
                    a.ended = None;
                } else if a.started.is_some() && a.ended.is_none() {
                    a.ended = Some(e.at_ms);
                }
                if error.is_some() {
                    a.error.clone_from(error);
                }
            }
            Record::Output { step, output } => {
                acc.entry(step.as_str()).or_default().output = Some(output.clone());
            }
            Record::CancelRequested { .. } => {}
        }
    }
    let mut steps = Vec::new();
    let (mut read, mut written) = (0, 0);
    let mut step_configs = Vec::new();
    let mut warnings = Vec::new();
    for s in &r.workflow.steps {
        let a = acc.remove(s.id.as_str()).unwrap_or_default();
        if let Some(o) = a.output.as_ref() {
            step_configs.extend(config_facts(o));
            if let Some(notes) = o.facts.get("guest_notes").and_then(|v| v.as_array()) {
                warnings.extend(notes.iter().filter_map(|n| n.as_str()).map(str::to_owned));
            }
        }
        let seconds = match (a.started, a.ended) {
            (Some(b), Some(e)) => Some((e - b).max(0) as f64 / 1000.0),
            _ => None,
        };
        let m = a.output.as_ref().map(|o| o.measured).unwrap_or_default();
        read += m.bytes_read;
        written += m.bytes_written;
        steps.push(StepLine {
            id: s.id.clone(),
            migrator: s.migrator.clone(),
            site: s.site.clone(),
            state: a.state.unwrap_or(StepState::Pending),
            attempts: a.attempts,
            seconds,
            bytes_read: m.bytes_read,
            bytes_sent: m.bytes_sent,
            bytes_written: m.bytes_written,
            throughput: seconds
                .filter(|s| *s > 0.0 && m.bytes_written > 0)
                .map(|s| m.bytes_written as f64 / s),
            outputs: a
                .output
                .map(|o| {
                    o.artifacts
                        .into_iter()
                        .map(|(name, a)| ArtifactReport {
                            name,
                            site: a.site,
                            locator: a.locator,
                            size: a.size,
                            checksum: a.checksum,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            error: a.error,
            start: a
                .started
                .zip(first)
                .map(|(s, f)| (s - f).max(0) as f64 / 1000.0),
        });
    }
    let at = |id: &str, state: StepState| -> Option<i64> {
        let mut t = None;
        for e in entries {
            if let Record::Transition { step, to, .. } = &e.record
                && step == id
                && *to == state
            {
                t = Some(e.at_ms);
            }
        }
        t
    };
    let fact = |id: &str, name: &str| -> Option<Moment> {
        entries.iter().rev().find_map(|e| match &e.record {
            Record::Output { step, output } if step == id => {
                output.facts.get(name).and_then(Moment::from_fact)
            }
            _ => None,
        })
    };
    let final_delta = final_delta(entries);
    let (downtime_seconds, downtime_stages) =
        match (fact("stop-source", "stopped"), fact("cutover", "running")) {
            (Some(stopped), Some(running)) => {
                let total = running.since(&stopped).max(0.0);
                let guest = guest_span(entries);
                let stages = at("cutover", StepState::Running)
                    .map(|c| {
                        let last = ((c - stopped.unix_ms) as f64 / 1000.0).clamp(0.0, total);
                        let mut v = Vec::new();
                        match guest {
                            Some((g0, g1)) if g0 >= stopped.unix_ms && g1 <= c => {
                                let adapt = (g1 - g0) as f64 / 1000.0;
                                v.push(DowntimeStage {
                                    stage: "final delta".into(),
                                    seconds: (last - adapt).max(0.0),
                                });
                                v.push(DowntimeStage {
                                    stage: "guest adaptation".into(),
                                    seconds: adapt,
                                });
                            }
                            _ => v.push(DowntimeStage {
                                stage: "final delta and verify".into(),
                                seconds: last,
                            }),
                        }
                        v.push(DowntimeStage {
                            stage: "start and boot check".into(),
                            seconds: total - last,
                        });
                        v
                    })
                    .unwrap_or_default();
                (Some(total), stages)
            }
            _ => match (
                at("stop-source", StepState::Running),
                at("cutover", StepState::Succeeded),
            ) {
                (Some(a), Some(b)) if b >= a => (Some((b - a) as f64 / 1000.0), Vec::new()),
                _ => (None, Vec::new()),
            },
        };
    let downtime_start = downtime_seconds
        .and(
            fact("stop-source", "stopped")
                .map(|m| m.unix_ms)
                .or_else(|| at("stop-source", StepState::Running)),
        )
        .zip(first)
        .map(|(d, f)| (d - f).max(0) as f64 / 1000.0);
    let config = r
        .config_files
        .iter()
        .map(|(src, dst)| {
            let old = std::fs::read_to_string(src).unwrap_or_default();
            let new = std::fs::read_to_string(dst).ok();
            ConfigDiff {
                source: src.display().to_string(),
                target: dst.display().to_string(),
                diff: new
                    .map(|n| diff(&dst.display().to_string(), &old, &n))
                    .unwrap_or_default(),
            }
        })
        .chain(step_configs)
        .collect();
    Report {
        id: r.id.clone(),
        service: r.service.clone(),
        from: r.from.clone(),
        targets: r.targets(),
        status,
        seconds: match (first, last) {
            (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
            _ => 0.0,
        },
        started_unix_ms: first,
        downtime_start,
        downtime_seconds,
        downtime_stages,
        final_delta,
        bytes_to_move: r.bytes_to_move,
        bytes_read: read,
        bytes_written: written,
        steps,
        endpoint_map: r.endpoint_map.clone(),
        config,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    /// Reports travel as JSON (`serve` → `--server` clients) and are
    /// compared with the local ones: every figure must come back exact,
    /// which serde_json's default float parser does not promise.
    #[test]
    fn throughputs_and_seconds_survive_a_json_round_trip_exactly() {
        let mut x: f64 = 1.0;
        for i in 1..20_000u64 {
            x = (x * 1.618_033_988_749_895 + i as f64 / 7.0) % 3.0e9;
            let rate = (i * 4_194_304) as f64 / (x / 1000.0 + 0.001);
            for v in [x, rate, rate / 1e9, 1.0 / (i as f64)] {
                let back: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
                assert_eq!(back.to_bits(), v.to_bits(), "{v:e} came back as {back:e}");
            }
        }
    }
}
