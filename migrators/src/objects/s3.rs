//! The few S3 calls `object_store` does not make: bucket creation and
//! deletion, server-side copies across buckets (`CopyObject`,
//! `UploadPartCopy`) and multipart clean-up. Requests are signed with
//! `object_store`'s own SigV4 signer and sent through its HTTP client, so
//! no second S3 SDK is compiled in.

use bytes::Bytes;
use http::{Method, Request};
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};

use super::location::{S3Location, client_options};
use crate::error::{Error, Result};

/// Characters S3 wants percent-encoded in a key (everything but the
/// unreserved set and `/`).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of every `<tag>` element in a small XML document, unescaped.
pub(crate) fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(
            rest[..j]
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        );
        rest = &rest[j + close.len()..];
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A signed-request client for one S3 endpoint and key.
#[derive(Debug)]
pub(crate) struct S3Api {
    client: HttpClient,
    endpoint: String,
    region: String,
    credential: AwsCredential,
}

/// One answer: status, headers, body.
type Answer = (u16, http::HeaderMap, Bytes);

impl S3Api {
    pub(crate) fn new(loc: &S3Location) -> Result<Self> {
        let credential = loc.credentials()?;
        let client = ReqwestConnector::default()
            .connect(&client_options())
            .map_err(|source| Error::ObjectStore {
                context: format!("configuring an HTTP client for {}", loc.endpoint),
                source,
            })?;
        Ok(Self {
            client,
            endpoint: loc.endpoint.clone(),
            region: loc.region.clone(),
            credential,
        })
    }

    /// Whether `other` is the same server under the same identity, so a
    /// server-side copy between them is possible.
    pub(crate) fn same_server(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
            && self.region == other.region
            && self.credential.key_id == other.credential.key_id
    }

    fn resource(&self, bucket: &str, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("{}/{bucket}/{k}", self.endpoint),
            None => format!("{}/{bucket}", self.endpoint),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        operation: &str,
        method: Method,
        bucket: &str,
        key: Option<&str>,
        query: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Answer> {
        let resource = self.resource(bucket, key);
        let fail = |status: Option<u16>, message: String| Error::S3 {
            operation: operation.to_owned(),
            resource: resource.clone(),
            status,
            message,
        };
        let mut uri = format!("{}/{bucket}", self.endpoint);
        if let Some(k) = key {
            uri.push('/');
            uri.push_str(&encode_key(k));
        }
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(query);
        }
        let mut builder = Request::builder().method(method).uri(&uri);
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let mut request = builder
            .body(HttpRequestBody::from(body))
            .map_err(|e| fail(None, format!("building the request: {e}")))?;
        AwsAuthorizer::new(&self.credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| fail(None, format!("signing the request: {e}")))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| fail(None, e.to_string()))?;
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let body = body
            .bytes()
            .await
            .map_err(|e| fail(Some(status), format!("reading the answer: {e}")))?;
        // CopyObject and CompleteMultipartUpload may fail with 200 and an
        // error document.
        let text = String::from_utf8_lossy(&body);
        let error_doc = text.contains("<Error>");
        if !(200..300).contains(&status) || error_doc {
            let code = xml_values(&text, "Code").pop().unwrap_or_default();
            let msg = xml_values(&text, "Message").pop().unwrap_or_default();
            let status = if error_doc && status < 300 {
                500
            } else {
                status
            };
            return Err(fail(
                Some(status),
                format!("{code} {msg}").trim().to_owned(),
            ));
        }
        Ok((status, parts.headers, body))
    }

    /// Whether the bucket exists (and this key may see it).
    pub(crate) async fn bucket_exists(&self, bucket: &str) -> Result<bool> {
        match self
            .send(
                "HeadBucket",
                Method::HEAD,
                bucket,
                None,
                "",
                &[],
                Bytes::new(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::S3 {
                status: Some(404), ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `ListBuckets`: the names of the buckets this key sees, sorted.
    pub(crate) async fn list_buckets(&self) -> Result<Vec<String>> {
        let (_, _, body) = self
            .send("ListBuckets", Method::GET, "", None, "", &[], Bytes::new())
            .await?;
        let text = String::from_utf8_lossy(&body);
        let mut names: Vec<String> = xml_values(&text, "Bucket")
            .iter()
            .filter_map(|b| xml_values(b, "Name").pop())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Creates a bucket; `Ok(false)` when it already existed and is ours.
    pub(crate) async fn create_bucket(&self, bucket: &str) -> Result<bool> {
        let body = if self.region == "us-east-1" {
            Bytes::new()
        } else {
            Bytes::from(format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                xml_escape(&self.region)
            ))
        };
        match self
            .send("CreateBucket", Method::PUT, bucket, None, "", &[], body)
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::S3 {
                status: Some(409),
                ref message,
                ..
            }) if message.contains("BucketAlreadyOwnedByYou") => Ok(false),
            Err(Error::S3 {
                operation,
                resource,
                status: Some(403),
                message,
            }) => Err(Error::S3 {
                operation,
                resource,
                status: Some(403),
                message: format!(
                    "{message} (the key may not create buckets: create it beforehand, or on Garage run `garage key allow --create-bucket KEY`)"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Deletes an empty bucket.
    pub(crate) async fn delete_bucket(&self, bucket: &str) -> Result<()> {
        self.send(
            "DeleteBucket",
            Method::DELETE,
            bucket,
            None,
            "",
            &[],
            Bytes::new(),
        )
        .await
        .map(|_| ())
    }

    /// Server-side `CopyObject` replacing the metadata with `headers`
    /// (content type, `x-amz-meta-*`); returns the new ETag.
    pub(crate) async fn copy_object(
        &self,
        src_bucket: &str,
        src_key: &str,
        bucket: &str,
        key: &str,
        headers: &[(String, String)],
    ) -> Result<String> {
        let mut h = headers.to_vec();
        h.push((
            "x-amz-copy-source".into(),
            format!("/{src_bucket}/{}", encode_key(src_key)),
        ));
        h.push(("x-amz-metadata-directive".into(), "REPLACE".into()));
        let (_, _, body) = self
            .send(
                "CopyObject",
                Method::PUT,
                bucket,
                Some(key),
                "",
                &h,
                Bytes::new(),
            )
            .await?;
        Ok(xml_values(&String::from_utf8_lossy(&body), "ETag")
            .pop()
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned())
    }

    /// Starts a multipart upload with the object's headers; returns its id.
    pub(crate) async fn create_multipart(
        &self,
        bucket: &str,
        key: &str,
        headers: &[(String, String)],
    ) -> Result<String> {
        let (_, _, body) = self
            .send(
                "CreateMultipartUpload",
                Method::POST,
                bucket,
                Some(key),
                "uploads",
                headers,
                Bytes::new(),
            )
            .await?;
        xml_values(&String::from_utf8_lossy(&body), "UploadId")
            .pop()
            .ok_or_else(|| Error::S3 {
                operation: "CreateMultipartUpload".into(),
                resource: self.resource(bucket, Some(key)),
                status: None,
                message: "no UploadId in the answer".into(),
            })
    }

    /// `UploadPartCopy` of bytes `first..=last` of the source; returns the
    /// part's ETag.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn upload_part_copy(
        &self,
        src_bucket: &str,
        src_key: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_number: usize,
        first: u64,
        last: u64,
    ) -> Result<String> {
        let h = vec![
            (
                "x-amz-copy-source".to_owned(),
                format!("/{src_bucket}/{}", encode_key(src_key)),
            ),
            (
                "x-amz-copy-source-range".to_owned(),
                format!("bytes={first}-{last}"),
            ),
        ];
        let query = format!(
            "partNumber={part_number}&uploadId={}",
            encode_key(upload_id)
        );
        let (_, _, body) = self
            .send(
                "UploadPartCopy",
                Method::PUT,
                bucket,
                Some(key),
                &query,
                &h,
                Bytes::new(),
            )
            .await?;
        Ok(xml_values(&String::from_utf8_lossy(&body), "ETag")
            .pop()
            .unwrap_or_default())
    }

    /// Completes a multipart upload from its parts' ETags (in order).
    pub(crate) async fn complete_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<String> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let query = format!("uploadId={}", encode_key(upload_id));
        let (_, _, body) = self
            .send(
                "CompleteMultipartUpload",
                Method::POST,
                bucket,
                Some(key),
                &query,
                &[],
                Bytes::from(xml),
            )
            .await?;
        Ok(xml_values(&String::from_utf8_lossy(&body), "ETag")
            .pop()
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned())
    }

    /// Aborts a multipart upload.
    pub(crate) async fn abort_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<()> {
        let query = format!("uploadId={}", encode_key(upload_id));
        self.send(
            "AbortMultipartUpload",
            Method::DELETE,
            bucket,
            Some(key),
            &query,
            &[],
            Bytes::new(),
        )
        .await
        .map(|_| ())
    }

    /// Incomplete multipart uploads under `prefix`, as (key, upload id).
    pub(crate) async fn list_multipart_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut markers = (String::new(), String::new());
        loop {
            let mut query = String::from("uploads");
            if !prefix.is_empty() {
                query.push_str(&format!(
                    "&prefix={}",
                    encode_key(prefix).replace('/', "%2F")
                ));
            }
            if !markers.0.is_empty() {
                query.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    encode_key(&markers.0).replace('/', "%2F"),
                    encode_key(&markers.1)
                ));
            }
            let (_, _, body) = self
                .send(
                    "ListMultipartUploads",
                    Method::GET,
                    bucket,
                    None,
                    &query,
                    &[],
                    Bytes::new(),
                )
                .await?;
            let text = String::from_utf8_lossy(&body);
            for upload in xml_values(&text, "Upload") {
                let key = xml_values(&upload, "Key").pop().unwrap_or_default();
                let id = xml_values(&upload, "UploadId").pop().unwrap_or_default();
                out.push((key, id));
            }
            let truncated = xml_values(&text, "IsTruncated").pop().as_deref() == Some("true");
            let next = (
                xml_values(&text, "NextKeyMarker").pop().unwrap_or_default(),
                xml_values(&text, "NextUploadIdMarker")
                    .pop()
                    .unwrap_or_default(),
            );
            if !truncated || next.0.is_empty() || next == markers {
                return Ok(out);
            }
            markers = next;
        }
    }
}

/// Bucket names an S3 endpoint lists for the key of `location` (its
/// bucket and prefix are ignored), sorted.
///
/// # Errors
/// [`Error::MissingCredential`] when a named variable is unset;
/// [`Error::S3`] when the server refuses or cannot be reached.
pub async fn list_buckets(location: &S3Location) -> Result<Vec<String>> {
    S3Api::new(location)?.list_buckets().await
}

/// Whether the bucket of `location` exists and its key may see it.
///
/// # Errors
/// As [`list_buckets`].
pub async fn bucket_exists(location: &S3Location) -> Result<bool> {
    S3Api::new(location)?.bucket_exists(&location.bucket).await
}

/// Creates the bucket of `location`; `Ok(false)` when it already existed
/// and is owned by its key.
///
/// # Errors
/// As [`list_buckets`]; a 403 says how to let the key create buckets.
pub async fn create_bucket(location: &S3Location) -> Result<bool> {
    S3Api::new(location)?.create_bucket(&location.bucket).await
}

/// Deletes the bucket of `location`, which must be empty.
///
/// # Errors
/// As [`list_buckets`]; `BucketNotEmpty` (409) when objects remain.
pub async fn delete_bucket(location: &S3Location) -> Result<()> {
    S3Api::new(location)?.delete_bucket(&location.bucket).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_like_s3_wants() {
        assert_eq!(encode_key("a b/c+d.txt"), "a%20b/c%2Bd.txt");
        assert_eq!(encode_key("é"), "%C3%A9");
    }

    #[test]
    fn xml_values_are_found_and_unescaped() {
        let xml = "<R><ETag>&quot;abc&quot;</ETag><Upload><Key>a&amp;b</Key></Upload><Upload><Key>c</Key></Upload></R>";
        assert_eq!(xml_values(xml, "ETag"), vec!["\"abc\""]);
        assert_eq!(xml_values(xml, "Key"), vec!["a&b", "c"]);
        assert!(xml_values(xml, "Missing").is_empty());
    }
}
