//! Instances as EC2 runs them: compute and inventory of an `aws` site.
//!
//! - **Defining** an instance creates a launch template, and nothing runs
//!   or costs money: the target of a relocation is defined while its
//!   source still serves, and two live copies must never run. The
//!   template names the AMI of the boot disk, the instance type chosen
//!   from the vCPUs and memory, and a volume created from the latest
//!   snapshot of each of the instance's volumes. Its network interface
//!   (in `aws.subnet_id` with the planned private address, in
//!   `aws.security_group_ids`) is given at launch. It is tagged with the instance's name and the whole record
//!   (JSON, base64, in tags of 255 characters), so inventory gives back
//!   exactly what was defined.
//! - **Starting** launches the instance from its template the first time
//!   (`RunInstances` with a client token, so a retried call never launches
//!   a second), then `StartInstances`; **stopping** waits until EC2 says
//!   `stopped`. A started instance's guest writes to EBS volumes, not to
//!   the snapshots: reading one of its disks snapshots the volume first
//!   (`crate::drivers::aws::ebs`), and **undefining** keeps what it wrote
//!   as the disk's latest snapshot before it terminates the instance.
//! - **Config files** live in the S3 bucket `aws.config_bucket`, under
//!   `config/`, with the relocation that wrote each under `owners/`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use fluidcloud_migrators::owner::{describe, same_relocation};
use fluidcloud_plugins::{Diagnostic, Error, Result};
use object_store::ObjectStoreExt as _;

use super::ec2::{Instance, InstanceType, Template, params, tag_of};
use super::{Api, Aws};
use crate::driver::{
    Compute, ConfigFileRecord, DiskStore, InstanceRecord, InstanceState, Inventory,
};

const TAG_INSTANCE: &str = "fluidcloud:instance";
const TAG_SERVICE: &str = "fluidcloud:service";
/// `fluidcloud:record.N`: the Nth piece of the record.
const TAG_RECORD: &str = "fluidcloud:record";
/// Characters of the record per tag (EC2 takes 256).
const PIECE: usize = 255;
/// The boot disk's device; volumes follow from `/dev/sdf`.
const BOOT_DEVICE: &str = "/dev/xvda";
/// How long EC2 may take to start, stop or terminate an instance, or to
/// complete a snapshot.
const STATE_TIMEOUT: Duration = Duration::from_secs(900);

/// The device of volume `i` (0-based): `/dev/sdf` to `/dev/sdp`.
fn volume_device(i: usize) -> Option<String> {
    (i < 11).then(|| format!("/dev/sd{}", char::from(b'f' + i as u8)))
}

/// An instance defined on the site: its template and record.
#[derive(Debug, Clone)]
pub(crate) struct Defined {
    pub template: Template,
    pub record: InstanceRecord,
}

impl Defined {
    /// The device disk `name` of `store` is attached on, if it is one of
    /// this instance's.
    fn device_of(&self, store: DiskStore, name: &str) -> Option<String> {
        match store {
            DiskStore::Image => {
                (self.record.boot_image.as_deref() == Some(name)).then(|| BOOT_DEVICE.to_owned())
            }
            DiskStore::Volume => self
                .record
                .volumes
                .iter()
                .position(|v| v == name)
                .and_then(volume_device),
        }
    }
}

/// The record as tags.
fn record_tags(record: &InstanceRecord) -> Result<Vec<(String, String)>> {
    let json = serde_json::to_vec(record)
        .map_err(|e| Error::Precondition(format!("instance {}: {e}", record.name)))?;
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let pieces: Vec<(String, String)> = text
        .as_bytes()
        .chunks(PIECE)
        .enumerate()
        .map(|(i, c)| {
            (
                format!("{TAG_RECORD}.{i}"),
                String::from_utf8_lossy(c).into_owned(),
            )
        })
        .collect();
    if pieces.len() > 40 {
        return Err(Error::Precondition(format!(
            "instance {} is described by {} bytes, more than EC2's tags hold",
            record.name,
            text.len()
        )));
    }
    Ok(pieces)
}

/// The record the tags hold, if they hold one.
fn record_of(tags: &[(String, String)]) -> std::result::Result<Option<InstanceRecord>, String> {
    let mut text = String::new();
    for i in 0.. {
        match tag_of(tags, &format!("{TAG_RECORD}.{i}")) {
            Some(piece) => text.push_str(piece),
            None if i == 0 => return Ok(None),
            None => break,
        }
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The smallest usable type among `types` (by vCPUs, then memory, then
/// name) with at least `vcpus` and `memory_mib`, among the names starting
/// with one of `allowed` (any, when empty).
fn choose_type<'a>(
    types: &'a [InstanceType],
    vcpus: u32,
    memory_mib: u64,
    allowed: &[String],
) -> Option<&'a InstanceType> {
    types
        .iter()
        .filter(|t| t.usable && t.vcpus >= vcpus && t.memory_mib >= memory_mib)
        .filter(|t| allowed.is_empty() || allowed.iter().any(|a| t.name.starts_with(a.as_str())))
        .min_by(|a, b| (a.vcpus, a.memory_mib, &a.name).cmp(&(b.vcpus, b.memory_mib, &b.name)))
}

/// The name an instance fluidcloud did not define goes by: its `Name`
/// tag when that is a plain name, else its id.
fn foreign_name(i: &Instance) -> String {
    tag_of(&i.tags, "Name")
        .filter(|n| crate::relocate::lock::is_plain_name(n))
        .map_or_else(|| i.id.clone(), str::to_owned)
}

/// The record of instance `i`, which fluidcloud did not define, from what
/// EC2 says of it: its disks are its EBS volumes, by id (the root device
/// boots it), read as they are (`crate::drivers::aws::ebs`).
fn foreign_record(i: &Instance, types: &[InstanceType]) -> InstanceRecord {
    let t = types.iter().find(|t| t.name == i.instance_type);
    let mut r = InstanceRecord::new(
        foreign_name(i),
        t.map_or(0, |t| t.vcpus),
        t.map_or(0, |t| t.memory_mib),
    );
    r.service = tag_of(&i.tags, TAG_SERVICE).map(str::to_owned);
    r.state = instance_state(Some(i));
    r.addresses.clone_from(&i.private_ips);
    for (device, vol) in &i.volumes {
        if Some(device) == i.root_device.as_ref() {
            r.boot_image = Some(vol.clone());
        } else {
            r.volumes.push(vol.clone());
        }
        r.formats
            .insert(vol.clone(), fluidcloud_plugins::ImageFormat::Raw);
    }
    r
}

fn instance_state(i: Option<&Instance>) -> InstanceState {
    match i.map(|i| i.state.as_str()) {
        Some("pending" | "running" | "stopping" | "shutting-down") => InstanceState::Running,
        _ => InstanceState::Stopped,
    }
}

impl Api {
    /// The instances defined on the site (all, or the one named `name`).
    pub(crate) async fn defined(&self, name: Option<&str>) -> Result<Vec<Defined>> {
        let mut out = Vec::new();
        for template in self.templates(TAG_INSTANCE, name).await? {
            let record = record_of(&template.tags).map_err(|e| {
                Error::Precondition(format!(
                    "site {}: launch template {} holds a damaged instance record: {e}",
                    self.name, template.id
                ))
            })?;
            if let Some(record) = record {
                out.push(Defined { template, record });
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// The EC2 instance launched for instance `name`, unless terminated.
    pub(crate) async fn launched(&self, name: &str) -> Result<Option<Instance>> {
        Ok(self
            .instances(TAG_INSTANCE, Some(name))
            .await?
            .into_iter()
            .next())
    }

    /// The volume holding disk `name` of `store` for an instance launched
    /// on the site, if one does: `(instance name, vol-…)`.
    pub(crate) async fn attached(
        &self,
        store: DiskStore,
        name: &str,
    ) -> Result<Option<(String, String)>> {
        for d in self.defined(None).await? {
            let Some(device) = d.device_of(store, name) else {
                continue;
            };
            if let Some(i) = self.launched(&d.record.name).await?
                && let Some((_, vol)) = i.volumes.iter().find(|(dev, _)| *dev == device)
            {
                return Ok(Some((d.record.name, vol.clone())));
            }
        }
        Ok(None)
    }

    /// Waits until instance `id` is in one of `states`; it then.
    async fn wait_instance(&self, id: &str, states: &[&str]) -> Result<Option<Instance>> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let now = self.instance(id).await?;
            let state = now.as_ref().map_or("terminated", |i| i.state.as_str());
            if states.contains(&state) {
                return Ok(now);
            }
            if start.elapsed() > STATE_TIMEOUT {
                return Err(Error::Transient(format!(
                    "site {}: instance {id} is still {state} after {} s, waiting for {}",
                    self.name,
                    STATE_TIMEOUT.as_secs(),
                    states.join(" or ")
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Waits until snapshot `id` is completed.
    pub(crate) async fn wait_snapshot(&self, id: &str) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let state = self.snapshot(id).await?.map(|s| s.state);
            match state.as_deref() {
                Some("completed") => return Ok(()),
                Some("error") | None => {
                    return Err(Error::Precondition(format!(
                        "site {}: snapshot {id} failed ({})",
                        self.name,
                        state.unwrap_or_else(|| "gone".into())
                    )));
                }
                Some(_) if start.elapsed() > STATE_TIMEOUT => {
                    return Err(Error::Transient(format!(
                        "site {}: snapshot {id} is not complete after {} s",
                        self.name,
                        STATE_TIMEOUT.as_secs()
                    )));
                }
                Some(_) => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }
}

/// An instance of the site as compute finds it by name.
struct Found {
    /// Its definition, when fluidcloud defined it.
    defined: Option<Defined>,
    /// Its EC2 instance, when launched (and not terminated).
    launched: Option<Instance>,
}

impl Aws {
    /// Instance `name`: one fluidcloud defined, or one of a service
    /// (tagged `fluidcloud:service`), or `NotFound`.
    async fn find(&self, name: &str) -> Result<Found> {
        super::ebs::check_name(name)?;
        let api = self.api.clone();
        let owned = name.to_owned();
        let found = self
            .api
            .on_rt(async move {
                let defined = api
                    .defined(Some(&owned))
                    .await?
                    .into_iter()
                    .find(|d| d.record.name == owned);
                let launched = match &defined {
                    Some(_) => api.launched(&owned).await?,
                    None => api
                        .instances(TAG_SERVICE, None)
                        .await?
                        .into_iter()
                        .find(|i| {
                            tag_of(&i.tags, TAG_INSTANCE).is_none() && foreign_name(i) == owned
                        }),
                };
                Ok(Found { defined, launched })
            })
            .await?;
        if found.defined.is_none() && found.launched.is_none() {
            return Err(Error::NotFound {
                what: format!("instance {name}"),
                site: Some(self.api.name.clone()),
            });
        }
        Ok(found)
    }

    /// The region's instance types, listed once.
    async fn types(&self) -> Result<&[InstanceType]> {
        self.types
            .get_or_try_init(|| async {
                let api = self.api.clone();
                self.api
                    .on_rt(async move { api.instance_types().await })
                    .await
            })
            .await
            .map(Vec::as_slice)
    }

    /// The instance type for `record`, from the region's types (listed once).
    async fn instance_type(&self, record: &InstanceRecord) -> Result<String> {
        let types = self.types().await?;
        choose_type(
            types,
            record.vcpus,
            record.memory_mib,
            &self.config.instance_types,
        )
        .map(|t| t.name.clone())
        .ok_or_else(|| {
            Error::Precondition(format!(
                "site {}: no instance type has {} vCPUs and {} MiB{}",
                self.api.name,
                record.vcpus,
                record.memory_mib,
                if self.config.instance_types.is_empty() {
                    String::new()
                } else {
                    format!(" among {}", self.config.instance_types.join(", "))
                }
            ))
        })
    }

    /// The `LaunchTemplateData.…` parameters for `record`.
    async fn template_data(&self, record: &InstanceRecord) -> Result<Vec<(String, String)>> {
        let site = self.api.name.clone();
        let mut p = params([
            (
                "LaunchTemplateData.InstanceType",
                self.instance_type(record).await?.as_str(),
            ),
            (
                "LaunchTemplateData.TagSpecification.1.ResourceType",
                "instance",
            ),
            (
                "LaunchTemplateData.TagSpecification.1.Tag.1.Key",
                TAG_INSTANCE,
            ),
            (
                "LaunchTemplateData.TagSpecification.1.Tag.1.Value",
                &record.name,
            ),
            ("LaunchTemplateData.TagSpecification.1.Tag.2.Key", "Name"),
            (
                "LaunchTemplateData.TagSpecification.1.Tag.2.Value",
                &record.name,
            ),
        ]);
        let mut disks: Vec<(String, DiskStore, &str)> = Vec::new();
        match &record.boot_image {
            Some(boot) => {
                let api = self.api.clone();
                let b = boot.clone();
                let ami = self
                    .api
                    .on_rt(async move { api.images("fluidcloud:name", &b).await })
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        Error::Precondition(format!(
                            "site {site}: image {boot} of instance {} is not registered as an AMI",
                            record.name
                        ))
                    })?;
                p.push(("LaunchTemplateData.ImageId".into(), ami));
                disks.push((BOOT_DEVICE.to_owned(), DiskStore::Image, boot));
            }
            None => {
                let ami = self.config.default_image_id.clone().ok_or_else(|| {
                    Error::Invalid(vec![
                        Diagnostic::error(format!(
                            "instance {} has no boot disk, and site {site} names no AMI for such instances",
                            record.name
                        ))
                        .at_key(format!("sites.{site}.aws.default_image_id")),
                    ])
                })?;
                p.push(("LaunchTemplateData.ImageId".into(), ami));
            }
        }
        for (i, v) in record.volumes.iter().enumerate() {
            let device = volume_device(i).ok_or_else(|| {
                Error::Precondition(format!(
                    "instance {} has {} volumes; an aws site attaches at most 11",
                    record.name,
                    record.volumes.len()
                ))
            })?;
            disks.push((device, DiskStore::Volume, v));
        }
        for (n, (device, store, name)) in disks.into_iter().enumerate() {
            let api = self.api.clone();
            let owned = name.to_owned();
            let (id, size) = self
                .api
                .on_rt(async move { api.latest_with_size(store, &owned).await })
                .await?;
            let k = |f: &str| format!("LaunchTemplateData.BlockDeviceMapping.{}.{f}", n + 1);
            p.push((k("DeviceName"), device));
            p.push((k("Ebs.SnapshotId"), id));
            p.push((
                k("Ebs.VolumeSize"),
                size.div_ceil(1 << 30).max(1).to_string(),
            ));
            p.push((k("Ebs.DeleteOnTermination"), "true".into()));
        }
        Ok(p)
    }

    /// The `RunInstances` parameters of `record`'s network interface: in
    /// `aws.subnet_id` with the record's first address, in
    /// `aws.security_group_ids`. (Given at launch rather than in the
    /// template: EC2 takes both, moto only this.)
    fn interface_params(&self, record: &InstanceRecord) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let nic = |f: &str| format!("NetworkInterface.1.{f}");
        if let Some(subnet) = &self.config.subnet_id {
            p.push((nic("DeviceIndex"), "0".into()));
            p.push((nic("SubnetId"), subnet.clone()));
            if let Some(ip) = record.addresses.first() {
                p.push((nic("PrivateIpAddress"), ip.clone()));
            }
            for (i, g) in self.config.security_group_ids.iter().enumerate() {
                p.push((nic(&format!("SecurityGroupId.{}", i + 1)), g.clone()));
            }
        } else {
            for (i, g) in self.config.security_group_ids.iter().enumerate() {
                p.push((format!("SecurityGroupId.{}", i + 1), g.clone()));
            }
        }
        p
    }

    /// Snapshots each volume of launched instance `d` as the latest state
    /// of the disk it holds, so terminating it loses no guest write.
    async fn keep_volumes(&self, d: &Defined, launched: &Instance) -> Result<()> {
        let disks = d
            .record
            .boot_image
            .iter()
            .map(|b| (DiskStore::Image, b))
            .chain(d.record.volumes.iter().map(|v| (DiskStore::Volume, v)));
        for (store, name) in disks {
            let Some(device) = d.device_of(store, name) else {
                continue;
            };
            let Some((_, vol)) = launched.volumes.iter().find(|(dev, _)| *dev == device) else {
                continue;
            };
            let api = self.api.clone();
            let (name, vol) = (name.clone(), vol.clone());
            let owner = d.record.created_by.clone();
            self.api
                .on_rt(async move { api.keep_volume(store, &name, &vol, owner.as_deref()).await })
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Compute for Aws {
    async fn define(&self, record: &InstanceRecord) -> Result<()> {
        super::ebs::check_name(&record.name)?;
        let api = self.api.clone();
        let name = record.name.clone();
        let existing = self
            .api
            .on_rt(async move { api.defined(Some(&name)).await })
            .await?;
        if let Some(d) = existing.first() {
            return Err(Error::Precondition(format!(
                "site {}: instance {} is already defined (launch template {}, {})",
                self.api.name,
                record.name,
                d.template.id,
                describe(d.record.created_by.as_deref())
            )));
        }
        let mut stored = record.clone();
        stored.state = InstanceState::Stopped;
        let mut tags = vec![(TAG_INSTANCE.to_owned(), record.name.clone())];
        if let Some(s) = &record.service {
            tags.push((TAG_SERVICE.to_owned(), s.clone()));
        }
        if let Some(o) = &record.created_by {
            tags.push(("fluidcloud:owner".to_owned(), o.clone()));
        }
        tags.extend(record_tags(&stored)?);
        let data = self.template_data(record).await?;
        let api = self.api.clone();
        let template_name = format!("fluidcloud-{}", record.name);
        self.api
            .on_rt(async move { api.create_template(&template_name, data, &tags).await })
            .await
            .map(drop)
    }

    async fn start(&self, name: &str) -> Result<()> {
        let found = self.find(name).await?;
        let interface = found
            .defined
            .as_ref()
            .map(|d| self.interface_params(&d.record))
            .unwrap_or_default();
        let api = self.api.clone();
        let name = name.to_owned();
        self.api
            .on_rt(async move {
                let id = match (found.launched, found.defined) {
                    (Some(i), _) if matches!(i.state.as_str(), "pending" | "running") => i.id,
                    (Some(i), _) if i.state == "shutting-down" => {
                        return Err(Error::Precondition(format!(
                            "site {}: instance {name} ({}) is being terminated",
                            api.name, i.id
                        )));
                    }
                    (Some(i), _) => {
                        api.wait_instance(&i.id, &["stopped"]).await?;
                        api.instance_action("StartInstances", &i.id).await?;
                        i.id
                    }
                    (None, Some(d)) => {
                        let i = api
                            .run_instance(&d.template.id, &d.template.id, interface)
                            .await?;
                        if i.state == "terminated" {
                            return Err(Error::Precondition(format!(
                                "site {}: instance {name} ({}) was terminated outside fluidcloud; undefine it and define it again",
                                api.name, i.id
                            )));
                        }
                        i.id
                    }
                    (None, None) => unreachable!("find returns one or the other"),
                };
                api.wait_instance(&id, &["running"]).await.map(drop)
            })
            .await
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let Some(i) = self.find(name).await?.launched else {
            return Ok(());
        };
        let api = self.api.clone();
        self.api
            .on_rt(async move {
                if i.state != "stopped" {
                    api.wait_instance(&i.id, &["running", "stopping", "stopped"])
                        .await?;
                    api.instance_action("StopInstances", &i.id).await?;
                    api.wait_instance(&i.id, &["stopped"]).await?;
                }
                Ok(())
            })
            .await
    }

    async fn state(&self, name: &str) -> Result<InstanceState> {
        Ok(instance_state(self.find(name).await?.launched.as_ref()))
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let found = self.find(name).await?;
        let Some(d) = found.defined else {
            return Err(Error::Precondition(format!(
                "site {}: instance {name} was not defined by fluidcloud; it is left as it is",
                self.api.name
            )));
        };
        if let Some(i) = &found.launched {
            if instance_state(Some(i)) == InstanceState::Running {
                return Err(Error::Precondition(format!(
                    "site {}: instance {name} ({}) is {}; stop it first",
                    self.api.name, i.id, i.state
                )));
            }
            self.keep_volumes(&d, i).await?;
        }
        let api = self.api.clone();
        self.api
            .on_rt(async move {
                if let Some(i) = found.launched {
                    api.instance_action("TerminateInstances", &i.id).await?;
                    api.wait_instance(&i.id, &["terminated"]).await?;
                }
                api.delete_template(&d.template.id).await
            })
            .await
    }

    async fn console(&self, name: &str) -> Result<String> {
        let Some(i) = self.find(name).await?.launched else {
            return Ok(String::new());
        };
        let api = self.api.clone();
        self.api
            .on_rt(async move { api.console_output(&i.id).await })
            .await
    }
}

impl Aws {
    /// The config bucket, or `NotSupported` naming the key.
    fn config_bucket(&self, doing: &str) -> Result<&str> {
        self.config
            .config_bucket
            .as_deref()
            .ok_or_else(|| Error::NotSupported {
                operation: format!("{doing} (the site names no aws.config_bucket)"),
                site: Some(self.api.name.clone()),
            })
    }

    async fn config_store(
        &self,
        doing: &str,
    ) -> Result<std::sync::Arc<dyn object_store::ObjectStore>> {
        let bucket = self.config_bucket(doing)?;
        crate::driver::ObjectStorage::bucket(&self.buckets, bucket).await
    }

    async fn get_text(&self, key: &str, doing: &str) -> Result<Option<Vec<u8>>> {
        let store = self.config_store(doing).await?;
        match store.get(&object_store::path::Path::from(key)).await {
            Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())).map_err(|e| {
                Error::Transient(format!("site {}: reading {key}: {e}", self.api.name))
            }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::Transient(format!(
                "site {}: reading {key}: {e}",
                self.api.name
            ))),
        }
    }

    async fn put_text(&self, key: &str, content: &[u8], doing: &str) -> Result<()> {
        let store = self.config_store(doing).await?;
        store
            .put(
                &object_store::path::Path::from(key),
                content.to_vec().into(),
            )
            .await
            .map(drop)
            .map_err(|e| Error::Transient(format!("site {}: writing {key}: {e}", self.api.name)))
    }

    fn locator(&self, key: &str) -> String {
        format!(
            "s3://{}/{key}",
            self.config.config_bucket.as_deref().unwrap_or_default()
        )
    }
}

#[async_trait]
impl Inventory for Aws {
    async fn instances(&self) -> Result<Vec<InstanceRecord>> {
        let api = self.api.clone();
        let mut records = self
            .api
            .on_rt(async move {
                let defined = api.defined(None).await?;
                let launched = api.instances(TAG_INSTANCE, None).await?;
                Ok(defined
                    .into_iter()
                    .map(|d| {
                        let mut r = d.record;
                        let i = launched
                            .iter()
                            .find(|i| tag_of(&i.tags, TAG_INSTANCE) == Some(r.name.as_str()));
                        r.state = instance_state(i);
                        r
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        // Instances of a service that fluidcloud did not define.
        let api = self.api.clone();
        let foreign = self
            .api
            .on_rt(async move { api.instances(TAG_SERVICE, None).await })
            .await?;
        let foreign: Vec<Instance> = foreign
            .into_iter()
            .filter(|i| tag_of(&i.tags, TAG_INSTANCE).is_none())
            .collect();
        if !foreign.is_empty() {
            let types = self.types().await?;
            for i in &foreign {
                let r = foreign_record(i, types);
                if records.iter().any(|d| d.name == r.name) {
                    return Err(Error::Precondition(format!(
                        "site {}: two instances are named {} (EC2 {} and another)",
                        self.api.name, r.name, i.id
                    )));
                }
                records.push(r);
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    async fn config_file(&self, path: &str) -> Result<ConfigFileRecord> {
        crate::drivers::local::check_config_path(path)?;
        let key = format!("config/{path}");
        let content = self
            .get_text(&key, "reading config files")
            .await
            .or_else(|e| match e {
                Error::NotSupported { .. } => Ok(None),
                e => Err(e),
            })?
            .ok_or_else(|| Error::NotFound {
                what: format!("config file {path}"),
                site: Some(self.api.name.clone()),
            })?;
        Ok(ConfigFileRecord {
            path: path.to_owned(),
            content,
            locator: self.locator(&key),
        })
    }

    async fn config_files(&self) -> Result<Vec<String>> {
        use futures::TryStreamExt as _;
        let Ok(store) = self.config_store("listing config files").await else {
            return Ok(Vec::new());
        };
        let prefix = object_store::path::Path::from("config");
        let mut out: Vec<String> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location.as_ref().trim_start_matches("config/").to_owned())
            .try_collect()
            .await
            .map_err(|e| {
                Error::Transient(format!("site {}: listing config files: {e}", self.api.name))
            })?;
        out.sort();
        Ok(out)
    }

    async fn service_manifest(
        &self,
        service: &str,
    ) -> Result<Option<(std::path::PathBuf, String)>> {
        super::ebs::check_name(service)?;
        if self.config.config_bucket.is_none() {
            return Ok(None);
        }
        let key = format!("services/{service}.toml");
        match self.get_text(&key, "reading service manifests").await? {
            Some(b) => Ok(Some((
                self.locator(&key).into(),
                String::from_utf8(b).map_err(|_| {
                    Error::Precondition(format!("{} is not UTF-8", self.locator(&key)))
                })?,
            ))),
            None => Ok(None),
        }
    }

    async fn put_config_file(&self, path: &str, content: &[u8], owner: &str) -> Result<()> {
        crate::drivers::local::check_config_path(path)?;
        let (key, owner_key) = (format!("config/{path}"), format!("owners/{path}"));
        let doing = "writing config files";
        let recorded = self
            .get_text(&owner_key, doing)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let exists = self.get_text(&key, doing).await?.is_some();
        let ours = recorded
            .as_deref()
            .is_some_and(|t| same_relocation(t, owner));
        if exists && !ours {
            return Err(Error::Precondition(format!(
                "site {}: {} is {}; this relocation ({}) does not overwrite it",
                self.api.name,
                self.locator(&key),
                describe(recorded.as_deref()),
                fluidcloud_migrators::owner::relocation_of(owner)
            )));
        }
        if recorded.is_none() {
            self.put_text(&owner_key, owner.as_bytes(), doing).await?;
        }
        self.put_text(&key, content, doing).await
    }

    async fn remove_config_file(&self, path: &str, owner: &str) -> Result<bool> {
        crate::drivers::local::check_config_path(path)?;
        let (key, owner_key) = (format!("config/{path}"), format!("owners/{path}"));
        let doing = "removing config files";
        let recorded = self
            .get_text(&owner_key, doing)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        match recorded.as_deref() {
            None if self.get_text(&key, doing).await?.is_none() => return Ok(false),
            Some(t) if same_relocation(t, owner) => {}
            other => {
                return Err(Error::Precondition(format!(
                    "site {}: {} is {}; this relocation ({}) does not remove it",
                    self.api.name,
                    self.locator(&key),
                    describe(other),
                    fluidcloud_migrators::owner::relocation_of(owner)
                )));
            }
        }
        let store = self.config_store(doing).await?;
        for k in [key, owner_key] {
            match store
                .delete(&object_store::path::Path::from(k.as_str()))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(Error::Transient(format!(
                        "site {}: removing {k}: {e}",
                        self.api.name
                    )));
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_tags_and_types_are_chosen_by_size() {
        let mut r = InstanceRecord::new("web", 2, 3000);
        r.addresses = vec!["10.0.0.5".into()];
        r.cmdline = Some("x".repeat(2000));
        let tags = record_tags(&r).unwrap();
        assert!(tags.len() > 1 && tags.iter().all(|(_, v)| v.len() <= 256));
        assert_eq!(record_of(&tags).unwrap(), Some(r));
        assert_eq!(record_of(&[]).unwrap(), None);
        let broken = vec![(format!("{TAG_RECORD}.0"), "!!".to_owned())];
        assert!(record_of(&broken).is_err());
        let t = |name: &str, vcpus, memory_mib, usable| InstanceType {
            name: name.into(),
            vcpus,
            memory_mib,
            usable,
        };
        let types = [
            t("t3.micro", 2, 1024, true),
            t("t3.medium", 2, 4096, true),
            t("m7i.large", 2, 8192, true),
            t("a1.medium", 1, 2048, false),
            t("t3.xlarge", 4, 16384, true),
        ];
        assert_eq!(choose_type(&types, 2, 3000, &[]).unwrap().name, "t3.medium");
        assert_eq!(choose_type(&types, 1, 512, &[]).unwrap().name, "t3.micro");
        let m7 = ["m7i.".to_owned()];
        assert_eq!(choose_type(&types, 1, 512, &m7).unwrap().name, "m7i.large");
        assert!(choose_type(&types, 8, 1, &[]).is_none());
        assert_eq!(volume_device(0).as_deref(), Some("/dev/sdf"));
        assert_eq!(volume_device(10).as_deref(), Some("/dev/sdp"));
        assert!(volume_device(11).is_none());
    }
}
