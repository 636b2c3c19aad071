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
use serde_json::Value;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/aws")
}

/// A moto server of the test's own, stopped when dropped.
struct Moto {
    dir: PathBuf,
    url: String,
}

impl Moto {
    fn start(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("moto-{name}"));
        let out = Command::new(script())
            .args(["start", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`scripts/aws start` exited {:?}: {} (run scripts/setup)",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Self { dir, url }
    }

    /// `code`, a Python expression over boto3 clients `ec2`, `ebs` and
    /// `s3`, evaluated at the endpoint and printed as JSON.
    fn boto3(&self, code: &str) -> Value {
        let program = format!(
            "import boto3, json\n\
             kw = dict(endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             ec2 = boto3.client('ec2', **kw)\nebs = boto3.client('ebs', **kw)\ns3 = boto3.client('s3', **kw)\n\
             print(json.dumps({code}, default=str))\n",
            self.url
        );
        let out = Command::new(script())
            .args(["python", "-c", &program])
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", self.dir.to_str().unwrap()])
            .output();
    }
}

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

#[test]
fn the_demo_shop_goes_into_aws_runs_there_and_comes_back_byte_for_byte() {
    let moto = Moto::start("relocate-aws");
    let (dir, config) = common::fresh_demo("aws");
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
