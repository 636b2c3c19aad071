//! The `aws` driver against a real AWS endpoint on loopback: moto in server
//! mode, started per test by `scripts/aws` (the tests fail, never skip,
//! when it is missing). What the driver says is checked against what the
//! endpoint holds, read independently with boto3.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use fluidcloud_conduit::config::{AwsConfig, SiteConfig};
use fluidcloud_conduit::conformance;
use fluidcloud_conduit::driver::{DiskStore, SiteDriver};
use fluidcloud_conduit::drivers::aws::Aws;
use fluidcloud_conduit::drivers::local::LocalSite;
use fluidcloud_conduit::transfer::DiskRef;
use fluidcloud_conduit::transfer::local::{LocalMove, Moved, run};
use fluidcloud_plugins::{CancelFlag, Error, ImageFormat};
use fluidcloud_testkit::Moto;

const BLOCK: u64 = 512 << 10;
const MIB: u64 = 1 << 20;

/// A moto server of the test's own, with the keys the sites file names
/// (moto takes any) set before this test process starts any thread that
/// reads the environment (nextest runs each test in a process of its own).
fn moto(name: &str, env: &[(&str, &str)]) -> Moto {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        std::env::set_var("FC_TEST_AWS_KEY", "testing");
        std::env::set_var("FC_TEST_AWS_SECRET", "testing");
    });
    Moto::start_with(name, env)
}

/// Snapshot ids and listed blocks of disk `name` at `moto`, oldest first.
fn snapshots_of(moto: &Moto, name: &str) -> Vec<(String, u64)> {
    let v = moto.boto3(&format!(
        "[(s['SnapshotId'], len(ebs.list_snapshot_blocks(SnapshotId=s['SnapshotId'])['Blocks'])) \
         for s in sorted(ec2.describe_snapshots(OwnerIds=['self'], Filters=[{{'Name': 'tag:fluidcloud:name', 'Values': ['{name}']}}])['Snapshots'], key=lambda s: s['StartTime'])]"
    ));
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_u64().unwrap()))
        .collect()
}

fn config(toml_text: &str) -> SiteConfig {
    toml::from_str(toml_text).unwrap()
}

fn aws_config(endpoint: &str) -> SiteConfig {
    config(&format!(
        "kind = \"aws\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\njurisdiction = \"US/VA\"\n\
         location = {{ region = \"us-east-1\", latitude = 38.9, longitude = -77.4 }}\n\
         credentials = {{ access_key_id_env = \"FC_TEST_AWS_KEY\", secret_access_key_env = \"FC_TEST_AWS_SECRET\" }}\n"
    ))
}

fn aws(endpoint: &str) -> Aws {
    Aws::open("aws-test", &aws_config(endpoint)).unwrap()
}

fn local(dir: &Path, name: &str) -> LocalSite {
    LocalSite::create(name, dir.join(name)).unwrap()
}

/// Writes `len` bytes of xorshift data at `offset` of `path`.
fn scribble(path: &Path, offset: u64, len: u64, seed: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut x = seed | 1;
    let mut buf = vec![0u8; len as usize];
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    f.write_all(&buf).unwrap();
}

/// The 512 KiB blocks of `path` that hold a byte other than zero.
fn data_blocks(path: &Path) -> BTreeSet<u64> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut out = BTreeSet::new();
    let mut i = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            out.insert(i);
        }
        i += 1;
    }
    out
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn image(name: &str) -> DiskRef {
    DiskRef {
        store: DiskStore::Image,
        name: name.to_owned(),
        format: ImageFormat::Raw,
    }
}

fn transfer(
    source: &dyn SiteDriver,
    target: &dyn SiteDriver,
    name: &str,
    owner: &str,
) -> fluidcloud_plugins::Result<Moved> {
    let disk = image(name);
    let cancel = CancelFlag::new();
    run(&LocalMove {
        source: source.disks().unwrap(),
        from: &disk,
        target: target.disks().unwrap(),
        into: &disk,
        owner,
        workers: 4,
        since: None,
        cancel: &cancel,
        progress: &|_, _| {},
    })
}

/// A 96 MiB raw image with 40 MiB of data in four places, holes between.
fn source_image(site: &LocalSite, name: &str) -> PathBuf {
    let path = site.root().join("images").join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    for (k, (at, len)) in [(0, 8), (20, 16), (50, 12), (90, 4)].iter().enumerate() {
        scribble(&path, at * MIB, len * MIB, 7 + k as u64);
    }
    // A block of zeros inside the data: allocated in the file, but
    // nothing to put.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; BLOCK as usize], 30 * MIB).unwrap();
    path
}

#[tokio::test]
async fn the_aws_driver_passes_the_conformance_suite_on_moto() {
    let moto = moto("conformance", &[]);
    // An AMI of moto's own for the instance that has no boot disk, and
    // the bucket config files live in.
    let ami = moto.boto3("ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']");
    moto.boto3(
        "boto3.client('s3', **kw).create_bucket(Bucket='fc-config')['ResponseMetadata']['HTTPStatusCode']",
    );
    // A subnet holding the suite's address (10.99.0.1), and a group.
    let net = moto.boto3(
        "(lambda vpc: (lambda sub, sg: [sub, sg])(\
           ec2.create_subnet(VpcId=vpc, CidrBlock='10.99.0.0/24')['Subnet']['SubnetId'], \
           ec2.create_security_group(VpcId=vpc, GroupName='fc-web', Description='web')['GroupId']))\
         (ec2.create_vpc(CidrBlock='10.99.0.0/16')['Vpc']['VpcId'])",
    );
    let (subnet, group) = (net[0].as_str().unwrap(), net[1].as_str().unwrap());
    let mut config = aws_config(&moto.url);
    config.aws = Some(AwsConfig {
        default_image_id: Some(ami.as_str().unwrap().to_owned()),
        config_bucket: Some("fc-config".into()),
        subnet_id: Some(subnet.to_owned()),
        security_group_ids: vec![group.to_owned()],
        instance_types: vec!["t3.".into()],
    });
    let site = Aws::open("aws-test", &config).unwrap();
    conformance::run_all(&site).await.unwrap();
    let caps: Vec<_> = site
        .capabilities()
        .into_iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(
        caps,
        [
            "inventory",
            "image-store",
            "block-store",
            "object-storage",
            "compute"
        ]
    );
    // Nothing is left at the endpoint: no snapshot, AMI, launch template
    // or live instance of fluidcloud's.
    let left = moto.boto3(
        "[len(ec2.describe_snapshots(OwnerIds=['self'], Filters=[{'Name': 'tag-key', 'Values': ['fluidcloud:name']}])['Snapshots']), len(ec2.describe_images(Owners=['self'])['Images']), len(ec2.describe_launch_templates()['LaunchTemplates']), [i['State']['Name'] for r in ec2.describe_instances()['Reservations'] for i in r['Instances']]]",
    );
    assert_eq!(left, serde_json::json!([0, 0, 0, ["terminated"]]));
    // The instance had the suite's address in the subnet, the group, and
    // the smallest t3 type with 1 vCPU and 256 MiB.
    let launched = moto.boto3(
        "(lambda i: [i['InstanceType'], i.get('SubnetId'), i.get('PrivateIpAddress'), [g['GroupId'] for n in i['NetworkInterfaces'] for g in n['Groups']]])\
         (ec2.describe_instances()['Reservations'][0]['Instances'][0])",
    );
    assert_eq!(
        launched,
        serde_json::json!(["t3.nano", subnet, "10.99.0.1", [group]])
    );
}

#[test]
fn a_disk_goes_into_ebs_as_its_data_blocks_only_and_comes_back_equal() {
    let moto = moto("roundtrip", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (local(dir.path(), "a"), local(dir.path(), "b"));
    let src = source_image(&a, "web.raw");
    let cloud = aws(&moto.url);

    let moved = transfer(&a, &cloud, "web.raw", "r1/precopy:web.raw").unwrap();
    let snaps = snapshots_of(&moto, "web.raw");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    // Exactly the blocks with data went (the zero block and holes did not).
    let want = data_blocks(&src);
    assert_eq!(snaps[0].1, want.len() as u64);
    assert_eq!(want.len() as u64, (8 + 16 + 12 + 4) * 2 - 1);
    let record = moved.status.record.unwrap();
    assert_eq!(record.locator, snaps[0].0);
    assert_eq!(record.virtual_size, 96 * MIB);
    // Registered as an AMI of its name, on that snapshot.
    let amis = moto.boto3("[i['Name'] for i in ec2.describe_images(Owners=['self'])['Images']]");
    assert_eq!(amis, serde_json::json!(["web.raw"]));
    // The owner is recorded; another relocation may not overwrite it.
    assert_eq!(
        cloud
            .disks()
            .unwrap()
            .holder(DiskStore::Image, "web.raw")
            .unwrap(),
        Some(Some("r1/precopy:web.raw".to_owned()))
    );
    let other = transfer(&a, &cloud, "web.raw", "r2/precopy:web.raw");
    assert!(matches!(other, Err(Error::Precondition(_))), "{other:?}");

    // Back to another site: every byte equal.
    transfer(&cloud, &b, "web.raw", "r3/back:web.raw").unwrap();
    assert_eq!(sha256(&src), sha256(&b.root().join("images/web.raw")));

    // The rollback removes what r1 wrote, and only r1 may.
    let disks = cloud.disks().unwrap();
    assert!(matches!(
        disks.remove(DiskStore::Image, "web.raw", "r2/x"),
        Err(Error::Precondition(_))
    ));
    assert!(
        disks
            .remove(DiskStore::Image, "web.raw", "r1/precopy:web.raw")
            .unwrap()
    );
    assert!(snapshots_of(&moto, "web.raw").is_empty());
    assert_eq!(
        moto.boto3("len(ec2.describe_images(Owners=['self'])['Images'])"),
        serde_json::json!(0)
    );
}

#[test]
fn the_second_precopy_puts_only_the_blocks_that_changed() {
    let moto = moto("incremental", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (local(dir.path(), "a"), local(dir.path(), "b"));
    let src = source_image(&a, "db.raw");
    let cloud = aws(&moto.url);
    transfer(&a, &cloud, "db.raw", "r1/precopy:db.raw").unwrap();

    // 64 MiB change: sixteen 4 MiB runs, in data and in holes.
    let mut changed = BTreeSet::new();
    for k in 0..16u64 {
        let at = (k * 6 * MIB) % (92 * MIB);
        scribble(&src, at, 4 * MIB, 1000 + k);
        changed.extend(at / BLOCK..(at + 4 * MIB) / BLOCK);
    }
    let moved = transfer(&a, &cloud, "db.raw", "r1/final:db.raw").unwrap();
    let snaps = snapshots_of(&moto, "db.raw");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    // moto keeps in the child only what was put into it: the changed
    // blocks, every one of them, and nothing else.
    assert_eq!(snaps[1].1, changed.len() as u64, "{snaps:?}");
    assert_eq!(changed.len() as u64, 128);
    assert_eq!(moved.status.data_bytes, 64 * MIB);
    // Read back through the chain, every byte is the source's.
    transfer(&cloud, &b, "db.raw", "r9/back:db.raw").unwrap();
    assert_eq!(sha256(&src), sha256(&b.root().join("images/db.raw")));
}

#[tokio::test]
async fn keys_the_endpoint_refuses_are_a_clear_permission_error() {
    // moto checks keys against its IAM users when told to from the first
    // call; the test's keys belong to none.
    let moto = moto("bad-keys", &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let site = aws(&moto.url);
    let e = site.check().await.unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied { what, site: Some(s) }
            if s == "aws-test" && what.contains("AuthFailure") && what.contains("DescribeSnapshots")),
        "{e:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let a = local(dir.path(), "a");
    source_image(&a, "web.raw");
    let site = Arc::new(site);
    let moved = {
        let site = site.clone();
        tokio::task::spawn_blocking(move || transfer(&a, site.as_ref(), "web.raw", "r1/x"))
            .await
            .unwrap()
    };
    assert!(
        matches!(moved, Err(Error::PermissionDenied { .. })),
        "{moved:?}"
    );
    let e = fluidcloud_conduit::driver::ObjectStorage::list_buckets(site.object_storage().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("InvalidAccessKeyId") || e.contains("403"), "{e}");
}

#[test]
fn site_config_errors_name_the_key_or_the_variable() {
    let mut c = aws_config("http://127.0.0.1:9");
    c.region = None;
    let e = Aws::open("x", &c).unwrap_err().to_string();
    assert!(e.contains("sites.x.region"), "{e}");
    let mut c = aws_config("ftp://nowhere");
    c.region = Some("us-east-1".into());
    let e = Aws::open("x", &c).unwrap_err().to_string();
    assert!(e.contains("sites.x.endpoint_url"), "{e}");
    let mut c = aws_config("http://127.0.0.1:9");
    c.credentials.as_mut().unwrap().access_key_id_env = Some("FC_TEST_UNSET_VARIABLE_42".into());
    let e = format!("{:#}", anyhow_chain(&Aws::open("x", &c).unwrap_err()));
    assert!(e.contains("FC_TEST_UNSET_VARIABLE_42"), "{e}");
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut at = e.source();
    while let Some(c) = at {
        s.push_str(": ");
        s.push_str(&c.to_string());
        at = c.source();
    }
    s
}

/// What a proxy answers instead of moto: given a request's method, path
/// and how many came before, `Some((status, body))`.
type Fault = Arc<dyn Fn(&str, &str, u32) -> Option<(u16, String)> + Send + Sync>;

/// A proxy in front of moto that answers some requests itself: `fault`
/// gets each request's method and path (and how many came before) and
/// returns `Some((status, body))` to answer instead of moto.
async fn proxy(upstream: String, fault: Fault) -> (String, Arc<AtomicU32>) {
    use axum::body::Body;
    use axum::http::{Request, Response};
    let seen = Arc::new(AtomicU32::new(0));
    let client = reqwest::Client::new();
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let (client, upstream, fault, counter) = (
            client.clone(),
            upstream.clone(),
            fault.clone(),
            counter.clone(),
        );
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Some((status, body)) = fault(req.method().as_str(), &path, n) {
                return Response::builder()
                    .status(status)
                    .body(Body::from(body))
                    .unwrap();
            }
            let mut up = client.request(req.method().clone(), format!("{upstream}{path}"));
            for (k, v) in req.headers() {
                up = up.header(k, v);
            }
            let body = axum::body::to_bytes(req.into_body(), 64 << 20)
                .await
                .unwrap();
            let resp = up.body(body).send().await.unwrap();
            let mut out = Response::builder().status(resp.status().as_u16());
            for (k, v) in resp.headers() {
                out = out.header(k, v);
            }
            out.body(Body::from(resp.bytes().await.unwrap())).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_retried_and_a_failed_write_leaves_no_snapshot() {
    let moto = moto("faults", &[]);
    let dir = tempfile::tempdir().unwrap();
    let a = local(dir.path(), "a");
    source_image(&a, "t.raw");
    source_image(&a, "u.raw");
    let throttled = Arc::new(AtomicU32::new(0));
    let t = throttled.clone();
    // Every fifth call is throttled: EC2's way, or EBS's.
    let (url, _) = proxy(
        moto.url.clone(),
        Arc::new(move |method, path, n| {
            if n % 5 != 1 {
                return None;
            }
            t.fetch_add(1, Ordering::SeqCst);
            Some(if method == "POST" && path == "/" {
                (503, "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors></Response>".into())
            } else {
                (429, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into())
            })
        }),
    )
    .await;
    let cloud = aws(&url);
    let (a2, cloud2) = (Arc::new(a), Arc::new(cloud));
    let (src, dst) = (a2.clone(), cloud2.clone());
    tokio::task::spawn_blocking(move || {
        transfer(src.as_ref(), dst.as_ref(), "t.raw", "r1/p:t.raw").unwrap()
    })
    .await
    .unwrap();
    assert!(throttled.load(Ordering::SeqCst) >= 10);
    assert_eq!(snapshots_of(&moto, "t.raw").len(), 1);

    // Puts that fail for good (a full quota) end the write, and its
    // snapshot is deleted.
    let (url, _) = proxy(
        moto.url.clone(),
        Arc::new(|method, path, n| {
            (method == "PUT" && path.contains("/blocks/") && n > 12).then(|| {
                (400, r#"{"__type":"ServiceQuotaExceededException","message":"too many blocks in flight"}"#.into())
            })
        }),
    )
    .await;
    let cloud = Arc::new(aws(&url));
    let src = a2.clone();
    let err = tokio::task::spawn_blocking(move || {
        transfer(src.as_ref(), cloud.as_ref(), "u.raw", "r2/p:u.raw")
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ServiceQuotaExceededException") && err.contains("too many blocks"),
        "{err}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !snapshots_of(&moto, "u.raw").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the unfinished snapshot stayed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        moto.boto3("sorted(i['Name'] for i in ec2.describe_images(Owners=['self'])['Images'])"),
        serde_json::json!(["t.raw"])
    );
}
