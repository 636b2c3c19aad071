//! `fluidcloud match` on the demo environment, through the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;

fn matched(extra: &[&str]) -> Value {
    let cfg = demo_config();
    let mut args = vec![
        "--config",
        cfg.as_str(),
        "--json",
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&run(&args))).unwrap()
}

fn site_of<'a>(p: &'a Value, unit: &str) -> &'a str {
    p["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["unit"]["name"] == unit)
        .unwrap()["site"]
        .as_str()
        .unwrap()
}

fn alternative<'a>(p: &'a Value, unit: &str, site: &str) -> &'a Value {
    let a = p["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["unit"]["name"] == unit)
        .unwrap();
    a["alternatives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["site"] == site)
        .unwrap()
}

#[test]
fn every_unit_is_placed_with_every_other_site_explained() {
    let p = matched(&[]);
    assert_eq!(p["optimal"], true);
    let names: Vec<&str> = p["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["unit"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "db", "web", "shop-media"]);
    for a in p["assignments"].as_array().unwrap() {
        // Five sites: the source is not a candidate, the chosen one is not an alternative.
        assert_eq!(a["alternatives"].as_array().unwrap().len(), 3, "{a}");
        assert_ne!(a["site"], "dc-paris");
    }
    // The cheap, close EU region wins, and the bucket follows its readers.
    for u in ["app", "db", "web", "shop-media"] {
        assert_eq!(site_of(&p, u), "cloud-frankfurt", "{u}");
    }
    let db = p["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["unit"]["name"] == "db")
        .unwrap();
    assert_eq!(
        db["unit"]["peers"],
        serde_json::json!(["app", "shop-media"])
    );
    assert_eq!(
        db["chain"][0]["migrator"], "image-convert",
        "frankfurt takes vmdk or raw, not qcow2"
    );
    assert_eq!(db["chain"][0]["to"]["format"], "raw");
}

#[test]
fn constraints_move_units_and_are_named_in_the_explanations() {
    let p = matched(&["-c", "ban(*; cloud-frankfurt)", "-c", "jurisdiction(*; EU)"]);
    for u in ["app", "db", "web", "shop-media"] {
        assert!(
            site_of(&p, u).starts_with("edge-"),
            "{u} -> {}",
            site_of(&p, u)
        );
    }
    let fra = alternative(&p, "db", "cloud-frankfurt");
    assert_eq!(fra["verdict"], "rejected");
    assert_eq!(fra["constraint"], "ban(*; cloud-frankfurt)");
    let us = alternative(&p, "db", "cloud-virginia");
    assert_eq!(us["constraint"], "jurisdiction(*; EU)");
    assert!(
        us["reason"]
            .as_str()
            .unwrap()
            .contains("US/VA is outside EU"),
        "{us}"
    );

    let p = matched(&[
        "-c",
        "spread(web,db)",
        "-c",
        "fence(web,db; edge-rennes,edge-nantes)",
    ]);
    assert_ne!(site_of(&p, "web"), site_of(&p, "db"));

    // Users in Brittany and a high latency weight pull the service to the edge.
    let p = matched(&["--user", "48.11,-1.68", "--weights", "latency=20"]);
    assert_eq!(site_of(&p, "web"), "edge-rennes");
}

#[test]
fn text_output_reads_as_an_explanation() {
    let cfg = demo_config();
    let out = ok(&match_shop(&cfg, &["-c", "jurisdiction(*; EU)"]));
    assert!(
        out.starts_with("placement of shop from dc-paris (optimal, "),
        "{out}"
    );
    assert!(
        out.contains("instance db -> cloud-frankfurt   score "),
        "{out}"
    );
    assert!(
        out.contains("convert disk-image(qcow2) -> disk-image(raw) with image-convert"),
        "{out}"
    );
    assert!(
        out.contains("cloud-virginia   rejected by jurisdiction(*; EU): US/VA is outside EU"),
        "{out}"
    );
    assert!(out.contains(", mainly cost"), "{out}");
}

#[test]
fn unsatisfiable_constraints_name_the_conflict() {
    let cfg = demo_config();
    let out = match_shop(
        &cfg,
        &[
            "-c",
            "fence(db; edge-rennes)",
            "-c",
            "jurisdiction(*; EU/DE)",
            "-c",
            "ban(web; cloud-virginia)",
        ],
    );
    let err = fails(&out, 9);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("these conflict: fence(db; edge-rennes), jurisdiction(*; EU/DE)"),
        "{err}"
    );
    assert!(
        !err.contains("ban(web"),
        "the ban is satisfiable and not part of the conflict: {err}"
    );
}

#[test]
fn bad_constraints_and_options_are_reported_clearly() {
    let cfg = demo_config();
    let base = [
        "--config",
        cfg.as_str(),
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run(&a)
    };
    let err = fails(&with(&["-c", "ban(db)"]), 3);
    assert!(err.contains("constraint `ban(db)`: ban takes 2"), "{err}");
    let err = fails(&with(&["-c", "ban(dbb; edge-rennes)"]), 3);
    assert!(
        err.contains("`dbb`") && err.contains("known: app, db, shop-media, web"),
        "{err}"
    );
    let err = fails(&with(&["-c", "fence(db; atlantis)"]), 3);
    assert!(err.contains("unknown site `atlantis`"), "{err}");
    let err = fails(&with(&["--user", "95,2"]), 2);
    assert!(err.contains("latitude must be within"), "{err}");
    let err = fails(&with(&["--weights", "speed=2"]), 2);
    assert!(err.contains("unknown objective `speed`"), "{err}");
    let err = fails(
        &run(&[
            "--config",
            &cfg,
            "match",
            "--from",
            "nowhere",
            "--service",
            "shop",
        ]),
        4,
    );
    assert!(err.contains("unknown site `nowhere`"), "{err}");
}

#[test]
fn a_measured_rtt_replaces_the_estimate_and_is_named_measured() {
    let estimated = matched(&[]);
    assert_eq!(site_of(&estimated, "web"), "cloud-frankfurt");
    let p = matched(&["--rtt", "cloud-frankfurt=400"]);
    assert_ne!(site_of(&p, "web"), "cloud-frankfurt", "{p:#}");
    let fra = alternative(&p, "web", "cloud-frankfurt");
    assert_eq!(fra["score"]["latency_ms"], 400.0, "{fra:#}");
    assert_eq!(fra["score"]["latency_measured"], true, "{fra:#}");
    assert_eq!(fra["mainly"], "latency (measured)", "{fra:#}");

    let cfg = demo_config();
    let text = ok(&match_shop(&cfg, &["--rtt", "cloud-frankfurt=0.5"]));
    assert!(text.contains("0.5 ms to users (measured)"), "{text}");
    let err = fails(&match_shop(&cfg, &["--rtt", "atlantis=3"]), 3);
    assert!(err.contains("atlantis"), "{err}");
    let err = fails(&match_shop(&cfg, &["--rtt", "edge-nantes=fast"]), 2);
    assert!(
        err.contains("SITE=MS") || err.contains("milliseconds"),
        "{err}"
    );
}

#[test]
fn measure_rtt_times_tcp_connects_to_site_endpoints() {
    // Frankfurt's endpoint answers on loopback; Rennes' refuses.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(demo_config()).unwrap();
    let text = text
        .replace(
            "[sites.cloud-frankfurt]\nkind = \"local\"\n",
            &format!("[sites.cloud-frankfurt]\nkind = \"local\"\nendpoint = \"http://127.0.0.1:{port}/api\"\n"),
        )
        .replace(
            "[sites.edge-rennes]\nkind = \"local\"\n",
            &format!("[sites.edge-rennes]\nkind = \"local\"\nendpoint = \"127.0.0.1:{closed}\"\n"),
        );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("endpoint = "))
            .count(),
        2,
        "{text}"
    );
    let cfg = demo().join("fluidcloud-rtt.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
        "--measure-rtt",
    ]);
    let p: Value = serde_json::from_str(&ok(&out)).unwrap();
    let web = p["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["unit"]["name"] == "web")
        .unwrap();
    assert_eq!(web["site"], "cloud-frankfurt");
    assert_eq!(web["score"]["latency_measured"], true, "{web:#}");
    let ms = web["score"]["latency_ms"].as_f64().unwrap();
    assert!(
        ms < 8.0,
        "a loopback connect took {ms} ms (the estimate is 8.2)"
    );
    let rennes = alternative(&p, "web", "edge-rennes");
    assert!(
        rennes["score"].get("latency_measured").is_none(),
        "{rennes:#}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("edge-rennes") && err.contains("estimated"),
        "{err}"
    );
    drop(listener);
}

/// `--config CFG match --from dc-paris --service shop EXTRA...`.
fn match_shop(cfg: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--config",
        cfg,
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ];
    args.extend_from_slice(extra);
    run(&args)
}
