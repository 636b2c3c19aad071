//! The few EC2 calls the `aws` driver makes, over EC2's Query API: a form
//! POST signed with SigV4 (`aws-sigv4`, which the SDK uses itself), and an
//! XML answer read with roxmltree. `docs/design.md` says why this is not
//! `aws-sdk-ec2`: that crate is the largest of the SDK, and these are a
//! score of calls.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials as _;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use fluidcloud_plugins::{Error, Result};

use super::{Api, classify};

/// The EC2 API version every call names.
const VERSION: &str = "2016-11-15";

/// A snapshot as `DescribeSnapshots` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// `snap-…`.
    pub id: String,
    /// `pending`, `completed` or `error`.
    pub state: String,
    /// Its size in GiB.
    pub volume_gib: u64,
    /// When it started (ISO 8601, as EC2 writes it; sorts by time).
    pub start_time: String,
    /// Its tags.
    pub tags: Vec<(String, String)>,
}

impl Snapshot {
    /// The value of tag `key`.
    pub(crate) fn tag(&self, key: &str) -> Option<&str> {
        tag_of(&self.tags, key)
    }
}

/// An instance as `DescribeInstances` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    /// `i-…`.
    pub id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`,
    /// `terminated`.
    pub state: String,
    /// Its type (`t3.micro`).
    pub instance_type: String,
    /// The device it boots from (`/dev/xvda`).
    pub root_device: Option<String>,
    /// Its private addresses, primary first.
    pub private_ips: Vec<String>,
    /// (device name, `vol-…`) of each EBS volume attached.
    pub volumes: Vec<(String, String)>,
    /// Its tags.
    pub tags: Vec<(String, String)>,
}

/// A launch template as `DescribeLaunchTemplates` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    /// `lt-…`.
    pub id: String,
    /// Its tags.
    pub tags: Vec<(String, String)>,
}

/// An instance type as `DescribeInstanceTypes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InstanceType {
    /// `t3.micro`.
    pub name: String,
    /// Default vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Current generation, x86_64, not bare metal: what a relocated
    /// instance may get.
    pub usable: bool,
}

/// The value of tag `key` in `tags`.
pub(crate) fn tag_of<'a>(tags: &'a [(String, String)], key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Query parameters from `(name, value)` pairs.
pub(crate) fn params<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `PREFIX.N.Key`/`PREFIX.N.Value` parameters for `tags`.
pub(crate) fn tag_params(prefix: &str, tags: &[(String, String)]) -> Vec<(String, String)> {
    tags.iter()
        .enumerate()
        .flat_map(|(i, (k, v))| {
            [
                (format!("{prefix}.{}.Key", i + 1), k.clone()),
                (format!("{prefix}.{}.Value", i + 1), v.clone()),
            ]
        })
        .collect()
}

impl Api {
    /// Calls EC2 action `action` with `params`; the answer's XML text.
    pub(crate) async fn ec2(&self, action: &str, params: &[(String, String)]) -> Result<String> {
        let mut attempt = 0;
        loop {
            match self.ec2_once(action, params).await {
                Err(Error::Transient(m)) if attempt < super::RETRIES => {
                    let wait = super::backoff(attempt);
                    tracing::info!(site = %self.name, action, error = %m, ?wait, "EC2 throttled or unavailable; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn ec2_once(&self, action: &str, params: &[(String, String)]) -> Result<String> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action);
            form.append_pair("Version", VERSION);
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let url = self.ec2_endpoint.as_str();
        let creds = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| self.credentials_error(&e))?;
        let identity = creds.into();
        let settings = SigningSettings::default();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| Error::Precondition(format!("signing an EC2 request: {e}")))?
            .into();
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let headers = [("content-type", content_type)];
        let signable = SignableRequest::new(
            "POST",
            url,
            headers.iter().copied(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| Error::Precondition(format!("signing an EC2 request: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| Error::Precondition(format!("signing an EC2 request: {e}")))?
            .into_parts();
        let mut req = self
            .http
            .post(url)
            .header("content-type", content_type)
            .timeout(Duration::from_secs(60))
            .body(body);
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Transient(format!("EC2 {action} at {url}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Error::Transient(format!("EC2 {action} at {url}: {e}")))?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = error_of(&text);
        Err(classify(
            &self.name,
            &format!("EC2 {action}"),
            status.as_u16(),
            &code,
            &message,
        ))
    }

    /// Every snapshot this account owns with tag `key` = `value` (any
    /// value when `None`), oldest first.
    pub(crate) async fn snapshots(&self, key: &str, value: Option<&str>) -> Result<Vec<Snapshot>> {
        let mut p = vec![("Owner.1".to_owned(), "self".to_owned())];
        p.extend(tag_filter(1, key, value));
        let mut out = Vec::new();
        for xml in self.pages("DescribeSnapshots", &p).await? {
            out.extend(
                parse_snapshots(&xml)
                    .map_err(|e| bad("DescribeSnapshots", &e))?
                    .0,
            );
        }
        out.sort_by(|a, b| a.start_time.cmp(&b.start_time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Deletes snapshot `id`; one already gone is fine.
    pub(crate) async fn delete_snapshot(&self, id: &str) -> Result<()> {
        match self
            .ec2("DeleteSnapshot", &[("SnapshotId".into(), id.into())])
            .await
        {
            Err(Error::NotFound { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Registers an AMI named `name` whose root device is `snapshot`, tagged
    /// with `tags`; its id.
    pub(crate) async fn register_image(
        &self,
        name: &str,
        snapshot: &str,
        tags: &[(String, String)],
    ) -> Result<String> {
        let p = [
            ("Name", name),
            ("Architecture", "x86_64"),
            ("VirtualizationType", "hvm"),
            ("EnaSupport", "true"),
            ("RootDeviceName", "/dev/xvda"),
            ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
            ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot),
            ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
            ("Description", "registered by fluidcloud"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let xml = self.ec2("RegisterImage", &p).await?;
        let id = first_text(&xml, "imageId").ok_or_else(|| {
            Error::Transient("EC2 RegisterImage answered without an imageId".into())
        })?;
        self.tag(&id, tags).await?;
        Ok(id)
    }

    /// Tags resource `id`.
    pub(crate) async fn tag(&self, id: &str, tags: &[(String, String)]) -> Result<()> {
        let mut p = vec![("ResourceId.1".to_owned(), id.to_owned())];
        p.extend(tag_params("Tag", tags));
        self.ec2("CreateTags", &p).await.map(drop)
    }

    /// Calls paged action `action` until its last page; the pages' XML.
    async fn pages(&self, action: &str, p: &[(String, String)]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = p.to_vec();
            if let Some(t) = &token {
                p.push(("NextToken".into(), t.clone()));
            }
            let xml = self.ec2(action, &p).await?;
            let next = next_token(&xml);
            out.push(xml);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// The launch templates with tag `key` = `value`.
    pub(crate) async fn templates(&self, key: &str, value: Option<&str>) -> Result<Vec<Template>> {
        let mut out = Vec::new();
        for xml in self
            .pages("DescribeLaunchTemplates", &tag_filter(1, key, value))
            .await?
        {
            out.extend(parse_templates(&xml).map_err(|e| bad("DescribeLaunchTemplates", &e))?);
        }
        Ok(out)
    }

    /// Creates launch template `name` from `data` (`LaunchTemplateData.…`
    /// parameters) tagged with `tags`; its id.
    pub(crate) async fn create_template(
        &self,
        name: &str,
        data: Vec<(String, String)>,
        tags: &[(String, String)],
    ) -> Result<String> {
        let mut p = params([
            ("LaunchTemplateName", name),
            ("VersionDescription", "defined by fluidcloud"),
            ("TagSpecification.1.ResourceType", "launch-template"),
        ]);
        p.extend(tag_params("TagSpecification.1.Tag", tags));
        p.extend(data);
        let xml = self.ec2("CreateLaunchTemplate", &p).await?;
        first_text(&xml, "launchTemplateId")
            .ok_or_else(|| bad("CreateLaunchTemplate", "no launchTemplateId"))
    }

    /// Deletes launch template `id`; one already gone is fine.
    pub(crate) async fn delete_template(&self, id: &str) -> Result<()> {
        match self
            .ec2("DeleteLaunchTemplate", &params([("LaunchTemplateId", id)]))
            .await
        {
            Err(Error::NotFound { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The instances with tag `key` = `value` that are not terminated.
    pub(crate) async fn instances(&self, key: &str, value: Option<&str>) -> Result<Vec<Instance>> {
        let mut p = tag_filter(1, key, value);
        p.push(("Filter.2.Name".into(), "instance-state-name".into()));
        for (i, s) in ["pending", "running", "stopping", "stopped", "shutting-down"]
            .iter()
            .enumerate()
        {
            p.push((format!("Filter.2.Value.{}", i + 1), (*s).to_owned()));
        }
        let mut out = Vec::new();
        for xml in self.pages("DescribeInstances", &p).await? {
            out.extend(parse_instances(&xml).map_err(|e| bad("DescribeInstances", &e))?);
        }
        Ok(out)
    }

    /// Instance `id`, whatever its state; `None` once EC2 forgot it.
    pub(crate) async fn instance(&self, id: &str) -> Result<Option<Instance>> {
        match self
            .ec2("DescribeInstances", &params([("InstanceId.1", id)]))
            .await
        {
            Ok(xml) => Ok(parse_instances(&xml)
                .map_err(|e| bad("DescribeInstances", &e))?
                .into_iter()
                .next()),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Launches one instance from template `template`, with `extra`
    /// parameters (its network interface). `token` makes a
    /// repeated call (a retry after a lost answer) return the instance the
    /// first one launched instead of a second.
    pub(crate) async fn run_instance(
        &self,
        template: &str,
        token: &str,
        extra: Vec<(String, String)>,
    ) -> Result<Instance> {
        let mut p = params([
            ("LaunchTemplate.LaunchTemplateId", template),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", token),
        ]);
        p.extend(extra);
        let xml = self.ec2("RunInstances", &p).await?;
        parse_instances(&xml)
            .map_err(|e| bad("RunInstances", &e))?
            .into_iter()
            .next()
            .ok_or_else(|| bad("RunInstances", "no instance"))
    }

    /// Calls `StartInstances`, `StopInstances` or `TerminateInstances` on `id`.
    pub(crate) async fn instance_action(&self, action: &str, id: &str) -> Result<()> {
        self.ec2(action, &params([("InstanceId.1", id)]))
            .await
            .map(drop)
    }

    /// What instance `id` wrote on its console (EC2 keeps the last 64 KiB).
    pub(crate) async fn console_output(&self, id: &str) -> Result<String> {
        use base64::Engine as _;
        let xml = self
            .ec2(
                "GetConsoleOutput",
                &params([("InstanceId", id), ("Latest", "true")]),
            )
            .await?;
        let text = first_text(&xml, "output").unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| bad("GetConsoleOutput", &e.to_string()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every instance type the region offers.
    pub(crate) async fn instance_types(&self) -> Result<Vec<InstanceType>> {
        let mut out = Vec::new();
        for xml in self
            .pages("DescribeInstanceTypes", &params([("MaxResults", "100")]))
            .await?
        {
            out.extend(parse_types(&xml).map_err(|e| bad("DescribeInstanceTypes", &e))?);
        }
        Ok(out)
    }

    /// Snapshots volume `volume`, tagged with `tags`; the snapshot's id.
    pub(crate) async fn snapshot_volume(
        &self,
        volume: &str,
        tags: &[(String, String)],
    ) -> Result<String> {
        let mut p = params([
            ("VolumeId", volume),
            ("Description", "read by fluidcloud"),
            ("TagSpecification.1.ResourceType", "snapshot"),
        ]);
        p.extend(tag_params("TagSpecification.1.Tag", tags));
        let xml = self.ec2("CreateSnapshot", &p).await?;
        first_text(&xml, "snapshotId").ok_or_else(|| bad("CreateSnapshot", "no snapshotId"))
    }

    /// The size in GiB of EBS volume `id`; `None` when there is none.
    pub(crate) async fn volume_gib(&self, id: &str) -> Result<Option<u64>> {
        match self
            .ec2("DescribeVolumes", &params([("VolumeId.1", id)]))
            .await
        {
            Ok(xml) => Ok(first_text(&xml, "size").and_then(|s| s.parse().ok())),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Snapshot `id`.
    pub(crate) async fn snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        let xml = self
            .ec2("DescribeSnapshots", &params([("SnapshotId.1", id)]))
            .await?;
        Ok(parse_snapshots(&xml)
            .map_err(|e| bad("DescribeSnapshots", &e))?
            .0
            .into_iter()
            .next())
    }

    /// The AMIs this account owns with tag `key` = `value`.
    pub(crate) async fn images(&self, key: &str, value: &str) -> Result<Vec<String>> {
        let p = [
            ("Owner.1", "self".to_owned()),
            ("Filter.1.Name", format!("tag:{key}")),
            ("Filter.1.Value.1", value.to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let xml = self.ec2("DescribeImages", &p).await?;
        all_text(&xml, "imageId")
            .map_err(|e| Error::Transient(format!("EC2 DescribeImages answered badly: {e}")))
    }

    /// Deregisters AMI `id`; one already gone is fine.
    pub(crate) async fn deregister_image(&self, id: &str) -> Result<()> {
        match self
            .ec2("DeregisterImage", &[("ImageId".into(), id.into())])
            .await
        {
            Err(Error::NotFound { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn children<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    n.children().filter(move |c| c.tag_name().name() == name)
}

fn text_of(n: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    children(n, name)
        .next()
        .and_then(|c| c.text())
        .map(str::to_owned)
}

/// An answer that is not what the action returns.
fn bad(action: &str, what: &str) -> Error {
    Error::Transient(format!("EC2 {action} answered badly: {what}"))
}

/// Filter number `n`: tag `key` = `value`, or any value when `None`.
fn tag_filter(n: usize, key: &str, value: Option<&str>) -> Vec<(String, String)> {
    let (name, value) = match value {
        Some(v) => (format!("tag:{key}"), v.to_owned()),
        None => ("tag-key".to_owned(), key.to_owned()),
    };
    vec![
        (format!("Filter.{n}.Name"), name),
        (format!("Filter.{n}.Value.1"), value),
    ]
}

/// The `nextToken` of a page, if the answer has one at its top.
fn next_token(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    text_of(doc.root_element(), "nextToken")
}

fn tags_in(n: roxmltree::Node<'_, '_>, set: &str) -> Vec<(String, String)> {
    children(n, set)
        .flat_map(|t| children(t, "item"))
        .filter_map(|t| Some((text_of(t, "key")?, text_of(t, "value").unwrap_or_default())))
        .collect()
}

fn parse_templates(xml: &str) -> std::result::Result<Vec<Template>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for set in children(doc.root_element(), "launchTemplates") {
        for item in children(set, "item") {
            out.push(Template {
                id: text_of(item, "launchTemplateId")
                    .ok_or("a template without launchTemplateId")?,
                tags: tags_in(item, "tagSet"),
            });
        }
    }
    Ok(out)
}

/// The instances of a `DescribeInstances` or `RunInstances` answer.
fn parse_instances(xml: &str) -> std::result::Result<Vec<Instance>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let items = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "instancesSet")
        .flat_map(|s| children(s, "item"));
    for item in items {
        let mut private_ips: Vec<String> = text_of(item, "privateIpAddress").into_iter().collect();
        let more = children(item, "networkInterfaceSet")
            .flat_map(|s| children(s, "item"))
            .flat_map(|n| children(n, "privateIpAddressesSet"))
            .flat_map(|s| children(s, "item"))
            .filter_map(|a| text_of(a, "privateIpAddress"));
        for ip in more {
            if !private_ips.contains(&ip) {
                private_ips.push(ip);
            }
        }
        let volumes = children(item, "blockDeviceMapping")
            .flat_map(|s| children(s, "item"))
            .filter_map(|m| {
                let vol = children(m, "ebs")
                    .next()
                    .and_then(|e| text_of(e, "volumeId"))?;
                Some((text_of(m, "deviceName")?, vol))
            })
            .collect();
        out.push(Instance {
            id: text_of(item, "instanceId").ok_or("an instance without instanceId")?,
            state: children(item, "instanceState")
                .next()
                .and_then(|s| text_of(s, "name"))
                .unwrap_or_default(),
            instance_type: text_of(item, "instanceType").unwrap_or_default(),
            root_device: text_of(item, "rootDeviceName"),
            private_ips,
            volumes,
            tags: tags_in(item, "tagSet"),
        });
    }
    Ok(out)
}

fn parse_types(xml: &str) -> std::result::Result<Vec<InstanceType>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for set in children(doc.root_element(), "instanceTypeSet") {
        for item in children(set, "item") {
            let num = |parent: &str, name: &str| {
                children(item, parent)
                    .next()
                    .and_then(|p| text_of(p, name))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let x86 = children(item, "processorInfo")
                .flat_map(|p| children(p, "supportedArchitectures"))
                .flat_map(|a| children(a, "item"))
                .any(|a| a.text() == Some("x86_64"));
            let (Some(vcpus), Some(memory_mib)) = (
                num("vCpuInfo", "defaultVCpus"),
                num("memoryInfo", "sizeInMiB"),
            ) else {
                continue;
            };
            out.push(InstanceType {
                name: text_of(item, "instanceType").ok_or("a type without instanceType")?,
                vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
                memory_mib,
                usable: x86
                    && text_of(item, "currentGeneration").as_deref() == Some("true")
                    && text_of(item, "bareMetal").as_deref() != Some("true"),
            });
        }
    }
    Ok(out)
}

/// A page of `DescribeSnapshots`, and the next page's token.
pub(crate) fn parse_snapshots(
    xml: &str,
) -> std::result::Result<(Vec<Snapshot>, Option<String>), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let mut out = Vec::new();
    for set in children(root, "snapshotSet") {
        for item in children(set, "item") {
            let tags = tags_in(item, "tagSet");
            out.push(Snapshot {
                id: text_of(item, "snapshotId").ok_or("a snapshot without snapshotId")?,
                state: text_of(item, "status").unwrap_or_default(),
                volume_gib: text_of(item, "volumeSize")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                start_time: text_of(item, "startTime").unwrap_or_default(),
                tags,
            });
        }
    }
    Ok((out, text_of(root, "nextToken")))
}

/// The text of the first element named `name`, anywhere.
fn first_text(xml: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().name() == name)
        .and_then(|n| n.text())
        .map(str::to_owned)
}

fn all_text(xml: &str, name: &str) -> std::result::Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    Ok(doc
        .descendants()
        .filter(|n| n.tag_name().name() == name)
        .filter_map(|n| n.text())
        .map(str::to_owned)
        .collect())
}

/// `(Code, Message)` of an EC2 error document (`<Response><Errors><Error>`),
/// or the HTTP body's first line when it is not one.
pub(crate) fn error_of(xml: &str) -> (String, String) {
    match (first_text(xml, "Code"), first_text(xml, "Message")) {
        (Some(c), m) => (c, m.unwrap_or_default()),
        (None, _) => (
            String::new(),
            xml.lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_and_errors_read_from_ec2_xml() {
        let xml = r#"<DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
          <requestId>r</requestId>
          <snapshotSet><item><snapshotId>snap-1</snapshotId><status>completed</status>
            <startTime>2026-12-05T07:00:00.000Z</startTime><volumeSize>2</volumeSize>
            <tagSet><item><key>fluidcloud:name</key><value>web.raw</value></item></tagSet></item>
          </snapshotSet><nextToken>abc</nextToken></DescribeSnapshotsResponse>"#;
        let (s, next) = parse_snapshots(xml).unwrap();
        assert_eq!(next.as_deref(), Some("abc"));
        assert_eq!(s[0].id, "snap-1");
        assert_eq!(s[0].volume_gib, 2);
        assert_eq!(s[0].tag("fluidcloud:name"), Some("web.raw"));
        let err = r#"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>slow down</Message></Error></Errors></Response>"#;
        assert_eq!(
            error_of(err),
            ("RequestLimitExceeded".into(), "slow down".into())
        );
        assert_eq!(error_of("Bad Gateway").1, "Bad Gateway");
        assert!(parse_snapshots("<nope").is_err());
    }
}
