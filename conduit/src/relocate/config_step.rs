//! `config-transfer`: one config file from the source site to the target
//! site, rewritten with the endpoint map on the way, through the sites'
//! inventories (in this process or at their agents).
//!
//! The orchestrator reads the file through the source's inventory,
//! rewrites it with the same format-aware rewriter as `config-adapt`
//! (`fluidcloud_migrators::config::adapt`), and writes it through the
//! target's inventory (mode 0600, the owner record first). Config files are
//! small and the orchestrator holds the endpoint map, so they pass through
//! it; disks and objects never do. The step's facts carry the diff
//! (redacted), which the report shows. Its rollback removes the file when
//! this relocation wrote it.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fluidcloud_migrators::config::{self, EndpointMap, Format};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, Migrator,
    MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::Deserialize;

use super::steps::{descriptor, nothing, open_site, params, validate_params};
use crate::driver::require_inventory;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigParams {
    sites_file: PathBuf,
    /// The source site.
    from: String,
    /// The target site.
    site: String,
    /// The file's path relative to the config root, the same at both.
    path: String,
    relocation: String,
    /// The endpoint map (`config-adapt`'s shape).
    #[serde(default)]
    map: serde_json::Value,
}

/// `config-transfer`: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfigTransfer;

fn owner(p: &ConfigParams) -> String {
    format!("{}/config:{}", p.relocation, p.path)
}

#[async_trait]
impl Migrator for ConfigTransfer {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "config-transfer",
            "rewrites a config file with the endpoint map, from one site's inventory to another's",
            vec![ArtifactKind::ConfigFile],
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<ConfigParams>(request)
    }

    /// The file's size, as the source's inventory gives it.
    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let p: ConfigParams = params(request)?;
        let (_, source) = open_site(&p.sites_file, &p.from)?;
        let size = require_inventory(source.as_ref())?
            .config_file(&p.path)
            .await
            .map_or(0, |rec| rec.content.len() as u64);
        Ok(Estimate {
            bytes_read: size,
            bytes_written: size,
            ..nothing()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: ConfigParams = params(request)?;
        let (source, target) = super::transfer_step::both_sites(&p.sites_file, &p.from, &p.site)?;
        let rec = require_inventory(source.as_ref())?
            .config_file(&p.path)
            .await?;
        let text = String::from_utf8(rec.content).map_err(|_| {
            SdkError::Precondition(format!(
                "config file {} at {} is not UTF-8 text",
                p.path, p.from
            ))
        })?;
        let map =
            EndpointMap::from_json(&p.map).map_err(|e| SdkError::Invalid(vec![e.diagnostic()]))?;
        let format = Format::detect(Path::new(&p.path), &text);
        let adapted = config::adapt(&p.path, &text, format, &map, &[])
            .map_err(|e| SdkError::Invalid(vec![e.diagnostic()]))?;
        require_inventory(target.as_ref())?
            .put_config_file(&p.path, adapted.content.as_bytes(), &owner(&p))
            .await?;
        ctx.progress.message(&format!(
            "writing {}:config/{} ({} change(s)) (details in the report)",
            p.site,
            p.path,
            adapted.changes.len()
        ));
        let mut out = StepOutput::default();
        out.measured.bytes_read = text.len() as u64;
        out.measured.bytes_written = adapted.content.len() as u64;
        out.artifacts.insert(
            "config".into(),
            Artifact {
                kind: ArtifactKind::ConfigFile,
                site: p.site.clone(),
                locator: p.path.clone(),
                size: Some(adapted.content.len() as u64),
                checksum: Some(config::checksum(adapted.content.as_bytes())),
            },
        );
        let diff = config::unified_diff(&p.path, &text, &adapted.content);
        for (k, v) in [
            ("config_source", format!("{}:config/{}", p.from, p.path)),
            ("config_target", format!("{}:config/{}", p.site, p.path)),
            ("config_diff", diff),
        ] {
            out.facts.insert(k.into(), serde_json::json!(v));
        }
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: ConfigParams = params(request)?;
        let (_, target) = open_site(&p.sites_file, &p.site)?;
        require_inventory(target.as_ref())?
            .remove_config_file(&p.path, &owner(&p))
            .await?;
        Ok(())
    }
}
