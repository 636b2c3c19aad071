//! The broker REST service over real sockets.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fluidcloud_broker::rest::{Problem, ServiceConfig, StaticCatalog, router, serve};
use fluidcloud_plugins::{
    ArtifactKind, Capability, Capacity, Cost, ImageFormat, Location, MigratorDescriptor, Origin,
    Relation, Resource, ResourceSpec, SiteInfo, Topology,
};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-token-for-tests";

fn site(name: &str, lat: f64, lon: f64, jur: &str, price: f64) -> SiteInfo {
    SiteInfo {
        name: name.into(),
        kind: "local".into(),
        location: Location {
            region: name.into(),
            latitude: lat,
            longitude: lon,
        },
        jurisdiction: jur.into(),
        cost: Cost {
            vcpu_hour: price,
            ..Cost::default()
        },
        capacity: Capacity::default(),
        image_formats: [ImageFormat::Raw, ImageFormat::Qcow2].into_iter().collect(),
        capabilities: Capability::ALL.into_iter().collect(),
        rtt_ms: None,
    }
}

fn topology() -> Value {
    let mut t = Topology::new("shop", "paris");
    let web = Resource::new(
        "web",
        ResourceSpec::Instance {
            vcpus: 2,
            memory_mib: 2048,
            state: "running".into(),
            hostname: None,
            addresses: vec![],
            guest: None,
        },
        Origin::Discovered,
    );
    let img = Resource::new(
        "web.qcow2",
        ResourceSpec::Image {
            format: ImageFormat::Qcow2,
            virtual_size: 1 << 30,
            allocated: 1 << 28,
            locator: "images/web.qcow2".into(),
            backing: None,
        },
        Origin::Discovered,
    );
    let (w, i) = (web.id.clone(), img.id.clone());
    t.add(web);
    t.add(img);
    t.link(&w, &i, Relation::BootsFrom, None).unwrap();
    serde_json::to_value(t.to_doc()).unwrap()
}

/// Starts a server on a free loopback port; returns its base URL.
async fn start() -> String {
    let catalog = StaticCatalog {
        sites: vec![
            site("paris", 48.85, 2.35, "EU/FR", 0.03),
            site("frankfurt", 50.11, 8.68, "EU/DE", 0.02),
            site("virginia", 38.9, -77.3, "US/VA", 0.01),
        ],
        migrators: vec![MigratorDescriptor {
            name: "image-convert".into(),
            version: "0.1.0".into(),
            summary: "converts".into(),
            consumes: vec![ArtifactKind::DiskImage {
                format: ImageFormat::Qcow2,
            }],
            produces: vec![ArtifactKind::DiskImage {
                format: ImageFormat::Raw,
            }],
        }],
    };
    let config = ServiceConfig {
        token: Some(TOKEN.into()),
        body_limit: 64 * 1024,
        ..ServiceConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(Arc::new(catalog), &config);
    tokio::spawn(serve(listener, app, std::future::pending()));
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn problem(resp: reqwest::Response, status: u16) -> Problem {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()[reqwest::header::CONTENT_TYPE],
        "application/problem+json"
    );
    let p: Problem = resp.json().await.unwrap();
    assert_eq!(p.status, status);
    p
}

#[tokio::test]
async fn health_is_open_and_everything_else_needs_the_token() {
    let base = start().await;
    let r = client().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");

    for path in ["/version", "/sites", "/sites/paris", "/migrators"] {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(
            r.headers()[reqwest::header::WWW_AUTHENTICATE],
            "Bearer",
            "{path}"
        );
        let p = problem(r, 401).await;
        assert!(p.detail.contains("Bearer"), "{path}: {p:?}");
        let r = client()
            .get(format!("{base}{path}"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        problem(r, 401).await;
    }
    let r = client()
        .post(format!("{base}/match"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    problem(r, 401).await;
}

#[tokio::test]
async fn catalog_routes_answer_with_the_catalog() {
    let base = start().await;
    let get = |path: &str| {
        client()
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
    };
    let sites: Value = get("/sites").await.unwrap().json().await.unwrap();
    assert_eq!(sites.as_array().unwrap().len(), 3);
    let one: Value = get("/sites/frankfurt").await.unwrap().json().await.unwrap();
    assert_eq!(one["jurisdiction"], "EU/DE");
    let p = problem(get("/sites/atlantis").await.unwrap(), 404).await;
    assert!(p.detail.contains("atlantis"));
    let m: Value = get("/migrators").await.unwrap().json().await.unwrap();
    assert_eq!(m[0]["name"], "image-convert");
    let v: Value = get("/version").await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    problem(get("/no/such/route").await.unwrap(), 404).await;
}

#[tokio::test]
async fn match_places_the_topology_and_explains() {
    let base = start().await;
    let body = json!({ "topology": topology(), "request": { "source": "paris", "constraints": [
        { "type": "jurisdiction", "resources": "*", "regions": ["EU"] }
    ] } });
    let r = client()
        .post(format!("{base}/match"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["assignments"][0]["site"], "frankfurt");
    assert_eq!(p["optimal"], true);
    let alt = &p["assignments"][0]["alternatives"][0];
    assert_eq!(alt["site"], "virginia");
    assert_eq!(alt["constraint"], "jurisdiction(*; EU)");
}

#[tokio::test]
async fn bad_requests_are_problems_naming_the_field() {
    let base = start().await;
    let post = |body: Vec<u8>, ctype: &'static str| {
        client()
            .post(format!("{base}/match"))
            .bearer_auth(TOKEN)
            .header(reqwest::header::CONTENT_TYPE, ctype)
            .body(body)
            .send()
    };
    // Malformed JSON.
    let p = problem(
        post(b"{\"topology\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(p.detail.contains("EOF"), "{p:?}");
    // A field of the wrong type is named by pointer.
    let body = json!({ "topology": topology(), "request": { "source": "paris", "weights": { "cost": "cheap" } } });
    let p = problem(
        post(serde_json::to_vec(&body).unwrap(), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p.errors[0].pointer, "/request/weights/cost", "{p:?}");
    // Unknown fields are refused.
    let body = json!({ "topology": topology(), "request": { "source": "paris" }, "colour": 1 });
    let p = problem(
        post(serde_json::to_vec(&body).unwrap(), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert!(p.detail.contains("colour"), "{p:?}");
    // A topology whose edge points nowhere.
    let mut topo = topology();
    topo["edges"][0]["to"] = json!("image:ghost");
    let body = json!({ "topology": topo, "request": { "source": "paris" } });
    let p = problem(
        post(serde_json::to_vec(&body).unwrap(), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert!(p.detail.contains("image:ghost"), "{p:?}");
    assert_eq!(p.errors[0].pointer, "/topology/edges/0", "{p:?}");
    // Unknown names in constraints.
    let body = json!({ "topology": topology(), "request": { "source": "paris", "constraints": [
        { "type": "ban", "resources": ["wbe"], "sites": ["paris"] }] } });
    let p = problem(
        post(serde_json::to_vec(&body).unwrap(), "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert!(p.detail.contains("`wbe`"), "{p:?}");
    assert_eq!(p.errors[0].pointer, "/request/constraints/0", "{p:?}");
    // Infeasible: the conflict is listed.
    let body = json!({ "topology": topology(), "request": { "source": "paris", "constraints": [
        { "type": "fence", "resources": ["web"], "sites": ["virginia"] },
        { "type": "jurisdiction", "resources": "*", "regions": ["EU"] }] } });
    let p = problem(
        post(serde_json::to_vec(&body).unwrap(), "application/json")
            .await
            .unwrap(),
        409,
    )
    .await;
    let conflict: Vec<&str> = p.errors.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(conflict, ["fence(web; virginia)", "jurisdiction(*; EU)"]);
    // Wrong media type, and a body over the limit.
    problem(post(b"{}".to_vec(), "text/plain").await.unwrap(), 415).await;
    let p = problem(
        post(vec![b' '; 100 * 1024], "application/json")
            .await
            .unwrap(),
        413,
    )
    .await;
    assert!(p.detail.contains("size limit"), "{p:?}");
    // The service is still healthy after all that.
    let r = client().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A validator for `schema` that resolves `#/components/...` in `doc`.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    root.as_object_mut()
        .unwrap()
        .insert("components".into(), doc["components"].clone());
    jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{root}"))
}

fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: &str) -> &'a Value {
    let r = &doc["paths"][path][method]["responses"][status]["content"];
    let s = r["application/json"]["schema"]
        .as_object()
        .map(|_| &r["application/json"]["schema"]);
    s.unwrap_or(&r["application/problem+json"]["schema"])
}

#[tokio::test]
async fn the_openapi_document_describes_what_the_service_really_sends() {
    let base = start().await;
    // Open without a token, like /health.
    let doc: Value = client()
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/health",
        "/version",
        "/sites",
        "/sites/{name}",
        "/migrators",
        "/match",
        "/openapi.json",
        "/relocations",
        "/relocations/{id}",
        "/relocations/{id}/events",
        "/relocations/{id}/cancel",
        "/relocations/{id}/resume",
        "/relocations/{id}/rollback",
        "/plan",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // Successful answers validate against their documented schemas.
    let check = |path: &str, method: &str, status: &str, body: &Value| {
        let v = validator(&doc, response_schema(&doc, path, method, status));
        let errors: Vec<String> = v
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {errors:?}\n{body}"
        );
    };
    for path in ["/version", "/sites", "/migrators"] {
        let body: Value = client()
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        check(path, "get", "200", &body);
    }
    let body: Value = client()
        .get(format!("{base}/sites/paris"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check("/sites/{name}", "get", "200", &body);
    let request = json!({ "topology": topology(), "request": { "source": "paris", "users": [{ "latitude": 48.1, "longitude": -1.7 }] } });
    // The request body itself is valid per the document.
    let req_schema =
        &doc["paths"]["/match"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    assert!(validator(&doc, req_schema).is_valid(&request));
    assert!(
        !validator(&doc, req_schema).is_valid(&json!({ "topology": topology() })),
        "request is required"
    );
    let placed: Value = client()
        .post(format!("{base}/match"))
        .bearer_auth(TOKEN)
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check("/match", "post", "200", &placed);
    // Problems, too.
    let r = client().get(format!("{base}/sites")).send().await.unwrap();
    check("/sites", "get", "401", &r.json::<Value>().await.unwrap());
    let bad = json!({ "topology": topology(), "request": { "source": "paris", "constraints": [
        { "type": "fence", "resources": ["web"], "sites": ["virginia"] },
        { "type": "jurisdiction", "resources": "*", "regions": ["EU"] }] } });
    let r = client()
        .post(format!("{base}/match"))
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    check("/match", "post", "409", &r.json::<Value>().await.unwrap());
}

#[tokio::test]
async fn match_by_service_name_needs_a_runner_and_a_body_needs_one_or_the_other() {
    let base = start().await;
    let post = |body: Value| {
        client()
            .post(format!("{base}/match"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let p = problem(
        post(json!({ "request": { "source": "paris" } }))
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p.errors[0].pointer, "/topology", "{p:?}");
    // This service was built without relocations: it cannot introspect.
    let p = problem(
        post(json!({ "service": "shop", "request": { "source": "paris" } }))
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p.errors[0].pointer, "/service", "{p:?}");
    let p = problem(
        post(
            json!({ "topology": topology(), "service": "shop", "request": { "source": "paris" } }),
        )
        .await
        .unwrap(),
        422,
    )
    .await;
    assert!(p.detail.contains("not both"), "{p:?}");
    // And its relocation routes are unknown.
    let r = client()
        .get(format!("{base}/relocations"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    problem(r, 404).await;
}

/// `start`, without a token: the Host check guards the service instead.
async fn start_open() -> (String, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = ServiceConfig {
        token: None,
        hosts: ServiceConfig::local_hosts(port, &[]),
        ..ServiceConfig::default()
    };
    let app = router(Arc::new(StaticCatalog::default()), &config);
    tokio::spawn(serve(listener, app, std::future::pending()));
    (format!("http://127.0.0.1:{port}"), port)
}

#[tokio::test]
async fn the_dashboard_is_served_with_a_strict_policy_and_shows_nothing_without_a_session() {
    let base = start().await;
    let page = client().get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    assert!(html.contains("app.js") && !html.contains("paris"), "{html}");
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
    }
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects.get(format!("{base}/ui")).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/ui/");
    let s: Value = client()
        .get(format!("{base}/ui/session"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s, json!({ "auth": true, "logged_in": false }));
}

#[tokio::test]
async fn a_login_trades_the_token_for_a_strict_cookie_that_needs_the_ui_header_to_change_anything()
{
    let base = start().await;
    let login = |token: &str| {
        client()
            .post(format!("{base}/ui/login"))
            .json(&json!({ "token": token }))
            .send()
    };
    let wrong = login("not-it").await.unwrap();
    assert!(wrong.headers().get("set-cookie").is_none());
    let p = problem(wrong, 401).await;
    assert!(p.detail.contains("not valid"), "{p:?}");

    let right = login(TOKEN).await.unwrap();
    assert_eq!(right.status(), 204);
    let set = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in [
        "fluidcloud_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(part), "{set}");
    }
    assert!(
        !set.contains(TOKEN) && !set.contains("Secure"),
        "plain HTTP here: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();

    // Reads work with the cookie alone.
    let sites = client()
        .get(format!("{base}/sites"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(sites.status(), 200);
    let s: Value = client()
        .get(format!("{base}/ui/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["logged_in"], true);

    // A change needs the dashboard's header besides the cookie, which a
    // form of another site cannot add.
    let body = json!({ "topology": topology(), "request": { "source": "paris" } });
    let forged = client()
        .post(format!("{base}/match"))
        .header("cookie", &cookie)
        .json(&body)
        .send()
        .await
        .unwrap();
    let p = problem(forged, 403).await;
    assert!(p.detail.contains("x-fluidcloud-ui"), "{p:?}");
    let from_ui = client()
        .post(format!("{base}/match"))
        .header("cookie", &cookie)
        .header("x-fluidcloud-ui", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(from_ui.status(), 200);

    // A cookie someone altered, or made up, is refused.
    let (name, value) = cookie.split_once('=').unwrap();
    let forged_expiry = format!("{name}=9{value}");
    for bad in [forged_expiry.as_str(), "fluidcloud_session=1.2.3"] {
        let r = client()
            .get(format!("{base}/sites"))
            .header("cookie", bad)
            .send()
            .await
            .unwrap();
        let p = problem(r, 401).await;
        assert!(p.detail.contains("log in again"), "{p:?}");
    }

    // Logging out clears the cookie.
    let out = client()
        .post(format!("{base}/ui/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert!(
        out.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn without_a_token_the_dashboard_needs_no_login_but_keeps_the_host_check() {
    let (base, port) = start_open().await;
    let r = client()
        .post(format!("{base}/ui/login"))
        .json(&json!({ "token": "anything" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("set-cookie").is_none());
    let s: Value = client()
        .get(format!("{base}/ui/session"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["auth"], false);
    // A page of a rebinding DNS name gets nothing, dashboard included.
    let r = client()
        .get(format!("{base}/ui/"))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
}

#[tokio::test]
async fn plan_answers_404_where_no_runner_plans() {
    let base = start().await;
    let r = client()
        .post(format!("{base}/plan"))
        .bearer_auth(TOKEN)
        .json(&json!({ "from": "paris" }))
        .send()
        .await
        .unwrap();
    let p = problem(r, 404).await;
    assert!(p.detail.contains("does not"), "{p:?}");
}
