//! The web dashboard at `/ui/`, and the self-contained report page.
//!
//! The dashboard is three static files built into the binary
//! (`broker/ui/`): one HTML page, its script and its style sheet, with no
//! framework, no build step and nothing fetched from elsewhere. The page
//! reads the same REST API as any client (`/sites`, `/match`, `/plan`,
//! `/relocations`, the event streams); `docs/ui.md` describes it.
//!
//! **Sessions.** The static files hold no data, so they are served to
//! anyone; every API call still needs the bearer token. The login form
//! posts the token to `/ui/login`, which answers with a session cookie
//! (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS) instead of keeping
//! the token in the page. The cookie carries no secret: it is an expiry
//! and a nonce, signed with a key derived from the token (BLAKE3 keyed
//! hash), so any worker that knows the token accepts it, it expires by
//! itself, and changing the token ends every session. Requests that
//! change something (`POST`) and come with the cookie must also carry
//! [`UI_HEADER`], which a page of another origin cannot set: a
//! defence against cross-site requests besides `SameSite`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The page.
const INDEX: &str = include_str!("../ui/index.html");
/// Its script.
pub const SCRIPT: &str = include_str!("../ui/app.js");
/// Its style sheet.
pub const STYLE: &str = include_str!("../ui/app.css");

/// The session cookie's name.
pub const COOKIE: &str = "fluidcloud_session";
/// The header a state-changing request authenticated by the cookie must
/// carry (any value).
pub const UI_HEADER: &str = "x-fluidcloud-ui";
/// How long a session lasts.
pub const SESSION: Duration = Duration::from_secs(12 * 3600);

/// What every page of the dashboard is served with: nothing from other
/// origins, no framing, no sniffing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /ui/`.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/app.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /ui`: to `/ui/`, where the page's relative URLs resolve.
pub async fn to_index() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, HeaderValue::from_static("/ui/"))],
    )
        .into_response()
}

/// Signs and checks session cookies with a key derived from the token.
#[derive(Clone)]
pub struct Sessions {
    key: [u8; 32],
    secure: bool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sessions {
    /// Sessions of a service whose bearer token is `token`; `secure` when it
    /// speaks HTTPS (the cookie is then never sent in clear).
    pub fn new(token: &str, secure: bool) -> Self {
        Self {
            key: blake3::derive_key("fluidcloud 2026-12 ui session cookie", token.as_bytes()),
            secure,
        }
    }

    fn mac(&self, expiry: u64, nonce: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.key, format!("{expiry}.{nonce}").as_bytes())
    }

    /// A new cookie value, valid until `expiry` (seconds since the epoch).
    pub fn issue(&self, expiry: u64) -> String {
        let mut nonce = [0u8; 16];
        // Without randomness the MAC still binds the expiry; the nonce
        // only makes two sessions' cookies differ.
        let _ = getrandom::fill(&mut nonce);
        let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        format!("{expiry}.{nonce}.{}", self.mac(expiry, &nonce).to_hex())
    }

    /// Whether `value` is a cookie this service issued that has not expired.
    pub fn valid(&self, value: &str) -> bool {
        let mut parts = value.splitn(3, '.');
        let (Some(expiry), Some(nonce), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let (Ok(expiry), Ok(mac)) = (expiry.parse::<u64>(), blake3::Hash::from_hex(mac)) else {
            return false;
        };
        // `Hash`'s equality is constant-time.
        expiry > now_secs() && self.mac(expiry, nonce) == mac
    }

    /// The `Set-Cookie` value starting a session.
    pub fn set_cookie(&self) -> String {
        let expiry = now_secs() + SESSION.as_secs();
        format!(
            "{COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
            self.issue(expiry),
            SESSION.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value ending one.
    pub fn clear_cookie(&self) -> String {
        format!(
            "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
            if self.secure { "; Secure" } else { "" }
        )
    }
}

/// The session cookie's value in `headers`, if any.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

/// The report of one relocation as a self-contained HTML page: the
/// dashboard's style and script inline, the report as JSON in the page,
/// and a policy that lets the page load nothing at all. `report` is the
/// conduit's report document, secrets already redacted.
pub fn report_page(title: &str, report: &serde_json::Value) -> String {
    // Inside a <script> element only `</` could end it early; escaping
    // `<`, `>` and `&` keeps the JSON valid and the element whole.
    let data = fluidcloud_plugins::redact::text(&report.to_string())
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let title = escape_html(title);
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">\n\
         <title>{title}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>\n\
         <main id=\"app\" tabindex=\"-1\"></main>\n\
         <script type=\"application/json\" id=\"report-data\">{data}</script>\n\
         <script>\n{SCRIPT}\n</script>\n</body>\n</html>\n"
    )
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_under_its_token() {
        let s = Sessions::new("tok-1", true);
        let later = now_secs() + 60;
        let c = s.issue(later);
        assert!(s.valid(&c));
        assert!(
            !Sessions::new("tok-2", true).valid(&c),
            "another token's key"
        );
        assert!(!s.valid(&s.issue(now_secs() - 1)), "expired");
        // Moving the expiry breaks the MAC.
        let (_, rest) = c.split_once('.').unwrap();
        assert!(!s.valid(&format!("{}.{rest}", later + 3600)));
        for junk in ["", "x", "1.2", "1.2.3", "99999999999.ab.zz"] {
            assert!(!s.valid(junk), "{junk}");
        }
        assert_ne!(s.issue(later), s.issue(later), "nonces differ");
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_over_https() {
        let set = Sessions::new("t", true).set_cookie();
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!Sessions::new("t", false).set_cookie().contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}=v.w.x; c=d")).unwrap(),
        );
        assert_eq!(cookie(&h), Some("v.w.x"));
    }

    #[test]
    fn the_report_page_keeps_its_data_inside_its_script_element() {
        let page = report_page(
            "r <1>",
            &serde_json::json!({"id": "</script><script>alert(1)</script>", "password": "hunter2"}),
        );
        assert_eq!(page.matches("</script>").count(), 2, "only the page's own");
        assert!(!page.contains("hunter2"));
        assert!(page.contains("<title>r &lt;1&gt;</title>"));
        let start = page.find("id=\"report-data\">").unwrap() + "id=\"report-data\">".len();
        let end = start + page[start..].find("</script>").unwrap();
        let v: serde_json::Value = serde_json::from_str(&page[start..end]).unwrap();
        assert_eq!(v["id"], "</script><script>alert(1)</script>");
    }
}
