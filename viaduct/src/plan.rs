//! Plan rendering: what a workflow will do, before it does it.
//!
//! [`Plan::new`] asks each step's migrator for its [`Estimate`] (steps
//! whose inputs do not exist yet get their producers' placeholders; a
//! migrator that cannot estimate from those shows `?`). The plan renders as
//! a text tree, JSON, Graphviz DOT and Mermaid.

use std::fmt::Write as _;

use fluidcloud_plugins::Estimate;
use serde::Serialize;

use crate::workflow::{Registry, Workflow, placeholder_request};

/// One step of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanStep {
    /// The step id.
    pub id: String,
    /// Its migrator.
    pub migrator: String,
    /// Its site.
    pub site: String,
    /// Ids of the steps it waits for.
    pub depends_on: Vec<String>,
    /// The migrator's estimate, when it could make one.
    pub estimate: Option<Estimate>,
    /// Why there is no estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl PlanStep {
    /// The largest of the bytes read, sent and written.
    pub fn bytes(&self) -> Option<u64> {
        self.estimate
            .map(|e| e.bytes_read.max(e.bytes_sent).max(e.bytes_written))
    }
}

/// A workflow with estimates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The workflow id.
    pub workflow_id: String,
    /// Its name.
    pub name: String,
    /// Steps in topological order.
    pub steps: Vec<PlanStep>,
    /// Sum of the steps' bytes.
    pub total_bytes: u64,
    /// Estimated duration with unbounded concurrency: the longest path, in
    /// seconds.
    pub critical_path_seconds: f64,
}

/// `1.5 GiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `2m05s`, `3.2s`.
pub fn human_seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let total = s.round() as u64;
        if total < 3600 {
            format!("{}m{:02}s", total / 60, total % 60)
        } else {
            format!("{}h{:02}m", total / 3600, total % 3600 / 60)
        }
    }
}

fn quote_dot(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Plan {
    /// Estimates every step of `workflow`.
    pub async fn new(workflow: &Workflow, registry: &Registry) -> Self {
        let index: std::collections::HashMap<String, usize> = workflow
            .steps()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let mut steps = Vec::with_capacity(workflow.len());
        let mut finish = vec![0.0f64; workflow.len()];
        for &i in workflow.topo_order() {
            let s = &workflow.steps()[i];
            let (estimate, note) = match registry.get(&s.migrator) {
                None => (None, Some(format!("unknown migrator `{}`", s.migrator))),
                Some(m) => match m
                    .plan(&placeholder_request(s, workflow.steps(), &index))
                    .await
                {
                    Ok(e) => (Some(e), None),
                    Err(e) => (None, Some(e.to_string())),
                },
            };
            let start = workflow
                .dependencies(i)
                .iter()
                .map(|&d| finish[d])
                .fold(0.0, f64::max);
            finish[i] = start + estimate.map_or(0.0, |e| e.seconds);
            steps.push(PlanStep {
                id: s.id.clone(),
                migrator: s.migrator.clone(),
                site: s.site.clone(),
                depends_on: workflow
                    .dependencies(i)
                    .iter()
                    .map(|&d| workflow.steps()[d].id.clone())
                    .collect(),
                estimate,
                note,
            });
        }
        let total_bytes = steps.iter().filter_map(PlanStep::bytes).sum();
        Self {
            workflow_id: workflow.id().to_owned(),
            name: workflow.name().to_owned(),
            steps,
            total_bytes,
            critical_path_seconds: finish.iter().copied().fold(0.0, f64::max),
        }
    }

    fn cost(step: &PlanStep) -> String {
        match step.estimate {
            Some(e) => format!(
                "{}, ~{}",
                human_bytes(step.bytes().unwrap_or(0)),
                human_seconds(e.seconds)
            ),
            None => "? bytes, ? time".to_owned(),
        }
    }

    /// A text tree: each step under the first step it depends on, with the
    /// others it waits for noted.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "{} ({}): {} steps, {} of I/O, ~{} on the critical path\n",
            self.name,
            self.workflow_id,
            self.steps.len(),
            human_bytes(self.total_bytes),
            human_seconds(self.critical_path_seconds)
        );
        let pos: std::collections::HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); self.steps.len()];
        let mut roots = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            match s.depends_on.first().and_then(|d| pos.get(d.as_str())) {
                Some(&p) => children[p].push(i),
                None => roots.push(i),
            }
        }
        fn walk(
            plan: &Plan,
            children: &[Vec<usize>],
            i: usize,
            prefix: &str,
            last: bool,
            out: &mut String,
        ) {
            let s = &plan.steps[i];
            let also = if s.depends_on.len() > 1 {
                format!(" (also after {})", s.depends_on[1..].join(", "))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{prefix}{} {} [{} @ {}] {}{also}",
                if last { "└─" } else { "├─" },
                s.id,
                s.migrator,
                s.site,
                Plan::cost(s)
            );
            let next = format!("{prefix}{}", if last { "   " } else { "│  " });
            for (k, &c) in children[i].iter().enumerate() {
                walk(plan, children, c, &next, k + 1 == children[i].len(), out);
            }
        }
        for (k, &r) in roots.iter().enumerate() {
            walk(self, &children, r, "", k + 1 == roots.len(), &mut out);
        }
        out
    }

    /// Pretty JSON of the whole plan.
    pub fn render_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Graphviz DOT: one box per step, edges from dependency to dependent.
    pub fn render_dot(&self) -> String {
        let mut out = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
            quote_dot(&self.workflow_id)
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "  \"{}\" [label=\"{}\\n{} @ {}\\n{}\"];",
                quote_dot(&s.id),
                quote_dot(&s.id),
                quote_dot(&s.migrator),
                quote_dot(&s.site),
                quote_dot(&Self::cost(s))
            );
        }
        for s in &self.steps {
            for d in &s.depends_on {
                let _ = writeln!(out, "  \"{}\" -> \"{}\";", quote_dot(d), quote_dot(&s.id));
            }
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid flowchart; node ids are `s0`, `s1`, ... in plan order.
    pub fn render_mermaid(&self) -> String {
        let mut out = String::from("flowchart TD\n");
        let pos: std::collections::HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let esc = |s: &str| s.replace('"', "#quot;");
        for (i, s) in self.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "  s{i}[\"{}<br/>{} @ {}<br/>{}\"]",
                esc(&s.id),
                esc(&s.migrator),
                esc(&s.site),
                esc(&Self::cost(s))
            );
        }
        for (i, s) in self.steps.iter().enumerate() {
            for d in &s.depends_on {
                if let Some(p) = pos.get(d.as_str()) {
                    let _ = writeln!(out, "  s{p} --> s{i}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Noop, noop_registry};
    use crate::workflow::{InputBinding, StepSpec, WorkflowBuilder};
    use fluidcloud_plugins::ArtifactKind;

    async fn plan() -> Plan {
        let reg = noop_registry();
        let w = WorkflowBuilder::new("shop")
            .step(
                StepSpec::new("export", Noop::NAME, "dc-paris")
                    .params(serde_json::json!({"bytes": 2u64 << 30, "sleep_ms": 60_000}))
                    .output("img", ArtifactKind::Volume),
            )
            .step(
                StepSpec::new("copy", Noop::NAME, "edge-rennes")
                    .params(serde_json::json!({"bytes": 1024, "sleep_ms": 5000}))
                    .input(
                        "img",
                        InputBinding::from_step("export", "img", ArtifactKind::Volume),
                    ),
            )
            .step(StepSpec::new("cfg", Noop::NAME, "edge-rennes"))
            .step(
                StepSpec::new("cutover", Noop::NAME, "edge-rennes")
                    .after("copy")
                    .after("cfg"),
            )
            .build(&reg)
            .unwrap();
        Plan::new(&w, &reg).await
    }

    #[tokio::test]
    async fn text_tree_shows_bytes_and_time_per_step() {
        let p = plan().await;
        assert_eq!(p.total_bytes, (2u64 << 30) + 1024);
        assert!((p.critical_path_seconds - 65.0).abs() < 1e-9);
        let text = p.render_text();
        let want = format!(
            "shop ({}): 4 steps, 2.0 GiB of I/O, ~1m05s on the critical path\n\
             ├─ export [noop @ dc-paris] 2.0 GiB, ~1m00s\n\
             │  └─ copy [noop @ edge-rennes] 1.0 KiB, ~5.0s\n\
             │     └─ cutover [noop @ edge-rennes] 0 B, ~0.0s (also after cfg)\n\
             └─ cfg [noop @ edge-rennes] 0 B, ~0.0s\n",
            p.workflow_id
        );
        assert_eq!(text, want);
    }

    #[tokio::test]
    async fn json_dot_and_mermaid_carry_every_step_and_edge() {
        let p = plan().await;
        let v: serde_json::Value = serde_json::from_str(&p.render_json()).unwrap();
        assert_eq!(v["steps"].as_array().unwrap().len(), 4);
        assert_eq!(v["steps"][1]["depends_on"], serde_json::json!(["export"]));
        let dot = p.render_dot();
        assert!(dot.starts_with("digraph \"wf-"));
        for e in [
            "\"export\" -> \"copy\"",
            "\"copy\" -> \"cutover\"",
            "\"cfg\" -> \"cutover\"",
        ] {
            assert!(dot.contains(e), "{dot}");
        }
        assert!(
            dot.contains("label=\"copy\\nnoop @ edge-rennes\\n1.0 KiB, ~5.0s\""),
            "{dot}"
        );
        let m = p.render_mermaid();
        assert!(m.starts_with("flowchart TD\n"));
        assert_eq!(m.matches("-->").count(), 3, "{m}");
        assert!(m.contains("s0 --> s1"), "{m}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_seconds(3.24), "3.2s");
        assert_eq!(human_seconds(7320.0), "2h02m");
    }
}
