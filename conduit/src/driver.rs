//! Site drivers: a small required trait and optional capability traits.
//!
//! A driver implements [`SiteDriver`] (name, kind, a health check) and hands
//! out the capabilities it has through accessor methods returning
//! `Option<&dyn Capability>`. The capability set of a site is *detected* from
//! which accessors return `Some` ([`SiteDriver::capabilities`]); callers that
//! need a capability use the `require_*` helpers, which turn a missing one
//! into `NotSupported { operation, site }` rather than any fallback. This is
//! rclone's `Features` pattern: no default method pretends to work.
//!
//! Data moves through these traits in bulk: images and volumes are read at
//! offsets with allocation maps (so copies skip holes), buckets are
//! `object_store::ObjectStore`s (so any backend works the same way).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_plugins::{Capability, Error, ImageFormat, Result};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

/// Whether an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Started.
    Running,
    /// Defined but not running.
    Stopped,
}

impl InstanceState {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

/// An instance as a site describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// Name, unique on the site.
    pub name: String,
    /// Service it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Whether it runs.
    pub state: InstanceState,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Host name the service uses for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Its addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Image it boots from (a name in the site's image store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_image: Option<String>,
    /// Attached volumes (names in the block store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Config files it reads (paths relative to the site's config root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_files: Vec<String>,
    /// Direct kernel boot: the kernel, a name in the image store. Carried
    /// with the instance like its disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Direct kernel boot: the initial RAM disk, a name in the image store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Direct kernel boot: the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Bus the guest sees its disks on (`virtio`, `sata`, `scsi`, `ide`);
    /// unset means the site's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bus: Option<String>,
    /// Network interfaces, in guest order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicRecord>,
    /// The format of each disk (boot image and volumes, by name) as the
    /// site declares it: a libvirt domain's `<driver type>` (raw when
    /// absent, as libvirt reads it), a local manifest's `[format]` table.
    /// A disk's own bytes never decide its format: a raw disk may begin
    /// with anything, including a qcow2 header naming a host file.
    #[serde(default, rename = "format", skip_serializing_if = "BTreeMap::is_empty")]
    pub formats: BTreeMap<String, ImageFormat>,
    /// The relocation that defined this instance, if one did: only that
    /// relocation's rollback may undefine it, and no other adopts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

impl InstanceRecord {
    /// A record with only the required facts set.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            name: name.into(),
            service: None,
            state: InstanceState::Stopped,
            vcpus,
            memory_mib,
            hostname: None,
            addresses: Vec::new(),
            boot_image: None,
            volumes: Vec::new(),
            config_files: Vec::new(),
            kernel: None,
            initrd: None,
            cmdline: None,
            disk_bus: None,
            nics: Vec::new(),
            formats: BTreeMap::new(),
            created_by: None,
        }
    }
}

/// What a network interface is plugged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicKind {
    /// A named virtual network of the site (libvirt `<interface type='network'>`).
    Network,
    /// A host bridge (`<interface type='bridge'>`).
    Bridge,
    /// User-mode networking, nothing on the host to name.
    User,
}

/// One network interface of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicRecord {
    /// What it is plugged into.
    pub kind: NicKind,
    /// The network or bridge name (none for `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Its MAC address, `52:54:00:..`-style; unset lets the site choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device model (`virtio`, `e1000`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A disk image in an image store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Name in the store.
    pub name: String,
    /// Format detected from the content.
    pub format: ImageFormat,
    /// Size the guest sees.
    pub virtual_size: u64,
    /// Bytes allocated in the store.
    pub allocated: u64,
    /// Backing image, if any.
    pub backing: Option<String>,
    /// Where it is (a path for file-based stores).
    pub locator: String,
}

/// Whether a byte range of a volume holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Allocated; must be read and copied.
    Data,
    /// Not allocated; reads as zeros and need not be copied.
    Hole,
}

/// A byte range with its allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data or hole.
    pub kind: ExtentKind,
}

/// A config file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileRecord {
    /// Path relative to the site's config root.
    pub path: String,
    /// Raw bytes.
    pub content: Vec<u8>,
    /// Where it is on the site, for messages.
    pub locator: String,
}

/// Lists what runs on a site.
#[async_trait]
pub trait Inventory: Send + Sync {
    /// Every instance on the site, sorted by name.
    async fn instances(&self) -> Result<Vec<InstanceRecord>>;
    /// Reads a config file by its path relative to the config root.
    async fn config_file(&self, path: &str) -> Result<ConfigFileRecord>;
    /// Paths of every config file on the site, sorted.
    async fn config_files(&self) -> Result<Vec<String>>;
    /// The service manifest stored on the site for `service`, if any:
    /// (where it is, its TOML text).
    async fn service_manifest(&self, service: &str) -> Result<Option<(PathBuf, String)>>;
    /// Writes a config file (readable by its owner only, as config files
    /// hold credentials), atomically. `owner` (`RELOCATION/STEP`) is
    /// recorded first; an existing file is replaced only when `owner`'s
    /// relocation wrote it.
    async fn put_config_file(&self, path: &str, content: &[u8], owner: &str) -> Result<()> {
        let _ = (content, owner);
        Err(Error::NotSupported {
            operation: format!("writing config file {path}"),
            site: None,
        })
    }
    /// Removes a config file that `owner`'s relocation wrote (the rollback
    /// of [`Self::put_config_file`]); whether there was one.
    async fn remove_config_file(&self, path: &str, owner: &str) -> Result<bool> {
        let _ = owner;
        Err(Error::NotSupported {
            operation: format!("removing config file {path}"),
            site: None,
        })
    }
}

/// Stores disk images.
#[async_trait]
pub trait ImageStore: Send + Sync {
    /// Image names, sorted.
    async fn list_images(&self) -> Result<Vec<String>>;
    /// Facts about one image.
    async fn image_info(&self, name: &str) -> Result<ImageRecord>;
    /// Stores an image from a stream, atomically: either the whole image
    /// appears under `name` or nothing does. Fails if `name` exists.
    async fn put_image(&self, name: &str, data: &mut (dyn AsyncRead + Send + Unpin))
    -> Result<u64>;
    /// Streams an image's bytes (its container format, unchanged).
    async fn open_image(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>>;
    /// Removes an image.
    async fn delete_image(&self, name: &str) -> Result<()>;
}

/// Block volumes with allocation status.
#[async_trait]
pub trait BlockStore: Send + Sync {
    /// Volume names, sorted.
    async fn list_volumes(&self) -> Result<Vec<String>>;
    /// Facts about one volume (format, sizes, locator).
    async fn volume_info(&self, name: &str) -> Result<ImageRecord>;
    /// Creates an empty (all-hole) raw volume. Fails if it exists.
    async fn create_volume(&self, name: &str, size: u64) -> Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read
    /// (less only at the end of the volume).
    async fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// Writes `data` at `offset`; writing past the size is an error.
    async fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()>;
    /// Allocation map covering the whole volume, in order, without gaps.
    async fn allocation(&self, name: &str) -> Result<Vec<Extent>>;
    /// Makes written data durable.
    async fn flush(&self, name: &str) -> Result<()>;
    /// Removes a volume.
    async fn delete_volume(&self, name: &str) -> Result<()>;
}

/// Buckets as `object_store` stores.
#[async_trait]
pub trait ObjectStorage: Send + Sync {
    /// Bucket names, sorted.
    async fn list_buckets(&self) -> Result<Vec<String>>;
    /// Creates an empty bucket; fails if it exists.
    async fn create_bucket(&self, name: &str) -> Result<()>;
    /// A store rooted at the bucket. `NotFound` if it does not exist.
    async fn bucket(&self, name: &str) -> Result<Arc<dyn ObjectStore>>;
    /// Removes a bucket and everything in it.
    async fn delete_bucket(&self, name: &str) -> Result<()>;
    /// Where `object-copy` reaches bucket `name` from this process, when
    /// it can: `file:///…`, or `s3://…` naming its credentials by variable
    /// only. `None` for object storage it cannot open as a URL.
    fn location(&self, name: &str) -> Option<Result<String>> {
        let _ = name;
        None
    }
    /// How many objects and bytes bucket `name` holds.
    async fn summary(&self, name: &str) -> Result<BucketSummary> {
        use futures::TryStreamExt as _;
        let store = self.bucket(name).await?;
        store
            .list(None)
            .map_err(|e| Error::Transient(format!("listing bucket {name}: {e}")))
            .try_fold(BucketSummary::default(), |mut s, meta| async move {
                s.objects += 1;
                s.bytes += meta.size;
                Ok(s)
            })
            .await
    }
}

/// Objects and bytes of a bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSummary {
    /// Objects.
    pub objects: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Runs instances.
#[async_trait]
pub trait Compute: Send + Sync {
    /// Defines a new instance (stopped, whatever `record.state` says).
    /// Fails if one with the same name exists.
    async fn define(&self, record: &InstanceRecord) -> Result<()>;
    /// Starts a defined instance; starting a running one is a no-op.
    async fn start(&self, name: &str) -> Result<()>;
    /// Stops an instance; stopping a stopped one is a no-op.
    async fn stop(&self, name: &str) -> Result<()>;
    /// Current state.
    async fn state(&self, name: &str) -> Result<InstanceState>;
    /// Removes a stopped instance's definition (not its disks).
    async fn undefine(&self, name: &str) -> Result<()>;
    /// What the instance wrote on its serial console since it last
    /// started. `NotSupported` where instances have no console.
    async fn console(&self, name: &str) -> Result<String>;
    /// Boots a throw-away copy of the defined instance `name` for a boot
    /// check: its disks are copy-on-write overlays over the instance's
    /// (which are only read), it has no network interface and its own
    /// console. Returns the trial's instance name, for [`Self::console`]
    /// and [`Self::end_trial`]. `NotSupported` where a site cannot.
    async fn start_trial(&self, name: &str) -> Result<String> {
        Err(Error::NotSupported {
            operation: format!("booting a throw-away copy of instance {name}"),
            site: None,
        })
    }
    /// Destroys the trial of `name` and its overlays; nothing when there
    /// is none.
    async fn end_trial(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }
}

/// Tracks which byte ranges of an instance's disks its guest writes, so
/// the final delta of a warm relocation reads only those instead of
/// re-hashing whole disks. Sites without it get the re-hash.
///
/// While tracking, each disk's locator holds what it held when tracking
/// began and is only read; the guest's writes go elsewhere (libvirt: an
/// external snapshot overlay) until [`Self::end_tracking`] folds them back.
#[async_trait]
pub trait ChangeTracking: Send + Sync {
    /// Starts tracking every disk of instance `name`, running or not.
    /// Tracking already on is kept (a resumed relocation calls it again).
    async fn begin_tracking(&self, name: &str) -> Result<()>;
    /// What the guest of the *stopped* instance `name` wrote since
    /// tracking began, one change set per disk (`disk` is the locator the
    /// instance's inventory gives). `None` when `name` is not tracked.
    /// Only reads.
    async fn changes(&self, name: &str) -> Result<Option<Vec<ChangeSet>>>;
    /// Folds the tracked writes into the disks and ends tracking, running
    /// or stopped: afterwards each disk's locator holds everything the
    /// guest wrote. Nothing when `name` is not tracked; safe to repeat
    /// after a crash.
    async fn end_tracking(&self, name: &str) -> Result<()>;
}

/// Which store of a site holds a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskStore {
    /// The image store (boot disks, kernels, initrds).
    Image,
    /// The block store (volumes).
    Volume,
}

impl DiskStore {
    /// `image` or `volume`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Volume => "volume",
        }
    }
}

/// Looking inside the guests of a site's disks (`crate::guest`): what
/// introspection reads there and what a relocation rewrites. A site whose
/// disks are files of this process offers it (`crate::guest::site`); a
/// site agent serves it to orchestrators elsewhere, so the appliance always
/// runs on the machine that holds the disks.
#[async_trait]
pub trait Guests: Send + Sync {
    /// Looks, read-only, inside the guests booting from `boots`; those
    /// whose boot disk holds no partition table or filesystem are left out.
    /// `dirs` are scanned besides `/etc`.
    async fn inspect(
        &self,
        boots: &[crate::guest::BootDisk],
        dirs: &[String],
    ) -> Result<BTreeMap<String, crate::guest::GuestView>>;
    /// Checks the guest on `job`'s disks has a readable root and boots a
    /// read-write appliance over them, which waits for [`Self::adapt`].
    async fn prepare(&self, job: &crate::guest::GuestJob) -> Result<crate::guest::Prepared>;
    /// Rewrites the guest on `job`'s disks, with the appliance `prepare`
    /// left waiting, or one booted now.
    async fn adapt(
        &self,
        job: &crate::guest::GuestJob,
        plan: &crate::guest::GuestPlan,
    ) -> Result<crate::guest::Adapted>;
    /// Stops the appliance waiting under `key`, if any.
    async fn release(&self, key: &str) -> Result<()>;
}

/// Whole disks as streams of extents: what a transfer between two sites
/// reads at one and writes at the other. A disk is read as its guest sees
/// it (virtual bytes, with the ranges that hold no data marked), whatever
/// its container format, and written the same way into the format the
/// target keeps it in. Blocking: callers run it off the async runtime.
pub trait Disks: Send + Sync {
    /// Opens disk `name` of `store` for reading, as `format`: the format
    /// the site declares for it, never one its bytes suggest. Its backing
    /// files and extents stay inside the site's store.
    ///
    /// # Errors
    /// `NotFound` for a missing disk; the image reader's errors.
    fn read(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
    ) -> Result<Box<dyn fluidcloud_migrators::image::ImageReader>>;

    /// Opens disk `name` of `store` for writing `virtual_size` guest bytes,
    /// kept as `format`. A new disk appears under its name only when
    /// [`DiskWriter::finish`] succeeds. An existing disk is written only
    /// when `owner`'s relocation created it (tags `RELOCATION/STEP`: the
    /// same `RELOCATION/` prefix): a repeated transfer (the final delta) or
    /// one resumed after a crash updates it; anything else is refused.
    ///
    /// # Errors
    /// `Precondition` for a disk someone else created or of another size.
    fn write(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
        virtual_size: u64,
        owner: &str,
    ) -> Result<Box<dyn DiskWriter>>;

    /// Removes disk `name` of `store`, and whatever transfers left for it,
    /// when `owner`'s relocation created it (the rollback of a transfer).
    /// Whether there was anything to remove.
    ///
    /// # Errors
    /// `Precondition` for a disk someone else created; I/O errors.
    fn remove(&self, store: DiskStore, name: &str, owner: &str) -> Result<bool>;

    /// Who created disk `name` of `store`: `None` when there is no such
    /// disk, `Some(None)` for a disk no relocation created, else the
    /// creator's tag (`RELOCATION/STEP`). A relocation checks its targets
    /// with it before it writes anything.
    ///
    /// # Errors
    /// An unreadable owner record.
    fn holder(&self, store: DiskStore, name: &str) -> Result<Option<Option<String>>>;
}

/// A disk being written by a transfer (see [`Disks::write`]). Positioned
/// writes from several threads at once are allowed.
pub trait DiskWriter: Send + Sync {
    /// What the disk holds now, as guest bytes: an earlier run's work
    /// (resumed or repeated), or all zeros for a new disk. A transfer
    /// hashes it to send only what differs.
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn current(&self) -> Result<Box<dyn fluidcloud_migrators::image::ImageReader>>;
    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// I/O errors naming the file; a range past the virtual size.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes `offset..offset + len` read as zeros (a hole where it can).
    ///
    /// # Errors
    /// As [`Self::write_at`].
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes everything written durable and the disk visible under its
    /// name in its format. Its record.
    ///
    /// # Errors
    /// I/O or conversion errors; the disk keeps its earlier state.
    fn finish(&self) -> Result<ImageRecord>;
}

/// The required core of every site driver.
#[async_trait]
pub trait SiteDriver: Send + Sync {
    /// The site's name.
    fn name(&self) -> &str;
    /// The driver kind.
    fn kind(&self) -> &'static str;
    /// Checks the site is reachable and well-formed.
    async fn check(&self) -> Result<()>;
    /// The inventory capability, if the site has it.
    fn inventory(&self) -> Option<&dyn Inventory>;
    /// The image store capability, if any.
    fn image_store(&self) -> Option<&dyn ImageStore>;
    /// The block store capability, if any.
    fn block_store(&self) -> Option<&dyn BlockStore>;
    /// The object storage capability, if any.
    fn object_storage(&self) -> Option<&dyn ObjectStorage>;
    /// The compute capability, if any.
    fn compute(&self) -> Option<&dyn Compute>;
    /// Change tracking of instances' disks, if the site offers it and its
    /// configuration does not turn it off.
    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        None
    }
    /// Whole-disk streams of the image and block stores, where this
    /// process reaches the site's data (a site agent serves them to
    /// other agents; see `crate::transfer`).
    fn disks(&self) -> Option<&dyn Disks> {
        None
    }
    /// Looking inside its guests' disks, where the appliance can open them.
    fn guests(&self) -> Option<&dyn Guests> {
        None
    }
    /// The site's agent, when the site is reached through one (disks then
    /// move agent to agent, `crate::transfer`).
    fn agent(&self) -> Option<&crate::agent::client::AgentClient> {
        None
    }

    /// Capabilities detected from the accessors above.
    fn capabilities(&self) -> BTreeSet<Capability> {
        let mut set = BTreeSet::new();
        let has = [
            (Capability::Inventory, self.inventory().is_some()),
            (Capability::ImageStore, self.image_store().is_some()),
            (Capability::BlockStore, self.block_store().is_some()),
            (Capability::ObjectStorage, self.object_storage().is_some()),
            (Capability::Compute, self.compute().is_some()),
        ];
        for (cap, present) in has {
            if present {
                set.insert(cap);
            }
        }
        set
    }
}

fn not_supported(site: &dyn SiteDriver, cap: Capability) -> Error {
    Error::NotSupported {
        operation: cap.as_str().to_owned(),
        site: Some(site.name().to_owned()),
    }
}

/// The site's inventory, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "inventory", site }`.
pub fn require_inventory(site: &dyn SiteDriver) -> Result<&dyn Inventory> {
    site.inventory()
        .ok_or_else(|| not_supported(site, Capability::Inventory))
}

/// The site's image store, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "image-store", site }`.
pub fn require_image_store(site: &dyn SiteDriver) -> Result<&dyn ImageStore> {
    site.image_store()
        .ok_or_else(|| not_supported(site, Capability::ImageStore))
}

/// The site's block store, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "block-store", site }`.
pub fn require_block_store(site: &dyn SiteDriver) -> Result<&dyn BlockStore> {
    site.block_store()
        .ok_or_else(|| not_supported(site, Capability::BlockStore))
}

/// The site's object storage, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "object-storage", site }`.
pub fn require_object_storage(site: &dyn SiteDriver) -> Result<&dyn ObjectStorage> {
    site.object_storage()
        .ok_or_else(|| not_supported(site, Capability::ObjectStorage))
}

/// The site's compute, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "compute", site }`.
pub fn require_compute(site: &dyn SiteDriver) -> Result<&dyn Compute> {
    site.compute()
        .ok_or_else(|| not_supported(site, Capability::Compute))
}

/// Looking inside the site's guests, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "looking inside guests", site }`.
pub fn require_guests(site: &dyn SiteDriver) -> Result<&dyn Guests> {
    site.guests().ok_or_else(|| Error::NotSupported {
        operation: "looking inside guests".to_owned(),
        site: Some(site.name().to_owned()),
    })
}

/// The site's whole-disk streams, or `NotSupported`.
///
/// # Errors
/// `NotSupported { operation: "disk transfers", site }`.
pub fn require_disks(site: &dyn SiteDriver) -> Result<&dyn Disks> {
    site.disks().ok_or_else(|| Error::NotSupported {
        operation: "disk transfers".to_owned(),
        site: Some(site.name().to_owned()),
    })
}
