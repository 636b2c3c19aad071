//! The `openstack` site driver: one project of an OpenStack cloud, reached
//! through Keystone v3 (`keystone`), with its images in Glance v2
//! (`glance`). `docs/openstack.md` shows how to point it at a cloud.
//!
//! | capability | how |
//! |---|---|
//! | image store, whole-disk streams | Glance images of the project; a disk is read from a download checked against Glance's `os_hash_value`, and written into a scratch file that is uploaded (and checked) when the transfer finishes |
//! | object storage, inventory, compute, block store | missing: Swift, Nova and Cinder come with the next steps of the OpenStack issue |
//!
//! A capability is offered only when Keystone's catalog lists its service:
//! `fluidcloud sites show` never shows one the cloud lacks.

mod glance;
mod keystone;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use fluidcloud_plugins::{Diagnostic, Error, Result};

use super::DriverDescriptor;
use super::runtime::{Rt, off_runtime};
use crate::config::{OpenstackConfig, SiteConfig};
use crate::driver::{BlockStore, Compute, Disks, ImageStore, Inventory, ObjectStorage, SiteDriver};

/// Registration of the `openstack` kind.
pub const DESCRIPTOR: DriverDescriptor = DriverDescriptor {
    kind: "openstack",
    disk_bus: false,
    help: "a project of an OpenStack cloud, through Keystone v3: images in Glance",
    options: &[
        (
            "openstack",
            "{ auth_url, project, project_domain, user, user_domain, password_env, application_credential_id_env, application_credential_secret_env, interface, cacert }: Keystone and the variables holding the password or application credential",
        ),
        (
            "region",
            "the catalog's region (needed when the catalog has several)",
        ),
    ],
    open,
};

fn config_error(site: &str, key: &str, message: impl Into<String>) -> crate::Error {
    crate::Error::Config {
        diagnostics: vec![Diagnostic::error(message).at_key(format!("sites.{site}.{key}"))],
    }
}

fn open(name: &str, config: &SiteConfig) -> crate::Result<Box<dyn SiteDriver>> {
    Ok(Box::new(OpenStack::open(name, config)?))
}

/// The first 300 characters of an error body, with a JSON error's
/// message when it is one.
fn message_of(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            [
                "/error/message",
                "/message",
                "/badRequest/message",
                "/itemNotFound/message",
                "/overLimit/message",
            ]
            .iter()
            .find_map(|p| v.pointer(p).and_then(|m| m.as_str()).map(str::to_owned))
        });
    let text = from_json.unwrap_or_else(|| {
        body.split(['\n', '<'])
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.ends_with('>'))
            .collect::<Vec<_>>()
            .join(" ")
    });
    text.chars().take(300).collect()
}

/// The error of a call answered with `status`: 401 and 403 are refusals,
/// 404 a missing thing, 413 a full quota, 429 and 5xx may pass.
pub(crate) fn http_error(site: &str, call: &str, status: reqwest::StatusCode, body: &str) -> Error {
    let what = format!("{call}: HTTP {}: {}", status.as_u16(), message_of(body));
    match status.as_u16() {
        401 | 403 => Error::PermissionDenied {
            what,
            site: Some(site.to_owned()),
        },
        404 => Error::NotFound {
            what,
            site: Some(site.to_owned()),
        },
        413 => Error::Precondition(format!("site {site}: quota exceeded: {what}")),
        408 | 429 | 500..=599 => Error::Transient(format!("site {site}: {what}")),
        _ => Error::Precondition(format!("site {site}: {what}")),
    }
}

/// A project of an OpenStack cloud.
#[derive(Clone)]
pub struct OpenStack {
    name: String,
    http: reqwest::Client,
    identity: Arc<keystone::Identity>,
    rt: Arc<Rt>,
    /// The service types of the catalog, once a token brought it (unset
    /// while Keystone could not be reached; `check` says why).
    services: Arc<OnceLock<Vec<String>>>,
}

impl std::fmt::Debug for OpenStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStack")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The value of variable `var` named by key `key`.
fn variable(site: &str, key: &str, var: &str) -> crate::Result<String> {
    std::env::var(var).map_err(|_| crate::Error::MissingCredential {
        site: site.to_owned(),
        key: format!("sites.{site}.openstack.{key}"),
        variable: var.to_owned(),
    })
}

/// How site `name` authenticates, from its `openstack` table.
fn method(name: &str, c: &OpenstackConfig) -> crate::Result<keystone::Method> {
    let domain = |d: &Option<String>| d.clone().unwrap_or_else(|| "Default".to_owned());
    match (
        &c.application_credential_id_env,
        &c.application_credential_secret_env,
        &c.password_env,
    ) {
        (Some(id), Some(secret), _) => Ok(keystone::Method::AppCredential {
            id: variable(name, "application_credential_id_env", id)?,
            secret: variable(name, "application_credential_secret_env", secret)?,
        }),
        (Some(_), None, _) | (None, Some(_), _) => Err(config_error(
            name,
            "openstack",
            "name both application_credential_id_env and application_credential_secret_env",
        )),
        (None, None, Some(pw)) => Ok(keystone::Method::Password {
            user: c.user.clone().ok_or_else(|| {
                config_error(
                    name,
                    "openstack.user",
                    "a password needs the user it belongs to",
                )
            })?,
            user_domain: domain(&c.user_domain),
            password: variable(name, "password_env", pw)?,
            project: c.project.clone().ok_or_else(|| {
                config_error(
                    name,
                    "openstack.project",
                    "a password needs the project it is scoped to",
                )
            })?,
            project_domain: domain(&c.project_domain),
        }),
        (None, None, None) => Err(config_error(
            name,
            "openstack",
            "name password_env (with user and project) or application_credential_id_env and application_credential_secret_env",
        )),
    }
}

impl OpenStack {
    /// The site `name` of the sites file. Reads the credentials' variables
    /// now; Keystone is asked only when a capability is first used.
    ///
    /// # Errors
    /// `Config` naming the key; `MissingCredential` naming the variable.
    pub fn open(name: &str, config: &SiteConfig) -> crate::Result<Self> {
        let c = config.openstack.as_ref().ok_or_else(|| {
            config_error(
                name,
                "openstack",
                "an openstack site needs an `openstack` table with auth_url and credentials",
            )
        })?;
        let auth = url::Url::parse(&c.auth_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                config_error(
                    name,
                    "openstack.auth_url",
                    format!("`{}` is not an http(s) URL", c.auth_url),
                )
            })?;
        let interface = c.interface.clone().unwrap_or_else(|| "public".to_owned());
        if !matches!(interface.as_str(), "public" | "internal" | "admin") {
            return Err(config_error(
                name,
                "openstack.interface",
                format!("`{interface}` is not public, internal or admin"),
            ));
        }
        let method = method(name, c)?;
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(ca) = &c.cacert {
            let pem = std::fs::read(ca).map_err(|e| {
                config_error(name, "openstack.cacert", format!("{}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                config_error(
                    name,
                    "openstack.cacert",
                    format!("{} is not a PEM certificate: {e}", ca.display()),
                )
            })?;
            http = http.add_root_certificate(cert);
        }
        let http = http.build().map_err(|e| {
            crate::Error::site(name, Error::Precondition(format!("HTTP client: {e}")))
        })?;
        let rt = Rt::new("openstack", name).map_err(|e| {
            crate::Error::site(
                name,
                Error::io("starting the OpenStack client's runtime", e),
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            http,
            identity: Arc::new(keystone::Identity::new(
                name,
                auth.as_str(),
                method,
                config.region.clone(),
                interface,
            )),
            rt: Arc::new(rt),
            services: Arc::new(OnceLock::new()),
        })
    }

    /// Runs `f` on the driver's runtime from async code.
    async fn on_rt<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.rt.run("OpenStack", f).await
    }

    /// Runs `f` on the driver's runtime from blocking code.
    fn block_on<T: Send>(
        &self,
        f: impl std::future::Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        off_runtime(|| self.rt.block_on(f))
    }

    /// Whether the catalog lists service `kind`. Keystone is asked until
    /// it answers once: a site that could not reach it claims nothing,
    /// and a long-running service sees its capabilities once it can.
    fn has(&self, kind: &str) -> bool {
        if let Some(services) = self.services.get() {
            return services.iter().any(|s| s == kind);
        }
        let this = self.clone();
        let asked = self.block_on(async move {
            let t = this.identity.token(&this.http, None).await?;
            Ok(t.catalog.iter().map(|s| s.kind.clone()).collect::<Vec<_>>())
        });
        match asked {
            Ok(services) => self
                .services
                .get_or_init(|| services)
                .iter()
                .any(|s| s == kind),
            Err(e) => {
                tracing::debug!(site = %self.name, error = %e, "Keystone could not be asked for the catalog");
                false
            }
        }
    }

    /// Sends the request `build` makes for service `kind` (given its
    /// endpoint and a token), with a new token and once more when the
    /// service answers 401. Its response, or the error its status means.
    pub(crate) async fn send(
        &self,
        kind: &str,
        call: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let mut stale: Option<String> = None;
        loop {
            let token = self.identity.token(&self.http, stale.as_deref()).await?;
            let base = self.identity.endpoint(&token, kind)?;
            let resp = build(&self.http, &base)
                .header("X-Auth-Token", &token.value)
                .send()
                .await
                .map_err(|e| Error::Transient(format!("site {}: {call}: {e}", self.name)))?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && stale.is_none() {
                tracing::info!(site = %self.name, call, "token refused; asking Keystone for a new one");
                stale = Some(token.value);
                continue;
            }
            if status.is_success() {
                return Ok(resp);
            }
            let body = resp.text().await.unwrap_or_default();
            return Err(http_error(&self.name, call, status, &body));
        }
    }

    /// The project the site's token is scoped to.
    pub(crate) async fn project_id(&self) -> Result<String> {
        Ok(self.identity.token(&self.http, None).await?.project_id)
    }
}

#[async_trait]
impl SiteDriver for OpenStack {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "openstack"
    }

    async fn check(&self) -> Result<()> {
        let this = self.clone();
        self.on_rt(async move {
            let t = this.identity.token(&this.http, None).await?;
            this.identity.endpoint(&t, "image")?;
            this.send("image", "Glance GET /v2/images", |h, base| {
                h.get(format!("{base}/v2/images?limit=1"))
            })
            .await
            .map(drop)
        })
        .await
    }

    fn inventory(&self) -> Option<&dyn Inventory> {
        None
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        self.has("image").then_some(self as _)
    }

    fn block_store(&self) -> Option<&dyn BlockStore> {
        None
    }

    fn object_storage(&self) -> Option<&dyn ObjectStorage> {
        None
    }

    fn compute(&self) -> Option<&dyn Compute> {
        None
    }

    fn disks(&self) -> Option<&dyn Disks> {
        self.has("image").then_some(self as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openstack_errors_say_what_the_cloud_said() {
        let e = http_error(
            "os",
            "Glance PUT /v2/images/x/file",
            reqwest::StatusCode::PAYLOAD_TOO_LARGE,
            "<html><body><h1>413 Request Entity Too Large</h1>Denying attempt to upload image because it exceeds the quota</body></html>",
        );
        assert!(
            matches!(&e, Error::Precondition(m) if m.contains("quota exceeded") && m.contains("exceeds the quota")),
            "{e}"
        );
        let e = http_error(
            "os",
            "Keystone",
            reqwest::StatusCode::UNAUTHORIZED,
            r#"{"error": {"code": 401, "message": "The request you have made requires authentication.", "title": "Unauthorized"}}"#,
        );
        assert!(
            matches!(&e, Error::PermissionDenied { what, .. } if what.contains("requires authentication")),
            "{e}"
        );
        assert!(matches!(
            http_error("os", "c", reqwest::StatusCode::SERVICE_UNAVAILABLE, ""),
            Error::Transient(_)
        ));
    }
}
