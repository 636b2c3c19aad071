//! A moto server (the AWS endpoint of the `aws` driver's tests) of one
//! test's own, started by `scripts/aws` and stopped when dropped.

use std::path::PathBuf;
use std::process::Command;

use crate::{tmp_root, workspace};

/// A moto server on loopback.
#[derive(Debug)]
pub struct Moto {
    dir: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Moto {
    /// Starts the server `name` (its log in `target/tmp/moto-NAME`).
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts it with `env` set for the server (moto's own settings, such
    /// as `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start_with(name: &str, env: &[(&str, &str)]) -> Self {
        let dir = tmp_root().join(format!("moto-{name}"));
        let out = Command::new(workspace().join("scripts/aws"))
            .args(["start", dir.to_str().unwrap()])
            .envs(env.iter().copied())
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

    /// What boto3 sees at the endpoint: `code` is a Python expression over
    /// the clients `ec2`, `ebs` and `s3` (and `kw`, their arguments),
    /// printed as JSON.
    pub fn boto3(&self, code: &str) -> serde_json::Value {
        let program = format!(
            "import boto3, json\n\
             kw = dict(endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             ec2 = boto3.client('ec2', **kw)\nebs = boto3.client('ebs', **kw)\ns3 = boto3.client('s3', **kw)\n\
             print(json.dumps({code}, default=str))\n",
            self.url
        );
        let out = Command::new(workspace().join("scripts/aws"))
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
        let _ = Command::new(workspace().join("scripts/aws"))
            .args(["stop", self.dir.to_str().unwrap()])
            .output();
    }
}
