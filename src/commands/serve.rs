//! `fluidcloud serve`: the broker REST service.
//!
//! HTTPS by default, on every address including loopback: a bearer token
//! and the power to stop and move services must not cross any network in
//! clear. With no `--tls-cert`, a self-signed certificate is generated
//! once into the state directory (`STATE/tls/`, next to the relocations)
//! and reused, and its fingerprint is printed so that clients can pin it
//! (`--server-fingerprint`). Plain HTTP is a loopback-only opt-in
//! (`--plain-http`), for tools such as load generators that measure the
//! service rather than its transport.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use fluidcloud_broker::rest::{ServiceConfig, StaticCatalog, router_with, serve};
use fluidcloud_broker::tls::{self, IdentityOrigin, ServerIdentity};
use fluidcloud_conduit::drivers;

use super::sites_file;
use super::worker::WorkerConfig;
use crate::{ExitWith, Globals};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8640")]
    listen: SocketAddr,
    /// Environment variable holding the bearer token clients must send.
    #[arg(long, default_value = "FLUIDCLOUD_TOKEN", value_name = "VAR")]
    token_env: String,
    /// Serve without authentication (only for a loopback address).
    #[arg(long)]
    no_auth: bool,
    /// Serve plain HTTP instead of HTTPS (only for a loopback address).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_name"])]
    plain_http: bool,
    /// The server certificate (PEM, the chain from the server's own
    /// certificate up); default: a self-signed one kept in the state
    /// directory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A name clients reach the service by (DNS name or IP address; repeat
    /// for several): put in the generated certificate, and accepted as
    /// `Host` with --no-auth.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_name: Vec<String>,
    /// Largest accepted request body, in KiB.
    #[arg(long, default_value_t = 4096)]
    body_limit_kib: usize,
    /// Requests going on at once from one client address.
    #[arg(long, default_value_t = ServiceConfig::default().max_requests_per_client, value_name = "N")]
    max_requests_per_client: usize,
    /// Event streams (`GET /relocations/ID/events`) open at once from one
    /// client address.
    #[arg(long, default_value_t = ServiceConfig::default().max_streams_per_client, value_name = "N")]
    max_streams_per_client: usize,
    /// Event streams open at once in all.
    #[arg(long, default_value_t = ServiceConfig::default().max_streams, value_name = "N")]
    max_streams: usize,
    /// Keep relocations (plans, journals, reports) in this PostgreSQL
    /// database, `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, and run
    /// them as one of its workers: every `serve` pointed at it shares the
    /// queue. Default: the state directory, run by this process alone.
    #[arg(
        long,
        env = "FLUIDCLOUD_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// How long a worker's claim on a relocation lasts without renewal
    /// (renewed every third of it): after a worker dies, another takes its
    /// relocations over within this time.
    #[arg(long, default_value = "15", value_name = "SECS", value_parser = parse_lease)]
    lease: Duration,
    /// Relocations this worker runs at once (with --database); 0 makes a
    /// node that only answers the API and streams events.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_running: usize,
    /// This worker's name in leases (with --database); default: the host
    /// name and process id.
    #[arg(long, value_name = "NAME")]
    worker_name: Option<String>,
}

fn parse_lease(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.5..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!("`{s}`: a lease is 0.5 to 3600 seconds")),
    }
}

pub(crate) async fn run(g: &Globals, a: ServeArgs) -> Result<()> {
    let loopback = a.listen.ip().is_loopback();
    if a.plain_http && !loopback {
        bail!(ExitWith(
            2,
            format!(
                "--plain-http is only allowed on a loopback address, not {}: the bearer token would cross the network in clear (drop --plain-http to serve HTTPS)",
                a.listen
            )
        ));
    }
    let token = match (std::env::var(&a.token_env), a.no_auth) {
        (Ok(t), _) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        (_, true) if loopback => None,
        (_, true) => bail!(ExitWith(
            2,
            format!(
                "--no-auth is only allowed on a loopback address, not {}",
                a.listen
            )
        )),
        _ => {
            return Err(fluidcloud_conduit::Error::Config {
                diagnostics: vec![fluidcloud_plugins::Diagnostic::error(format!(
                    "set the bearer token in ${} (or pass --no-auth on a loopback address)",
                    a.token_env
                ))],
            }
            .into());
        }
    };
    let file = sites_file(g)?;
    let tls = if a.plain_http {
        None
    } else {
        let sites_path = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
        let dir = fluidcloud_conduit::relocate::store::state_dir(&sites_path).join("tls");
        let given = a.tls_cert.as_deref().zip(a.tls_key.as_deref());
        let names = tls::default_names(a.listen.ip(), &a.tls_name);
        let identity = ServerIdentity::load_or_generate(&dir, given, &names)?;
        // A kept certificate was made for the names of its first start;
        // pinning clients do not care, name-checking ones would refuse.
        let wanted = if given.is_some() {
            a.tls_name.clone()
        } else {
            names
        };
        let missing = identity.missing_names(&wanted);
        if !missing.is_empty() {
            tracing::warn!(
                "the certificate is not valid for {}: clients that check names (--server-ca) will refuse it{}",
                missing.join(", "),
                match identity.origin() {
                    IdentityOrigin::Reused(d) => format!(
                        "; delete {} to generate one for the names of this start (its fingerprint changes)",
                        d.display()
                    ),
                    _ => String::new(),
                }
            );
        }
        Some(identity)
    };
    let mut sites = Vec::new();
    for (name, cfg) in &file.sites {
        let d = drivers::open(name, cfg)?;
        let asked = std::time::Instant::now();
        let (caps, rtt) = match d.check().await {
            Ok(()) => (
                d.capabilities(),
                Some(asked.elapsed().as_secs_f64() * 1000.0),
            ),
            Err(e) => {
                tracing::warn!(site = %name, error = %e, "site does not answer; listed without capabilities");
                (Default::default(), None)
            }
        };
        let mut info = cfg.info(name, caps);
        info.rtt_ms = rtt;
        sites.push(info);
    }
    let catalog = StaticCatalog {
        sites,
        migrators: super::matching::migrators(),
    };
    // The database answers (and its schema is current) before this says
    // it listens.
    let store = super::relocate::store_with(&file, a.database.as_deref())?;
    let worker = store.database().map(|_| WorkerConfig {
        name: a.worker_name.clone().unwrap_or_else(default_worker_name),
        lease: a.lease,
        max_running: a.max_running,
    });
    if let (Some(db), Some(w)) = (store.database(), &worker) {
        eprintln!(
            "worker {} of {} (lease {:.1} s, up to {} relocations at once)",
            w.name,
            db.location(),
            w.lease.as_secs_f64(),
            w.max_running
        );
    }
    let runner = super::runner::Runner::new(file.clone(), store, worker)?;
    let stopping = runner.clone();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let config = ServiceConfig {
        token,
        body_limit: a.body_limit_kib * 1024,
        hosts: ServiceConfig::local_hosts(addr.port(), &a.tls_name),
        max_requests_per_client: a.max_requests_per_client,
        max_streams_per_client: a.max_streams_per_client,
        max_streams: a.max_streams,
        secure_cookies: tls.is_some(),
        ..ServiceConfig::default()
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let fingerprint = tls.as_ref().map(|t| t.fingerprint().to_string());
    if g.json {
        let mut doc = serde_json::json!({ "listening": format!("{scheme}://{addr}") });
        if let Some(f) = &fingerprint {
            doc["fingerprint"] = f.clone().into();
        }
        outln!("{doc}")?;
    } else {
        match &fingerprint {
            Some(f) => outln!("listening on {scheme}://{addr} (certificate {f})")?,
            None => outln!("listening on {scheme}://{addr}")?,
        }
        if let Some(IdentityOrigin::Generated(dir)) = tls.as_ref().map(ServerIdentity::origin) {
            eprintln!(
                "generated a self-signed certificate in {}; clients pin it with --server-fingerprint {}",
                dir.display(),
                fingerprint.as_deref().unwrap_or_default()
            );
        }
    }
    let app = router_with(Arc::new(catalog), Arc::new(runner), &config);
    let worker = stopping.worker().cloned();
    let shutdown = async move {
        super::agent::wait_for_signal().await;
        // This worker's runs stop at a safe point and go back to the
        // queue, where another worker (or this one, restarted) continues
        // them at once, without waiting for a lease to run out.
        if let Some(w) = stopping.worker() {
            w.stop_all();
        }
    };
    match tls {
        Some(identity) => {
            let server = tls::server_config(&identity)?;
            tls::serve_tls(listener, app, server, shutdown).await?;
        }
        None => serve(listener, app, shutdown).await?,
    }
    if let Some(w) = worker
        && !w.drained(Duration::from_secs(60)).await
    {
        tracing::warn!("runs still stopping after 60 s; their leases will expire");
    }
    Ok(())
}

/// `HOST:PID`: unique among workers of one database.
fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".to_owned());
    format!("{host}:{}", std::process::id())
}
