//! A site reached through its agent (`agent = "https://HOST:PORT"` in the
//! sites file): every capability call goes to `fluidcloud agent` at the
//! site, which runs the site's own driver there. Disks do not pass through
//! here at all: transfers go from agent to agent ([`crate::transfer`]).
//!
//! The capabilities are the remote driver's: learnt from the agent when
//! first needed (and by [`SiteDriver::check`]), so a capability the site
//! lacks is reported missing, and one an unreachable agent may have is not
//! claimed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_plugins::{Capability, Error, Result};
use tokio::io::AsyncRead;

use crate::agent::client::{AgentClient, segment};
use crate::agent::server::{AdaptGuest, InspectGuests, NewVolume, ReleaseGuest, SiteDoc};
use crate::config::SiteConfig;
use crate::driver::{
    BlockStore, ChangeTracking, Compute, ConfigFileRecord, Extent, Guests, ImageRecord, ImageStore,
    InstanceRecord, InstanceState, Inventory, ObjectStorage, SiteDriver,
};
use crate::guest::{Adapted, BootDisk, GuestJob, GuestPlan, GuestView, Prepared};

/// A site driven through its agent.
#[derive(Debug)]
pub struct AgentSite {
    name: String,
    /// The kind the orchestrator's sites file declares.
    kind: &'static str,
    client: AgentClient,
    doc: OnceLock<Option<SiteDoc>>,
}

/// Opens the agent site `name` of `config` (which has `agent`).
///
/// # Errors
/// `Config` for missing keys; a malformed URL or fingerprint.
pub fn open(name: &str, config: &SiteConfig) -> crate::Result<Box<dyn SiteDriver>> {
    Ok(Box::new(AgentSite::new(name, config)?))
}

impl AgentSite {
    /// The agent site `name` of `config`.
    ///
    /// # Errors
    /// As [`open`].
    pub fn new(name: &str, config: &SiteConfig) -> crate::Result<Self> {
        let site_err = |source| crate::Error::Site {
            site: name.to_owned(),
            source,
        };
        let url = config
            .agent
            .as_deref()
            .ok_or_else(|| site_err(Error::Precondition("no `agent` URL".into())))?;
        let fp = config.agent_fingerprint.as_deref().unwrap_or_default();
        let token = config
            .agent_token_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        if let (Some(var), None) = (&config.agent_token_env, &token) {
            return Err(crate::Error::MissingCredential {
                site: name.to_owned(),
                variable: var.clone(),
                key: format!("sites.{name}.agent_token_env"),
            });
        }
        let client = AgentClient::new(name, url, fp, token, config.agent_token_env.clone())
            .map_err(site_err)?;
        let kind = super::DRIVERS
            .iter()
            .find(|d| d.kind == config.kind)
            .map_or("agent", |d| d.kind);
        Ok(Self {
            name: name.to_owned(),
            kind,
            client,
            doc: OnceLock::new(),
        })
    }

    /// The agent's client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// What the agent says of its site, asked once (from a thread of its
    /// own, since capability accessors are not async).
    fn doc(&self) -> Option<&SiteDoc> {
        self.doc
            .get_or_init(|| {
                let client = self.client.clone();
                std::thread::scope(|s| {
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .ok()?;
                        rt.block_on(async {
                            // A client of this thread's runtime.
                            let fresh = client.fresh().ok()?;
                            fresh.get::<SiteDoc>("/v1/site").await.ok()
                        })
                    })
                    .join()
                    .ok()
                    .flatten()
                })
            })
            .as_ref()
    }

    fn has(&self, cap: Capability) -> bool {
        self.doc()
            .is_some_and(|d| d.capabilities.iter().any(|c| c == cap.as_str()))
    }
}

#[async_trait]
impl SiteDriver for AgentSite {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn check(&self) -> Result<()> {
        let doc: SiteDoc = self.client.get("/v1/site").await?;
        if doc.kind != self.kind {
            return Err(Error::Precondition(format!(
                "site {}: the agent at {} serves a `{}` site, the sites file says `{}`",
                self.name,
                self.client.url(),
                doc.kind,
                self.kind
            )));
        }
        let _ = self.doc.set(Some(doc));
        Ok(())
    }

    fn inventory(&self) -> Option<&dyn Inventory> {
        self.has(Capability::Inventory).then_some(self as _)
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        self.has(Capability::ImageStore).then_some(self as _)
    }

    fn block_store(&self) -> Option<&dyn BlockStore> {
        self.has(Capability::BlockStore).then_some(self as _)
    }

    fn object_storage(&self) -> Option<&dyn ObjectStorage> {
        self.has(Capability::ObjectStorage).then_some(self as _)
    }

    fn compute(&self) -> Option<&dyn Compute> {
        self.has(Capability::Compute).then_some(self as _)
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        self.doc()
            .is_some_and(|d| d.change_tracking)
            .then_some(self as _)
    }

    fn guests(&self) -> Option<&dyn Guests> {
        self.doc().is_some_and(|d| d.guests).then_some(self as _)
    }

    fn agent(&self) -> Option<&AgentClient> {
        Some(&self.client)
    }

    fn capabilities(&self) -> BTreeSet<Capability> {
        let mut set = BTreeSet::new();
        for cap in [
            Capability::Inventory,
            Capability::ImageStore,
            Capability::BlockStore,
            Capability::ObjectStorage,
            Capability::Compute,
        ] {
            if self.has(cap) {
                set.insert(cap);
            }
        }
        set
    }
}

/// A config file's relative path, each segment percent-encoded.
fn config_path(path: &str) -> String {
    path.split('/').map(segment).collect::<Vec<_>>().join("/")
}

fn unsupported(site: &str, operation: &str) -> Error {
    Error::NotSupported {
        operation: format!("{operation} through an agent (disks and objects move agent to agent)"),
        site: Some(site.to_owned()),
    }
}

#[async_trait]
impl Inventory for AgentSite {
    async fn instances(&self) -> Result<Vec<InstanceRecord>> {
        self.client.get("/v1/instances").await
    }

    async fn config_file(&self, path: &str) -> Result<ConfigFileRecord> {
        let content = self
            .client
            .get_bytes(&format!("/v1/config-files/{}", config_path(path)))
            .await?;
        Ok(ConfigFileRecord {
            path: path.to_owned(),
            content: content.to_vec(),
            locator: format!("{}/config/{path}", self.client.url()),
        })
    }

    async fn config_files(&self) -> Result<Vec<String>> {
        self.client.get("/v1/config-files").await
    }

    async fn service_manifest(&self, service: &str) -> Result<Option<(PathBuf, String)>> {
        self.client
            .get(&format!("/v1/manifests/{}", segment(service)))
            .await
    }

    async fn put_config_file(&self, path: &str, content: &[u8], owner: &str) -> Result<()> {
        self.client
            .put_bytes(
                &format!(
                    "/v1/config-files/{}?owner={}",
                    config_path(path),
                    segment(owner)
                ),
                content.to_vec(),
            )
            .await
    }

    async fn remove_config_file(&self, path: &str, owner: &str) -> Result<bool> {
        let resp = self
            .client
            .send(self.client.request(
                reqwest::Method::DELETE,
                &format!(
                    "/v1/config-files/{}?owner={}",
                    config_path(path),
                    segment(owner)
                ),
            ))
            .await?;
        Ok(resp.text().await.is_ok_and(|t| t.trim() == "true"))
    }
}

#[async_trait]
impl ImageStore for AgentSite {
    async fn list_images(&self) -> Result<Vec<String>> {
        self.client.get("/v1/images").await
    }

    async fn image_info(&self, name: &str) -> Result<ImageRecord> {
        self.client
            .get(&format!("/v1/images/{}", segment(name)))
            .await
    }

    async fn put_image(
        &self,
        _name: &str,
        _data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64> {
        Err(unsupported(
            &self.name,
            "storing an image from this process",
        ))
    }

    async fn open_image(&self, _name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
        Err(unsupported(
            &self.name,
            "reading an image into this process",
        ))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        self.client
            .delete(&format!("/v1/images/{}", segment(name)))
            .await
    }
}

#[async_trait]
impl BlockStore for AgentSite {
    async fn list_volumes(&self) -> Result<Vec<String>> {
        self.client.get("/v1/volumes").await
    }

    async fn volume_info(&self, name: &str) -> Result<ImageRecord> {
        self.client
            .get(&format!("/v1/volumes/{}", segment(name)))
            .await
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        self.client
            .post(
                "/v1/volumes",
                &NewVolume {
                    name: name.to_owned(),
                    size,
                },
            )
            .await
    }

    async fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self
            .client
            .get_bytes(&format!(
                "/v1/volumes/{}/data?offset={offset}&len={}",
                segment(name),
                buf.len()
            ))
            .await?;
        let n = data.len().min(buf.len());
        buf.get_mut(..n)
            .unwrap_or_default()
            .copy_from_slice(data.get(..n).unwrap_or_default());
        Ok(n)
    }

    async fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.client
            .put_bytes(
                &format!("/v1/volumes/{}/data?offset={offset}", segment(name)),
                data.to_vec(),
            )
            .await
    }

    async fn allocation(&self, name: &str) -> Result<Vec<Extent>> {
        self.client
            .get(&format!("/v1/volumes/{}/allocation", segment(name)))
            .await
    }

    async fn flush(&self, name: &str) -> Result<()> {
        self.client
            .post(&format!("/v1/volumes/{}/flush", segment(name)), &())
            .await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        self.client
            .delete(&format!("/v1/volumes/{}", segment(name)))
            .await
    }
}

#[async_trait]
impl ObjectStorage for AgentSite {
    async fn list_buckets(&self) -> Result<Vec<String>> {
        self.client.get("/v1/buckets").await
    }

    async fn create_bucket(&self, _name: &str) -> Result<()> {
        Err(unsupported(
            &self.name,
            "creating a bucket from this process",
        ))
    }

    async fn bucket(&self, _name: &str) -> Result<Arc<dyn object_store::ObjectStore>> {
        Err(unsupported(&self.name, "opening a bucket in this process"))
    }

    async fn delete_bucket(&self, _name: &str) -> Result<()> {
        Err(unsupported(
            &self.name,
            "deleting a bucket from this process",
        ))
    }

    async fn summary(&self, name: &str) -> Result<crate::driver::BucketSummary> {
        self.client
            .get(&format!("/v1/buckets/{}", segment(name)))
            .await
    }
}

impl AgentSite {
    async fn action(&self, name: &str, action: &str) -> Result<Option<String>> {
        self.client
            .post(&format!("/v1/instances/{}/{action}", segment(name)), &())
            .await
    }
}

#[async_trait]
impl Compute for AgentSite {
    async fn define(&self, record: &InstanceRecord) -> Result<()> {
        self.client.post("/v1/instances", record).await
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.action(name, "start").await.map(drop)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        self.action(name, "stop").await.map(drop)
    }

    async fn state(&self, name: &str) -> Result<InstanceState> {
        self.client
            .get(&format!("/v1/instances/{}/state", segment(name)))
            .await
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        self.action(name, "undefine").await.map(drop)
    }

    async fn console(&self, name: &str) -> Result<String> {
        self.client
            .get(&format!("/v1/instances/{}/console", segment(name)))
            .await
    }

    async fn start_trial(&self, name: &str) -> Result<String> {
        self.action(name, "trial").await?.ok_or_else(|| {
            Error::Precondition(format!(
                "site {}: the agent started a trial of {name} without naming it",
                self.name
            ))
        })
    }

    async fn end_trial(&self, name: &str) -> Result<()> {
        self.action(name, "end-trial").await.map(drop)
    }
}

#[async_trait]
impl ChangeTracking for AgentSite {
    async fn begin_tracking(&self, name: &str) -> Result<()> {
        self.action(name, "begin-tracking").await.map(drop)
    }

    async fn changes(&self, name: &str) -> Result<Option<Vec<ChangeSet>>> {
        self.client
            .get(&format!("/v1/instances/{}/changes", segment(name)))
            .await
    }

    async fn end_tracking(&self, name: &str) -> Result<()> {
        self.action(name, "end-tracking").await.map(drop)
    }
}

/// The guests' appliance runs at the agent, next to the disks.
#[async_trait]
impl Guests for AgentSite {
    async fn inspect(
        &self,
        boots: &[BootDisk],
        dirs: &[String],
    ) -> Result<std::collections::BTreeMap<String, GuestView>> {
        let body = InspectGuests {
            boots: boots.to_vec(),
            dirs: dirs.to_vec(),
        };
        self.client.post("/v1/guests/inspect", &body).await
    }

    async fn prepare(&self, job: &GuestJob) -> Result<Prepared> {
        self.client.post("/v1/guests/prepare", job).await
    }

    async fn adapt(&self, job: &GuestJob, plan: &GuestPlan) -> Result<Adapted> {
        let body = AdaptGuest {
            job: job.clone(),
            plan: plan.clone(),
        };
        self.client.post("/v1/guests/adapt", &body).await
    }

    async fn release(&self, key: &str) -> Result<()> {
        let body = ReleaseGuest {
            key: key.to_owned(),
        };
        self.client.post("/v1/guests/release", &body).await
    }
}
