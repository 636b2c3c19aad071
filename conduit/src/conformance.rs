//! The conformance suite every site driver must pass.
//!
//! Each function takes a driver for an *empty, writable* site and exercises
//! one capability through its public trait only, the way migrators will use
//! it. Capabilities the driver does not have are checked to fail with
//! `NotSupported` naming the site. Run [`run_all`] from a driver's tests; a
//! failure is an `Err` naming the capability and what went wrong.

use std::collections::BTreeSet;

use fluidcloud_plugins::{Capability, Error, ImageFormat};
use futures::TryStreamExt as _;
use object_store::{ObjectStoreExt as _, PutPayload, path::Path as ObjPath};
use tokio::io::AsyncReadExt as _;

use crate::driver::{
    ExtentKind, InstanceRecord, InstanceState, NicKind, NicRecord, SiteDriver, require_block_store,
    require_compute, require_image_store, require_inventory, require_object_storage,
};

/// A conformance failure: capability and message.
pub type Outcome = std::result::Result<(), String>;

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Outcome {
    if cond { Ok(()) } else { Err(what()) }
}

fn ok<T>(r: fluidcloud_plugins::Result<T>, doing: &str) -> std::result::Result<T, String> {
    r.map_err(|e| format!("{doing}: {e}"))
}

/// Runs every check that applies to the driver's capabilities.
///
/// # Errors
/// The first failed check, prefixed with its capability.
pub async fn run_all(site: &dyn SiteDriver) -> Outcome {
    core(site).await.map_err(|e| format!("core: {e}"))?;
    let caps = site.capabilities();
    for cap in Capability::ALL {
        let r = match (cap, caps.contains(&cap)) {
            (Capability::Inventory, true) => inventory(site).await,
            (Capability::ImageStore, true) => image_store(site).await,
            (Capability::BlockStore, true) => block_store(site).await,
            (Capability::ObjectStorage, true) => object_storage(site).await,
            (Capability::Compute, true) => compute(site).await,
            (_, false) => missing(site, cap),
        };
        r.map_err(|e| format!("{cap}: {e}"))?;
    }
    Ok(())
}

/// The required core: name, kind, health check, consistent capabilities.
///
/// # Errors
/// When a required method misbehaves.
pub async fn core(site: &dyn SiteDriver) -> Outcome {
    ensure(!site.name().is_empty(), || "empty site name".into())?;
    ensure(!site.kind().is_empty(), || "empty kind".into())?;
    ok(site.check().await, "check")?;
    let caps: BTreeSet<Capability> = site.capabilities();
    ensure(caps == site.capabilities(), || {
        "capabilities are not stable".into()
    })
}

fn missing(site: &dyn SiteDriver, cap: Capability) -> Outcome {
    let err = match cap {
        Capability::Inventory => require_inventory(site).err(),
        Capability::ImageStore => require_image_store(site).err(),
        Capability::BlockStore => require_block_store(site).err(),
        Capability::ObjectStorage => require_object_storage(site).err(),
        Capability::Compute => require_compute(site).err(),
    };
    match err {
        Some(Error::NotSupported {
            operation,
            site: Some(s),
        }) if operation == cap.as_str() && s == site.name() => Ok(()),
        other => Err(format!(
            "missing capability should be NotSupported naming the site, got {other:?}"
        )),
    }
}

/// Inventory: listings work on an empty site and see defined instances.
///
/// # Errors
/// When a listing fails or lies.
pub async fn inventory(site: &dyn SiteDriver) -> Outcome {
    let inv = ok(require_inventory(site), "inventory")?;
    let before = ok(inv.instances().await, "instances")?;
    ensure(before.is_empty(), || {
        format!("empty site lists instances: {before:?}")
    })?;
    let missing = inv.config_file("no/such.yaml").await;
    ensure(matches!(missing, Err(Error::NotFound { .. })), || {
        format!("reading a missing config file should be NotFound, got {missing:?}")
    })?;
    let escape = inv.config_file("../outside").await;
    ensure(matches!(escape, Err(Error::Invalid(_))), || {
        format!("a config path escaping the config root must be refused, got {escape:?}")
    })?;
    ensure(
        ok(inv.service_manifest("nothing").await, "service_manifest")?.is_none(),
        || "manifest of an unknown service should be None".into(),
    )
}

/// Image store: put, detect, read back, refuse overwrite, delete.
///
/// # Errors
/// On any deviation.
pub async fn image_store(site: &dyn SiteDriver) -> Outcome {
    let store = ok(require_image_store(site), "image store")?;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let n = ok(
        store.put_image("conf-raw", &mut data.as_slice()).await,
        "put_image",
    )?;
    ensure(n == data.len() as u64, || {
        format!("put_image reported {n} bytes")
    })?;
    let names = ok(store.list_images().await, "list_images")?;
    ensure(names == ["conf-raw"], || format!("list_images: {names:?}"))?;
    let info = ok(store.image_info("conf-raw").await, "image_info")?;
    ensure(
        info.format == ImageFormat::Raw && info.virtual_size == data.len() as u64,
        || format!("image_info: {info:?}"),
    )?;
    let mut back = Vec::new();
    let mut r = ok(store.open_image("conf-raw").await, "open_image")?;
    r.read_to_end(&mut back)
        .await
        .map_err(|e| format!("read image: {e}"))?;
    ensure(back == data, || "image read back differs".into())?;
    let again = store.put_image("conf-raw", &mut &b"x"[..]).await;
    ensure(matches!(again, Err(Error::Precondition(_))), || {
        format!("overwriting an image must fail, got {again:?}")
    })?;
    let bad = store.put_image("../escape", &mut &b"x"[..]).await;
    ensure(matches!(bad, Err(Error::Invalid(_))), || {
        format!("bad name accepted: {bad:?}")
    })?;
    ok(store.delete_image("conf-raw").await, "delete_image")?;
    let gone = store.image_info("conf-raw").await;
    ensure(matches!(gone, Err(Error::NotFound { .. })), || {
        format!("deleted image still there: {gone:?}")
    })?;
    let names = ok(store.list_images().await, "list_images")?;
    ensure(names.is_empty(), || {
        format!("leftovers after delete: {names:?}")
    })
}

/// Block store: sparse create, write/read at offsets, allocation map, bounds.
///
/// # Errors
/// On any deviation.
pub async fn block_store(site: &dyn SiteDriver) -> Outcome {
    const SIZE: u64 = 16 << 20;
    const AT: u64 = 5 << 20;
    let store = ok(require_block_store(site), "block store")?;
    ok(store.create_volume("conf-vol", SIZE).await, "create_volume")?;
    let info = ok(store.volume_info("conf-vol").await, "volume_info")?;
    ensure(info.virtual_size == SIZE, || {
        format!("volume_info: {info:?}")
    })?;
    let map = ok(store.allocation("conf-vol").await, "allocation")?;
    ensure(map.iter().all(|e| e.kind == ExtentKind::Hole), || {
        format!("new volume has data: {map:?}")
    })?;
    let block: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 256) as u8).collect();
    ok(store.write_at("conf-vol", AT, &block).await, "write_at")?;
    ok(store.flush("conf-vol").await, "flush")?;
    let mut buf = vec![0xAAu8; block.len()];
    let n = ok(store.read_at("conf-vol", AT, &mut buf).await, "read_at")?;
    ensure(n == block.len() && buf == block, || {
        "data read back differs".into()
    })?;
    let mut hole = vec![0xAAu8; 4096];
    ok(
        store.read_at("conf-vol", 0, &mut hole).await,
        "read_at hole",
    )?;
    ensure(hole.iter().all(|&b| b == 0), || {
        "a hole did not read as zeros".into()
    })?;
    let mut tail = vec![0u8; 8192];
    let n = ok(
        store.read_at("conf-vol", SIZE - 4096, &mut tail).await,
        "read_at end",
    )?;
    ensure(n == 4096, || {
        format!("read across the end returned {n} bytes")
    })?;
    let map = ok(store.allocation("conf-vol").await, "allocation")?;
    let mut pos = 0;
    for e in &map {
        ensure(e.offset == pos && e.length > 0, || {
            format!("allocation map has a gap or overlap: {map:?}")
        })?;
        pos += e.length;
    }
    ensure(pos == SIZE, || {
        format!("allocation map covers {pos} of {SIZE} bytes")
    })?;
    let data: u64 = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    let covers = map.iter().any(|e| {
        e.kind == ExtentKind::Data
            && e.offset <= AT
            && e.offset + e.length >= AT + block.len() as u64
    });
    ensure(covers && data < SIZE / 2, || {
        format!("allocation map does not reflect the write: {map:?}")
    })?;
    let past = store.write_at("conf-vol", SIZE - 10, &[1u8; 20]).await;
    ensure(past.is_err(), || "a write past the end was accepted".into())?;
    let dup = store.create_volume("conf-vol", SIZE).await;
    ensure(matches!(dup, Err(Error::Precondition(_))), || {
        format!("re-creating a volume: {dup:?}")
    })?;
    ok(store.delete_volume("conf-vol").await, "delete_volume")?;
    let gone = store.volume_info("conf-vol").await;
    ensure(matches!(gone, Err(Error::NotFound { .. })), || {
        format!("deleted volume: {gone:?}")
    })
}

/// Object storage: bucket lifecycle and object round trip via `object_store`.
///
/// # Errors
/// On any deviation.
pub async fn object_storage(site: &dyn SiteDriver) -> Outcome {
    let os = ok(require_object_storage(site), "object storage")?;
    let missing = os.bucket("conf-nope").await;
    ensure(matches!(missing, Err(Error::NotFound { .. })), || {
        "missing bucket should be NotFound".into()
    })?;
    ok(os.create_bucket("conf-bucket").await, "create_bucket")?;
    let dup = os.create_bucket("conf-bucket").await;
    ensure(matches!(dup, Err(Error::Precondition(_))), || {
        format!("re-creating a bucket: {dup:?}")
    })?;
    let store = ok(os.bucket("conf-bucket").await, "bucket")?;
    let body = vec![42u8; 70_000];
    for key in ["a/b/c.bin", "top.txt"] {
        store
            .put(&ObjPath::from(key), PutPayload::from(body.clone()))
            .await
            .map_err(|e| format!("put {key}: {e}"))?;
    }
    let got = store
        .get(&ObjPath::from("a/b/c.bin"))
        .await
        .map_err(|e| format!("get: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("get body: {e}"))?;
    ensure(got.as_ref() == body.as_slice(), || {
        "object read back differs".into()
    })?;
    let mut keys: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .map_err(|e| format!("list: {e}"))?;
    keys.sort();
    ensure(keys == ["a/b/c.bin", "top.txt"], || {
        format!("list: {keys:?}")
    })?;
    let buckets = ok(os.list_buckets().await, "list_buckets")?;
    ensure(buckets == ["conf-bucket"], || {
        format!("list_buckets: {buckets:?}")
    })?;
    ok(os.delete_bucket("conf-bucket").await, "delete_bucket")?;
    let buckets = ok(os.list_buckets().await, "list_buckets")?;
    ensure(buckets.is_empty(), || {
        format!("bucket survived delete: {buckets:?}")
    })
}

/// Compute: define (stopped), start, stop, undefine rules.
///
/// # Errors
/// On any deviation.
pub async fn compute(site: &dyn SiteDriver) -> Outcome {
    let c = ok(require_compute(site), "compute")?;
    let rec = InstanceRecord {
        name: "conf-vm".into(),
        service: Some("conformance".into()),
        state: InstanceState::Running,
        vcpus: 1,
        memory_mib: 256,
        hostname: Some("conf-vm.test.internal".into()),
        addresses: vec!["10.99.0.1".into()],
        nics: vec![NicRecord {
            kind: NicKind::User,
            source: None,
            mac: Some("52:54:00:00:99:01".into()),
            model: Some("virtio".into()),
        }],
        ..InstanceRecord::new("conf-vm", 1, 256)
    };
    ok(c.define(&rec).await, "define")?;
    let s = ok(c.state("conf-vm").await, "state")?;
    ensure(s == InstanceState::Stopped, || {
        format!("a defined instance must start stopped, is {s:?}")
    })?;
    let dup = c.define(&rec).await;
    ensure(matches!(dup, Err(Error::Precondition(_))), || {
        format!("defining twice: {dup:?}")
    })?;
    ok(c.start("conf-vm").await, "start")?;
    ok(c.start("conf-vm").await, "start again")?;
    ensure(
        ok(c.state("conf-vm").await, "state")? == InstanceState::Running,
        || "not running after start".into(),
    )?;
    if let Some(inv) = site.inventory() {
        let listed = ok(inv.instances().await, "instances")?;
        let mut want = rec.clone();
        want.state = InstanceState::Running;
        ensure(listed.contains(&want), || {
            format!("inventory does not show the instance as defined: {listed:?}, want {want:?}")
        })?;
    }
    match c.console("conf-vm").await {
        Ok(_) => {}
        Err(Error::NotSupported { site: Some(s), .. }) if s == site.name() => {}
        Err(e) => return Err(format!("console: {e}")),
    }
    let busy = c.undefine("conf-vm").await;
    ensure(matches!(busy, Err(Error::Precondition(_))), || {
        format!("undefining a running instance: {busy:?}")
    })?;
    ok(c.stop("conf-vm").await, "stop")?;
    ok(c.undefine("conf-vm").await, "undefine")?;
    let gone = c.state("conf-vm").await;
    ensure(matches!(gone, Err(Error::NotFound { .. })), || {
        format!("undefined instance: {gone:?}")
    })
}
