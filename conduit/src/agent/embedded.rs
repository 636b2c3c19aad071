//! An agent for a site of this process, started for the length of one
//! transfer with a site reached through its agent, so that the two sides
//! speak the same protocol: the in-process site's disks are pulled by the
//! remote agent from this process (or pulled here from it), never copied
//! through a third place.
//!
//! It listens on the address of this machine that routes to the remote
//! agent (so that the remote agent can reach it), on a port the system
//! picks, with this machine's identity for the site (the certificate
//! `fluidcloud agent --site SITE` would use, in the same state directory)
//! and a bearer token made up for it that only this process knows. The
//! remote agent reaches only its transfer routes, with a ticket bound to
//! its own certificate, as between two agents.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fluidcloud_broker::tls::{self, ServerIdentity};
use fluidcloud_plugins::{Error, Result};
use tokio::sync::oneshot;

use super::client::AgentClient;
use super::server::{AgentOptions, AgentState, router};
use crate::driver::SiteDriver;

/// Stripes the embedded agent sends at once.
const MAX_STRIPES: usize = 16;

/// A running embedded agent; [`Embedded::stop`] ends it.
pub struct Embedded {
    client: AgentClient,
    state: Arc<AgentState>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("url", &self.client.url())
            .finish_non_exhaustive()
    }
}

impl Embedded {
    /// Serves `driver` (site `site` of the sites file `sites_file`) for a
    /// transfer with the agent at `peer_url`; `None`: for this process
    /// alone (loopback).
    ///
    /// # Errors
    /// No route to the peer, an address that cannot be bound, or the
    /// site's identity that cannot be read or made.
    pub async fn start(
        sites_file: &Path,
        site: &str,
        driver: Arc<dyn SiteDriver>,
        peer_url: Option<&str>,
    ) -> Result<Self> {
        super::server::return_chunks_to_the_system();
        let ip = match peer_url {
            Some(url) => local_ip_towards(url).await?,
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let state_dir = crate::relocate::store::state_dir(sites_file).join(format!("agent-{site}"));
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            Error::Precondition(format!("site {site}: {what}: {e}"))
        };
        let identity = ServerIdentity::load_or_generate(
            &state_dir.join("tls"),
            None,
            &tls::default_names(ip, &[]),
        )
        .map_err(|e| setup("its TLS identity", &e))?;
        let fingerprint = identity.fingerprint().to_string();
        let identity = Arc::new(identity);
        let config =
            tls::server_config_peer_certs(&identity).map_err(|e| setup("TLS set-up", &e))?;
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|e| Error::io(format!("site {site}: listening on {ip} for a transfer"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io(format!("site {site}: the transfer listener"), e))?;
        let token = crate::transfer::source::random_secret()?;
        let state = AgentState::new(
            driver,
            identity,
            &AgentOptions {
                token: Some(token.clone()),
                max_stripes: MAX_STRIPES,
                state_dir,
            },
        );
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(tls::serve_tls_peers(
            listener,
            router(state.clone()),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        let client = AgentClient::new(
            site,
            &format!("https://{addr}"),
            &fingerprint,
            Some(token),
            None,
        )?;
        tracing::debug!(site, url = %client.url(), "embedded agent started");
        Ok(Self {
            client,
            state,
            stop,
            task,
        })
    }

    /// The agent, as the orchestrator calls it.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Stops it: transfers still running end at their next chunk.
    pub async fn stop(self) {
        self.state.stop_transfers();
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The address of this machine that packets to the host of `url` leave
/// from (no packet is sent: a UDP socket is only connected).
async fn local_ip_towards(url: &str) -> Result<IpAddr> {
    let unreachable = |detail: String| Error::Transient(format!("no route to {url}: {detail}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| unreachable(e.to_string()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| unreachable("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let peer = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable(format!("{host} has no address")))?;
    let any: IpAddr = if peer.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let socket = std::net::UdpSocket::bind((any, 0)).map_err(|e| unreachable(e.to_string()))?;
    socket
        .connect(peer)
        .map_err(|e| unreachable(e.to_string()))?;
    socket
        .local_addr()
        .map(|a| a.ip())
        .map_err(|e| unreachable(e.to_string()))
}
