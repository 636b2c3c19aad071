//! Migrator chains: how to turn what the source has into what a target accepts.
//!
//! Migrators declare the artifact kinds they consume and produce. The broker
//! builds a graph whose nodes are artifact kinds and whose edges are
//! migrators (every consumed kind to every produced kind), and searches it
//! for the cheapest path. Each step reads and writes the whole artifact, so
//! a chain's cost is its number of steps times the bytes to convert; a
//! shorter chain is always cheaper, and among equal lengths the
//! lexicographically smallest migrator names win, which keeps results
//! deterministic.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fluidcloud_plugins::{ArtifactKind, MigratorDescriptor};
use serde::{Deserialize, Serialize};

/// One step of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChainStep {
    /// The migrator.
    pub migrator: String,
    /// What it reads.
    pub from: ArtifactKind,
    /// What it produces.
    pub to: ArtifactKind,
}

/// The graph of artifact kinds linked by migrators.
#[derive(Debug, Clone, Default)]
pub struct ChainFinder {
    edges: BTreeMap<ArtifactKind, Vec<(ArtifactKind, String)>>,
}

impl ChainFinder {
    /// Builds the graph from migrator descriptors.
    pub fn new(migrators: &[MigratorDescriptor]) -> Self {
        let mut edges: BTreeMap<ArtifactKind, Vec<(ArtifactKind, String)>> = BTreeMap::new();
        for m in migrators {
            for from in &m.consumes {
                for to in &m.produces {
                    if from != to {
                        edges.entry(*from).or_default().push((*to, m.name.clone()));
                    }
                }
            }
        }
        for v in edges.values_mut() {
            v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        }
        Self { edges }
    }

    /// The shortest chain from `from` to any kind in `accepted`: empty when
    /// `from` is accepted as is, `None` when no chain exists.
    pub fn find(
        &self,
        from: ArtifactKind,
        accepted: &BTreeSet<ArtifactKind>,
    ) -> Option<Vec<ChainStep>> {
        if accepted.contains(&from) {
            return Some(Vec::new());
        }
        // Breadth-first: every edge costs the same, so the first time a kind
        // is reached is along a shortest path; sorted edges make it stable.
        let mut prev: BTreeMap<ArtifactKind, (ArtifactKind, String)> = BTreeMap::new();
        let mut queue = VecDeque::from([from]);
        let mut seen = BTreeSet::from([from]);
        while let Some(k) = queue.pop_front() {
            for (to, migrator) in self.edges.get(&k).into_iter().flatten() {
                if !seen.insert(*to) {
                    continue;
                }
                prev.insert(*to, (k, migrator.clone()));
                if accepted.contains(to) {
                    let mut steps = Vec::new();
                    let mut cur = *to;
                    while let Some((p, m)) = prev.get(&cur) {
                        steps.push(ChainStep {
                            migrator: m.clone(),
                            from: *p,
                            to: cur,
                        });
                        cur = *p;
                    }
                    steps.reverse();
                    return Some(steps);
                }
                queue.push_back(*to);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidcloud_plugins::ImageFormat::{Qcow2, Raw, Vhd, Vmdk};

    fn img(f: fluidcloud_plugins::ImageFormat) -> ArtifactKind {
        ArtifactKind::DiskImage { format: f }
    }

    fn m(name: &str, consumes: &[ArtifactKind], produces: &[ArtifactKind]) -> MigratorDescriptor {
        MigratorDescriptor {
            name: name.into(),
            version: "1.0.0".into(),
            summary: String::new(),
            consumes: consumes.to_vec(),
            produces: produces.to_vec(),
        }
    }

    #[test]
    fn direct_two_step_and_missing_chains() {
        let finder = ChainFinder::new(&[
            m("qcow2-to-raw", &[img(Qcow2)], &[img(Raw)]),
            m("raw-to-vhd", &[img(Raw)], &[img(Vhd)]),
        ]);
        assert_eq!(
            finder.find(img(Qcow2), &BTreeSet::from([img(Qcow2)])),
            Some(vec![])
        );
        let one = finder
            .find(img(Qcow2), &BTreeSet::from([img(Raw), img(Vmdk)]))
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].migrator, "qcow2-to-raw");
        let two = finder
            .find(img(Qcow2), &BTreeSet::from([img(Vhd)]))
            .unwrap();
        let names: Vec<_> = two.iter().map(|s| s.migrator.as_str()).collect();
        assert_eq!(names, ["qcow2-to-raw", "raw-to-vhd"]);
        assert_eq!(two[0].to, two[1].from);
        assert_eq!(finder.find(img(Qcow2), &BTreeSet::from([img(Vmdk)])), None);
    }

    #[test]
    fn the_shortest_chain_wins_over_a_longer_one() {
        let finder = ChainFinder::new(&[
            m("a-qcow2-raw", &[img(Qcow2)], &[img(Raw)]),
            m("b-raw-vmdk", &[img(Raw)], &[img(Vmdk)]),
            m("z-direct", &[img(Qcow2)], &[img(Vmdk)]),
        ]);
        let c = finder
            .find(img(Qcow2), &BTreeSet::from([img(Vmdk)]))
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].migrator, "z-direct");
    }
}
