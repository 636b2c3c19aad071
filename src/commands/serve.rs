//! `fluidcloud serve`: the broker REST service.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use fluidcloud_broker::rest::{ServiceConfig, StaticCatalog, router_with, serve};
use fluidcloud_conduit::drivers;

use super::sites_file;
use crate::Globals;

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
}

pub(crate) async fn run(g: &Globals, a: ServeArgs) -> Result<()> {
    let token = match (std::env::var(&a.token_env), a.no_auth) {
        (Ok(t), _) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        (_, true) if a.listen.ip().is_loopback() => None,
        (_, true) => bail!(
            "--no-auth is only allowed on a loopback address, not {}",
            a.listen
        ),
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
    let mut sites = Vec::new();
    for (name, cfg) in &file.sites {
        let d = drivers::open(name, cfg)?;
        let caps = match d.check().await {
            Ok(()) => d.capabilities(),
            Err(e) => {
                tracing::warn!(site = %name, error = %e, "site does not answer; listed without capabilities");
                Default::default()
            }
        };
        sites.push(cfg.info(name, caps));
    }
    let catalog = StaticCatalog {
        sites,
        migrators: super::matching::migrators(),
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let config = ServiceConfig {
        token,
        body_limit: a.body_limit_kib * 1024,
        hosts: ServiceConfig::local_hosts(addr.port(), &[]),
        max_requests_per_client: a.max_requests_per_client,
        max_streams_per_client: a.max_streams_per_client,
        max_streams: a.max_streams,
        ..ServiceConfig::default()
    };
    if g.json {
        println!(
            "{}",
            serde_json::json!({ "listening": format!("http://{addr}") })
        );
    } else {
        println!("listening on http://{addr}");
    }
    let runner = super::runner::Runner::new(file.clone());
    let app = router_with(Arc::new(catalog), Arc::new(runner), &config);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, app, shutdown).await?;
    Ok(())
}
