//! Workflow graphs: steps, typed bindings, validation, freezing.
//!
//! A [`WorkflowBuilder`] collects [`StepSpec`]s, then
//! [`WorkflowBuilder::build`] checks them against a [`Registry`] of migrators
//! and returns a frozen [`Workflow`] or every problem at once as
//! diagnostics naming the step (`steps.<id>.inputs.<name>`). A frozen
//! workflow cannot change; its [`Workflow::id`] is a hash of its canonical
//! definition, so the same definition always gets the same id and a journal
//! can tell whether it belongs to it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use fluidcloud_plugins::{Artifact, ArtifactKind, Diagnostic, Migrator, StepRequest};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The migrators a workflow may name, by name.
#[derive(Clone, Default)]
pub struct Registry {
    migrators: BTreeMap<String, Arc<dyn Migrator>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a migrator under its [`describe`](Migrator::describe) name,
    /// replacing any other of that name.
    #[must_use]
    pub fn with(mut self, migrator: Arc<dyn Migrator>) -> Self {
        self.insert(migrator);
        self
    }

    /// Adds a migrator under its `describe` name.
    pub fn insert(&mut self, migrator: Arc<dyn Migrator>) {
        self.migrators.insert(migrator.describe().name, migrator);
    }

    /// The migrator called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Migrator>> {
        self.migrators.get(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.migrators.keys().map(String::as_str)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.migrators.keys()).finish()
    }
}

/// Where a step input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case", deny_unknown_fields)]
pub enum InputBinding {
    /// A named output of another step, which must produce `kind`.
    Step {
        /// The producing step.
        step: String,
        /// The producer's output name.
        output: String,
        /// The kind this step expects.
        kind: ArtifactKind,
    },
    /// An artifact that exists before the workflow runs (at the source).
    Given {
        /// The artifact.
        artifact: Artifact,
    },
}

impl InputBinding {
    /// An input taken from `step`'s output `output`, expected to be `kind`.
    pub fn from_step(
        step: impl Into<String>,
        output: impl Into<String>,
        kind: ArtifactKind,
    ) -> Self {
        Self::Step {
            step: step.into(),
            output: output.into(),
            kind,
        }
    }

    /// The kind of artifact this input carries.
    pub fn kind(&self) -> ArtifactKind {
        match self {
            Self::Step { kind, .. } => *kind,
            Self::Given { artifact } => artifact.kind,
        }
    }
}

/// One step: a migrator invocation with typed inputs and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique id in the workflow; also the migrator's idempotency key.
    pub id: String,
    /// The migrator to run, by registry name.
    pub migrator: String,
    /// The site the step works on; per-site concurrency limits count it.
    pub site: String,
    /// Migrator parameters.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Named inputs.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputBinding>,
    /// Declared outputs and their kinds; the migrator must produce each.
    #[serde(default)]
    pub outputs: BTreeMap<String, ArtifactKind>,
    /// Steps that must succeed first without passing an artifact (e.g.
    /// cut-over after verification).
    #[serde(default)]
    pub after: Vec<String>,
}

impl StepSpec {
    /// A step with no inputs, outputs or parameters.
    pub fn new(
        id: impl Into<String>,
        migrator: impl Into<String>,
        site: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            migrator: migrator.into(),
            site: site.into(),
            params: serde_json::Value::Null,
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            after: Vec::new(),
        }
    }

    /// Sets the parameters.
    #[must_use]
    pub fn params(mut self, params: serde_json::Value) -> Self {
        self.params = params;
        self
    }

    /// Adds an input.
    #[must_use]
    pub fn input(mut self, name: impl Into<String>, binding: InputBinding) -> Self {
        self.inputs.insert(name.into(), binding);
        self
    }

    /// Declares an output.
    #[must_use]
    pub fn output(mut self, name: impl Into<String>, kind: ArtifactKind) -> Self {
        self.outputs.insert(name.into(), kind);
        self
    }

    /// Adds an ordering dependency.
    #[must_use]
    pub fn after(mut self, step: impl Into<String>) -> Self {
        self.after.push(step.into());
        self
    }

    /// The steps this one depends on (producers of its inputs and `after`),
    /// without duplicates, in first-mention order.
    pub fn dependencies(&self) -> Vec<&str> {
        let mut deps: Vec<&str> = Vec::new();
        let producers = self.inputs.values().filter_map(|b| match b {
            InputBinding::Step { step, .. } => Some(step.as_str()),
            InputBinding::Given { .. } => None,
        });
        for d in producers.chain(self.after.iter().map(String::as_str)) {
            if !deps.contains(&d) {
                deps.push(d);
            }
        }
        deps
    }
}

/// The serializable definition of a workflow: what the journal stores and
/// what the id is computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    /// A human name, e.g. `relocate shop to edge-rennes`.
    pub name: String,
    /// The steps, in the order they were added.
    pub steps: Vec<StepSpec>,
}

/// Collects steps, then validates and freezes them.
#[derive(Debug, Clone)]
pub struct WorkflowBuilder {
    def: WorkflowDef,
}

impl WorkflowBuilder {
    /// An empty workflow called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            def: WorkflowDef {
                name: name.into(),
                steps: Vec::new(),
            },
        }
    }

    /// Adds a step.
    #[must_use]
    pub fn step(mut self, step: StepSpec) -> Self {
        self.def.steps.push(step);
        self
    }

    /// Adds a step in place.
    pub fn push(&mut self, step: StepSpec) {
        self.def.steps.push(step);
    }

    /// A builder continuing from a definition.
    pub fn from_def(def: WorkflowDef) -> Self {
        Self { def }
    }

    /// The definition collected so far.
    pub fn def(&self) -> &WorkflowDef {
        &self.def
    }

    /// The definition, unvalidated.
    pub fn into_def(self) -> WorkflowDef {
        self.def
    }

    /// Validates and freezes the workflow.
    ///
    /// # Errors
    /// [`Error::InvalidWorkflow`] with one diagnostic per problem: duplicate
    /// step ids, unknown migrators, inputs naming a missing step or output,
    /// kind mismatches between producer and consumer, kinds the migrator does
    /// not consume or produce, cycles, and the migrators' own `validate`
    /// findings.
    pub fn build(self, registry: &Registry) -> Result<Workflow> {
        Workflow::freeze(self.def, registry)
    }
}

/// A validated, immutable workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    def: WorkflowDef,
    id: String,
    graph: DiGraph<usize, ()>,
    index: HashMap<String, usize>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    topo: Vec<usize>,
}

fn diag(step: &str, field: &str, summary: String) -> Diagnostic {
    let key = if field.is_empty() {
        format!("steps.{step}")
    } else {
        format!("steps.{step}.{field}")
    };
    Diagnostic::error(format!("step `{step}`: {summary}")).at_key(key)
}

impl Workflow {
    /// Validates a definition (for instance one read back from a journal)
    /// and freezes it.
    ///
    /// # Errors
    /// As [`WorkflowBuilder::build`].
    pub fn freeze(def: WorkflowDef, registry: &Registry) -> Result<Self> {
        let mut diags = Vec::new();
        let mut index = HashMap::new();
        for (i, s) in def.steps.iter().enumerate() {
            if s.id.is_empty() {
                diags.push(Diagnostic::error(format!("step #{i} has an empty id")));
            }
            if index.contains_key(&s.id) {
                diags.push(diag(&s.id, "", "step id used twice".into()));
            } else {
                index.insert(s.id.clone(), i);
            }
        }
        let mut graph = DiGraph::with_capacity(def.steps.len(), def.steps.len());
        let nodes: Vec<NodeIndex> = (0..def.steps.len()).map(|i| graph.add_node(i)).collect();
        let mut deps = vec![Vec::new(); def.steps.len()];
        let mut dependents = vec![Vec::new(); def.steps.len()];
        for (i, s) in def.steps.iter().enumerate() {
            let descriptor = match registry.get(&s.migrator) {
                Some(m) => Some(m.describe()),
                None => {
                    let known: Vec<&str> = registry.names().collect();
                    diags.push(
                        diag(
                            &s.id,
                            "migrator",
                            format!("unknown migrator `{}`", s.migrator),
                        )
                        .with_detail(format!("known: {}", known.join(", "))),
                    );
                    None
                }
            };
            for (name, binding) in &s.inputs {
                let field = format!("inputs.{name}");
                if let Some(d) = &descriptor
                    && !d.consumes.contains(&binding.kind())
                {
                    diags.push(diag(
                        &s.id,
                        &field,
                        format!("migrator `{}` does not consume {}", d.name, binding.kind()),
                    ));
                }
                let InputBinding::Step { step, output, kind } = binding else {
                    continue;
                };
                let Some(&p) = index.get(step) else {
                    diags.push(diag(&s.id, &field, format!("needs unknown step `{step}`")));
                    continue;
                };
                match def.steps[p].outputs.get(output) {
                    None => diags.push(diag(
                        &s.id,
                        &field,
                        format!("step `{step}` has no output `{output}`"),
                    )),
                    Some(produced) if produced != kind => diags.push(diag(
                        &s.id,
                        &field,
                        format!("expects {kind} but `{step}.{output}` is {produced}"),
                    )),
                    Some(_) => {}
                }
            }
            for (name, kind) in &s.outputs {
                if let Some(d) = &descriptor
                    && !d.produces.contains(kind)
                {
                    diags.push(diag(
                        &s.id,
                        &format!("outputs.{name}"),
                        format!("migrator `{}` does not produce {kind}", d.name),
                    ));
                }
            }
            for dep in s.dependencies() {
                match index.get(dep) {
                    Some(&p) if !deps[i].contains(&p) => {
                        deps[i].push(p);
                        dependents[p].push(i);
                        graph.add_edge(nodes[p], nodes[i], ());
                    }
                    Some(_) => {}
                    None if s.after.iter().any(|a| a == dep) => {
                        diags.push(diag(
                            &s.id,
                            "after",
                            format!("runs after unknown step `{dep}`"),
                        ));
                    }
                    None => {}
                }
            }
            if let Some(m) = registry.get(&s.migrator) {
                let request = placeholder_request(s, &def.steps, &index);
                for mut d in m.validate(&request) {
                    d.summary = format!("step `{}`: {}", s.id, d.summary);
                    d.key = Some(match d.key {
                        Some(k) => format!("steps.{}.{k}", s.id),
                        None => format!("steps.{}", s.id),
                    });
                    diags.push(d);
                }
            }
        }
        for scc in tarjan_scc(&graph) {
            let cyclic = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
            if cyclic {
                let mut ids: Vec<&str> = scc
                    .iter()
                    .map(|n| def.steps[graph[*n]].id.as_str())
                    .collect();
                ids.sort_unstable();
                diags.push(diag(
                    ids[0],
                    "",
                    format!("is in a dependency cycle: {}", ids.join(" -> ")),
                ));
            }
        }
        if diags.iter().any(Diagnostic::is_error) {
            return Err(Error::InvalidWorkflow(diags));
        }
        let topo = topo_order(&deps, &dependents);
        let id = workflow_id(&def);
        Ok(Self {
            def,
            id,
            graph,
            index,
            deps,
            dependents,
            topo,
        })
    }

    /// The stable id: `wf-` and 16 hex digits of the SHA-256 of the
    /// canonical JSON definition.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The human name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The definition.
    pub fn def(&self) -> &WorkflowDef {
        &self.def
    }

    /// The steps, indexed as everywhere in this crate.
    pub fn steps(&self) -> &[StepSpec] {
        &self.def.steps
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.def.steps.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.def.steps.is_empty()
    }

    /// The index of step `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Indices of the steps step `i` depends on.
    pub fn dependencies(&self, i: usize) -> &[usize] {
        &self.deps[i]
    }

    /// Indices of the steps depending on step `i`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// Step indices in a topological order (dependencies first; ties in
    /// insertion order).
    pub fn topo_order(&self) -> &[usize] {
        &self.topo
    }

    /// The dependency graph (edges from producer to consumer; node weights
    /// are step indices).
    pub fn graph(&self) -> &DiGraph<usize, ()> {
        &self.graph
    }

    /// The request for step `i`, its inputs resolved from `outputs` (the
    /// succeeded producers' outputs, by step index).
    pub fn request(
        &self,
        i: usize,
        outputs: &[Option<fluidcloud_plugins::StepOutput>],
    ) -> StepRequest {
        let s = &self.def.steps[i];
        let mut inputs = BTreeMap::new();
        for (name, binding) in &s.inputs {
            let artifact = match binding {
                InputBinding::Given { artifact } => Some(artifact.clone()),
                InputBinding::Step { step, output, .. } => self
                    .index_of(step)
                    .and_then(|p| outputs.get(p))
                    .and_then(Option::as_ref)
                    .and_then(|o| o.artifacts.get(output).cloned()),
            };
            if let Some(a) = artifact {
                inputs.insert(name.clone(), a);
            }
        }
        StepRequest {
            step_id: s.id.clone(),
            params: s.params.clone(),
            inputs,
        }
    }
}

/// A request for `validate`/`plan` before the producers ran: their outputs
/// are placeholders of the declared kind at `pending://STEP/OUTPUT`.
pub(crate) fn placeholder_request(
    s: &StepSpec,
    steps: &[StepSpec],
    index: &HashMap<String, usize>,
) -> StepRequest {
    let mut inputs = BTreeMap::new();
    for (name, binding) in &s.inputs {
        let artifact = match binding {
            InputBinding::Given { artifact } => artifact.clone(),
            InputBinding::Step { step, output, kind } => Artifact {
                kind: *kind,
                site: index
                    .get(step)
                    .map(|&p| steps[p].site.clone())
                    .unwrap_or_default(),
                locator: format!("pending://{step}/{output}"),
                size: None,
                checksum: None,
            },
        };
        inputs.insert(name.clone(), artifact);
    }
    StepRequest {
        step_id: s.id.clone(),
        params: s.params.clone(),
        inputs,
    }
}

fn topo_order(deps: &[Vec<usize>], dependents: &[Vec<usize>]) -> Vec<usize> {
    let mut missing: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = missing
        .iter()
        .enumerate()
        .filter(|(_, m)| **m == 0)
        .map(|(i, _)| std::cmp::Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(deps.len());
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            missing[d] -= 1;
            if missing[d] == 0 {
                ready.push(std::cmp::Reverse(d));
            }
        }
    }
    order
}

fn workflow_id(def: &WorkflowDef) -> String {
    // serde_json writes struct fields in declaration order and maps sorted
    // (BTreeMap), so this is canonical for a given definition.
    let json = serde_json::to_vec(def).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let mut id = String::from("wf-");
    for b in &digest[..8] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Noop, noop_registry};

    fn vol() -> ArtifactKind {
        ArtifactKind::Volume
    }

    #[test]
    fn a_valid_workflow_freezes_with_a_stable_id_and_topological_order() {
        let reg = noop_registry();
        let build = || {
            WorkflowBuilder::new("w")
                .step(
                    StepSpec::new("b", Noop::NAME, "t")
                        .input("v", InputBinding::from_step("a", "v", vol())),
                )
                .step(StepSpec::new("a", Noop::NAME, "s").output("v", vol()))
                .step(StepSpec::new("c", Noop::NAME, "t").after("b").after("a"))
                .build(&reg)
                .unwrap()
        };
        let w = build();
        assert_eq!(w.id(), build().id());
        assert!(w.id().starts_with("wf-") && w.id().len() == 19);
        assert_eq!(w.topo_order(), &[1, 0, 2]);
        assert_eq!(w.dependencies(2), &[0, 1]);
        let other = WorkflowBuilder::new("w2")
            .step(StepSpec::new("a", Noop::NAME, "s"))
            .build(&reg)
            .unwrap();
        assert_ne!(w.id(), other.id());
    }

    fn errors(b: WorkflowBuilder) -> Vec<String> {
        match b.build(&noop_registry()) {
            Err(Error::InvalidWorkflow(d)) => d.iter().map(ToString::to_string).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn each_problem_is_a_diagnostic_naming_the_step() {
        let e = errors(
            WorkflowBuilder::new("w")
                .step(StepSpec::new("x", "no-such", "s"))
                .step(
                    StepSpec::new("y", Noop::NAME, "s")
                        .input("i", InputBinding::from_step("ghost", "o", vol())),
                )
                .step(StepSpec::new("p", Noop::NAME, "s").output("o", ArtifactKind::Bucket))
                .step(
                    StepSpec::new("q", Noop::NAME, "s")
                        .input("i", InputBinding::from_step("p", "o", vol())),
                )
                .step(StepSpec::new("r", Noop::NAME, "s").input(
                    "i",
                    InputBinding::from_step("p", "nope", ArtifactKind::Bucket),
                ))
                .step(StepSpec::new("z", Noop::NAME, "s").after("z2"))
                .step(StepSpec::new("z2", Noop::NAME, "s").after("z"))
                .step(StepSpec::new("y", Noop::NAME, "s")),
        );
        let want = [
            "key `steps.x.migrator`: step `x`: unknown migrator `no-such`",
            "key `steps.y.inputs.i`: step `y`: needs unknown step `ghost`",
            "key `steps.q.inputs.i`: step `q`: expects volume but `p.o` is bucket",
            "key `steps.r.inputs.i`: step `r`: step `p` has no output `nope`",
            "key `steps.y`: step `y`: step id used twice",
            "step `z`: is in a dependency cycle: z -> z2",
        ];
        for w in want {
            assert!(e.iter().any(|d| d.contains(w)), "missing {w:?} in {e:#?}");
        }
    }

    #[test]
    fn kinds_the_migrator_does_not_handle_and_its_own_validation_are_reported() {
        let e = errors(
            WorkflowBuilder::new("w")
                .step(StepSpec::new("a", Noop::NAME, "s").output("o", ArtifactKind::EndpointMap))
                .step(StepSpec::new("b", Noop::NAME, "s").params(serde_json::json!({"fail": "x"}))),
        );
        assert!(
            e.iter()
                .any(|d| d.contains("step `a`: migrator `noop` does not produce endpoint-map")),
            "{e:#?}"
        );
        assert!(
            e.iter().any(|d| d.contains("key `steps.b.params.fail`")),
            "{e:#?}"
        );
    }
}
