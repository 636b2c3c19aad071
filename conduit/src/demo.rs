//! The demo environment: a realistic relocation setting with no cloud account.
//!
//! `fluidcloud demo init DIR` writes `DIR/fluidcloud.toml` and five local
//! sites under `DIR/sites/`:
//!
//! - `dc-paris`, the source, runs the three-tier **shop** service: `web`
//!   (nginx, qcow2 boot disk of 1 GiB virtual size with ~300 MiB of data and
//!   holes), `app` (API server) and `db` (PostgreSQL, with a 2 GiB raw data
//!   volume of which ~192 MiB is written), a `shop-media` bucket of 520
//!   objects of mixed sizes, and seven config files in six syntaxes that
//!   reference the db host, the bucket endpoint and public URLs. A second
//!   service, `intranet`, and a `paris-backups` bucket share the site, so
//!   introspection has something to leave out.
//! - `edge-rennes`, `edge-nantes` (small edge sites in Brittany and the Loire
//!   valley), `cloud-frankfurt` (large and cheap, German jurisdiction) and
//!   `cloud-virginia` (cheapest, US jurisdiction): empty targets that differ
//!   in accepted image formats, capacity, location, jurisdiction and cost.
//!
//! All content is generated from fixed seeds, so two demo environments are
//! byte-identical and tests can hash what they expect. The qcow2 images are
//! written by fluidcloud's own writer; the environment is built in a
//! temporary directory inside `DIR` and moved into place at the end, so an
//! interrupted `demo init` leaves nothing that looks finished.

use std::path::{Path, PathBuf};

use fluidcloud_migrators::{Qcow2Options, Qcow2Writer};
use fluidcloud_plugins::ImageFormat;
use object_store::{ObjectStoreExt as _, PutPayload, path::Path as ObjPath};
use serde::Serialize;

use crate::driver::{BlockStore, Compute, InstanceRecord, InstanceState, ObjectStorage};
use crate::drivers::local::LocalSite;
use crate::error::{Error, Result};

/// The source site's name.
pub const SOURCE_SITE: &str = "dc-paris";
/// The demo service's name.
pub const SERVICE: &str = "shop";
/// The demo's media bucket.
pub const MEDIA_BUCKET: &str = "shop-media";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What `demo init` created.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// The sites file.
    pub config: PathBuf,
    /// Site names, source first.
    pub sites: Vec<String>,
    /// Disk images written (name, virtual size, data bytes).
    pub images: Vec<(String, u64, u64)>,
    /// Volumes written (name, size, data bytes).
    pub volumes: Vec<(String, u64, u64)>,
    /// Objects in the media bucket, and their total size.
    pub media_objects: u64,
    /// Total size of the media objects.
    pub media_bytes: u64,
    /// Bytes of data generated in all.
    pub bytes_written: u64,
}

/// Receives progress of `demo init` in bytes.
pub trait DemoProgress {
    /// `done` of `total` bytes generated; `what` is being written.
    fn update(&self, done: u64, total: u64, what: &str);
}

impl<F: Fn(u64, u64, &str)> DemoProgress for F {
    fn update(&self, done: u64, total: u64, what: &str) {
        self(done, total, what);
    }
}

/// SplitMix64: tiny, fast, and good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Fills `buf` with compressible text-like content (log lines, rows).
fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    const WORDS: &[&str] = &[
        "order",
        "customer",
        "basket",
        "paid",
        "shipped",
        "Paris",
        "Rennes",
        "sku",
        "price",
        "EUR",
        "status=200",
        "GET /api/products",
        "POST /api/orders",
        "INSERT INTO orders",
        "VALUES",
    ];
    let mut pos = 0;
    while pos < buf.len() {
        let line = format!(
            "{:010} {} {} {} {}\n",
            rng.below(10_000_000_000),
            WORDS[rng.below(WORDS.len() as u64) as usize],
            WORDS[rng.below(WORDS.len() as u64) as usize],
            rng.below(100_000),
            WORDS[rng.below(WORDS.len() as u64) as usize],
        );
        let n = line.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&line.as_bytes()[..n]);
        pos += n;
    }
}

/// One disk's layout: where data goes, and whether it is random or text.
struct DiskPlan {
    name: &'static str,
    virtual_size: u64,
    /// (offset, length, text?) in increasing offset order.
    extents: Vec<(u64, u64, bool)>,
    seed: u64,
}

impl DiskPlan {
    fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// Scattered extents: a dense start (boot sector, kernel, root fs), then
    /// `count` extents of `len` bytes every `stride`, alternating random and
    /// text, with a final extent that ends exactly at the disk's last byte.
    fn scattered(
        name: &'static str,
        virtual_size: u64,
        head: u64,
        count: u64,
        len: u64,
        seed: u64,
    ) -> Self {
        let mut extents = vec![(0, head, false)];
        let stride = (virtual_size - head) / (count + 1);
        for i in 1..=count {
            extents.push((head + i * stride - len / 2, len, i % 2 == 0));
        }
        extents.push((virtual_size - 64 * 1024, 64 * 1024, true));
        Self {
            name,
            virtual_size,
            extents,
            seed,
        }
    }
}

/// The data of a disk plan, generated in chunks of at most 4 MiB, in
/// offset order, into one reused buffer.
struct Chunks<'a> {
    plan: &'a DiskPlan,
    rng: Rng,
    buf: Vec<u8>,
    extent: usize,
    at: u64,
}

impl<'a> Chunks<'a> {
    fn new(plan: &'a DiskPlan) -> Self {
        Self {
            plan,
            rng: Rng(plan.seed),
            buf: vec![0u8; 4 * MIB as usize],
            extent: 0,
            at: 0,
        }
    }

    /// The next (offset, data), or None at the end.
    fn next_chunk(&mut self) -> Option<(u64, &[u8])> {
        let &(offset, len, text) = self.plan.extents.get(self.extent)?;
        let n = (len - self.at).min(self.buf.len() as u64) as usize;
        let chunk = &mut self.buf[..n];
        if text {
            fill_text(&mut self.rng, chunk);
        } else {
            self.rng.fill(chunk);
        }
        let at = offset + self.at;
        self.at += n as u64;
        if self.at >= len {
            self.extent += 1;
            self.at = 0;
        }
        Some((at, &self.buf[..n]))
    }
}

fn plans() -> (Vec<DiskPlan>, DiskPlan) {
    let images = vec![
        DiskPlan::scattered("shop-web.qcow2", GIB, 24 * MIB, 34, 8 * MIB, 0x5eb),
        DiskPlan::scattered("shop-app.qcow2", 256 * MIB, 8 * MIB, 6, 4 * MIB, 0xa99),
        DiskPlan::scattered("shop-db.qcow2", 256 * MIB, 8 * MIB, 6, 4 * MIB, 0xdb),
        DiskPlan::scattered("intranet-wiki.qcow2", 64 * MIB, 2 * MIB, 2, MIB, 0x1417),
    ];
    let volume = DiskPlan::scattered("db-data.raw", 2 * GIB, 32 * MIB, 20, 8 * MIB, 0xda7a);
    (images, volume)
}

/// (key, size, text?) of every media object, in a fixed order.
fn media_objects() -> Vec<(String, u64, bool)> {
    let mut rng = Rng(0x3ed1a);
    let mut v = Vec::new();
    for i in 0..300 {
        v.push((
            format!("products/{i:04}.jpg"),
            20 * 1024 + rng.below(380 * 1024),
            false,
        ));
    }
    for i in 0..200 {
        v.push((
            format!("thumbs/{i:04}.webp"),
            2 * 1024 + rng.below(14 * 1024),
            false,
        ));
    }
    for i in 0..16 {
        v.push((
            format!("docs/catalogue-{i:02}.txt"),
            50 * 1024 + rng.below(150 * 1024),
            true,
        ));
    }
    for i in 0..4 {
        v.push((format!("videos/promo-{i}.mp4"), 4 * MIB, false));
    }
    v.push(("index.json".to_owned(), 1234, true));
    v
}

/// The file that marks a directory as a demo environment: only such a
/// directory is ever reset (its `sites/` and `.fluidcloud/` removed).
pub const MARKER: &str = ".fluidcloud-demo";

const MARKER_TEXT: &str = "This directory is a fluidcloud demo environment (fluidcloud demo init).\n\
`fluidcloud demo` resets it: sites/, .fluidcloud/ and fluidcloud.toml are replaced.\n\
Delete this file to keep `demo` from ever touching this directory.\n";

/// Creates the demo environment in `dir`.
///
/// `dir` may exist but must not already hold a demo unless `force`, in which
/// case the previous `fluidcloud.toml` and `sites/` are replaced (and the
/// previous relocations' records in `.fluidcloud/` removed). A directory
/// holding any of those without the [`MARKER`] file is never touched.
///
/// # Errors
/// `Precondition` (as a site error) when a demo exists and `force` is not
/// set; I/O errors naming the path.
pub async fn init(dir: &Path, force: bool, progress: &dyn DemoProgress) -> Result<DemoSummary> {
    let config = dir.join("fluidcloud.toml");
    let sites_dir = dir.join("sites");
    let fail = |e: fluidcloud_plugins::Error| Error::site(SOURCE_SITE, e);
    let io = |what: &str, p: &Path, e: std::io::Error| {
        fail(fluidcloud_plugins::Error::io(
            format!("{what} {}", p.display()),
            e,
        ))
    };
    let occupied = config.exists() || sites_dir.exists() || dir.join(".fluidcloud").exists();
    if occupied && !dir.join(MARKER).is_file() {
        // Not ours: a real sites file and its sites, never to be replaced.
        return Err(fail(fluidcloud_plugins::Error::Precondition(format!(
            "{} holds a fluidcloud.toml, sites/ or .fluidcloud/ that no demo made (no {MARKER} marker); nothing was changed — choose another directory",
            dir.display()
        ))));
    }
    if !force && occupied {
        return Err(fail(fluidcloud_plugins::Error::Precondition(format!(
            "{} already holds a demo environment (pass --force to recreate it)",
            dir.display()
        ))));
    }
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let staging = dir.join(".demo-staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io("clean", &staging, e))?;
    }
    let (images, volume) = plans();
    let objects = media_objects();
    let total: u64 = images.iter().map(DiskPlan::data_bytes).sum::<u64>()
        + volume.data_bytes()
        + objects.iter().map(|o| o.1).sum::<u64>();
    let mut done = 0u64;

    let paris =
        LocalSite::create(SOURCE_SITE, staging.join("sites").join(SOURCE_SITE)).map_err(fail)?;
    for target in TARGETS {
        LocalSite::create(target.name, staging.join("sites").join(target.name)).map_err(fail)?;
    }

    let mut summary = DemoSummary {
        config: config.clone(),
        sites: std::iter::once(SOURCE_SITE)
            .chain(TARGETS.iter().map(|t| t.name))
            .map(str::to_owned)
            .collect(),
        images: Vec::new(),
        volumes: Vec::new(),
        media_objects: objects.len() as u64,
        media_bytes: objects.iter().map(|o| o.1).sum(),
        bytes_written: total,
    };

    // Boot images, through the qcow2 writer.
    for plan in &images {
        let path = paris.image_path(plan.name).map_err(fail)?;
        let mut w = Qcow2Writer::create(&path, plan.virtual_size, &Qcow2Options::default())
            .map_err(|e| fail(e.into()))?;
        let mut chunks = Chunks::new(plan);
        while let Some((offset, chunk)) = chunks.next_chunk() {
            w.write_at(offset, chunk).map_err(|e| fail(e.into()))?;
            done += chunk.len() as u64;
            progress.update(done, total, plan.name);
        }
        w.finish().map_err(|e| fail(e.into()))?;
        summary
            .images
            .push((plan.name.to_owned(), plan.virtual_size, plan.data_bytes()));
    }

    // The db's data volume, through the block store.
    paris
        .create_volume(volume.name, volume.virtual_size)
        .await
        .map_err(fail)?;
    let mut chunks = Chunks::new(&volume);
    while let Some((offset, chunk)) = chunks.next_chunk() {
        paris
            .write_at(volume.name, offset, chunk)
            .await
            .map_err(fail)?;
        done += chunk.len() as u64;
        progress.update(done, total, volume.name);
    }
    paris.flush(volume.name).await.map_err(fail)?;
    summary.volumes.push((
        volume.name.to_owned(),
        volume.virtual_size,
        volume.data_bytes(),
    ));

    // Buckets, through object_store.
    paris.create_bucket(MEDIA_BUCKET).await.map_err(fail)?;
    paris.create_bucket("paris-backups").await.map_err(fail)?;
    let media = paris.bucket(MEDIA_BUCKET).await.map_err(fail)?;
    let mut rng = Rng(0x0b1ec7);
    for (key, size, text) in &objects {
        let mut body = vec![0u8; *size as usize];
        if *text {
            fill_text(&mut rng, &mut body)
        } else {
            rng.fill(&mut body)
        }
        media
            .put(&ObjPath::from(key.as_str()), PutPayload::from(body))
            .await
            .map_err(|e| {
                fail(fluidcloud_plugins::Error::Transient(format!(
                    "put {key}: {e}"
                )))
            })?;
        done += size;
        progress.update(done, total, MEDIA_BUCKET);
    }
    let backups = paris.bucket("paris-backups").await.map_err(fail)?;
    backups
        .put(
            &ObjPath::from("intranet/2026-11-01.tar"),
            PutPayload::from(vec![7u8; 4096]),
        )
        .await
        .map_err(|e| {
            fail(fluidcloud_plugins::Error::Transient(format!(
                "put backup: {e}"
            )))
        })?;

    // Config files and instances.
    for (path, content) in CONFIG_FILES {
        let p = paris.config_path(path).map_err(fail)?;
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        std::fs::write(&p, content).map_err(|e| io("write", &p, e))?;
    }
    let manifest = paris.root().join("services").join("shop.toml");
    std::fs::write(&manifest, SHOP_MANIFEST).map_err(|e| io("write", &manifest, e))?;
    for rec in instances() {
        paris.define(&rec).await.map_err(fail)?;
        if rec.state == InstanceState::Running {
            paris.start(&rec.name).await.map_err(fail)?;
        }
    }
    let staged_config = staging.join("fluidcloud.toml");
    std::fs::write(&staged_config, sites_toml()).map_err(|e| io("write", &staged_config, e))?;

    // Publish: replace any previous demo, then move the new one into place.
    if sites_dir.exists() {
        std::fs::remove_dir_all(&sites_dir).map_err(|e| io("remove", &sites_dir, e))?;
    }
    // Relocations of the previous demo refer to sites that are gone.
    let state = dir.join(".fluidcloud");
    if state.exists() {
        std::fs::remove_dir_all(&state).map_err(|e| io("remove", &state, e))?;
    }
    let marker = dir.join(MARKER);
    std::fs::write(&marker, MARKER_TEXT).map_err(|e| io("write", &marker, e))?;
    std::fs::rename(staging.join("sites"), &sites_dir).map_err(|e| io("move", &sites_dir, e))?;
    std::fs::rename(&staged_config, &config).map_err(|e| io("move", &config, e))?;
    std::fs::remove_dir_all(&staging).map_err(|e| io("clean", &staging, e))?;
    Ok(summary)
}

fn instances() -> Vec<InstanceRecord> {
    let vm = |name: &str,
              service: &str,
              vcpus,
              mem,
              ip: &str,
              image: &str,
              volumes: &[&str],
              configs: &[&str]| InstanceRecord {
        name: name.to_owned(),
        service: Some(service.to_owned()),
        state: InstanceState::Running,
        vcpus,
        memory_mib: mem,
        hostname: Some(format!("{name}.{service}.paris.internal")),
        addresses: vec![ip.to_owned()],
        boot_image: Some(image.to_owned()),
        volumes: volumes.iter().map(|s| (*s).to_owned()).collect(),
        config_files: configs.iter().map(|s| (*s).to_owned()).collect(),
        // Declared, as a cloud's image store records them: a relocation
        // never takes a disk's format from its content.
        formats: std::iter::once((image.to_owned(), ImageFormat::Qcow2))
            .chain(volumes.iter().map(|v| ((*v).to_owned(), ImageFormat::Raw)))
            .collect(),
        ..InstanceRecord::new(name, vcpus, mem)
    };
    vec![
        vm(
            "web",
            "shop",
            2,
            2048,
            "10.10.0.11",
            "shop-web.qcow2",
            &[],
            &["shop/web/nginx.conf", "shop/web/site.env"],
        ),
        vm(
            "app",
            "shop",
            4,
            4096,
            "10.10.0.12",
            "shop-app.qcow2",
            &[],
            &[
                "shop/app/app.yaml",
                "shop/app/.env",
                "shop/app/features.json",
            ],
        ),
        vm(
            "db",
            "shop",
            4,
            8192,
            "10.10.0.13",
            "shop-db.qcow2",
            &["db-data.raw"],
            &["shop/db/postgresql.conf", "shop/db/backup.toml"],
        ),
        vm(
            "wiki",
            "intranet",
            1,
            1024,
            "10.10.0.50",
            "intranet-wiki.qcow2",
            &[],
            &["intranet/wiki.ini"],
        ),
    ]
}

const SHOP_MANIFEST: &str = r#"# Declared facts about the shop service that introspection cannot see.
name = "shop"
# Public names: they stay reachable from wherever the service runs.
external = ["shop.example.com", "www.shop.example.com", "cdn.shop.example.com", "pay.example.org"]
buckets = ["shop-media"]
"#;

const CONFIG_FILES: &[(&str, &str)] = &[
    (
        "shop/web/nginx.conf",
        r#"# nginx front end of the shop
server {
    listen 10.10.0.11:80;
    server_name shop.example.com www.shop.example.com;

    location /api/ {
        proxy_pass http://app.shop.paris.internal:8080;
    }
    location /media/ {
        proxy_pass https://s3.dc-paris.example.net/shop-media/;
    }
    location / {
        root /srv/shop/public;
        index index.html;
    }
}
"#,
    ),
    (
        "shop/web/site.env",
        "PUBLIC_URL=https://shop.example.com\nAPI_UPSTREAM=http://app.shop.paris.internal:8080\nWORKERS=4\n",
    ),
    (
        "shop/app/app.yaml",
        r#"service: shop-api
listen: 0.0.0.0:8080
public_url: https://shop.example.com
database:
  host: db.shop.paris.internal
  port: 5432
  name: shop
media:
  endpoint: https://s3.dc-paris.example.net
  bucket: shop-media
  region: fr-par
cdn:
  url: https://cdn.shop.example.com/
"#,
    ),
    (
        "shop/app/.env",
        "# secrets come from files, never from here\nDATABASE_URL=postgres://shop@db.shop.paris.internal:5432/shop\nS3_ENDPOINT=https://s3.dc-paris.example.net\nS3_BUCKET=shop-media\nAWS_ACCESS_KEY_ID_FILE=/run/secrets/paris-key\n",
    ),
    (
        "shop/app/features.json",
        r#"{
  "payments": {
    "provider_url": "https://pay.example.org/v2",
    "callback": "https://shop.example.com/pay/callback"
  },
  "search": { "host": "10.10.0.12", "port": 9200 }
}
"#,
    ),
    (
        "shop/db/postgresql.conf",
        "# PostgreSQL\nlisten_addresses = '10.10.0.13'\nport = 5432\nmax_connections = 200\nshared_buffers = 2GB\n",
    ),
    (
        "shop/db/backup.toml",
        r#"[backup]
schedule = "0 3 * * *"
archive_url = "https://s3.dc-paris.example.net/shop-media/db-archive/"

[source]
host = "db.shop.paris.internal"
"#,
    ),
    (
        "intranet/wiki.ini",
        "[server]\nhost = wiki.intranet.paris.internal\nbackup_url = s3://paris-backups/intranet/\n",
    ),
];

struct Target {
    name: &'static str,
    toml: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        name: "edge-rennes",
        toml: r#"kind = "local"
description = "edge point of presence in Rennes: close to Breton users, small, raw images only"
path = "sites/edge-rennes"
jurisdiction = "EU/FR"
image_formats = ["raw"]
internal_domains = ["rennes.internal"]
subnet = "10.20.0.0/24"
object_endpoint = "https://s3.edge-rennes.example.net"
location = { region = "fr-bretagne", latitude = 48.1173, longitude = -1.6778 }
cost = { vcpu_hour = 0.045, memory_gib_hour = 0.006, storage_gib_month = 0.06, egress_gib = 0.02 }
capacity = { vcpus = 16, memory_mib = 32768, storage_gib = 500 }
"#,
    },
    Target {
        name: "edge-nantes",
        toml: r#"kind = "local"
description = "edge point of presence in Nantes: qcow2 or raw, medium capacity"
path = "sites/edge-nantes"
jurisdiction = "EU/FR"
image_formats = ["qcow2", "raw"]
internal_domains = ["nantes.internal"]
subnet = "10.25.0.0/24"
object_endpoint = "https://s3.edge-nantes.example.net"
location = { region = "fr-pays-de-la-loire", latitude = 47.2184, longitude = -1.5536 }
cost = { vcpu_hour = 0.040, memory_gib_hour = 0.005, storage_gib_month = 0.05, egress_gib = 0.02, carbon_g_per_kwh = 56.0 }
capacity = { vcpus = 24, memory_mib = 65536, storage_gib = 1000 }
"#,
    },
    Target {
        name: "cloud-frankfurt",
        toml: r#"kind = "local"
description = "large public cloud region: VMDK or raw images, cheap, German jurisdiction"
path = "sites/cloud-frankfurt"
jurisdiction = "EU/DE"
image_formats = ["vmdk", "raw"]
internal_domains = ["fra.internal"]
subnet = "10.30.0.0/24"
object_endpoint = "https://s3.eu-central.cloud.example.com"
location = { region = "de-hessen", latitude = 50.1109, longitude = 8.6821 }
cost = { vcpu_hour = 0.021, memory_gib_hour = 0.003, storage_gib_month = 0.023, egress_gib = 0.09, carbon_g_per_kwh = 380.0 }
capacity = { vcpus = 4096, memory_mib = 16777216, storage_gib = 500000 }
credentials = { access_key_id_env = "FRANKFURT_ACCESS_KEY_ID", secret_access_key_env = "FRANKFURT_SECRET_ACCESS_KEY" }
"#,
    },
    Target {
        name: "cloud-virginia",
        toml: r#"kind = "local"
description = "cheapest region, outside the EU: raw or VHD images"
path = "sites/cloud-virginia"
jurisdiction = "US/VA"
image_formats = ["raw", "vhd"]
internal_domains = ["iad.internal"]
subnet = "10.40.0.0/24"
object_endpoint = "https://s3.us-east.cloud.example.com"
location = { region = "us-virginia", latitude = 38.9586, longitude = -77.3570 }
cost = { vcpu_hour = 0.017, memory_gib_hour = 0.002, storage_gib_month = 0.021, egress_gib = 0.09, carbon_g_per_kwh = 410.0 }
capacity = { vcpus = 8192, memory_mib = 33554432, storage_gib = 1000000 }
"#,
    },
];

fn sites_toml() -> String {
    let mut s = String::from(
        "# fluidcloud sites file, written by `fluidcloud demo init`.\n\
         # Every site here is a local directory (kind = \"local\"): no cloud account needed.\n\
         # Paths are relative to this file.\n\n[sites.dc-paris]\n",
    );
    s.push_str(
        r#"kind = "local"
description = "the shop's current data centre in Paris"
path = "sites/dc-paris"
jurisdiction = "EU/FR"
image_formats = ["qcow2", "raw"]
internal_domains = ["paris.internal"]
subnet = "10.10.0.0/24"
object_endpoint = "https://s3.dc-paris.example.net"
location = { region = "fr-idf", latitude = 48.8566, longitude = 2.3522 }
cost = { vcpu_hour = 0.031, memory_gib_hour = 0.004, storage_gib_month = 0.04, egress_gib = 0.01, carbon_g_per_kwh = 56.0 }
capacity = { vcpus = 64, memory_mib = 262144, storage_gib = 4000 }
"#,
    );
    for t in TARGETS {
        s.push_str(&format!("\n[sites.{}]\n{}", t.name, t.toml));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plans_fit_inside_their_disks_and_are_ordered() {
        let (images, volume) = plans();
        for p in images.iter().chain(std::iter::once(&volume)) {
            let mut end = 0;
            for &(off, len, _) in &p.extents {
                assert!(off >= end, "{}: overlapping extents", p.name);
                end = off + len;
            }
            assert_eq!(
                end, p.virtual_size,
                "{}: last extent must end at the last byte",
                p.name
            );
        }
        let web = &images[0];
        assert!(web.data_bytes() >= 280 * MIB && web.virtual_size >= GIB);
        assert!(volume.virtual_size == 2 * GIB && volume.data_bytes() < volume.virtual_size / 4);
    }

    #[test]
    fn the_sites_file_parses_with_every_site() {
        let f = crate::SitesFile::parse(
            Path::new("/d/fluidcloud.toml"),
            &sites_toml(),
            &crate::drivers::kinds(),
        )
        .unwrap();
        let names: Vec<_> = f.sites.keys().cloned().collect();
        assert_eq!(
            names,
            [
                "cloud-frankfurt",
                "cloud-virginia",
                "dc-paris",
                "edge-nantes",
                "edge-rennes"
            ]
        );
        let formats: std::collections::BTreeSet<_> =
            f.sites.values().map(|s| s.image_formats.clone()).collect();
        assert!(
            formats.len() >= 4,
            "targets must differ in accepted formats"
        );
        assert!(media_objects().len() >= 500);
    }

    #[test]
    fn rng_is_deterministic_and_fills_odd_lengths() {
        let (mut a, mut b) = (Rng(1), Rng(1));
        let (mut x, mut y) = (vec![0u8; 13], vec![0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != 0));
    }
}
