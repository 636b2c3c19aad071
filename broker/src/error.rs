//! The broker's error type.

use fluidcloud_plugins::{Diagnostic, Retry, Retryable};

use crate::constraint::Constraint;

/// Errors of matching and placement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A constraint or request is malformed; the diagnostics say where.
    #[error("{}", .0.first().map_or_else(|| "invalid request".to_owned(), ToString::to_string))]
    Invalid(Vec<Diagnostic>),
    /// No placement satisfies every constraint. `conflict` is a smallest set
    /// found of constraints that cannot hold together (removing any one of
    /// them makes the rest satisfiable).
    #[error(
        "no placement satisfies the constraints; these conflict: {}",
        list(conflict)
    )]
    Infeasible {
        /// The conflicting constraints.
        conflict: Vec<Constraint>,
    },
    /// The heuristic search (used beyond the exact search's size) found no
    /// placement; that does not prove there is none.
    #[error(
        "no placement found for {units} units by the heuristic search ({explored} exact search \
         nodes explored first); the constraints may be too tight: relax some and retry"
    )]
    NotFound {
        /// Units to place.
        units: usize,
        /// Exact-search nodes explored before the heuristic.
        explored: u64,
    },
}

fn list(c: &[Constraint]) -> String {
    c.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        Retry::Never
    }
}

/// Result alias of the broker.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::constraint::Selector;

    // Every broker error comes from the request itself (malformed input, a
    // constraint set that cannot hold, a search that gave up): the same
    // request fails the same way again, so none of them is worth a retry.
    #[test]
    fn every_variant_is_never_retried() {
        let invalid = Error::Invalid(vec![Diagnostic::error("unknown site `nowhere`")]);
        assert_eq!(invalid.retry(), Retry::Never);
        assert_eq!(Error::Invalid(Vec::new()).retry(), Retry::Never);
        let infeasible = Error::Infeasible {
            conflict: vec![
                Constraint::Spread {
                    resources: Selector::Names(vec!["web".into(), "db".into()]),
                },
                Constraint::Gather {
                    resources: Selector::Names(vec!["web".into(), "db".into()]),
                },
            ],
        };
        assert_eq!(infeasible.retry(), Retry::Never);
        let not_found = Error::NotFound {
            units: 40,
            explored: 1_000_000,
        };
        assert_eq!(not_found.retry(), Retry::Never);
    }
}
