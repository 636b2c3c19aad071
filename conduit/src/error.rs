//! The conduit's error type.

use std::path::PathBuf;

use fluidcloud_plugins::{Diagnostic, Retry, Retryable};

/// Errors of site drivers, the sites file and introspection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No sites file was given or found.
    #[error(
        "no sites file: pass --config PATH, set FLUIDCLOUD_CONFIG, or create ./fluidcloud.toml \
         (`fluidcloud demo init DIR` writes an example)"
    )]
    NoConfig,
    /// The sites file or a manifest is malformed or invalid.
    #[error("{}", first_of(diagnostics))]
    Config {
        /// Every problem found, each naming file, line and key.
        diagnostics: Vec<Diagnostic>,
    },
    /// A site name that is not in the sites file.
    #[error("unknown site `{name}` in {} (known: {known})", file.display())]
    UnknownSite {
        /// The name asked for.
        name: String,
        /// Names that exist.
        known: String,
        /// The sites file.
        file: PathBuf,
    },
    /// A credential variable named in the sites file is not set.
    #[error("site {site}: environment variable {variable} named by `{key}` is not set")]
    MissingCredential {
        /// The site.
        site: String,
        /// Its key in the sites file.
        key: String,
        /// The variable.
        variable: String,
    },
    /// A config file references a site-internal host or address that
    /// belongs to nothing of the service.
    #[error(
        "{file}: key `{key}`: `{value}` looks internal to site {site} but resolves to no instance \
         or bucket of the service (declare it in the service manifest's `external` list if it \
         stays reachable after relocation)"
    )]
    UnresolvedReference {
        /// Site the config file is on.
        site: String,
        /// Config file path on the site.
        file: String,
        /// Key path (or `line N`) inside it.
        key: String,
        /// The value found.
        value: String,
    },
    /// An error from a site, with the site's name.
    #[error("site {site}: {source}")]
    Site {
        /// The site.
        site: String,
        /// What went wrong.
        #[source]
        source: fluidcloud_plugins::Error,
    },
}

fn first_of(diags: &[Diagnostic]) -> String {
    match diags {
        [] => "invalid configuration".to_owned(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more problems)", rest.len()),
    }
}

impl Error {
    /// Wraps a vocabulary error with the site it came from.
    pub fn site(site: &str, source: fluidcloud_plugins::Error) -> Self {
        Self::Site {
            site: site.to_owned(),
            source,
        }
    }

    /// All diagnostics carried by this error (one for most variants).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            Self::Config { diagnostics } => diagnostics.clone(),
            Self::Site {
                source: fluidcloud_plugins::Error::Invalid(d),
                ..
            } => d.clone(),
            other => vec![Diagnostic::error(other.to_string())],
        }
    }
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        match self {
            Self::Site { source, .. } => source.retry(),
            _ => Retry::Never,
        }
    }
}

/// Result alias of the conduit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::ErrorKind;
    use std::time::Duration;

    use fluidcloud_plugins::Error as Sdk;

    use super::*;

    #[test]
    fn a_site_error_keeps_the_retry_class_of_what_it_wraps() {
        let wrapped = |e: Sdk| Error::site("edge-rennes", e).retry();
        // Transient faults stay transient through the wrapper.
        assert_eq!(
            wrapped(Sdk::Transient("listing bucket shop-media".into())),
            Retry::Transient
        );
        assert_eq!(
            wrapped(Sdk::io(
                "reading images/web.qcow2",
                ErrorKind::TimedOut.into()
            )),
            Retry::Transient
        );
        assert_eq!(
            wrapped(Sdk::io(
                "writing buckets/shop-media",
                ErrorKind::ConnectionReset.into()
            )),
            Retry::Transient
        );
        // A site asking to wait keeps its delay.
        let after = Retry::After(Duration::from_secs(7));
        assert_eq!(
            wrapped(Sdk::Plugin {
                plugin: "dns-zone".into(),
                message: "rate limited".into(),
                retry: after,
                diagnostics: Vec::new(),
            }),
            after
        );
        // Permanent faults stay permanent.
        assert_eq!(
            wrapped(Sdk::io(
                "reading images/web.qcow2",
                ErrorKind::NotFound.into()
            )),
            Retry::Never
        );
        assert_eq!(
            wrapped(Sdk::NotFound {
                what: "instance \"web\"".into(),
                site: Some("edge-rennes".into()),
            }),
            Retry::Never
        );
        assert_eq!(
            wrapped(Sdk::PermissionDenied {
                what: "images/".into(),
                site: None,
            }),
            Retry::Never
        );
    }

    #[test]
    fn errors_of_the_sites_file_and_of_introspection_are_never_retried() {
        let never = [
            Error::NoConfig,
            Error::Config {
                diagnostics: vec![
                    Diagnostic::error("unknown key `pth`")
                        .in_file("fluidcloud.toml")
                        .at_line(3),
                ],
            },
            Error::UnknownSite {
                name: "edge-lyon".into(),
                known: "dc-paris, edge-rennes".into(),
                file: PathBuf::from("fluidcloud.toml"),
            },
            Error::MissingCredential {
                site: "cloud-frankfurt".into(),
                key: "access_key_id_env".into(),
                variable: "FRANKFURT_ACCESS_KEY_ID".into(),
            },
            Error::UnresolvedReference {
                site: "dc-paris".into(),
                file: "shop/app/app.yaml".into(),
                key: "database.host".into(),
                value: "db2.shop.paris.internal".into(),
            },
        ];
        for e in never {
            assert_eq!(e.retry(), Retry::Never, "{e}");
        }
    }
}
