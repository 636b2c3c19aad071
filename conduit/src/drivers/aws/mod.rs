//! The `aws` site driver: disk images and volumes as EBS snapshots moved
//! through the EBS direct APIs (`aws-sdk-ebs`), images registered as AMIs,
//! buckets on S3. `docs/aws.md` shows how to point it at an account.
//!
//! | capability | how |
//! |---|---|
//! | image store | an image is the latest completed snapshot tagged `fluidcloud:store=image`, `fluidcloud:name=NAME`, registered as an AMI of that name |
//! | block store | a volume is the same, tagged `fluidcloud:store=volume` (`volumes`) |
//! | whole-disk streams | images and volumes read with `ListSnapshotBlocks`/`GetSnapshotBlock` (holes skipped) and written with `StartSnapshot`/`PutSnapshotBlock`/`CompleteSnapshot`, allocated 512 KiB blocks only, in parallel, each with its SHA-256; a launched instance's disk is read from a snapshot of its EBS volume |
//! | object storage | S3 buckets of the region (or `endpoint_url`), through object_store |
//! | compute, inventory | EC2 instances defined as launch templates and launched at start (`instances`); config files in the bucket `aws.config_bucket` |
//!
//! Every snapshot and AMI it makes carries `fluidcloud:owner` (the
//! relocation and step that made it), so only that relocation's rollback
//! removes it, and a failed write deletes its unfinished snapshot.

mod ebs;
mod ec2;
mod instances;
mod volumes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_credential_types::provider::SharedCredentialsProvider;
use fluidcloud_plugins::{Diagnostic, Error, Result};

use super::DriverDescriptor;
use super::runtime::{Rt, off_runtime};
use super::s3buckets::S3Buckets;
use crate::config::{AwsConfig, SiteConfig};
use crate::driver::{BlockStore, Compute, Disks, ImageStore, Inventory, ObjectStorage, SiteDriver};

/// Registration of the `aws` kind.
pub const DESCRIPTOR: DriverDescriptor = DriverDescriptor {
    kind: "aws",
    disk_bus: false,
    help: "an AWS region: images and volumes as EBS snapshots (EBS direct APIs) and AMIs, instances on EC2, buckets on S3",
    options: &[
        ("region", "the region, e.g. eu-west-3 (required)"),
        (
            "endpoint_url",
            "one endpoint for EC2, EBS and S3 instead of AWS's (an emulator, a VPC endpoint)",
        ),
        (
            "credentials",
            "{ access_key_id_env, secret_access_key_env, token_env }: the variables holding the keys; without it, the SDK's default chain (profile, SSO, instance role)",
        ),
        (
            "aws",
            "{ subnet_id, security_group_ids, instance_types, default_image_id, config_bucket }: where instances go and where config files live",
        ),
    ],
    open,
};

/// Attempts of a throttled or unavailable call before it fails.
const RETRIES: u32 = 6;

/// Wait before retry `attempt` (0-based): 0.2 s doubling to 6.4 s, with
/// a jitter of up to a quarter so parallel callers spread out.
fn backoff(attempt: u32) -> Duration {
    let base = 200u64 << attempt.min(5);
    let jitter =
        u64::from(std::process::id() ^ attempt.wrapping_mul(2_654_435_761)) % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}

/// The error of a failed AWS call, by HTTP status and AWS error code:
/// throttling and server faults may pass (`Transient`, retried with
/// backoff), refused credentials and permissions are `PermissionDenied`,
/// a missing thing `NotFound`, a full quota `Precondition`.
fn classify(site: &str, call: &str, status: u16, code: &str, message: &str) -> Error {
    let what = if message.is_empty() {
        format!("{call}: {code} (HTTP {status})")
    } else {
        format!("{call}: {code}: {message} (HTTP {status})")
    };
    let throttled = matches!(
        code,
        "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "SlowDown"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
    );
    if throttled || status == 429 || status >= 500 {
        return Error::Transient(format!("{what}; retried with backoff"));
    }
    let denied = matches!(
        code,
        "AuthFailure"
            | "UnauthorizedOperation"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "AccessDeniedException"
            | "UnrecognizedClientException"
            | "ExpiredToken"
    );
    if denied || status == 401 || status == 403 {
        return Error::PermissionDenied {
            what,
            site: Some(site.to_owned()),
        };
    }
    if code.ends_with(".NotFound") || code.ends_with("NotFound") || status == 404 {
        return Error::NotFound {
            what,
            site: Some(site.to_owned()),
        };
    }
    Error::Precondition(format!("site {site}: {what}"))
}

/// The calls of one site: EC2 (Query API), EBS direct (the SDK), and the
/// runtime they run on. Cheap to clone into readers, writers and tasks.
#[derive(Clone)]
pub(crate) struct Api {
    name: String,
    region: String,
    /// Where EC2 calls go.
    ec2_endpoint: url::Url,
    http: reqwest::Client,
    credentials: SharedCredentialsProvider,
    /// Names of the variables holding the keys, for messages.
    credentials_from: String,
    ebs: aws_sdk_ebs::Client,
    /// Runs the SDK's calls for the blocking [`Disks`] interface, whose
    /// callers are threads of a transfer, not tasks.
    rt: Arc<Rt>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("ec2_endpoint", &self.ec2_endpoint.as_str())
            .finish_non_exhaustive()
    }
}

/// An AWS region (or an endpoint that speaks for one). Clones share
/// everything.
#[derive(Debug, Clone)]
pub struct Aws {
    api: Api,
    buckets: S3Buckets,
    /// The EC2 side: subnet, security groups, instance types, config bucket.
    config: AwsConfig,
    /// The region's instance types, listed once.
    types: Arc<tokio::sync::OnceCell<Vec<ec2::InstanceType>>>,
    /// Volumes with block-store writes not yet flushed.
    writes: Arc<volumes::OpenWrites>,
}

fn config_error(site: &str, key: &str, message: impl Into<String>) -> crate::Error {
    crate::Error::Config {
        diagnostics: vec![Diagnostic::error(message).at_key(format!("sites.{site}.{key}"))],
    }
}

fn open(name: &str, config: &SiteConfig) -> crate::Result<Box<dyn SiteDriver>> {
    Ok(Box::new(Aws::open(name, config)?))
}

impl Aws {
    /// The site `name` of the sites file.
    ///
    /// # Errors
    /// `Config` naming the key: no `region`, a malformed `endpoint_url`, a
    /// credential variable that is not set.
    pub fn open(name: &str, config: &SiteConfig) -> crate::Result<Self> {
        let region = config
            .region
            .clone()
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| {
                config_error(
                    name,
                    "region",
                    "an aws site needs `region` (e.g. eu-west-3)",
                )
            })?;
        let endpoint = match &config.endpoint_url {
            Some(u) => Some(
                url::Url::parse(u)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| {
                        config_error(name, "endpoint_url", format!("`{u}` is not an http(s) URL"))
                    })?,
            ),
            None => None,
        };
        let (credentials, credentials_from) = credentials(name, config)?;
        let rt = Rt::new("aws", name).map_err(|e| {
            crate::Error::site(name, Error::io("starting the AWS client's runtime", e))
        })?;
        let sdk = {
            let mut b = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(region.clone()))
                .credentials_provider(credentials.clone());
            if let Some(u) = &endpoint {
                b = b.endpoint_url(u.as_str().trim_end_matches('/'));
            }
            off_runtime(|| rt.block_on(b.load()))
        };
        let ebs_config = aws_sdk_ebs::config::Builder::from(&sdk)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(RETRIES + 1))
            .build();
        let ec2_endpoint =
            match &endpoint {
                Some(u) => u.clone(),
                None => url::Url::parse(&format!("https://ec2.{region}.amazonaws.com/")).map_err(
                    |e| config_error(name, "region", format!("`{region}` makes no endpoint: {e}")),
                )?,
            };
        let s3_endpoint = endpoint.as_ref().map_or_else(
            || format!("https://s3.{region}.amazonaws.com"),
            |u| u.as_str().trim_end_matches('/').to_owned(),
        );
        let mut bucket_config = config.clone();
        bucket_config.buckets_url = Some(format!("s3://?endpoint={s3_endpoint}&region={region}"));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| {
                crate::Error::site(name, Error::Precondition(format!("HTTP client: {e}")))
            })?;
        Ok(Self {
            api: Api {
                name: name.to_owned(),
                region,
                ec2_endpoint,
                http,
                credentials,
                credentials_from,
                ebs: aws_sdk_ebs::Client::from_conf(ebs_config),
                rt: Arc::new(rt),
            },
            buckets: S3Buckets::from_config(name, &bucket_config)?
                .keeping_own(config.aws.as_ref().and_then(|a| a.config_bucket.clone())),
            config: config.aws.clone().unwrap_or_default(),
            types: Arc::default(),
            writes: Arc::default(),
        })
    }
}

impl Api {
    fn credentials_error(
        &self,
        e: &aws_credential_types::provider::error::CredentialsError,
    ) -> Error {
        Error::PermissionDenied {
            what: format!("no AWS credentials from {}: {e}", self.credentials_from),
            site: Some(self.name.clone()),
        }
    }

    /// Runs `f` on the driver's runtime from async code.
    async fn on_rt<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.rt.run("AWS", f).await
    }
}

/// The credentials of site `name`: the variables `credentials` names, read
/// now; else the SDK's default chain. And where they come from, for
/// messages.
fn credentials(
    name: &str,
    config: &SiteConfig,
) -> crate::Result<(SharedCredentialsProvider, String)> {
    let Some(c) = &config.credentials else {
        let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
            .region(aws_config::Region::new(
                config.region.clone().unwrap_or_default(),
            ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::Error::site(name, Error::io("starting a runtime", e)))?;
        let chain = off_runtime(|| rt.block_on(chain.build()));
        return Ok((
            SharedCredentialsProvider::new(chain),
            "the SDK's default chain (environment, profile, SSO, instance role)".into(),
        ));
    };
    let (Some(id_var), Some(secret_var)) = (&c.access_key_id_env, &c.secret_access_key_env) else {
        return Err(config_error(
            name,
            "credentials",
            "name both access_key_id_env and secret_access_key_env (or leave credentials out for the SDK's default chain)",
        ));
    };
    let values = c.resolve(name)?;
    let key = |k: &str| values.get(k).cloned().unwrap_or_default();
    let creds = aws_credential_types::Credentials::new(
        key("access_key_id_env"),
        key("secret_access_key_env"),
        values.get("token_env").cloned(),
        None,
        "fluidcloud sites file",
    );
    Ok((
        SharedCredentialsProvider::new(creds),
        format!("${id_var} and ${secret_var}"),
    ))
}

#[async_trait]
impl SiteDriver for Aws {
    fn name(&self) -> &str {
        &self.api.name
    }

    fn kind(&self) -> &'static str {
        "aws"
    }

    async fn check(&self) -> Result<()> {
        // An authenticated call that lists nothing costs nothing.
        let api = self.api.clone();
        self.api
            .on_rt(async move { api.snapshots("fluidcloud:check", Some("none")).await })
            .await
            .map(drop)
    }

    fn inventory(&self) -> Option<&dyn Inventory> {
        Some(self)
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        Some(self)
    }

    fn block_store(&self) -> Option<&dyn BlockStore> {
        Some(self)
    }

    fn object_storage(&self) -> Option<&dyn ObjectStorage> {
        Some(&self.buckets)
    }

    fn compute(&self) -> Option<&dyn Compute> {
        Some(self)
    }

    fn disks(&self) -> Option<&dyn Disks> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_errors_are_classified_by_code_and_status() {
        for code in ["RequestLimitExceeded", "SlowDown", "ThrottlingException"] {
            assert!(
                matches!(classify("s", "c", 400, code, ""), Error::Transient(_)),
                "{code}"
            );
        }
        assert!(matches!(
            classify("s", "c", 503, "", ""),
            Error::Transient(_)
        ));
        assert!(matches!(
            classify("s", "c", 401, "AuthFailure", "no"),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            classify("s", "c", 400, "InvalidSnapshot.NotFound", ""),
            Error::NotFound { .. }
        ));
        let quota = classify(
            "s",
            "EC2 RegisterImage",
            400,
            "ResourceLimitExceeded",
            "too many",
        );
        assert!(
            matches!(&quota, Error::Precondition(m) if m.contains("too many") && m.contains("RegisterImage")),
            "{quota}"
        );
        assert!(
            backoff(0) >= Duration::from_millis(200) && backoff(0) <= Duration::from_millis(250)
        );
        assert!(backoff(9) <= Duration::from_millis(6400 + 1600));
    }
}
