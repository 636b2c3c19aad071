//! Placement constraints, in the vocabulary of the btrPlace/Plasma work.
//!
//! | constraint | meaning |
//! |---|---|
//! | `ban(R; S)` | no resource of R goes to a site of S |
//! | `fence(R; S)` | every resource of R goes to a site of S |
//! | `spread(R)` | no two resources of R share a site |
//! | `gather(R)` | all resources of R share one site |
//! | `latency(R; MS)` | the estimated round trip between the sites of any two resources of R is at most MS |
//! | `jurisdiction(R; J)` | every resource of R goes to a site within one of the jurisdictions J (`EU` covers `EU/FR`) |
//!
//! `R` is a comma-separated list of placement units (instance or bucket
//! names, or ids such as `instance:web`), or `*` for all of them. Two
//! constraints are always present: `capacity` (what each site can hold) and
//! `formats(R)` (an instance's boot image must be accepted by the target,
//! directly or through a chain of migrators); they are named like the others
//! so infeasibility explanations can point at them.

use std::fmt;
use std::str::FromStr;

use fluidcloud_plugins::Diagnostic;
use serde::{Deserialize, Serialize};

/// The resources a constraint applies to.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(untagged)]
pub enum Selector {
    /// `*`: every placement unit.
    All(AllMarker),
    /// Named units.
    Names(Vec<String>),
}

/// The `"*"` of [`Selector::All`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllMarker;

impl Serialize for AllMarker {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("*")
    }
}

impl schemars::JsonSchema for AllMarker {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "All".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "const": "*", "description": "every resource" })
    }
}

impl<'de> Deserialize<'de> for AllMarker {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            Ok(AllMarker)
        } else {
            Err(serde::de::Error::custom(
                "expected \"*\" or a list of names",
            ))
        }
    }
}

impl Selector {
    /// Whether the unit called `name` is selected.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::All(_) => true,
            Self::Names(n) => n.iter().any(|x| x == name),
        }
    }

    /// The named units (empty for `*`).
    pub fn names(&self) -> &[String] {
        match self {
            Self::All(_) => &[],
            Self::Names(n) => n,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All(_) => f.write_str("*"),
            Self::Names(n) => f.write_str(&n.join(",")),
        }
    }
}

/// One placement constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Constraint {
    /// Resources never go to these sites.
    Ban {
        /// Which resources.
        resources: Selector,
        /// Forbidden sites.
        sites: Vec<String>,
    },
    /// Resources only go to these sites.
    Fence {
        /// Which resources.
        resources: Selector,
        /// Allowed sites.
        sites: Vec<String>,
    },
    /// No two of these resources on the same site.
    Spread {
        /// Which resources.
        resources: Selector,
    },
    /// All of these resources on the same site.
    Gather {
        /// Which resources.
        resources: Selector,
    },
    /// Round trip between the chosen sites of any two of these resources.
    Latency {
        /// Which resources.
        resources: Selector,
        /// Maximum estimated RTT in milliseconds.
        max_ms: f64,
    },
    /// Resources stay within these jurisdictions.
    Jurisdiction {
        /// Which resources.
        resources: Selector,
        /// Allowed jurisdictions (prefixes such as `EU`).
        regions: Vec<String>,
    },
    /// Implicit: what a site holds never exceeds its declared capacity.
    Capacity,
    /// Implicit: an instance's image must be accepted by its site (directly
    /// or through a migrator chain).
    Formats {
        /// Which resources.
        resources: Selector,
    },
}

impl Constraint {
    /// The resources this constraint concerns.
    pub fn selector(&self) -> Option<&Selector> {
        match self {
            Self::Ban { resources, .. }
            | Self::Fence { resources, .. }
            | Self::Spread { resources }
            | Self::Gather { resources }
            | Self::Latency { resources, .. }
            | Self::Jurisdiction { resources, .. }
            | Self::Formats { resources } => Some(resources),
            Self::Capacity => None,
        }
    }

    /// Whether it constrains a single resource's site on its own.
    pub fn is_unary(&self) -> bool {
        matches!(
            self,
            Self::Ban { .. }
                | Self::Fence { .. }
                | Self::Jurisdiction { .. }
                | Self::Formats { .. }
        )
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ban { resources, sites } => write!(f, "ban({resources}; {})", sites.join(",")),
            Self::Fence { resources, sites } => {
                write!(f, "fence({resources}; {})", sites.join(","))
            }
            Self::Spread { resources } => write!(f, "spread({resources})"),
            Self::Gather { resources } => write!(f, "gather({resources})"),
            Self::Latency { resources, max_ms } => write!(f, "latency({resources}; {max_ms})"),
            Self::Jurisdiction { resources, regions } => {
                write!(f, "jurisdiction({resources}; {})", regions.join(","))
            }
            Self::Capacity => f.write_str("capacity"),
            Self::Formats { resources } => write!(f, "formats({resources})"),
        }
    }
}

fn items(group: &str) -> Vec<String> {
    group
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.split_once(':').map_or(s, |(_, n)| n).to_owned())
        .collect()
}

fn selector(group: &str) -> Selector {
    if group.trim() == "*" {
        Selector::All(AllMarker)
    } else {
        Selector::Names(items(group))
    }
}

impl FromStr for Constraint {
    type Err = Diagnostic;

    /// Parses `name(group; group)`, e.g. `ban(web,db; edge-rennes)`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| {
            Diagnostic::error(format!("constraint `{s}`: {why}")).with_detail(
                "forms: ban(R; SITES) fence(R; SITES) spread(R) gather(R) latency(R; MS) \
                 jurisdiction(R; J) with R a comma list of resources or *",
            )
        };
        let t = s.trim();
        let (name, rest) = t
            .split_once('(')
            .ok_or_else(|| bad("expected NAME(...)".into()))?;
        let inner = rest
            .strip_suffix(')')
            .ok_or_else(|| bad("missing closing `)`".into()))?;
        let groups: Vec<&str> = inner.split(';').collect();
        let need = |n: usize| {
            if groups.len() == n {
                Ok(())
            } else {
                Err(bad(format!(
                    "{} takes {n} `;`-separated argument(s), got {}",
                    name.trim(),
                    groups.len()
                )))
            }
        };
        let nonempty = |sel: Selector| match &sel {
            Selector::Names(n) if n.is_empty() => Err(bad("no resources named".into())),
            _ => Ok(sel),
        };
        let c = match name.trim() {
            "ban" | "fence" => {
                need(2)?;
                let sites = items(groups[1]);
                if sites.is_empty() {
                    return Err(bad("no sites named".into()));
                }
                let resources = nonempty(selector(groups[0]))?;
                if name.trim() == "ban" {
                    Self::Ban { resources, sites }
                } else {
                    Self::Fence { resources, sites }
                }
            }
            "spread" | "gather" => {
                need(1)?;
                let resources = nonempty(selector(groups[0]))?;
                if let Selector::Names(n) = &resources
                    && n.len() < 2
                {
                    return Err(bad("needs at least two resources".into()));
                }
                if name.trim() == "spread" {
                    Self::Spread { resources }
                } else {
                    Self::Gather { resources }
                }
            }
            "latency" => {
                need(2)?;
                let max_ms: f64 = groups[1]
                    .trim()
                    .trim_end_matches("ms")
                    .trim()
                    .parse()
                    .map_err(|_| {
                        bad(format!(
                            "`{}` is not a number of milliseconds",
                            groups[1].trim()
                        ))
                    })?;
                if !(max_ms.is_finite() && max_ms > 0.0) {
                    return Err(bad("the latency bound must be positive".into()));
                }
                Self::Latency {
                    resources: nonempty(selector(groups[0]))?,
                    max_ms,
                }
            }
            "jurisdiction" => {
                need(2)?;
                let regions: Vec<String> = groups[1]
                    .split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect();
                if regions.is_empty() {
                    return Err(bad("no jurisdictions named".into()));
                }
                Self::Jurisdiction {
                    resources: nonempty(selector(groups[0]))?,
                    regions,
                }
            }
            other => return Err(bad(format!("unknown constraint `{other}`"))),
        };
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for (text, shown) in [
            ("ban(web,db; edge-rennes)", "ban(web,db; edge-rennes)"),
            (
                "fence( instance:db ; edge-nantes , edge-rennes )",
                "fence(db; edge-nantes,edge-rennes)",
            ),
            ("spread(web,app)", "spread(web,app)"),
            ("gather(app, db)", "gather(app,db)"),
            ("latency(web,db; 12.5ms)", "latency(web,db; 12.5)"),
            ("jurisdiction(*; EU)", "jurisdiction(*; EU)"),
        ] {
            let c: Constraint = text.parse().unwrap();
            assert_eq!(c.to_string(), shown);
            let again: Constraint = shown.parse().unwrap();
            assert_eq!(again, c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(
                serde_json::from_str::<Constraint>(&json).unwrap(),
                c,
                "{json}"
            );
        }
    }

    #[test]
    fn errors_name_the_constraint_and_the_problem() {
        for (text, says) in [
            ("ban(web)", "takes 2"),
            ("spread(web)", "at least two"),
            ("latency(web,db; soon)", "not a number"),
            ("latency(web,db; -3)", "positive"),
            ("teleport(web)", "unknown constraint `teleport`"),
            ("ban web", "NAME(...)"),
            ("fence(; a)", "no resources"),
            ("ban(web; )", "no sites"),
        ] {
            let d = text.parse::<Constraint>().unwrap_err();
            assert!(
                d.summary.contains(text) && d.summary.contains(says),
                "{text}: {d}"
            );
        }
    }

    #[test]
    fn selectors_match_names_or_everything() {
        let c: Constraint = "ban(*; x)".parse().unwrap();
        assert!(c.selector().unwrap().contains("anything"));
        let c: Constraint = "ban(a,b; x)".parse().unwrap();
        assert!(c.selector().unwrap().contains("b") && !c.selector().unwrap().contains("c"));
        assert!(c.is_unary());
        assert!(!Constraint::Capacity.is_unary());
        assert_eq!(
            serde_json::to_string(&Selector::All(AllMarker)).unwrap(),
            "\"*\""
        );
    }
}
