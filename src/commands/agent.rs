//! `fluidcloud agent`: serve one site of this machine to orchestrators and
//! to other agents (see `fluidcloud_conduit::agent`).
//!
//! HTTPS always: a generated self-signed certificate, kept in the state
//! directory and reused, unless `--tls-cert`/`--tls-key` are given. The
//! fingerprint is printed at start (`fingerprint sha256:HEX`), for the
//! orchestrator's `agent_fingerprint`. The bearer token comes from
//! `$FLUIDCLOUD_AGENT_TOKEN`; `--no-auth` is allowed on loopback only.
//! SIGINT or SIGTERM stop it gracefully: transfers stop at a chunk
//! boundary (what was written stays, and the next pull resumes from it),
//! and guest appliances waiting for an adaptation are stopped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use fluidcloud_broker::tls::{self, IdentityOrigin, ServerIdentity};
use fluidcloud_conduit::agent::TOKEN_ENV;
use fluidcloud_conduit::agent::server::{AgentOptions, AgentState, router};
use fluidcloud_conduit::drivers;

use super::sites_file;
use crate::{ExitWith, Globals};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The site of the sites file (--config) this agent serves.
    #[arg(long, value_name = "NAME")]
    site: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The agent's certificate (PEM); default: a self-signed one kept in
    /// the state directory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A name the agent is reached by, put in the generated certificate
    /// (repeat for several).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_name: Vec<String>,
    /// Serve without a bearer token (only on a loopback address).
    #[arg(long)]
    no_auth: bool,
    /// Where the agent keeps its certificate and the records of the
    /// buckets it created (default: the sites file's state directory,
    /// `agent-SITE/`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Transfer stripes sent at once over every transfer, and received at
    /// once over every pull (each holds about three 4 MiB chunks in
    /// memory); more wait their turn.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_stripes: usize,
}

pub(crate) async fn run(g: &Globals, a: AgentArgs) -> Result<()> {
    let loopback = a.listen.ip().is_loopback();
    let token = match (std::env::var(TOKEN_ENV), a.no_auth) {
        (Ok(t), false) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        (_, true) if loopback => None,
        (_, true) => bail!(ExitWith(
            2,
            format!(
                "--no-auth is only allowed on a loopback address, not {}",
                a.listen
            )
        )),
        _ => bail!(ExitWith(
            3,
            format!(
                "set the agent's bearer token in ${TOKEN_ENV} (or pass --no-auth on a loopback address)"
            )
        )),
    };
    let file = sites_file(g)?;
    let cfg = file.site(&a.site)?;
    if cfg.agent.is_some() {
        bail!(ExitWith(
            3,
            format!(
                "site {} of {} is reached through an agent itself; an agent serves a site whose data is on this machine (`path`, or a libvirt `uri` and `pool`)",
                a.site,
                file.path.display()
            )
        ));
    }
    fluidcloud_conduit::agent::server::return_chunks_to_the_system();
    let driver: Arc<dyn fluidcloud_conduit::driver::SiteDriver> =
        Arc::from(drivers::open(&a.site, cfg)?);
    driver
        .check()
        .await
        .with_context(|| format!("site {} does not answer", a.site))?;
    let state_dir = match &a.state_dir {
        Some(d) => d.clone(),
        None => {
            let sites = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
            fluidcloud_conduit::relocate::store::state_dir(&sites).join(format!("agent-{}", a.site))
        }
    };
    let given = a.tls_cert.as_deref().zip(a.tls_key.as_deref());
    let names = tls::default_names(a.listen.ip(), &a.tls_name);
    let identity = ServerIdentity::load_or_generate(&state_dir.join("tls"), given, &names)?;
    let fingerprint = identity.fingerprint().to_string();
    let generated = matches!(identity.origin(), IdentityOrigin::Generated(_));
    let identity = Arc::new(identity);
    let server = tls::server_config_peer_certs(&identity)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let state = AgentState::new(
        driver.clone(),
        identity,
        &AgentOptions {
            token,
            max_stripes: a.max_stripes,
            state_dir: state_dir.clone(),
        },
    );
    if g.json {
        outln!(
            "{}",
            serde_json::json!({
                "listening": format!("https://{addr}"),
                "fingerprint": fingerprint,
                "site": a.site,
                "kind": driver.kind(),
            })
        )?;
    } else {
        outln!(
            "agent for site {} ({}) listening on https://{addr}",
            a.site,
            driver.kind()
        )?;
        outln!("fingerprint {fingerprint}")?;
        if generated {
            eprintln!(
                "generated a self-signed certificate in {}; pin it in the orchestrator's sites file: agent_fingerprint = \"{fingerprint}\"",
                state_dir.join("tls").display()
            );
        }
    }
    let stopping = state.clone();
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("stopping: transfers end at their next chunk");
        stopping.stop_transfers();
    };
    tls::serve_tls_peers(listener, router(state.clone()), server, shutdown).await?;
    // Pulls stop at their next frame; give them a moment to say so.
    for _ in 0..100 {
        if state.running_pulls() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Guest appliances waiting for their adaptation hold target disks:
    // none outlives the agent (a resumed relocation boots another).
    let _ = tokio::task::spawn_blocking(fluidcloud_conduit::guest::release_all).await;
    Ok(())
}

/// Ctrl-C or SIGTERM: how `agent` and `serve` are asked to stop.
pub(crate) async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
