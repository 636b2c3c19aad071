//! `fluidcloud relocate` into AWS and back out: the demo shop goes from a
//! local site to an `aws` site (moto in server mode, started by
//! `scripts/aws`; the test fails, never skips, without it), runs there,
//! and goes on to another local site. What AWS holds is read with boto3,
//! and every byte at the end is compared with the start, re-hashed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{ok, relocate_shop};
use fluidcloud_testkit::Moto;

/// The binary, with the keys the sites file names.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("FC_AWS_KEY", "testing")
        .env("FC_AWS_SECRET", "testing")
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// SHA-256 of the guest bytes of disk image `path` (any format), by
/// `qemu-img convert` to raw: the oracle, not our codecs.
fn guest_sha256(path: &Path, scratch: &Path) -> String {
    let raw = scratch.join("guest.raw");
    let out = Command::new(common::qemu_img())
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("sha256sum").arg(&raw).output().unwrap();
    std::fs::remove_file(&raw).unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// SHA-256 of every file under `dir`, by path relative to it.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f ! -name '.*' -print0 | sort -z | xargs -0 sha256sum")
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| (l[66..].to_owned(), l[..64].to_owned()))
        .collect()
}

/// A fresh demo environment with site `aws-virginia` at `moto`, its
/// config files in bucket `fc-shop-config`.
fn demo_with_aws(moto: &Moto, name: &str) -> (PathBuf, String) {
    let (dir, config) = common::fresh_demo(name);
    moto.boto3("s3.create_bucket(Bucket='fc-shop-config')['ResponseMetadata']['HTTPStatusCode']");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        r#"
[sites.aws-virginia]
kind = "aws"
description = "AWS us-east-1 (moto on loopback)"
region = "us-east-1"
endpoint_url = "{url}"
jurisdiction = "US/VA"
image_formats = ["raw"]
internal_domains = ["aws.internal"]
subnet = "10.40.0.0/24"
location = {{ region = "us-east-1", latitude = 38.9, longitude = -77.4 }}
credentials = {{ access_key_id_env = "FC_AWS_KEY", secret_access_key_env = "FC_AWS_SECRET" }}
aws = {{ config_bucket = "fc-shop-config" }}
"#,
        url = moto.url
    ));
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

#[test]
fn the_demo_shop_goes_into_aws_runs_there_and_comes_back_byte_for_byte() {
    let moto = Moto::start("relocate-aws");
    let (dir, config) = demo_with_aws(&moto, "aws");
    let paris = dir.join("sites/dc-paris");

    // Into AWS.
    ok(&run(&relocate_shop(&config, "dc-paris", "aws-virginia")));
    let amis =
        moto.boto3("sorted(i['Name'] for i in ec2.describe_images(Owners=['self'])['Images'])");
    assert_eq!(
        amis,
        serde_json::json!(["shop-app.raw", "shop-db.raw", "shop-web.raw"]),
        "the boot disks are AMIs"
    );
    let running = moto.boto3(
        "sorted((t['Value'], i['State']['Name'], i['InstanceType']) for r in ec2.describe_instances()['Reservations'] for i in r['Instances'] for t in i.get('Tags', []) if t['Key'] == 'fluidcloud:instance')",
    );
    println!("instances in AWS: {running}");
    let names: Vec<&str> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "db", "web"]);
    assert!(
        running
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r[1] == "running"),
        "{running}"
    );
    // The db (4 vCPUs, 8 GiB) got a type with at least that.
    let db_type = moto.boto3(&format!(
        "ec2.describe_instance_types(InstanceTypes=['{}'])['InstanceTypes'][0]",
        running[1][2].as_str().unwrap()
    ));
    assert!(db_type["VCpuInfo"]["DefaultVCpus"].as_u64().unwrap() >= 4);
    assert!(db_type["MemoryInfo"]["SizeInMiB"].as_u64().unwrap() >= 8192);
    let objects = moto.boto3(
        "sorted(o['Key'] for o in s3.list_objects_v2(Bucket='shop-media').get('Contents', []))",
    );
    assert!(!objects.as_array().unwrap().is_empty(), "{objects}");
    let configs = moto.boto3(
        "sorted(o['Key'] for o in s3.list_objects_v2(Bucket='fc-shop-config', Prefix='config/').get('Contents', []))",
    );
    assert!(
        configs
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("config/shop/db/postgresql.conf")),
        "{configs}"
    );
    // The source is stopped: one live copy.
    assert_eq!(common::instance_state(&dir, "dc-paris", "db"), "stopped");

    // Out again, to another local site: the disks are read from the
    // instances' EBS volumes.
    ok(&run(&relocate_shop(&config, "aws-virginia", "edge-rennes")));
    let rennes = dir.join("sites/edge-rennes");
    let scratch = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("images/shop-web.qcow2", "images/shop-web.raw"),
        ("images/shop-app.qcow2", "images/shop-app.raw"),
        ("images/shop-db.qcow2", "images/shop-db.raw"),
        ("volumes/db-data.raw", "volumes/db-data.raw"),
    ] {
        assert_eq!(
            guest_sha256(&paris.join(from), scratch.path()),
            guest_sha256(&rennes.join(to), scratch.path()),
            "{from} came back different as {to}"
        );
    }
    assert_eq!(
        tree(&paris.join("buckets/shop-media")),
        tree(&rennes.join("buckets/shop-media"))
    );
    assert_eq!(common::instance_state(&dir, "edge-rennes", "db"), "running");
    let states = moto.boto3(
        "sorted(i['State']['Name'] for r in ec2.describe_instances()['Reservations'] for i in r['Instances'])",
    );
    assert!(
        states.as_array().unwrap().iter().all(|s| s != "running"),
        "the instances in AWS are stopped once the shop left: {states}"
    );
}

/// Python that puts blocks `blocks` of 512 KiB into a new 1 GiB snapshot
/// through the EBS direct APIs, block `k` filled with byte `k % 251 + 1`;
/// evaluates to its id.
fn snapshot_with(blocks: &[u64]) -> String {
    format!(
        "(lambda s: ([ebs.put_snapshot_block(SnapshotId=s, BlockIndex=k, BlockData=bytes([k % 251 + 1]) * 524288, DataLength=524288, \
         Checksum=__import__('base64').b64encode(__import__('hashlib').sha256(bytes([k % 251 + 1]) * 524288).digest()).decode(), ChecksumAlgorithm='SHA256') for k in {blocks:?}], \
         ebs.complete_snapshot(SnapshotId=s, ChangedBlocksCount={n}), s)[-1])(ebs.start_snapshot(VolumeSize=1)['SnapshotId'])",
        n = blocks.len()
    )
}

/// A 1 GiB raw disk as [`snapshot_with`] fills it.
fn disk_with(path: &Path, blocks: &[u64]) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(1 << 30).unwrap();
    for &k in blocks {
        f.write_all_at(&vec![(k % 251 + 1) as u8; 512 << 10], k * (512 << 10))
            .unwrap();
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[test]
fn a_service_that_was_never_fluidclouds_leaves_aws_and_nothing_there_is_deleted() {
    let moto = Moto::start("relocate-aws-legacy");
    let (dir, config) = demo_with_aws(&moto, "aws-legacy");
    // Made with boto3, as a user's service: an instance booting from one
    // volume with another attached, tagged with its service.
    let (root_blocks, data_blocks) = ([0u64, 1, 7, 900], [3u64, 4, 2000, 2047]);
    let launched = moto.boto3(&format!(
        "(lambda ami, root, data: ec2.run_instances(ImageId=ami['ImageId'], InstanceType='t3.medium', MinCount=1, MaxCount=1, \
           BlockDeviceMappings=[{{'DeviceName': ami['RootDeviceName'], 'Ebs': {{'SnapshotId': root}}}}, {{'DeviceName': '/dev/sdf', 'Ebs': {{'SnapshotId': data}}}}], \
           TagSpecifications=[{{'ResourceType': 'instance', 'Tags': [{{'Key': 'Name', 'Value': 'legacy-app'}}, {{'Key': 'fluidcloud:service', 'Value': 'legacy'}}]}}])['Instances'][0])\
         (ec2.describe_images(Owners=['amazon'])['Images'][0], {}, {})",
        snapshot_with(&root_blocks),
        snapshot_with(&data_blocks)
    ));
    let id = launched["InstanceId"].as_str().unwrap().to_owned();
    let volumes: Vec<(String, String)> = launched["BlockDeviceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["DeviceName"].as_str().unwrap().to_owned(),
                m["Ebs"]["VolumeId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let data_vol = volumes
        .iter()
        .find(|(d, _)| d == "/dev/sdf")
        .unwrap()
        .1
        .clone();
    let root_vol = volumes
        .iter()
        .find(|(d, _)| d != "/dev/sdf")
        .unwrap()
        .1
        .clone();

    // Introspection sees it as EC2 describes it.
    let shown = ok(&run(&[
        "--config",
        &config,
        "introspect",
        "aws-virginia",
        "--service",
        "legacy",
        "--json",
    ]));
    assert!(
        shown.contains("legacy-app") && shown.contains(&data_vol),
        "{shown}"
    );

    ok(&run(&[
        "--config",
        &config,
        "relocate",
        "--from",
        "aws-virginia",
        "--service",
        "legacy",
        "--to",
        "edge-rennes",
        "--yes",
    ]));
    let rennes = dir.join("sites/edge-rennes");
    let want = tempfile::tempdir().unwrap();
    for (vol, blocks, store) in [
        (&root_vol, &root_blocks, "images"),
        (&data_vol, &data_blocks, "volumes"),
    ] {
        let expected = want.path().join(vol);
        disk_with(&expected, blocks);
        let got = std::fs::read_dir(rennes.join(store))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(vol.as_str())
            })
            .unwrap_or_else(|| panic!("{vol} is not in {store} at edge-rennes"));
        assert_eq!(sha256(&expected), guest_sha256(&got, want.path()), "{vol}");
    }
    assert_eq!(
        common::instance_state(&dir, "edge-rennes", "legacy-app"),
        "running"
    );
    let at_rennes = std::fs::read_to_string(rennes.join("instances/legacy-app.toml")).unwrap();
    assert!(
        at_rennes.contains("vcpus = 2") && at_rennes.contains("memory_mib = 4096"),
        "t3.medium's size: {at_rennes}"
    );
    // In AWS: the instance stopped (one live copy), both volumes still
    // there, no snapshot of fluidcloud's left, nothing deleted.
    let after = moto.boto3(&format!(
        "[ec2.describe_instances(InstanceIds=['{id}'])['Reservations'][0]['Instances'][0]['State']['Name'], \
          sorted(v['VolumeId'] for v in ec2.describe_volumes(VolumeIds=['{root_vol}', '{data_vol}'])['Volumes']), \
          len(ec2.describe_snapshots(OwnerIds=['self'], Filters=[{{'Name': 'tag-key', 'Values': ['fluidcloud:read-of']}}])['Snapshots'])]"
    ));
    let mut vols = vec![root_vol.clone(), data_vol.clone()];
    vols.sort();
    assert_eq!(after, serde_json::json!(["stopped", vols, 0]));
}
