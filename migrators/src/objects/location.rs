//! Bucket locations: one URL string, no secrets in it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::local::LocalFileSystem;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

/// Where a bucket lives, parsed from a URL (see the module docs of
/// [`crate::objects`] for the format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketLocation {
    /// A local directory; object keys are paths relative to it.
    Dir {
        /// Absolute path of the directory.
        path: PathBuf,
        /// The URL it was parsed from.
        url: String,
    },
    /// A bucket (and optional key prefix) on an S3-compatible server.
    S3(S3Location),
}

/// A bucket on an S3-compatible server. Credentials are named by
/// environment variable and read only when the bucket is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the whole bucket.
    pub prefix: String,
    /// Endpoint URL without a trailing `/`, e.g. `http://127.0.0.1:3900`.
    pub endpoint: String,
    /// Signing region, e.g. `garage`.
    pub region: String,
    /// Environment variable holding the access key id.
    pub access_key_id_env: String,
    /// Environment variable holding the secret access key.
    pub secret_access_key_env: String,
    /// Optional environment variable holding a session token.
    pub session_token_env: Option<String>,
    /// The URL it was parsed from.
    pub url: String,
}

fn bad(url: &str, reason: impl Into<String>) -> Error {
    Error::BadLocation {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

const FORMAT: &str = "expected file:///ABS/DIR or s3://BUCKET[/PREFIX]?endpoint=URL&region=R&access_key_id_env=VAR&secret_access_key_env=VAR";

impl BucketLocation {
    /// Parses a location URL. Pure: environment variables are not read here.
    ///
    /// # Errors
    /// [`Error::BadLocation`] naming the URL and what is wrong with it.
    pub fn parse(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| bad(url, format!("{e}; {FORMAT}")))?;
        match parsed.scheme() {
            "file" => {
                if parsed.query().is_some() || parsed.fragment().is_some() {
                    return Err(bad(url, "a file:// location takes no query or fragment"));
                }
                if parsed
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        url,
                        "a file:// location must be local (file:///ABS/DIR)",
                    ));
                }
                let path = parsed
                    .to_file_path()
                    .map_err(|()| bad(url, "not an absolute local path"))?;
                Ok(Self::Dir {
                    path,
                    url: url.to_owned(),
                })
            }
            "s3" => parse_s3(url, &parsed).map(Self::S3),
            other => Err(bad(url, format!("unknown scheme `{other}`; {FORMAT}"))),
        }
    }

    /// The URL this location was parsed from.
    pub fn url(&self) -> &str {
        match self {
            Self::Dir { url, .. } => url,
            Self::S3(s) => &s.url,
        }
    }

    /// The object key prefix inside the store returned by [`open_store`]
    /// (`""` for a directory or a whole bucket).
    pub fn prefix(&self) -> &str {
        match self {
            Self::Dir { .. } => "",
            Self::S3(s) => &s.prefix,
        }
    }
}

impl fmt::Display for BucketLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url())
    }
}

impl FromStr for BucketLocation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

fn parse_s3(url: &str, parsed: &url::Url) -> Result<S3Location> {
    let bucket = parsed.host_str().unwrap_or_default().to_owned();
    if !valid_bucket(&bucket) {
        return Err(bad(
            url,
            format!("`{bucket}` is not a valid bucket name (3-63 of a-z 0-9 . -)"),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            url,
            "credentials do not belong in the URL; name their environment variables with access_key_id_env and secret_access_key_env",
        ));
    }
    let prefix = parsed.path().trim_matches('/').to_owned();
    if prefix
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
        && !prefix.is_empty()
    {
        return Err(bad(url, format!("bad key prefix `{prefix}`")));
    }
    let mut endpoint = None;
    let mut region = None;
    let mut key_env = None;
    let mut secret_env = None;
    let mut token_env = None;
    for (k, v) in parsed.query_pairs() {
        let slot = match k.as_ref() {
            "endpoint" => &mut endpoint,
            "region" => &mut region,
            "access_key_id_env" => &mut key_env,
            "secret_access_key_env" => &mut secret_env,
            "session_token_env" => &mut token_env,
            other => {
                return Err(bad(
                    url,
                    format!(
                        "unknown parameter `{other}` (endpoint, region, access_key_id_env, secret_access_key_env, session_token_env)"
                    ),
                ));
            }
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(bad(url, format!("parameter `{k}` given twice")));
        }
    }
    let region = region.unwrap_or_else(|| "us-east-1".to_owned());
    let endpoint = match endpoint {
        Some(e) => {
            let u =
                url::Url::parse(&e).map_err(|err| bad(url, format!("endpoint `{e}`: {err}")))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(bad(url, format!("endpoint `{e}` must be an http(s) URL")));
            }
            if u.query().is_some() || !u.path().trim_matches('/').is_empty() {
                return Err(bad(
                    url,
                    format!("endpoint `{e}` must have no path or query"),
                ));
            }
            e.trim_end_matches('/').to_owned()
        }
        None => format!("https://s3.{region}.amazonaws.com"),
    };
    let key_env = key_env.unwrap_or_else(|| "AWS_ACCESS_KEY_ID".to_owned());
    let secret_env = secret_env.unwrap_or_else(|| "AWS_SECRET_ACCESS_KEY".to_owned());
    for v in [Some(&key_env), Some(&secret_env), token_env.as_ref()]
        .into_iter()
        .flatten()
    {
        if !valid_env_name(v) {
            return Err(bad(
                url,
                format!("`{v}` is not an environment variable name"),
            ));
        }
    }
    Ok(S3Location {
        bucket,
        prefix,
        endpoint,
        region,
        access_key_id_env: key_env,
        secret_access_key_env: secret_env,
        session_token_env: token_env,
        url: url.to_owned(),
    })
}

impl S3Location {
    /// Reads the credentials from the named environment variables.
    ///
    /// # Errors
    /// [`Error::MissingCredential`] naming the first variable that is unset.
    pub fn credentials(&self) -> Result<AwsCredential> {
        let read = |var: &str, what: &str| {
            std::env::var(var).map_err(|_| Error::MissingCredential {
                variable: var.to_owned(),
                what: what.to_owned(),
                url: self.url.clone(),
            })
        };
        Ok(AwsCredential {
            key_id: read(&self.access_key_id_env, "access key id")?,
            secret_key: read(&self.secret_access_key_env, "secret access key")?,
            token: match &self.session_token_env {
                Some(v) => Some(read(v, "session token")?),
                None => None,
            },
        })
    }

    /// The object key for a key relative to the prefix.
    pub(crate) fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

/// HTTP client settings shared by the object store and the signed requests:
/// plain http allowed (loopback test servers), and the store's own retries
/// kept short because [`crate::objects::copy_bucket`] retries whole objects
/// with its own budget.
pub(crate) fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(true)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300))
        .with_pool_max_idle_per_host(256)
}

/// Opens a location as an [`ObjectStore`]. A directory must exist; an S3
/// bucket is not contacted until the first request.
///
/// # Errors
/// [`Error::MissingCredential`] when a named environment variable is unset,
/// [`Error::Io`] when the directory does not exist, or
/// [`Error::ObjectStore`] when the store cannot be configured.
pub fn open_store(location: &BucketLocation) -> Result<Arc<dyn ObjectStore>> {
    match location {
        BucketLocation::Dir { path, .. } => {
            let meta = std::fs::metadata(path)
                .map_err(|e| Error::io(format!("opening directory {}", path.display()), e))?;
            if !meta.is_dir() {
                return Err(Error::io(
                    format!("opening directory {}", path.display()),
                    std::io::Error::other("not a directory"),
                ));
            }
            let fs =
                LocalFileSystem::new_with_prefix(path).map_err(|source| Error::ObjectStore {
                    context: format!("opening directory {}", path.display()),
                    source,
                })?;
            Ok(Arc::new(fs))
        }
        BucketLocation::S3(s3) => {
            let cred = s3.credentials()?;
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_endpoint(&s3.endpoint)
                .with_access_key_id(&cred.key_id)
                .with_secret_access_key(&cred.secret_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(true)
                // Integrity comes from our own MD5/BLAKE3 checks, not from
                // hashing every body once more for the signature.
                .with_unsigned_payload(true)
                .with_client_options(client_options())
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(2),
                        base: 2.0,
                    },
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(10),
                });
            if let Some(token) = cred.token {
                builder = builder.with_token(token);
            }
            let store = builder.build().map_err(|source| Error::ObjectStore {
                context: format!("configuring {}", s3.url),
                source,
            })?;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let l = BucketLocation::parse("file:///srv/data").unwrap();
        assert!(
            matches!(l, BucketLocation::Dir { ref path, .. } if path == &PathBuf::from("/srv/data"))
        );
        let l = BucketLocation::parse(
            "s3://photos/2024/raw?endpoint=http://127.0.0.1:3900/&region=garage&access_key_id_env=K&secret_access_key_env=S",
        )
        .unwrap();
        let BucketLocation::S3(s) = l else {
            panic!("not s3")
        };
        assert_eq!(s.bucket, "photos");
        assert_eq!(s.prefix, "2024/raw");
        assert_eq!(s.endpoint, "http://127.0.0.1:3900");
        assert_eq!(s.region, "garage");
        assert_eq!(s.full_key("a.jpg"), "2024/raw/a.jpg");
        let d = BucketLocation::parse("s3://photos").unwrap();
        let BucketLocation::S3(d) = d else {
            panic!("not s3")
        };
        assert_eq!(d.access_key_id_env, "AWS_ACCESS_KEY_ID");
        assert_eq!(d.endpoint, "https://s3.us-east-1.amazonaws.com");
    }

    #[test]
    fn rejects_bad_urls_with_reasons() {
        for (url, needle) in [
            ("ftp://x/y", "unknown scheme"),
            ("s3://A_B", "not a valid bucket name"),
            ("s3://user:pw@bucket", "credentials do not belong"),
            (
                "s3://bucket?endpoint=http://h&colour=red",
                "unknown parameter `colour`",
            ),
            ("s3://bucket?endpoint=ftp://h", "must be an http(s) URL"),
            (
                "s3://bucket?access_key_id_env=A-B",
                "not an environment variable name",
            ),
            ("s3://bucket?region=a&region=b", "given twice"),
            ("file:///x?y=1", "no query"),
            ("not a url", "relative URL"),
        ] {
            let e = BucketLocation::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(e.contains(url), "{url}: {e}");
        }
    }

    #[test]
    fn missing_credential_names_the_variable() {
        let BucketLocation::S3(s) = BucketLocation::parse(
            "s3://bucket?endpoint=http://127.0.0.1:1&access_key_id_env=FLUIDCLOUD_UNSET_VAR_1&secret_access_key_env=FLUIDCLOUD_UNSET_VAR_2",
        )
        .unwrap() else {
            panic!("not s3")
        };
        let e = s.credentials().unwrap_err().to_string();
        assert!(e.contains("FLUIDCLOUD_UNSET_VAR_1"), "{e}");
    }
}
