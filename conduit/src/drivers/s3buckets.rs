//! Buckets kept on an S3 endpoint: the object storage of a `local` site
//! with `buckets_url`, and of an `aws` site. Each bucket is a bucket of the
//! endpoint, reached through `fluidcloud_migrators::objects` (object_store's
//! S3 client), with credentials named by environment variable only.

use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_migrators::objects::{self as objects, BucketLocation, S3Location};
use fluidcloud_plugins::{Diagnostic, Error, Result};
use futures::TryStreamExt as _;
use object_store::ObjectStore;

use crate::config::SiteConfig;
use crate::driver::ObjectStorage;

/// Buckets on the S3 endpoint of a site's `buckets_url`.
#[derive(Debug, Clone)]
pub(crate) struct S3Buckets {
    /// The site's name, for messages.
    site: String,
    /// The site's config: `buckets_url` and `credentials`.
    config: Box<SiteConfig>,
    /// A bucket of the site's own (an aws site's config bucket): not
    /// listed among the service's buckets, never created or deleted here.
    own: Option<String>,
}

/// Bucket `bucket` on the S3 endpoint of `config.buckets_url`, as an
/// `object-copy` location: its query with the credentials' variable names
/// added.
fn s3_url(config: &SiteConfig, bucket: &str) -> String {
    let base = config.buckets_url.as_deref().unwrap_or_default();
    let rest = base.trim_start_matches("s3://");
    let (_, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut q: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(c) = &config.credentials {
        for (field, var) in c.references() {
            if field != "token_env" && !q.iter().any(|p| p.starts_with(field)) {
                q.push(format!("{field}={var}"));
            }
        }
    }
    format!("s3://{bucket}?{}", q.join("&"))
}

impl S3Buckets {
    /// Keeps bucket `name` out of the service's buckets (see `own`).
    pub(crate) fn keeping_own(mut self, name: Option<String>) -> Self {
        self.own = name;
        self
    }

    fn not_own(&self, name: &str) -> Result<()> {
        if self.own.as_deref() == Some(name) {
            return Err(Error::Precondition(format!(
                "bucket {name} is site {}'s config bucket, not a bucket of a service",
                self.site
            )));
        }
        Ok(())
    }

    /// The buckets of site `name`, whose `config.buckets_url` is checked
    /// now, so a malformed URL is a config error, not a late failure.
    ///
    /// # Errors
    /// `Config` naming `sites.NAME.buckets_url`.
    pub(crate) fn from_config(name: &str, config: &SiteConfig) -> crate::Result<Self> {
        let url = config.buckets_url.as_deref().unwrap_or_default();
        BucketLocation::parse(&s3_url(config, "probe"))
            .ok()
            .filter(|l| matches!(l, BucketLocation::S3(_)))
            .ok_or_else(|| crate::Error::Config {
                diagnostics: vec![
                    Diagnostic::error(format!(
                        "`{url}` is not an S3 location (expected s3://?endpoint=URL&region=R)"
                    ))
                    .at_key(format!("sites.{name}.buckets_url")),
                ],
            })?;
        Ok(Self {
            site: name.to_owned(),
            config: Box::new(config.clone()),
            own: None,
        })
    }

    fn s3_location(&self, bucket: &str) -> Result<S3Location> {
        if let Some(c) = &self.config.credentials {
            c.resolve(&self.site).map_err(|e| match e {
                crate::Error::MissingCredential { variable, key, .. } => {
                    Error::Invalid(vec![
                        Diagnostic::error(format!(
                            "environment variable {variable} is not set (it holds a credential of the buckets of site {})",
                            self.site
                        ))
                        .at_key(key),
                    ])
                }
                other => Error::Precondition(other.to_string()),
            })?;
        }
        let url = s3_url(&self.config, bucket);
        match BucketLocation::parse(&url).map_err(|e| self.s3_error(e))? {
            BucketLocation::S3(l) => Ok(l),
            BucketLocation::Dir { .. } => Err(Error::Precondition(format!(
                "site {}: buckets_url is not an s3:// location",
                self.site
            ))),
        }
    }

    fn s3_error(&self, e: fluidcloud_migrators::Error) -> Error {
        match Error::from(e) {
            Error::NotFound { what, site: None } => Error::NotFound {
                what,
                site: Some(self.site.clone()),
            },
            Error::PermissionDenied { what, site: None } => Error::PermissionDenied {
                what,
                site: Some(self.site.clone()),
            },
            other => other,
        }
    }

    async fn existing(&self, name: &str) -> Result<S3Location> {
        let loc = self.s3_location(name)?;
        if !objects::bucket_exists(&loc)
            .await
            .map_err(|e| self.s3_error(e))?
        {
            return Err(Error::NotFound {
                what: format!("bucket {name}"),
                site: Some(self.site.clone()),
            });
        }
        Ok(loc)
    }
}

#[async_trait]
impl ObjectStorage for S3Buckets {
    fn location(&self, name: &str) -> Option<Result<String>> {
        Some(Ok(s3_url(&self.config, name)))
    }

    async fn list_buckets(&self) -> Result<Vec<String>> {
        // Any valid name: only the endpoint and key are used.
        let loc = self.s3_location("list")?;
        let mut all = objects::list_buckets(&loc)
            .await
            .map_err(|e| self.s3_error(e))?;
        all.retain(|b| Some(b) != self.own.as_ref());
        Ok(all)
    }

    async fn create_bucket(&self, name: &str) -> Result<()> {
        self.not_own(name)?;
        let loc = self.s3_location(name)?;
        // S3 in us-east-1 answers 200 to creating a bucket its owner has.
        let exists = objects::bucket_exists(&loc)
            .await
            .map_err(|e| self.s3_error(e))?;
        match if exists {
            Ok(false)
        } else {
            objects::create_bucket(&loc).await
        } {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Precondition(format!(
                "bucket {name} already exists on site {}",
                self.site
            ))),
            Err(e) => Err(self.s3_error(e)),
        }
    }

    async fn bucket(&self, name: &str) -> Result<Arc<dyn ObjectStore>> {
        let loc = self.existing(name).await?;
        objects::open_store(&BucketLocation::S3(loc)).map_err(|e| self.s3_error(e))
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        self.not_own(name)?;
        let loc = self.existing(name).await?;
        // Like a directory: the objects go with the bucket.
        let location = BucketLocation::S3(loc.clone());
        let store = objects::open_store(&location).map_err(|e| self.s3_error(e))?;
        let keys: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .map_err(|e| Error::Transient(format!("listing bucket {name}: {e}")))?;
        objects::delete_objects(&location, &keys, false)
            .await
            .map_err(|e| self.s3_error(e))?;
        objects::delete_bucket(&loc)
            .await
            .map_err(|e| self.s3_error(e))
    }
}
