//! The few EC2 calls the `aws` driver makes, over EC2's Query API: a form
//! POST signed with SigV4 (`aws-sigv4`, which the SDK uses itself), and an
//! XML answer read with roxmltree. `docs/design.md` says why this is not
//! `aws-sdk-ec2`: that crate is the largest of the SDK, and these are six
//! calls.

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
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
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
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = vec![("Owner.1".to_owned(), "self".to_owned())];
            match value {
                Some(v) => {
                    p.push(("Filter.1.Name".into(), format!("tag:{key}")));
                    p.push(("Filter.1.Value.1".into(), v.to_owned()));
                }
                None => {
                    p.push(("Filter.1.Name".into(), "tag-key".into()));
                    p.push(("Filter.1.Value.1".into(), key.to_owned()));
                }
            }
            if let Some(t) = &token {
                p.push(("NextToken".into(), t.clone()));
            }
            let xml = self.ec2("DescribeSnapshots", &p).await?;
            let (page, next) = parse_snapshots(&xml).map_err(|e| {
                Error::Transient(format!("EC2 DescribeSnapshots answered badly: {e}"))
            })?;
            out.extend(page);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
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
        for (i, (k, v)) in tags.iter().enumerate() {
            p.push((format!("Tag.{}.Key", i + 1), k.clone()));
            p.push((format!("Tag.{}.Value", i + 1), v.clone()));
        }
        self.ec2("CreateTags", &p).await.map(drop)
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

/// A page of `DescribeSnapshots`, and the next page's token.
pub(crate) fn parse_snapshots(
    xml: &str,
) -> std::result::Result<(Vec<Snapshot>, Option<String>), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let mut out = Vec::new();
    for set in children(root, "snapshotSet") {
        for item in children(set, "item") {
            let tags = children(item, "tagSet")
                .flat_map(|t| children(t, "item"))
                .filter_map(|t| Some((text_of(t, "key")?, text_of(t, "value").unwrap_or_default())))
                .collect();
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
