//! The topology of a service: its resources and how they depend on each other.
//!
//! A [`Topology`] is a directed petgraph graph. Nodes are [`Resource`]s, edges
//! name the relation from the dependent to what it depends on:
//!
//! | relation              | from        | to                     |
//! |-----------------------|-------------|------------------------|
//! | `boots-from`          | instance    | image                  |
//! | `attaches`            | instance    | volume                 |
//! | `reads`               | instance    | config file or bucket  |
//! | `references-endpoint` | config file | endpoint (key in file) |
//! | `resolves-to`         | endpoint    | instance or bucket     |
//!
//! The `resolves-to` edges are what turns placement into an endpoint map: when
//! the instance `db` moves, every endpoint resolving to it must be rewritten in
//! every config file referencing that endpoint, at the recorded key.
//!
//! The serialized form ([`TopologyDoc`]) lists resources and edges sorted by
//! id, so the same site always prints the same document.

use std::collections::HashMap;
use std::fmt::Write as _;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use serde::{Deserialize, Serialize};

use crate::diagnostic::{Diagnostic, Severity};
use crate::error::{Error, Result};
use crate::resource::{Origin, Resource, ResourceId};

/// How one resource depends on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// Instance boots from an image.
    BootsFrom,
    /// Instance has a volume attached.
    Attaches,
    /// Instance reads a config file or a bucket.
    Reads,
    /// Config file names an endpoint.
    ReferencesEndpoint,
    /// Endpoint designates a resource of the service.
    ResolvesTo,
}

impl Relation {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BootsFrom => "boots-from",
            Self::Attaches => "attaches",
            Self::Reads => "reads",
            Self::ReferencesEndpoint => "references-endpoint",
            Self::ResolvesTo => "resolves-to",
        }
    }
}

/// An edge of the topology.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Edge {
    /// The dependent resource.
    pub from: ResourceId,
    /// What it depends on.
    pub to: ResourceId,
    /// How.
    pub relation: Relation,
    /// For `references-endpoint`: the key path inside the config file
    /// (`database.host`, `DATABASE_URL`, or `line 12` for plain text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Serialized form of a topology: stable, sorted, and readable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TopologyDoc {
    /// The service's name.
    pub service: String,
    /// The site it was introspected on.
    pub site: String,
    /// Resources sorted by id.
    pub resources: Vec<Resource>,
    /// Edges sorted by (from, to, relation, key).
    pub edges: Vec<Edge>,
}

/// A service's resources and their dependencies.
#[derive(Debug, Clone)]
pub struct Topology {
    service: String,
    site: String,
    graph: StableDiGraph<Resource, (Relation, Option<String>)>,
    index: HashMap<ResourceId, NodeIndex>,
}

impl Topology {
    /// An empty topology of `service` on `site`.
    pub fn new(service: impl Into<String>, site: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            site: site.into(),
            graph: StableDiGraph::new(),
            index: HashMap::new(),
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The site it runs on.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The underlying graph, for algorithms (petgraph's visitors work on it).
    pub fn graph(&self) -> &StableDiGraph<Resource, (Relation, Option<String>)> {
        &self.graph
    }

    /// Adds a resource, or returns the existing one's index when the id is
    /// already present (the first spec wins; see [`Topology::merge`]).
    pub fn add(&mut self, resource: Resource) -> NodeIndex {
        if let Some(&ix) = self.index.get(&resource.id) {
            return ix;
        }
        let id = resource.id.clone();
        let ix = self.graph.add_node(resource);
        self.index.insert(id, ix);
        ix
    }

    /// Adds an edge between two resources already present. Adding the same
    /// edge twice keeps one.
    ///
    /// # Errors
    /// `NotFound` when either end is not in the topology.
    pub fn link(
        &mut self,
        from: &ResourceId,
        to: &ResourceId,
        relation: Relation,
        key: Option<String>,
    ) -> Result<()> {
        let a = self.index_of(from)?;
        let b = self.index_of(to)?;
        let weight = (relation, key);
        let exists = self
            .graph
            .edges_connecting(a, b)
            .any(|e| *e.weight() == weight);
        if !exists {
            self.graph.add_edge(a, b, weight);
        }
        Ok(())
    }

    fn index_of(&self, id: &ResourceId) -> Result<NodeIndex> {
        self.index.get(id).copied().ok_or_else(|| Error::NotFound {
            what: format!("resource {id}"),
            site: Some(self.site.clone()),
        })
    }

    /// The resource with this id.
    pub fn get(&self, id: &ResourceId) -> Option<&Resource> {
        self.index.get(id).map(|&ix| &self.graph[ix])
    }

    /// Whether a resource with this id is present.
    pub fn contains(&self, id: &ResourceId) -> bool {
        self.index.contains_key(id)
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// True when there are no resources.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Resources sorted by id.
    pub fn resources(&self) -> Vec<&Resource> {
        let mut v: Vec<&Resource> = self.graph.node_weights().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Edges sorted by (from, to, relation, key).
    pub fn edges(&self) -> Vec<Edge> {
        let mut v: Vec<Edge> = self
            .graph
            .edge_references()
            .map(|e| Edge {
                from: self.graph[e.source()].id.clone(),
                to: self.graph[e.target()].id.clone(),
                relation: e.weight().0,
                key: e.weight().1.clone(),
            })
            .collect();
        v.sort();
        v
    }

    /// Edges leaving `id` (what it depends on), sorted.
    pub fn dependencies(&self, id: &ResourceId) -> Vec<Edge> {
        self.edges().into_iter().filter(|e| &e.from == id).collect()
    }

    /// Merges a declared topology into this (discovered) one.
    ///
    /// Resources present in both keep the discovered facts and are marked
    /// [`Origin::Both`]; a declared spec that disagrees with what the site
    /// shows yields a warning. Declared-only resources and all declared edges
    /// are added.
    ///
    /// # Errors
    /// Never for well-formed input: edges of `declared` always join resources
    /// of `declared`. Returns warnings as diagnostics.
    pub fn merge(&mut self, declared: &Topology) -> Vec<Diagnostic> {
        let mut warnings = Vec::new();
        for r in declared.graph.node_weights() {
            match self.index.get(&r.id) {
                Some(&ix) => {
                    let mine = &mut self.graph[ix];
                    if mine.spec != r.spec {
                        warnings.push(
                            Diagnostic::new(
                                Severity::Warning,
                                format!(
                                    "declared {} differs from what site {} shows; using the site's facts",
                                    r.id, self.site
                                ),
                            )
                            .at_key(r.id.to_string()),
                        );
                    }
                    mine.origin = Origin::Both;
                }
                None => {
                    self.add(r.clone());
                }
            }
        }
        for e in declared.edges() {
            // Both ends exist: they were in `declared` and are now in `self`.
            let _ = self.link(&e.from, &e.to, e.relation, e.key);
        }
        warnings
    }

    /// The stable serialized form.
    pub fn to_doc(&self) -> TopologyDoc {
        TopologyDoc {
            service: self.service.clone(),
            site: self.site.clone(),
            resources: self.resources().into_iter().cloned().collect(),
            edges: self.edges(),
        }
    }

    /// Rebuilds a topology from its serialized form.
    ///
    /// # Errors
    /// `Invalid` when an edge names a resource the document does not list,
    /// or a resource id does not match its kind and name.
    pub fn from_doc(doc: TopologyDoc) -> Result<Self> {
        let mut t = Topology::new(doc.service, doc.site);
        let mut diags = Vec::new();
        for (i, r) in doc.resources.into_iter().enumerate() {
            let expected = ResourceId::new(r.spec.kind(), &r.name);
            if r.id != expected {
                diags.push(
                    Diagnostic::error(format!("id `{}` should be `{expected}`", r.id))
                        .at_key(format!("resources[{i}].id")),
                );
            }
            t.add(r);
        }
        for (i, e) in doc.edges.into_iter().enumerate() {
            if let Err(err) = t.link(&e.from, &e.to, e.relation, e.key) {
                diags.push(Diagnostic::error(err.to_string()).at_key(format!("edges[{i}]")));
            }
        }
        if diags.is_empty() {
            Ok(t)
        } else {
            Err(Error::Invalid(diags))
        }
    }

    /// Graphviz DOT rendering, one cluster per resource kind.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "digraph {} {{\n  label={};\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];",
            dot_quote(&self.service),
            dot_quote(&format!("{} on {}", self.service, self.site))
        );
        for r in self.resources() {
            let shape = match r.kind() {
                crate::ResourceKind::Instance => "box3d",
                crate::ResourceKind::Volume | crate::ResourceKind::Image => "cylinder",
                crate::ResourceKind::Bucket => "folder",
                crate::ResourceKind::ConfigFile => "note",
                crate::ResourceKind::Endpoint => "ellipse",
            };
            let _ = writeln!(
                out,
                "  {} [shape={shape}, label={}];",
                dot_quote(r.id.as_str()),
                dot_quote(&format!("{}\n{}", r.kind(), r.name))
            );
        }
        for e in self.edges() {
            let label = match &e.key {
                Some(k) => format!("{}\n{k}", e.relation.as_str()),
                None => e.relation.as_str().to_owned(),
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                dot_quote(e.from.as_str()),
                dot_quote(e.to.as_str()),
                dot_quote(&label)
            );
        }
        out.push_str("}\n");
        out
    }
}

fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{EndpointKind, ResourceSpec};

    fn instance(name: &str) -> Resource {
        Resource::new(
            name,
            ResourceSpec::Instance {
                vcpus: 1,
                memory_mib: 512,
                state: "running".into(),
                hostname: None,
                addresses: vec![],
                guest: None,
            },
            Origin::Discovered,
        )
    }

    fn bucket(name: &str, objects: u64, origin: Origin) -> Resource {
        Resource::new(name, ResourceSpec::Bucket { objects, bytes: 0 }, origin)
    }

    #[test]
    fn link_requires_both_ends_and_dedupes() {
        let mut t = Topology::new("shop", "paris");
        let web = t.add(instance("web"));
        let web_id = t.graph()[web].id.clone();
        let media = bucket("media", 1, Origin::Discovered);
        let media_id = media.id.clone();
        assert!(t.link(&web_id, &media_id, Relation::Reads, None).is_err());
        t.add(media);
        t.link(&web_id, &media_id, Relation::Reads, None).unwrap();
        t.link(&web_id, &media_id, Relation::Reads, None).unwrap();
        assert_eq!(t.edges().len(), 1);
        assert_eq!(t.dependencies(&web_id)[0].to, media_id);
    }

    #[test]
    fn merge_marks_both_warns_on_disagreement_and_adds_declared_only() {
        let mut found = Topology::new("shop", "paris");
        found.add(instance("web"));
        found.add(bucket("media", 10, Origin::Discovered));
        let mut declared = Topology::new("shop", "paris");
        declared.add(bucket("media", 99, Origin::Declared));
        declared.add(bucket("logs", 0, Origin::Declared));
        let web = ResourceId::new(crate::ResourceKind::Instance, "web");
        declared.add(instance("web"));
        declared
            .link(&web, &"bucket:logs".parse().unwrap(), Relation::Reads, None)
            .unwrap();
        let warnings = found.merge(&declared);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key.as_deref(), Some("bucket:media"));
        let media = found.get(&"bucket:media".parse().unwrap()).unwrap();
        assert_eq!(media.origin, Origin::Both);
        assert_eq!(
            media.spec,
            ResourceSpec::Bucket {
                objects: 10,
                bytes: 0
            }
        );
        assert!(found.contains(&"bucket:logs".parse().unwrap()));
        assert_eq!(found.edges().len(), 1);
    }

    #[test]
    fn doc_round_trips_and_rejects_dangling_edges() {
        let mut t = Topology::new("shop", "paris");
        t.add(instance("web"));
        let ep = Resource::endpoint(EndpointKind::Host, "web.internal", false);
        let ep_id = ep.id.clone();
        t.add(ep);
        t.link(
            &ep_id,
            &"instance:web".parse().unwrap(),
            Relation::ResolvesTo,
            None,
        )
        .unwrap();
        let doc = t.to_doc();
        let json = serde_json::to_string(&doc).unwrap();
        let back: TopologyDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(Topology::from_doc(back.clone()).unwrap().to_doc(), doc);

        let mut broken = back;
        broken.edges[0].to = "instance:ghost".parse().unwrap();
        let err = Topology::from_doc(broken).unwrap_err();
        assert!(err.to_string().contains("instance:ghost"), "{err}");
    }

    #[test]
    fn dot_escapes_quotes_and_lists_every_edge() {
        let mut t = Topology::new("sh\"op", "paris");
        t.add(instance("web"));
        t.add(bucket("media", 1, Origin::Discovered));
        t.link(
            &"instance:web".parse().unwrap(),
            &"bucket:media".parse().unwrap(),
            Relation::Reads,
            None,
        )
        .unwrap();
        let dot = t.to_dot();
        assert!(dot.starts_with("digraph \"sh\\\"op\""), "{dot}");
        assert!(dot.contains("\"instance:web\" -> \"bucket:media\" [label=\"reads\"]"));
    }
}
