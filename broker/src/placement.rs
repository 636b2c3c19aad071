//! Placement: which site each part of a service goes to, and why.
//!
//! ## Units
//! A service is placed as *units*: each instance together with its boot
//! image and attached volumes (they cannot live apart), and each bucket.
//! Config files and endpoints follow their instances.
//!
//! ## Scores
//! Every (unit, site) pair gets a score, the weighted sum of:
//!
//! | component | unit of one point | estimate |
//! |---|---|---|
//! | latency | 1 ms | weighted mean RTT from the service's users to the site: measured when the request carries a figure for the site ([`Request::measured_rtt_ms`]), else estimated as `1 ms + distance × 2 × 1.5 / (200 km/ms)` (light in fibre, 1.5× route stretch) |
//! | cost | 1 currency unit | a month of compute and storage at the site, plus the one-time egress of the bytes to move |
//! | time | 1 minute | bytes to move over the link bandwidth, plus each conversion step at the conversion speed |
//! | carbon | 1 kg CO₂e | a month of the unit's vCPUs at 10 W each, at the site's declared intensity (0 when undeclared; weight 0 by default so undeclared sites are not favoured) |
//!
//! ## Solver
//! Constraints on one unit (ban, fence, jurisdiction, formats, a unit larger
//! than a site) prune each unit's domain first. Units coupled by spread,
//! gather or latency form components; each is checked for feasibility on
//! its own first (capacity relaxed), so a contradiction such as
//! `gather(a,b)` with `spread(a,b)` is proven in milliseconds whatever the
//! problem's size.
//!
//! Up to [`EXACT_MAX_UNITS`] units, a depth-first branch and bound assigns
//! units (fewest sites per coupling first, gather groups together), trying
//! sites in increasing score, with the bound "score so far + best unary
//! score of every unassigned unit" (valid because link costs are never
//! negative) and forward checking of coupled units. It proves the optimum,
//! or infeasibility. Ties break by site name: results are deterministic.
//!
//! Beyond that size, or past [`EXACT_LIMIT`] nodes, a heuristic takes over:
//! greedy placement of gather groups, most constrained first, each on the
//! site that adds least to the objective without breaking a constraint;
//! then moves of single units and whole groups while they lower the total
//! (at most 50 passes). The result says `optimal: false`; a heuristic that
//! finds nothing says so (`NotFound`) rather than claim infeasibility.
//!
//! ## Explanations and conflicts
//! Every assignment lists every other site with the reason it lost: the
//! constraint that forbids it (alone, or given where the other units went),
//! or the score difference and the component that dominates it. A problem
//! proven infeasible returns a minimal conflicting set of constraints
//! (deletion filter over the units the proof involved: drop each constraint
//! in turn, keep it only if the rest is no longer provably infeasible
//! without it), so every constraint named is needed for the conflict.

use std::collections::{BTreeMap, BTreeSet};

use fluidcloud_plugins::{
    ArtifactKind, Capability, ImageFormat, Location, MigratorDescriptor, Relation, ResourceId,
    ResourceSpec, SiteInfo, Topology,
};
use serde::{Deserialize, Serialize};

use crate::chain::{ChainFinder, ChainStep};
use crate::constraint::{AllMarker, Constraint, Selector};
use crate::error::{Error, Result};

/// Nodes the exact search may explore before the heuristic takes over.
pub const EXACT_LIMIT: u64 = 200_000;

const HOURS_PER_MONTH: f64 = 730.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What is placed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    /// An instance with its image and volumes.
    Instance,
    /// A bucket.
    Bucket,
}

/// One placement unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Unit {
    /// Instance or bucket name.
    pub name: String,
    /// Kind.
    pub kind: UnitKind,
    /// vCPUs needed.
    pub vcpus: u32,
    /// Memory needed, MiB.
    pub memory_mib: u64,
    /// Storage provisioned at the target, bytes.
    pub storage_bytes: u64,
    /// Bytes that have to move.
    pub move_bytes: u64,
    /// Format of the boot image, for instances that have one.
    pub image_format: Option<ImageFormat>,
    /// Resources travelling together.
    pub members: Vec<ResourceId>,
    /// Other units this one talks to (reads a bucket of, or references an
    /// endpoint of): their round trip counts in the objective.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Placement units of a topology, sorted by kind then name.
pub fn units(t: &Topology) -> Vec<Unit> {
    let mut out = Vec::new();
    let edges = t.edges();
    for r in t.resources() {
        match &r.spec {
            ResourceSpec::Instance {
                vcpus, memory_mib, ..
            } => {
                let mut u = Unit {
                    name: r.name.clone(),
                    kind: UnitKind::Instance,
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                    storage_bytes: 0,
                    move_bytes: 0,
                    image_format: None,
                    members: vec![r.id.clone()],
                    peers: Vec::new(),
                };
                for e in edges.iter().filter(|e| e.from == r.id) {
                    let Some(dep) = t.get(&e.to) else { continue };
                    match (&dep.spec, e.relation) {
                        (
                            ResourceSpec::Image {
                                format,
                                virtual_size,
                                allocated,
                                ..
                            },
                            Relation::BootsFrom,
                        ) => {
                            u.image_format = Some(*format);
                            u.storage_bytes += virtual_size;
                            u.move_bytes += allocated;
                            u.members.push(dep.id.clone());
                        }
                        (
                            ResourceSpec::Volume {
                                virtual_size,
                                allocated,
                                ..
                            },
                            Relation::Attaches,
                        ) => {
                            u.storage_bytes += virtual_size;
                            u.move_bytes += allocated;
                            u.members.push(dep.id.clone());
                        }
                        _ => {}
                    }
                }
                out.push(u);
            }
            ResourceSpec::Bucket { bytes, .. } => out.push(Unit {
                name: r.name.clone(),
                kind: UnitKind::Bucket,
                vcpus: 0,
                memory_mib: 0,
                storage_bytes: *bytes,
                move_bytes: *bytes,
                image_format: None,
                members: vec![r.id.clone()],
                peers: Vec::new(),
            }),
            _ => {}
        }
    }
    out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    // Who talks to whom: an instance reads a bucket, or reads a config file
    // referencing an endpoint that resolves to another unit.
    let owner = unit_of(&out);
    let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut add = |a: &ResourceId, b: &ResourceId| {
        if let (Some(x), Some(y)) = (owner.get(a), owner.get(b))
            && x != y
        {
            pairs.insert((x.clone(), y.clone()));
            pairs.insert((y.clone(), x.clone()));
        }
    };
    for e in &edges {
        match e.relation {
            Relation::Reads => add(&e.from, &e.to),
            Relation::ReferencesEndpoint => {
                for reader in edges
                    .iter()
                    .filter(|r| r.relation == Relation::Reads && r.to == e.from)
                {
                    for target in edges
                        .iter()
                        .filter(|r| r.relation == Relation::ResolvesTo && r.from == e.to)
                    {
                        add(&reader.from, &target.to);
                    }
                }
            }
            _ => {}
        }
    }
    for u in &mut out {
        u.peers = pairs
            .iter()
            .filter(|(a, _)| *a == u.name)
            .map(|(_, b)| b.clone())
            .collect();
    }
    out
}

/// Where users of the service are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserLocation {
    /// Latitude in degrees.
    pub latitude: f64,
    /// Longitude in degrees.
    pub longitude: f64,
    /// Relative weight (share of traffic).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Weights of the objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Per ms of user RTT.
    pub latency: f64,
    /// Per currency unit.
    pub cost: f64,
    /// Per minute of transfer.
    pub time: f64,
    /// Per kg CO₂e per month.
    pub carbon: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            latency: 1.0,
            cost: 1.0,
            time: 1.0,
            carbon: 0.0,
        }
    }
}

/// A matching request.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The site the service runs on now.
    pub source: String,
    /// User locations; none means "where the service runs now".
    #[serde(default)]
    pub users: Vec<UserLocation>,
    /// Constraints given by the user.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Objective weights.
    #[serde(default)]
    pub weights: Weights,
    /// Link bandwidth between sites, Mbit/s.
    #[serde(default = "default_bandwidth")]
    pub bandwidth_mbps: f64,
    /// Image conversion speed, MB/s.
    #[serde(default = "default_convert")]
    pub convert_mb_s: f64,
    /// Whether staying on the source site is an option.
    #[serde(default)]
    pub include_source: bool,
    /// Measured round trip from the users to a site, ms, by site name: it
    /// replaces the estimate from coordinates for that site.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measured_rtt_ms: BTreeMap<String, f64>,
}

fn default_bandwidth() -> f64 {
    1000.0
}

fn default_convert() -> f64 {
    400.0
}

impl Request {
    /// A request with defaults for everything but the source.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            users: Vec::new(),
            constraints: Vec::new(),
            weights: Weights::default(),
            bandwidth_mbps: default_bandwidth(),
            convert_mb_s: default_convert(),
            include_source: false,
            measured_rtt_ms: BTreeMap::new(),
        }
    }
}

/// Estimated round-trip time between two places, milliseconds.
pub fn rtt_ms(a: &Location, b: &Location) -> f64 {
    1.0 + a.distance_km(b) * 2.0 * 1.5 / 200.0
}

/// Score components of one unit on one site.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Score {
    /// Weighted mean RTT from users, ms.
    pub latency_ms: f64,
    /// Whether `latency_ms` was measured rather than estimated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latency_measured: bool,
    /// Monthly compute and storage cost.
    pub cost_month: f64,
    /// One-time egress cost of moving the bytes.
    pub egress: f64,
    /// Transfer and conversion time, s.
    pub time_s: f64,
    /// kg CO₂e per month.
    pub carbon_kg_month: f64,
    /// Sum of round trips to the unit's peers where they are placed, ms
    /// (filled in explanations; the solver adds it per link).
    pub peers_ms: f64,
    /// The weighted total (lower is better).
    pub total: f64,
}

impl Score {
    fn parts(&self, w: &Weights) -> [(&'static str, f64); 5] {
        [
            ("latency", w.latency * self.latency_ms),
            ("latency to peers", w.latency * self.peers_ms),
            ("cost", w.cost * (self.cost_month + self.egress)),
            ("time", w.time * self.time_s / 60.0),
            ("carbon", w.carbon * self.carbon_kg_month),
        ]
    }
}

/// Why a site lost for a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Alternative {
    /// A constraint forbids it.
    Rejected {
        /// The site.
        site: String,
        /// The constraint, as written.
        constraint: String,
        /// In words.
        reason: String,
    },
    /// Allowed, but scores worse.
    Worse {
        /// The site.
        site: String,
        /// Its score.
        score: Score,
        /// How much worse than the chosen site.
        delta: f64,
        /// The component that differs most.
        mainly: String,
    },
}

/// Where one unit goes and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Assignment {
    /// The unit.
    pub unit: Unit,
    /// The chosen site.
    pub site: String,
    /// Its score there.
    pub score: Score,
    /// Conversion steps to make the unit's image acceptable there.
    pub chain: Vec<ChainStep>,
    /// Every other candidate site, with why it lost.
    pub alternatives: Vec<Alternative>,
}

/// The answer to a matching request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Placement {
    /// One per unit, in unit order.
    pub assignments: Vec<Assignment>,
    /// Sum of the assignments' totals.
    pub total: f64,
    /// Whether the search proved this placement optimal.
    pub optimal: bool,
    /// Search nodes explored.
    pub explored: u64,
}

/// Everything the solver needs, precomputed.
struct Model<'a> {
    units: &'a [Unit],
    sites: Vec<&'a SiteInfo>,
    constraints: Vec<Constraint>,
    /// Per constraint, per unit: whether the unit is selected.
    member: Vec<Vec<bool>>,
    /// Per unit: the non-unary constraints selecting it.
    unit_cons: Vec<Vec<usize>>,
    /// Per unit, per site: unary score and chain index, or the index of the
    /// unary constraint forbidding it.
    table: Vec<Vec<std::result::Result<(Score, usize), usize>>>,
    /// Distinct conversion chains, referenced from `table`.
    chains: Vec<Vec<ChainStep>>,
    rtt: Vec<Vec<f64>>,
    weights: Weights,
    /// Per unit, the indices of its peers.
    links: Vec<Vec<usize>>,
    /// Per unit: units sharing a spread, gather or latency constraint with it.
    partners: Vec<Vec<usize>>,
}

/// A partial or complete placement, with what the constraints need to be
/// checked in constant time per constraint.
#[derive(Clone)]
struct Placed {
    assign: Vec<Option<usize>>,
    /// Per site: vCPUs, memory MiB, storage bytes in use.
    load: Vec<(u64, u64, u64)>,
    /// Per constraint: how many of its units sit on each site.
    used: Vec<BTreeMap<usize, u32>>,
    /// Ignore capacity (a relaxation used to prove infeasibility).
    relax_capacity: bool,
}

impl Placed {
    fn new(m: &Model<'_>) -> Self {
        Self {
            assign: vec![None; m.units.len()],
            load: vec![(0, 0, 0); m.sites.len()],
            used: vec![BTreeMap::new(); m.constraints.len()],
            relax_capacity: false,
        }
    }

    fn place(&mut self, m: &Model<'_>, u: usize, s: usize) {
        let unit = &m.units[u];
        let l = &mut self.load[s];
        l.0 += u64::from(unit.vcpus);
        l.1 += unit.memory_mib;
        l.2 += unit.storage_bytes;
        for &c in &m.unit_cons[u] {
            *self.used[c].entry(s).or_insert(0) += 1;
        }
        self.assign[u] = Some(s);
    }

    fn unplace(&mut self, m: &Model<'_>, u: usize) {
        let Some(s) = self.assign[u].take() else {
            return;
        };
        let unit = &m.units[u];
        let l = &mut self.load[s];
        l.0 -= u64::from(unit.vcpus);
        l.1 -= unit.memory_mib;
        l.2 -= unit.storage_bytes;
        for &c in &m.unit_cons[u] {
            if let Some(n) = self.used[c].get_mut(&s) {
                *n -= 1;
                if *n == 0 {
                    self.used[c].remove(&s);
                }
            }
        }
    }
}

impl<'a> Model<'a> {
    fn new(
        units: &'a [Unit],
        sites: &'a [SiteInfo],
        req: &Request,
        constraints: Vec<Constraint>,
        finder: &'a ChainFinder,
    ) -> Result<Self> {
        let source = sites.iter().find(|s| s.name == req.source).ok_or_else(|| {
            invalid(format!(
                "source site `{}` is not in the catalog",
                req.source
            ))
        })?;
        let sites: Vec<&SiteInfo> = sites
            .iter()
            .filter(|s| req.include_source || s.name != req.source)
            .collect();
        let member: Vec<Vec<bool>> = constraints
            .iter()
            .map(|c| match c.selector() {
                Some(sel) => units.iter().map(|u| sel.contains(&u.name)).collect(),
                None => vec![true; units.len()],
            })
            .collect();
        let unit_cons = (0..units.len())
            .map(|u| {
                (0..constraints.len())
                    .filter(|&c| member[c][u] && !constraints[c].is_unary())
                    .collect()
            })
            .collect();
        let mut m = Self {
            units,
            sites,
            constraints,
            member,
            unit_cons,
            table: Vec::new(),
            chains: Vec::new(),
            rtt: Vec::new(),
            weights: req.weights,
            links: units
                .iter()
                .map(|u| {
                    units
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| u.peers.contains(&v.name))
                        .map(|(i, _)| i)
                        .collect()
                })
                .collect(),
            partners: Vec::new(),
        };
        m.partners = (0..units.len())
            .map(|u| {
                let mut v: BTreeSet<usize> = BTreeSet::new();
                for (ci, c) in m.constraints.iter().enumerate() {
                    let coupling = matches!(
                        c,
                        Constraint::Spread { .. }
                            | Constraint::Gather { .. }
                            | Constraint::Latency { .. }
                    );
                    if coupling && m.member[ci][u] {
                        v.extend((0..units.len()).filter(|&o| o != u && m.member[ci][o]));
                    }
                }
                v.into_iter().collect()
            })
            .collect();
        // Per site: user latency, and the chain for each image format
        // (chains depend only on the format and the accepted formats).
        let latency: Vec<f64> = m
            .sites
            .iter()
            .map(|s| user_latency(s, req, source))
            .collect();
        let mut chain_memo: BTreeMap<(ImageFormat, Vec<ImageFormat>), Option<usize>> =
            BTreeMap::new();
        let mut chains: Vec<Vec<ChainStep>> = Vec::new();
        let site_chain: Vec<Vec<Option<usize>>> = m
            .sites
            .iter()
            .map(|s| {
                ImageFormat::ALL
                    .iter()
                    .map(|&f| {
                        let key = (f, s.image_formats.iter().copied().collect::<Vec<_>>());
                        *chain_memo.entry(key).or_insert_with(|| {
                            chain_for(finder, f, s).map(|c| {
                                chains.push(c);
                                chains.len() - 1
                            })
                        })
                    })
                    .collect()
            })
            .collect();
        let mut table = Vec::with_capacity(units.len());
        for (ui, u) in units.iter().enumerate() {
            let mut row = Vec::with_capacity(m.sites.len());
            for (si, s) in m.sites.iter().enumerate() {
                let cell = match m.unary_check(ui, s) {
                    Err(ci) => Err(ci),
                    Ok(()) => {
                        let chain = match u.image_format {
                            Some(f) if u.kind == UnitKind::Instance && m.formats_apply(ui) => {
                                let fi = ImageFormat::ALL.iter().position(|&x| x == f).unwrap_or(0);
                                match site_chain[si][fi] {
                                    Some(i) => Ok(i),
                                    None => Err(m.formats_index()),
                                }
                            }
                            _ => Ok(usize::MAX),
                        };
                        chain.map(|ci| {
                            let steps = chains.get(ci).map_or(0, Vec::len);
                            (unit_score(u, s, req, source, steps, latency[si]), ci)
                        })
                    }
                };
                row.push(cell);
            }
            table.push(row);
        }
        m.table = table;
        m.chains = chains;
        m.rtt = m
            .sites
            .iter()
            .map(|a| {
                m.sites
                    .iter()
                    .map(|b| rtt_ms(&a.location, &b.location))
                    .collect()
            })
            .collect();
        Ok(m)
    }

    fn formats_index(&self) -> usize {
        self.constraints
            .iter()
            .position(|c| matches!(c, Constraint::Formats { .. }))
            .unwrap_or(usize::MAX)
    }

    fn formats_apply(&self, u: usize) -> bool {
        let f = self.formats_index();
        f != usize::MAX && self.member[f][u]
    }

    /// Unary constraints other than the image chain: the index of the first
    /// one forbidding unit `u` on site `s`.
    fn unary_check(&self, u: usize, s: &SiteInfo) -> std::result::Result<(), usize> {
        let unit = &self.units[u];
        for (ci, c) in self.constraints.iter().enumerate() {
            if !self.member[ci][u] {
                continue;
            }
            let forbidden = match c {
                Constraint::Ban { sites, .. } => sites.contains(&s.name),
                Constraint::Fence { sites, .. } => !sites.contains(&s.name),
                Constraint::Jurisdiction { regions, .. } => {
                    !regions.iter().any(|r| s.in_jurisdiction(r))
                }
                Constraint::Formats { .. } => {
                    unit.kind == UnitKind::Instance
                        && !s.capabilities.is_empty()
                        && !s.capabilities.contains(&Capability::Compute)
                }
                Constraint::Capacity => !fits_alone(unit, s),
                _ => false,
            };
            if forbidden {
                return Err(ci);
            }
        }
        Ok(())
    }

    /// Why constraint `ci` forbids unit `u` on site `s`, in words.
    fn reason(&self, ci: usize, u: usize, s: &SiteInfo) -> String {
        let unit = &self.units[u];
        match &self.constraints[ci] {
            Constraint::Ban { .. } => format!("{} is banned from {}", unit.name, s.name),
            Constraint::Fence { sites, .. } => {
                format!("{} is fenced to {}", unit.name, sites.join(", "))
            }
            Constraint::Jurisdiction { regions, .. } => {
                format!("{} is outside {}", s.jurisdiction, regions.join(", "))
            }
            Constraint::Formats { .. } => {
                if !s.capabilities.is_empty() && !s.capabilities.contains(&Capability::Compute) {
                    return format!("{} cannot run instances (no compute capability)", s.name);
                }
                let acc: Vec<&str> = s.image_formats.iter().map(|f| f.as_str()).collect();
                format!(
                    "no migrator chain turns {} into a format {} accepts ({})",
                    unit.image_format.map_or("?", ImageFormat::as_str),
                    s.name,
                    if acc.is_empty() {
                        "none declared".to_owned()
                    } else {
                        acc.join(", ")
                    }
                )
            }
            Constraint::Capacity => {
                format!("{} alone exceeds the capacity of {}", unit.name, s.name)
            }
            other => format!("{} on {} breaks {other}", unit.name, s.name),
        }
    }

    fn score(&self, u: usize, s: usize) -> f64 {
        self.table[u][s]
            .as_ref()
            .map_or(f64::INFINITY, |(sc, _)| sc.total)
    }

    /// Weighted round trips from `u` on `s` to its already-placed peers.
    fn pair_cost(&self, p: &Placed, u: usize, s: usize) -> f64 {
        self.weights.latency * self.peers_ms(p, u, s)
    }

    fn peers_ms(&self, p: &Placed, u: usize, s: usize) -> f64 {
        self.links[u]
            .iter()
            .filter_map(|&v| p.assign[v].map(|t| self.rtt[s][t]))
            .sum()
    }

    /// The objective of a complete assignment: unary scores plus each link once.
    fn objective(&self, sol: &[usize]) -> f64 {
        let unary: f64 = sol.iter().enumerate().map(|(u, &s)| self.score(u, s)).sum();
        let pairs: f64 = (0..sol.len())
            .flat_map(|u| {
                self.links[u]
                    .iter()
                    .filter(move |&&v| v > u)
                    .map(move |&v| (u, v))
            })
            .map(|(u, v)| self.weights.latency * self.rtt[sol[u]][sol[v]])
            .sum();
        unary + pairs
    }

    /// The first non-unary constraint that unit `u` (not placed) on site `s`
    /// would break, given the placement `p`.
    fn violates(&self, p: &Placed, u: usize, s: usize) -> Option<usize> {
        let unit = &self.units[u];
        for &ci in &self.unit_cons[u] {
            let used = &p.used[ci];
            let ok = match &self.constraints[ci] {
                Constraint::Capacity if p.relax_capacity => true,
                Constraint::Capacity => {
                    let cap = &self.sites[s].capacity;
                    let (v, m, st) = p.load[s];
                    cap.vcpus
                        .is_none_or(|x| v + u64::from(unit.vcpus) <= u64::from(x))
                        && cap.memory_mib.is_none_or(|x| m + unit.memory_mib <= x)
                        && cap
                            .storage_gib
                            .is_none_or(|x| st + unit.storage_bytes <= x.saturating_mul(1 << 30))
                }
                Constraint::Spread { .. } => !used.contains_key(&s),
                Constraint::Gather { .. } => used.keys().all(|&t| t == s),
                Constraint::Latency { max_ms, .. } => {
                    used.keys().all(|&t| self.rtt[s][t] <= *max_ms)
                }
                _ => true,
            };
            if !ok {
                return Some(ci);
            }
        }
        None
    }
}

fn chain_for(finder: &ChainFinder, f: ImageFormat, s: &SiteInfo) -> Option<Vec<ChainStep>> {
    let accepted: BTreeSet<ArtifactKind> = s
        .image_formats
        .iter()
        .map(|&format| ArtifactKind::DiskImage { format })
        .collect();
    finder.find(ArtifactKind::DiskImage { format: f }, &accepted)
}

fn invalid(msg: String) -> Error {
    Error::Invalid(vec![fluidcloud_plugins::Diagnostic::error(msg)])
}

struct Search<'m, 'a> {
    m: &'m Model<'a>,
    order: Vec<usize>,
    /// Per unit, feasible sites sorted by score then name.
    domains: Vec<Vec<usize>>,
    /// Per position in `order`: sum of the best scores of the units after it.
    rest_bound: Vec<f64>,
    placed: Placed,
    best: Option<(f64, Vec<usize>)>,
    explored: u64,
    limit: u64,
}

impl Search<'_, '_> {
    /// Forward check after placing `u`: every unplaced partner of `u` still
    /// has a site that breaks nothing.
    fn partners_ok(&self, u: usize) -> bool {
        self.m.partners[u].iter().all(|&v| {
            self.placed.assign[v].is_some()
                || self.domains[v]
                    .iter()
                    .any(|&t| self.m.violates(&self.placed, v, t).is_none())
        })
    }

    /// Feasibility only (no costs): can the units of `order[depth..]` be
    /// placed? None when the node limit is hit.
    fn feasible(&mut self, depth: usize) -> Option<bool> {
        self.explored += 1;
        if self.explored > self.limit {
            return None;
        }
        let Some(&u) = self.order.get(depth) else {
            return Some(true);
        };
        for i in 0..self.domains[u].len() {
            let s = self.domains[u][i];
            if self.m.violates(&self.placed, u, s).is_some() {
                continue;
            }
            self.placed.place(self.m, u, s);
            let r = if self.partners_ok(u) {
                self.feasible(depth + 1)
            } else {
                Some(false)
            };
            self.placed.unplace(self.m, u);
            match r {
                Some(false) => {}
                other => return other,
            }
        }
        Some(false)
    }

    /// Depth-first branch and bound. Returns false when the node limit hit.
    fn dfs(&mut self, depth: usize, so_far: f64) -> bool {
        self.explored += 1;
        if self.explored > self.limit {
            return false;
        }
        if depth == self.order.len() {
            if self.best.as_ref().is_none_or(|(b, _)| so_far < *b - 1e-9) {
                let sol = self
                    .placed
                    .assign
                    .iter()
                    .map(|a| a.unwrap_or(usize::MAX))
                    .collect();
                self.best = Some((so_far, sol));
            }
            return true;
        }
        let u = self.order[depth];
        for i in 0..self.domains[u].len() {
            let s = self.domains[u][i];
            let unary = so_far + self.m.score(u, s);
            if let Some((b, _)) = &self.best
                && unary + self.rest_bound[depth] >= *b - 1e-9
            {
                // Domains are sorted by unary score and link costs are
                // never negative: no later site can do better.
                break;
            }
            let total = unary + self.m.pair_cost(&self.placed, u, s);
            if let Some((b, _)) = &self.best
                && total + self.rest_bound[depth] >= *b - 1e-9
            {
                continue;
            }
            if self.m.violates(&self.placed, u, s).is_some() {
                continue;
            }
            self.placed.place(self.m, u, s);
            let complete = !self.partners_ok(u) || self.dfs(depth + 1, total);
            self.placed.unplace(self.m, u);
            if !complete {
                return false;
            }
        }
        true
    }

    /// The cheapest site for a set of units that must share one (a single
    /// unit, or a gather group), given what is already placed; the units
    /// must not be placed. Returns (cost, site).
    fn best_site_for(&mut self, g: &[usize]) -> Option<(f64, usize)> {
        let m = self.m;
        let anchor = *g.iter().min_by_key(|&&v| self.domains[v].len())?;
        let mut best: Option<(f64, usize)> = None;
        if let [u] = g {
            // One unit: rank by cost, take the first that breaks nothing.
            let u = *u;
            let mut cands: Vec<(f64, usize)> = self.domains[u]
                .iter()
                .map(|&s| (m.score(u, s) + m.pair_cost(&self.placed, u, s), s))
                .collect();
            cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            return cands
                .into_iter()
                .find(|&(_, s)| m.violates(&self.placed, u, s).is_none());
        }
        for i in 0..self.domains[anchor].len() {
            let s = self.domains[anchor][i];
            if !g.iter().all(|&v| m.table[v][s].is_ok()) {
                continue;
            }
            let mut cost = 0.0;
            let mut done = Vec::with_capacity(g.len());
            for &v in g {
                if m.violates(&self.placed, v, s).is_some() {
                    break;
                }
                cost += m.score(v, s) + m.pair_cost(&self.placed, v, s);
                self.placed.place(m, v, s);
                done.push(v);
            }
            let ok = done.len() == g.len();
            for v in done {
                self.placed.unplace(m, v);
            }
            if ok && best.is_none_or(|(c, _)| cost < c - 1e-9) {
                best = Some((cost, s));
            }
        }
        best
    }

    /// Greedy placement of gather groups (most constrained first), then
    /// moves of single units and whole groups while they lower the total.
    /// None when the greedy pass dead-ends.
    fn heuristic(&mut self) -> Option<(f64, Vec<usize>)> {
        let m = self.m;
        self.placed = Placed::new(m);
        let mut groups = gather_groups(m);
        groups.sort_by_key(|g| {
            let smallest = g.iter().map(|&v| self.domains[v].len()).min().unwrap_or(0);
            (smallest, g.first().map(|&v| m.units[v].name.clone()))
        });
        for g in &groups {
            let (_, s) = self.best_site_for(g)?;
            for &v in g {
                self.placed.place(m, v, s);
            }
        }
        for _pass in 0..50 {
            let mut improved = false;
            for g in &groups {
                let Some(cur) = g.first().and_then(|&v| self.placed.assign[v]) else {
                    continue;
                };
                for &v in g {
                    self.placed.unplace(m, v);
                }
                let mut cur_cost = 0.0;
                for &v in g {
                    cur_cost += m.score(v, cur) + m.pair_cost(&self.placed, v, cur);
                    self.placed.place(m, v, cur);
                }
                for &v in g {
                    self.placed.unplace(m, v);
                }
                let target = match self.best_site_for(g) {
                    Some((c, s)) if c < cur_cost - 1e-9 => s,
                    _ => cur,
                };
                for &v in g {
                    self.placed.place(m, v, target);
                }
                improved |= target != cur;
            }
            if !improved {
                break;
            }
        }
        let sol: Vec<usize> = self
            .placed
            .assign
            .iter()
            .map(|a| a.unwrap_or(usize::MAX))
            .collect();
        Some((m.objective(&sol), sol))
    }
}

/// Units that `gather` constraints tie together, as groups (union-find);
/// every other unit is a group of its own. Groups and members are sorted.
fn gather_groups(m: &Model<'_>) -> Vec<Vec<usize>> {
    let n = m.units.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], x: usize) -> usize {
        let mut r = x;
        while p[r] != r {
            r = p[r];
        }
        let mut y = x;
        while p[y] != r {
            let next = p[y];
            p[y] = r;
            y = next;
        }
        r
    }
    for (ci, c) in m.constraints.iter().enumerate() {
        if let Constraint::Gather { .. } = c {
            let mut members = (0..n).filter(|&u| m.member[ci][u]);
            if let Some(first) = members.next() {
                for other in members {
                    let (a, b) = (find(&mut parent, first), find(&mut parent, other));
                    parent[b] = a;
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for u in 0..n {
        let r = find(&mut parent, u);
        groups.entry(r).or_default().push(u);
    }
    groups.into_values().collect()
}

/// Units up to which the exact search runs; beyond, the heuristic does.
pub const EXACT_MAX_UNITS: usize = 32;

/// What a search concluded.
enum Outcome {
    /// A placement: its objective, the site of each unit, whether optimal.
    Found(f64, Vec<usize>, bool),
    /// Proven: nothing satisfies the constraints; the units whose
    /// constraints conflict, when the proof involved only some of them.
    Infeasible(Option<Vec<usize>>),
    /// The heuristic found nothing, which proves nothing.
    Unknown,
}

/// Solves the model, and counts the search nodes explored.
fn solve_model(m: &Model<'_>, limit: u64) -> (Outcome, u64) {
    let n = m.units.len();
    let domains: Vec<Vec<usize>> = (0..n)
        .map(|u| {
            let mut d: Vec<usize> = (0..m.sites.len())
                .filter(|&s| m.table[u][s].is_ok())
                .collect();
            d.sort_by(|&a, &b| {
                m.score(u, a)
                    .total_cmp(&m.score(u, b))
                    .then_with(|| m.sites[a].name.cmp(&m.sites[b].name))
            });
            d
        })
        .collect();
    let mut domains = domains;
    if let Some(u) = domains.iter().position(Vec::is_empty) {
        return (Outcome::Infeasible(Some(vec![u])), 0);
    }
    // Small problems: drop sites where a unit, placed alone, already leaves
    // one of its partners nowhere to go (placing more units only removes
    // options, so such a site can never work).
    if n <= EXACT_MAX_UNITS {
        let mut placed = Placed::new(m);
        placed.relax_capacity = true;
        for u in 0..n {
            let keep: Vec<usize> = domains[u]
                .iter()
                .copied()
                .filter(|&s| {
                    placed.place(m, u, s);
                    let ok = m.partners[u].iter().all(|&v| {
                        domains[v]
                            .iter()
                            .any(|&t| m.violates(&placed, v, t).is_none())
                    });
                    placed.unplace(m, u);
                    ok
                })
                .collect();
            if keep.is_empty() {
                let mut involved = vec![u];
                involved.extend(&m.partners[u]);
                return (Outcome::Infeasible(Some(involved)), 0);
            }
            domains[u] = keep;
        }
    }
    // Most constrained first; the members of a gather group one after the
    // other, so a group that cannot share a site fails at once.
    // Fewest sites per coupling first (dom/deg): the units most likely to
    // fail are tried first, so failures surface near the root.
    let key = |v: usize| domains[v].len() as f64 / (1.0 + m.partners[v].len() as f64);
    let mut groups = gather_groups(m);
    for g in &mut groups {
        g.sort_by(|&a, &b| {
            key(a)
                .total_cmp(&key(b))
                .then(m.units[a].name.cmp(&m.units[b].name))
        });
    }
    groups.sort_by(|a, b| {
        let (ka, kb) = (
            a.first().map_or(0.0, |&v| key(v)),
            b.first().map_or(0.0, |&v| key(v)),
        );
        ka.total_cmp(&kb).then_with(|| {
            a.first()
                .map(|&v| &m.units[v].name)
                .cmp(&b.first().map(|&v| &m.units[v].name))
        })
    });
    let order: Vec<usize> = groups.into_iter().flatten().collect();
    // rest_bound[d]: best unary scores of the units after depth d.
    let mut rest_bound = vec![0.0; n];
    let mut acc = 0.0;
    for i in (0..n).rev() {
        rest_bound[i] = acc;
        acc += domains[order[i]]
            .first()
            .map_or(f64::INFINITY, |&s| m.score(order[i], s));
    }
    let mut s = Search {
        m,
        order,
        domains,
        rest_bound,
        placed: Placed::new(m),
        best: None,
        explored: 0,
        limit,
    };
    // Units coupled by spread, gather or latency form components; one that
    // cannot be placed on its own (capacity ignored, a relaxation) proves
    // the whole problem infeasible, and is quick to find.
    let full_order = std::mem::take(&mut s.order);
    s.placed.relax_capacity = true;
    let mut seen = vec![false; n];
    for &start in &full_order {
        if seen[start] || m.partners[start].is_empty() {
            continue;
        }
        let mut comp = vec![start];
        seen[start] = true;
        let mut i = 0;
        while i < comp.len() {
            for &v in &m.partners[comp[i]] {
                if !seen[v] {
                    seen[v] = true;
                    comp.push(v);
                }
            }
            i += 1;
        }
        s.order = full_order
            .iter()
            .copied()
            .filter(|v| comp.contains(v))
            .collect();
        if s.feasible(0) == Some(false) {
            comp.sort_unstable();
            return (Outcome::Infeasible(Some(comp)), s.explored);
        }
    }
    s.placed = Placed::new(m);
    s.order = full_order;
    s.explored = 0;
    if n <= EXACT_MAX_UNITS && s.dfs(0, 0.0) {
        let outcome = match s.best.take() {
            Some((total, sol)) => Outcome::Found(total, sol, true),
            None => Outcome::Infeasible(None),
        };
        return (outcome, s.explored);
    }
    let explored = s.explored;
    match s.heuristic() {
        Some((total, sol)) => (Outcome::Found(total, sol, false), explored),
        None => (Outcome::Unknown, explored),
    }
}

/// Finds the best placement of `units` on `sites` for `req`.
///
/// # Errors
/// `Invalid` when the request names an unknown site or resource;
/// `Infeasible` with a minimal conflicting constraint set when no placement
/// satisfies every constraint.
pub fn solve(
    units: &[Unit],
    sites: &[SiteInfo],
    req: &Request,
    migrators: &[MigratorDescriptor],
) -> Result<Placement> {
    check_names(units, sites, req)?;
    let finder = ChainFinder::new(migrators);
    let constraints = all_constraints(&req.constraints);
    let model = Model::new(units, sites, req, constraints.clone(), &finder)?;
    match solve_model(&model, EXACT_LIMIT) {
        (Outcome::Found(total, sol, optimal), explored) => {
            Ok(explain(&model, &sol, total, optimal, explored))
        }
        (Outcome::Infeasible(involved), _) => {
            // Look for the conflict among the units the proof involved, and
            // the constraints that concern them: much smaller, same answer.
            let (sub_units, sub_cons): (Vec<Unit>, Vec<Constraint>) = match involved {
                Some(ix) => {
                    let sub: Vec<Unit> = ix.iter().map(|&i| units[i].clone()).collect();
                    let cons = constraints
                        .iter()
                        .filter(|c| {
                            c.selector()
                                .is_none_or(|sel| sub.iter().any(|u| sel.contains(&u.name)))
                        })
                        .cloned()
                        .collect();
                    (sub, cons)
                }
                None => (units.to_vec(), constraints.clone()),
            };
            // The smaller problem's conflict is a conflict of the whole
            // problem too; filtering it again over all units keeps it minimal
            // there (other units may make part of it unnecessary).
            let candidate = minimal_conflict(&sub_units, sites, req, &finder, &sub_cons)?;
            Err(Error::Infeasible {
                conflict: minimal_conflict(units, sites, req, &finder, &candidate)?,
            })
        }
        (Outcome::Unknown, explored) => Err(Error::NotFound {
            units: units.len(),
            explored,
        }),
    }
}

fn check_names(units: &[Unit], sites: &[SiteInfo], req: &Request) -> Result<()> {
    let mut diags = Vec::new();
    let unit_names: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let site_names: BTreeSet<&str> = sites.iter().map(|s| s.name.as_str()).collect();
    for (name, ms) in &req.measured_rtt_ms {
        if !site_names.contains(name.as_str()) {
            diags.push(
                fluidcloud_plugins::Diagnostic::error(format!(
                    "measured RTT for unknown site `{name}`"
                ))
                .at_key(format!("measured_rtt_ms[{name}]")),
            );
        } else if !(ms.is_finite() && *ms >= 0.0) {
            diags.push(
                fluidcloud_plugins::Diagnostic::error(format!(
                    "measured RTT for `{name}` must be a non-negative number of ms, not {ms}"
                ))
                .at_key(format!("measured_rtt_ms[{name}]")),
            );
        }
    }
    for (i, c) in req.constraints.iter().enumerate() {
        if let Some(sel) = c.selector() {
            for n in sel.names() {
                if !unit_names.contains(n.as_str()) {
                    diags.push(
                        fluidcloud_plugins::Diagnostic::error(format!(
                            "constraint `{c}` names `{n}`, which is not an instance or bucket of the service (known: {})",
                            unit_names.iter().copied().collect::<Vec<_>>().join(", ")
                        ))
                        .at_key(format!("constraints[{i}]")),
                    );
                }
            }
        }
        if let Constraint::Ban { sites: s, .. } | Constraint::Fence { sites: s, .. } = c {
            for n in s {
                if !site_names.contains(n.as_str()) {
                    diags.push(
                        fluidcloud_plugins::Diagnostic::error(format!(
                            "constraint `{c}` names unknown site `{n}`"
                        ))
                        .at_key(format!("constraints[{i}]")),
                    );
                }
            }
        }
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(diags))
    }
}

/// Deletion filter over the constraints (user and implicit).
fn minimal_conflict(
    units: &[Unit],
    sites: &[SiteInfo],
    req: &Request,
    finder: &ChainFinder,
    all: &[Constraint],
) -> Result<Vec<Constraint>> {
    // Drop a constraint only when the rest is *proven* infeasible, so the
    // set returned is always a proven conflict.
    let feasible = |set: &[Constraint]| -> Result<bool> {
        let m = Model::new(units, sites, req, set.to_vec(), finder)?;
        Ok(!matches!(
            solve_model(&m, EXACT_LIMIT).0,
            Outcome::Infeasible(_)
        ))
    };
    let mut kept: Vec<Constraint> = all.to_vec();
    let mut i = 0;
    while i < kept.len() {
        let mut without = kept.clone();
        without.remove(i);
        if feasible(&without)? {
            i += 1; // needed for the conflict
        } else {
            kept = without;
        }
    }
    Ok(kept)
}

fn explain(m: &Model<'_>, sol: &[usize], total: f64, optimal: bool, explored: u64) -> Placement {
    let mut placed = Placed::new(m);
    for (u, &s) in sol.iter().enumerate() {
        placed.place(m, u, s);
    }
    let mut assignments = Vec::new();
    for (u, &s) in sol.iter().enumerate() {
        let unit = &m.units[u];
        // A unit's score includes the round trips to its peers where they are.
        let with_peers = |placed: &Placed, o: usize, sc: &Score| {
            let mut sc = *sc;
            sc.peers_ms = m.peers_ms(placed, u, o);
            sc.total += m.weights.latency * sc.peers_ms;
            sc
        };
        let (score, chain) = match &m.table[u][s] {
            Ok((sc, ci)) => (
                with_peers(&placed, s, sc),
                m.chains.get(*ci).cloned().unwrap_or_default(),
            ),
            Err(_) => (Score::default(), Vec::new()),
        };
        placed.unplace(m, u);
        let mut alternatives = Vec::new();
        for (o, site) in m.sites.iter().enumerate() {
            if o == s {
                continue;
            }
            match &m.table[u][o] {
                Err(ci) => alternatives.push(Alternative::Rejected {
                    site: site.name.clone(),
                    constraint: m.constraints[*ci].to_string(),
                    reason: m.reason(*ci, u, site),
                }),
                Ok((alt, _)) => {
                    // Would moving just this unit there break a constraint?
                    if let Some(ci) = m.violates(&placed, u, o) {
                        alternatives.push(Alternative::Rejected {
                            site: site.name.clone(),
                            constraint: m.constraints[ci].to_string(),
                            reason: format!(
                                "given where the other units go, {} on {} breaks it",
                                unit.name, site.name
                            ),
                        });
                    } else {
                        let alt = with_peers(&placed, o, alt);
                        let w = m.weights;
                        let (chosen, other) = (score.parts(&w), alt.parts(&w));
                        let mainly = chosen
                            .iter()
                            .zip(other.iter())
                            .max_by(|a, b| (a.1.1 - a.0.1).total_cmp(&(b.1.1 - b.0.1)))
                            .map(|(c, _)| c.0)
                            .unwrap_or("total");
                        let mainly = if mainly == "latency"
                            && (score.latency_measured || alt.latency_measured)
                        {
                            "latency (measured)"
                        } else {
                            mainly
                        };
                        alternatives.push(Alternative::Worse {
                            site: site.name.clone(),
                            score: alt,
                            delta: alt.total - score.total,
                            mainly: mainly.to_owned(),
                        });
                    }
                }
            }
        }
        placed.place(m, u, s);
        alternatives.sort_by(|a, b| match (a, b) {
            (
                Alternative::Worse {
                    delta: x, site: sa, ..
                },
                Alternative::Worse {
                    delta: y, site: sb, ..
                },
            ) => x.total_cmp(y).then(sa.cmp(sb)),
            (Alternative::Worse { .. }, _) => std::cmp::Ordering::Less,
            (_, Alternative::Worse { .. }) => std::cmp::Ordering::Greater,
            (Alternative::Rejected { site: sa, .. }, Alternative::Rejected { site: sb, .. }) => {
                sa.cmp(sb)
            }
        });
        assignments.push(Assignment {
            unit: unit.clone(),
            site: m.sites[s].name.clone(),
            score,
            chain,
            alternatives,
        });
    }
    Placement {
        assignments,
        total,
        optimal,
        explored,
    }
}

/// The built-in implicit constraints plus the user's.
fn all_constraints(user: &[Constraint]) -> Vec<Constraint> {
    let mut v = user.to_vec();
    v.push(Constraint::Formats {
        resources: Selector::All(AllMarker),
    });
    v.push(Constraint::Capacity);
    v
}

/// Weighted mean RTT from the users (default: the source site) to `s`:
/// the measured figure when there is one.
fn user_latency(s: &SiteInfo, req: &Request, source: &SiteInfo) -> f64 {
    if let Some(ms) = req.measured_rtt_ms.get(&s.name) {
        return *ms;
    }
    let users: Vec<(Location, f64)> = if req.users.is_empty() {
        vec![(source.location.clone(), 1.0)]
    } else {
        req.users
            .iter()
            .map(|p| {
                (
                    Location {
                        region: String::new(),
                        latitude: p.latitude,
                        longitude: p.longitude,
                    },
                    p.weight,
                )
            })
            .collect()
    };
    let wsum: f64 = users
        .iter()
        .map(|u| u.1)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    users
        .iter()
        .map(|(l, w)| rtt_ms(l, &s.location) * w)
        .sum::<f64>()
        / wsum
}

fn unit_score(
    u: &Unit,
    s: &SiteInfo,
    req: &Request,
    source: &SiteInfo,
    steps: usize,
    latency_ms: f64,
) -> Score {
    let c = &s.cost;
    let mem_gib = u.memory_mib as f64 / 1024.0;
    let cost_month = f64::from(u.vcpus) * c.vcpu_hour * HOURS_PER_MONTH
        + mem_gib * c.memory_gib_hour * HOURS_PER_MONTH
        + u.storage_bytes as f64 / GIB * c.storage_gib_month;
    let moves = s.name != source.name;
    let egress = if moves {
        u.move_bytes as f64 / GIB * source.cost.egress_gib
    } else {
        0.0
    };
    let time_s = if moves {
        u.move_bytes as f64 * 8.0 / (req.bandwidth_mbps * 1e6)
            + steps as f64 * u.move_bytes as f64 / (req.convert_mb_s * 1e6)
    } else {
        0.0
    };
    let carbon_kg_month =
        s.cost.carbon_g_per_kwh.unwrap_or(0.0) * f64::from(u.vcpus) * 10.0 * HOURS_PER_MONTH / 1e6;
    let mut score = Score {
        latency_ms,
        latency_measured: req.measured_rtt_ms.contains_key(&s.name),
        cost_month,
        egress,
        time_s,
        carbon_kg_month,
        peers_ms: 0.0,
        total: 0.0,
    };
    score.total = score.parts(&req.weights).iter().map(|p| p.1).sum();
    score
}

fn fits_alone(u: &Unit, s: &SiteInfo) -> bool {
    let cap = &s.capacity;
    cap.vcpus.is_none_or(|v| u.vcpus <= v)
        && cap.memory_mib.is_none_or(|m| u.memory_mib <= m)
        && cap
            .storage_gib
            .is_none_or(|g| u.storage_bytes <= g.saturating_mul(1 << 30))
}

/// The units of `t` that [`solve`] places, by resource id.
pub fn unit_of(units: &[Unit]) -> BTreeMap<ResourceId, String> {
    units
        .iter()
        .flat_map(|u| u.members.iter().map(move |m| (m.clone(), u.name.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidcloud_plugins::{Capacity, Cost};
    use proptest::prelude::*;

    fn site(
        name: &str,
        lat: f64,
        lon: f64,
        jur: &str,
        vcpu_hour: f64,
        formats: &[ImageFormat],
        vcpus: Option<u32>,
    ) -> SiteInfo {
        SiteInfo {
            name: name.into(),
            kind: "local".into(),
            location: Location {
                region: name.into(),
                latitude: lat,
                longitude: lon,
            },
            jurisdiction: jur.into(),
            cost: Cost {
                vcpu_hour,
                egress_gib: 0.01,
                ..Cost::default()
            },
            capacity: Capacity {
                vcpus,
                memory_mib: None,
                storage_gib: None,
            },
            image_formats: formats.iter().copied().collect(),
            capabilities: Capability::ALL.into_iter().collect(),
            rtt_ms: None,
        }
    }

    fn unit(name: &str, vcpus: u32, format: Option<ImageFormat>) -> Unit {
        Unit {
            name: name.into(),
            kind: if format.is_some() {
                UnitKind::Instance
            } else {
                UnitKind::Bucket
            },
            vcpus,
            memory_mib: 1024,
            storage_bytes: 1 << 30,
            move_bytes: 1 << 28,
            image_format: format,
            members: vec![],
            peers: vec![],
        }
    }

    use ImageFormat::{Qcow2, Raw};

    fn world() -> Vec<SiteInfo> {
        vec![
            site("src", 48.85, 2.35, "EU/FR", 0.03, &[Qcow2, Raw], None),
            site("near", 48.11, -1.68, "EU/FR", 0.05, &[Raw], Some(4)),
            site("cheap", 38.9, -77.3, "US/VA", 0.01, &[Raw, Qcow2], None),
            site("mid", 50.1, 8.7, "EU/DE", 0.02, &[Qcow2], Some(8)),
        ]
    }

    fn convert() -> Vec<MigratorDescriptor> {
        vec![MigratorDescriptor {
            name: "image-convert".into(),
            version: "0.1.0".into(),
            summary: String::new(),
            consumes: vec![ArtifactKind::DiskImage { format: Qcow2 }],
            produces: vec![ArtifactKind::DiskImage { format: Raw }],
        }]
    }

    fn req(constraints: &[&str]) -> Request {
        let mut r = Request::new("src");
        r.constraints = constraints.iter().map(|c| c.parse().unwrap()).collect();
        r
    }

    fn site_of<'p>(p: &'p Placement, unit: &str) -> &'p str {
        &p.assignments
            .iter()
            .find(|a| a.unit.name == unit)
            .unwrap()
            .site
    }

    #[test]
    fn picks_the_best_score_and_explains_every_other_site() {
        let units = [unit("web", 2, Some(Qcow2))];
        let p = solve(&units, &world(), &req(&[]), &convert()).unwrap();
        assert!(p.optimal);
        let a = &p.assignments[0];
        assert_eq!(a.site, "mid", "{p:#?}");
        assert_eq!(
            a.alternatives.len(),
            2,
            "source excluded, the two others explained"
        );
        for alt in &a.alternatives {
            if let Alternative::Worse { delta, .. } = alt {
                assert!(*delta > 0.0);
            }
        }
        let near = a
            .alternatives
            .iter()
            .find(|x| matches!(x, Alternative::Worse { site, .. } if site == "near"));
        assert!(
            near.is_some(),
            "near is allowed through the qcow2->raw chain: {a:#?}"
        );
    }

    #[test]
    fn a_measured_rtt_replaces_the_estimate_and_the_explanation_says_so() {
        let units = [unit("web", 2, Some(Qcow2))];
        // Estimated, mid (Frankfurt) wins; measured, its route is slow.
        let mut r = req(&[]);
        r.measured_rtt_ms.insert("mid".into(), 400.0);
        let p = solve(&units, &world(), &r, &convert()).unwrap();
        let a = &p.assignments[0];
        assert_ne!(a.site, "mid", "{p:#?}");
        assert!(!a.score.latency_measured);
        let mid = a
            .alternatives
            .iter()
            .find_map(|x| match x {
                Alternative::Worse {
                    site,
                    score,
                    mainly,
                    ..
                } if site == "mid" => Some((score, mainly)),
                _ => None,
            })
            .unwrap();
        assert_eq!(mid.0.latency_ms, 400.0);
        assert!(mid.0.latency_measured);
        assert_eq!(mid.1, "latency (measured)");
        // A figure for a site that does not exist is refused, by name.
        let mut r = req(&[]);
        r.measured_rtt_ms.insert("atlantis".into(), 3.0);
        let e = solve(&units, &world(), &r, &convert()).unwrap_err();
        assert!(e.to_string().contains("atlantis"), "{e}");
        let mut r = req(&[]);
        r.measured_rtt_ms.insert("mid".into(), -1.0);
        assert!(solve(&units, &world(), &r, &convert()).is_err());
    }

    #[test]
    fn unary_constraints_reject_with_their_names() {
        let units = [unit("web", 2, Some(Qcow2))];
        let p = solve(
            &units,
            &world(),
            &req(&["ban(web; mid)", "jurisdiction(*; EU)"]),
            &convert(),
        )
        .unwrap();
        let a = &p.assignments[0];
        assert_eq!(a.site, "near");
        assert_eq!(a.chain.len(), 1, "qcow2 must be converted to raw for near");
        let rej: BTreeMap<&str, &str> = a
            .alternatives
            .iter()
            .filter_map(|x| match x {
                Alternative::Rejected {
                    site, constraint, ..
                } => Some((site.as_str(), constraint.as_str())),
                Alternative::Worse { .. } => None,
            })
            .collect();
        assert_eq!(rej.get("mid"), Some(&"ban(web; mid)"));
        assert_eq!(rej.get("cheap"), Some(&"jurisdiction(*; EU)"));
        // Without the converter, near cannot take a qcow2 image.
        let p = solve(&units, &world(), &req(&["ban(web; mid)"]), &[]).unwrap();
        let a = &p.assignments[0];
        assert_eq!(a.site, "cheap");
        assert!(a.alternatives.iter().any(|x| matches!(x, Alternative::Rejected { site, constraint, .. } if site == "near" && constraint == "formats(*)")));
    }

    #[test]
    fn spread_gather_latency_and_capacity_shape_the_placement() {
        let units = [unit("a", 2, Some(Raw)), unit("b", 2, Some(Raw))];
        let p = solve(&units, &world(), &req(&["spread(a,b)"]), &[]).unwrap();
        assert_ne!(site_of(&p, "a"), site_of(&p, "b"));
        let p = solve(&units, &world(), &req(&["gather(a,b)"]), &[]).unwrap();
        assert_eq!(site_of(&p, "a"), site_of(&p, "b"));
        // Raw images fit only near and cheap, an ocean apart: no spread within 20 ms.
        let err = solve(
            &units,
            &world(),
            &req(&["spread(a,b)", "latency(a,b; 20)"]),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("spread(a,b), latency(a,b; 20), formats(*)"),
            "{err}"
        );
        // qcow2 images fit mid, and near through the converter: Rennes-Frankfurt is ~13 ms.
        let units = [unit("a", 2, Some(Qcow2)), unit("b", 2, Some(Qcow2))];
        let p = solve(
            &units,
            &world(),
            &req(&["spread(a,b)", "latency(a,b; 20)"]),
            &convert(),
        )
        .unwrap();
        let (sa, sb) = (site_of(&p, "a"), site_of(&p, "b"));
        assert!(
            sa != "cheap" && sb != "cheap",
            "transatlantic RTT exceeds 20 ms: {sa} {sb}"
        );
        let explained = &p.assignments[0].alternatives;
        assert!(explained.iter().any(|x| matches!(x, Alternative::Rejected { constraint, .. } if constraint.starts_with("spread") || constraint.starts_with("latency"))), "{explained:#?}");
    }

    #[test]
    fn infeasible_problems_name_a_minimal_conflict() {
        let units = [unit("web", 2, Some(Qcow2)), unit("db", 2, Some(Qcow2))];
        let err = solve(
            &units,
            &world(),
            &req(&["fence(web; near)", "ban(web; near)", "spread(web,db)"]),
            &convert(),
        )
        .unwrap_err();
        let Error::Infeasible { conflict } = err else {
            panic!("{err}")
        };
        let names: Vec<String> = conflict.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["fence(web; near)", "ban(web; near)"]);

        // Two small units fenced to one site cannot be spread.
        let units = [unit("a", 1, Some(Raw)), unit("b", 1, Some(Raw))];
        let err = solve(
            &units,
            &world(),
            &req(&["fence(a,b; near)", "spread(*)"]),
            &[],
        )
        .unwrap_err();
        let Error::Infeasible { conflict } = err else {
            panic!("{err}")
        };
        let names: Vec<String> = conflict.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["fence(a,b; near)", "spread(*)"]);
        // Capacity: near holds 4 vCPUs; two 3-vCPU units fenced there do not fit.
        let units = [unit("a", 3, Some(Raw)), unit("b", 3, Some(Raw))];
        let err = solve(
            &units,
            &world(),
            &req(&["fence(a,b; near)", "spread(*)"]),
            &[],
        )
        .unwrap_err();
        let Error::Infeasible { conflict } = err else {
            panic!("{err}")
        };
        assert_eq!(
            conflict.len(),
            2,
            "either minimal set is right: {conflict:?}"
        );
        let err = solve(&units, &world(), &req(&["fence(a,b; near)"]), &[]).unwrap_err();
        let Error::Infeasible { conflict } = err else {
            panic!("{err}")
        };
        let names: Vec<String> = conflict.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["fence(a,b; near)", "capacity"]);
        assert!(
            Error::Infeasible { conflict }
                .to_string()
                .contains("these conflict: fence(a,b; near), capacity")
        );
    }

    #[test]
    fn unknown_names_in_constraints_are_invalid() {
        let units = [unit("web", 2, Some(Raw))];
        let err = solve(&units, &world(), &req(&["ban(wbe; near)"]), &[]).unwrap_err();
        assert!(
            err.to_string().contains("`wbe`") && err.to_string().contains("known: web"),
            "{err}"
        );
        let err = solve(&units, &world(), &req(&["fence(web; narnia)"]), &[]).unwrap_err();
        assert!(err.to_string().contains("unknown site `narnia`"), "{err}");
        let err = solve(&units, &world(), &Request::new("nowhere"), &[]).unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
    }

    fn many(n_units: usize, n_sites: usize) -> (Vec<Unit>, Vec<SiteInfo>) {
        let units = (0..n_units)
            .map(|i| {
                let mut u = unit(
                    &format!("u{i}"),
                    1 + (i % 3) as u32,
                    Some(if i % 2 == 0 { Qcow2 } else { Raw }),
                );
                if i % 4 != 3 {
                    u.peers.push(format!("u{}", i + 1));
                }
                if i % 4 != 0 {
                    u.peers.push(format!("u{}", i - 1));
                }
                u
            })
            .collect();
        let mut sites = vec![site("src", 48.85, 2.35, "EU/FR", 0.03, &[Qcow2, Raw], None)];
        for i in 0..n_sites {
            let f: &[ImageFormat] = if i % 2 == 0 { &[Raw] } else { &[Qcow2, Raw] };
            let jur = if i % 3 == 0 { "US/VA" } else { "EU/DE" };
            sites.push(site(
                &format!("s{i}"),
                40.0 + (i % 13) as f64,
                -5.0 + (i % 17) as f64,
                jur,
                0.01 + (i % 7) as f64 * 0.005,
                f,
                Some(24),
            ));
        }
        (units, sites)
    }

    #[test]
    fn regression_gather_and_spread_of_the_same_units_is_proven_infeasible_at_scale() {
        // Once took minutes: the contradiction sat deep in the search order.
        let (units, sites) = many(300, 100);
        let r = req(&[
            "spread(u10,u20,u30)",
            "jurisdiction(u1,u2,u3; EU)",
            "gather(u20,u10)",
            "ban(u5; s3)",
        ]);
        let Err(Error::Infeasible { conflict }) = solve(&units, &sites, &r, &convert()) else {
            panic!("must be proven infeasible")
        };
        let names: Vec<String> = conflict.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["spread(u10,u20,u30)", "gather(u20,u10)"]);
    }

    #[test]
    fn large_problems_use_the_heuristic_and_still_respect_every_constraint() {
        let (units, sites) = many(400, 120);
        let cons = [
            "spread(u0,u4,u8,u12)",
            "gather(u1,u2)",
            "latency(u5,u6,u7; 15)",
            "jurisdiction(*; EU)",
            "ban(u9,u10; s1,s2)",
            "fence(u11; s4,s5,s7)",
        ];
        let r = req(&cons);
        let p = solve(&units, &sites, &r, &convert()).unwrap();
        assert!(
            !p.optimal,
            "{} units is beyond the exact search",
            units.len()
        );
        let sol: Vec<usize> = p
            .assignments
            .iter()
            .map(|a| sites.iter().position(|s| s.name == a.site).unwrap())
            .collect();
        let chains = ChainFinder::new(&convert());
        assert!(satisfied(&units, &sites, &r.constraints, &sol, &chains));
        // No single move improves the heuristic's answer.
        for a in &p.assignments {
            for alt in &a.alternatives {
                if let Alternative::Worse { delta, .. } = alt {
                    assert!(*delta >= -1e-9, "{}: {alt:?}", a.unit.name);
                }
            }
        }
    }

    /// An independent statement of every constraint, for the property tests.
    fn satisfied(
        units: &[Unit],
        sites: &[SiteInfo],
        cons: &[Constraint],
        sol: &[usize],
        chains: &ChainFinder,
    ) -> bool {
        let rtt = |a: usize, b: usize| rtt_ms(&sites[a].location, &sites[b].location);
        let members = |sel: &Selector| -> Vec<usize> {
            (0..units.len())
                .filter(|&u| sel.contains(&units[u].name))
                .collect()
        };
        for c in all_constraints(cons) {
            let ok = match &c {
                Constraint::Ban {
                    resources,
                    sites: s,
                } => members(resources)
                    .iter()
                    .all(|&u| !s.contains(&sites[sol[u]].name)),
                Constraint::Fence {
                    resources,
                    sites: s,
                } => members(resources)
                    .iter()
                    .all(|&u| s.contains(&sites[sol[u]].name)),
                Constraint::Jurisdiction { resources, regions } => members(resources)
                    .iter()
                    .all(|&u| regions.iter().any(|r| sites[sol[u]].in_jurisdiction(r))),
                Constraint::Spread { resources } => {
                    let m = members(resources);
                    m.iter()
                        .all(|&a| m.iter().all(|&b| a == b || sol[a] != sol[b]))
                }
                Constraint::Gather { resources } => {
                    let m = members(resources);
                    m.iter().all(|&a| sol[a] == sol[m[0]])
                }
                Constraint::Latency { resources, max_ms } => {
                    let m = members(resources);
                    m.iter()
                        .all(|&a| m.iter().all(|&b| rtt(sol[a], sol[b]) <= *max_ms))
                }
                Constraint::Capacity => (0..sites.len()).all(|s| {
                    let v: u64 = (0..units.len())
                        .filter(|&u| sol[u] == s)
                        .map(|u| u64::from(units[u].vcpus))
                        .sum();
                    sites[s].capacity.vcpus.is_none_or(|c| v <= u64::from(c))
                }),
                Constraint::Formats { .. } => {
                    (0..units.len()).all(|u| match units[u].image_format {
                        None => true,
                        Some(f) => {
                            let acc = sites[sol[u]]
                                .image_formats
                                .iter()
                                .map(|&format| ArtifactKind::DiskImage { format })
                                .collect();
                            chains
                                .find(ArtifactKind::DiskImage { format: f }, &acc)
                                .is_some()
                        }
                    })
                }
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn arb_problem() -> impl Strategy<Value = (Vec<Unit>, Vec<SiteInfo>, Vec<String>)> {
        let units = prop::collection::vec((1u32..5, prop::bool::ANY, prop::bool::ANY), 1..5)
            .prop_map(|v| {
                let n = v.len();
                let mut units: Vec<Unit> = v
                    .iter()
                    .enumerate()
                    .map(|(i, (vcpus, qcow, _))| {
                        unit(
                            &format!("u{i}"),
                            *vcpus,
                            Some(if *qcow { Qcow2 } else { Raw }),
                        )
                    })
                    .collect();
                // Link each unit to the next one when its flag says so.
                for (i, (_, _, linked)) in v.iter().enumerate() {
                    if *linked && i + 1 < n {
                        units[i].peers.push(format!("u{}", i + 1));
                        units[i + 1].peers.push(format!("u{i}"));
                    }
                }
                units
            });
        let sites = prop::collection::vec(
            (
                -60.0f64..60.0,
                -120.0f64..120.0,
                0.005f64..0.06,
                prop::option::of(2u32..10),
                prop::bool::ANY,
                0usize..3,
            ),
            2..5,
        )
        .prop_map(|v| {
            let mut s: Vec<SiteInfo> = v
                .into_iter()
                .enumerate()
                .map(|(i, (lat, lon, price, cap, qcow, j))| {
                    let formats: &[ImageFormat] = if qcow { &[Qcow2, Raw] } else { &[Raw] };
                    site(
                        &format!("s{i}"),
                        lat,
                        lon,
                        ["EU/FR", "EU/DE", "US/VA"][j],
                        price,
                        formats,
                        cap,
                    )
                })
                .collect();
            s.insert(
                0,
                site("src", 48.85, 2.35, "EU/FR", 0.03, &[Qcow2, Raw], None),
            );
            s
        });
        let cons = prop::collection::vec(
            prop::sample::select(vec![
                "ban(u0; s0)",
                "fence(u1; s1,s2)",
                "spread(u0,u1)",
                "gather(u1,u2)",
                "latency(u0,u2; 40)",
                "jurisdiction(*; EU)",
                "spread(*)",
                "ban(u2,u3; s1)",
            ]),
            0..4,
        );
        (units, sites, cons).prop_map(|(u, s, c)| {
            let n = u.len();
            // Keep only constraints whose resources exist.
            let c = c
                .into_iter()
                .filter(|c| {
                    (0..6)
                        .filter(|i| c.contains(&format!("u{i}")))
                        .all(|i| i < n)
                })
                .filter(|c| {
                    (0..6)
                        .filter(|i| c.contains(&format!("s{i}")))
                        .all(|i| i + 1 < s.len())
                })
                .map(str::to_owned)
                .collect();
            (u, s, c)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn solver_matches_brute_force_and_respects_every_constraint((units, sites, cons) in arb_problem()) {
            let mut r = Request::new("src");
            r.constraints = cons.iter().map(|c| c.parse().unwrap()).collect();
            let migrators = convert();
            let chains = ChainFinder::new(&migrators);
            let candidates: Vec<usize> = (1..sites.len()).collect();
            let model = Model::new(&units, &sites, &r, all_constraints(&r.constraints), &chains).unwrap();
            // Brute force over every assignment.
            let mut best: Option<f64> = None;
            let n = units.len();
            let mut idx = vec![0usize; n];
            loop {
                let sol: Vec<usize> = idx.iter().map(|&i| candidates[i]).collect();
                if satisfied(&units, &sites, &r.constraints, &sol, &chains) {
                    let idx0: Vec<usize> = sol.iter().map(|&s| s - 1).collect();
                    let unary: f64 = (0..n).map(|u| model.score(u, idx0[u])).sum();
                    let mut pairs = 0.0;
                    for a in 0..n {
                        for b in a + 1..n {
                            if units[a].peers.contains(&units[b].name) {
                                pairs += rtt_ms(&sites[sol[a]].location, &sites[sol[b]].location);
                            }
                        }
                    }
                    let total = unary + pairs;
                    best = Some(best.map_or(total, |b: f64| b.min(total)));
                }
                let mut k = 0;
                while k < n { idx[k] += 1; if idx[k] < candidates.len() { break; } idx[k] = 0; k += 1; }
                if k == n { break; }
            }
            match (solve(&units, &sites, &r, &migrators), best) {
                (Ok(p), Some(b)) => {
                    prop_assert!(p.optimal);
                    prop_assert!((p.total - b).abs() < 1e-6, "solver {} vs brute force {}", p.total, b);
                    let sol: Vec<usize> = p.assignments.iter().map(|a| sites.iter().position(|s| s.name == a.site).unwrap()).collect();
                    prop_assert!(satisfied(&units, &sites, &r.constraints, &sol, &chains));
                    for a in &p.assignments {
                        prop_assert_eq!(a.alternatives.len(), sites.len() - 2);
                        for alt in &a.alternatives {
                            if let Alternative::Worse { delta, .. } = alt {
                                prop_assert!(*delta >= -1e-9, "an optimal placement has no better single move");
                            }
                        }
                    }
                }
                (Err(Error::Infeasible { conflict }), None) => {
                    // The conflict alone is infeasible, and removing any one of its
                    // constraints makes it feasible.
                    let m = Model::new(&units, &sites, &r, conflict.clone(), &chains).unwrap();
                    prop_assert!(matches!(solve_model(&m, EXACT_LIMIT).0, Outcome::Infeasible(_)));
                    for i in 0..conflict.len() {
                        let mut less = conflict.clone();
                        less.remove(i);
                        let m = Model::new(&units, &sites, &r, less, &chains).unwrap();
                        prop_assert!(matches!(solve_model(&m, EXACT_LIMIT).0, Outcome::Found(..)), "not minimal: {:?}", conflict);
                    }
                }
                (got, want) => prop_assert!(false, "solver {:?} but brute force {:?}", got.map(|p| p.total), want),
            }
        }

        #[test]
        fn the_heuristic_respects_constraints_when_it_finds_a_placement((units, sites, cons) in arb_problem()) {
            let mut r = Request::new("src");
            r.constraints = cons.iter().map(|c| c.parse().unwrap()).collect();
            let migrators = convert();
            let chains = ChainFinder::new(&migrators);
            let model = Model::new(&units, &sites, &r, all_constraints(&r.constraints), &chains).unwrap();
            // A node limit of 1 forces the heuristic.
            if let (Outcome::Found(total, sol, optimal), _) = solve_model(&model, 1) {
                prop_assert!(!optimal);
                prop_assert!((model.objective(&sol) - total).abs() < 1e-6);
                let sol: Vec<usize> = sol.iter().map(|&s| s + 1).collect();
                prop_assert!(satisfied(&units, &sites, &r.constraints, &sol, &chains));
                if let (Outcome::Found(exact, ..), _) = solve_model(&model, EXACT_LIMIT) {
                    prop_assert!(total >= exact - 1e-6, "the heuristic cannot beat the optimum");
                }
            }
        }
    }
}
