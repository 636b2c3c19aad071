//! Relocating a running service safely: one relocation per service, never
//! adopt or delete what another relocation made, rollback and demo that
//! ask before discarding (docs/relocate.md, "Ownership").
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{fails, instance_state, ok, relocate_shop, relocation_id, run, tree_digest};

fn forced<'a>(config: &'a str, from: &'a str, to: &'a str) -> Vec<&'a str> {
    let mut v = relocate_shop(config, from, to);
    v.push("--force");
    v
}

#[test]
fn a_second_relocation_is_refused_then_forced_elsewhere_and_its_rollback_leaves_the_first_target_and_stopped_source_alone()
 {
    let (dir, config) = common::fresh_demo("again");
    let first = ok(&run(&relocate_shop(&config, "dc-paris", "edge-rennes")));
    let first_id = relocation_id(&first);
    let rennes = dir.join("sites/edge-rennes");
    let before = tree_digest(&rennes);
    assert_eq!(instance_state(&dir, "dc-paris", "web"), "stopped");

    // Again: the source is stopped by a finished relocation.
    let err = fails(&run(&relocate_shop(&config, "dc-paris", "edge-rennes")), 7);
    assert!(
        err.contains(&format!(
            "relocation {first_id} already moved shop from dc-paris to edge-rennes"
        )) && err.contains("--force"),
        "{err}"
    );
    // Forced onto the same target: the first relocation's disks are not
    // adopted; nothing is written.
    let err = fails(&run(&forced(&config, "dc-paris", "edge-rennes")), 7);
    assert!(
        err.contains("site edge-rennes already holds")
            && err.contains(&format!("created by `{first_id}/")),
        "{err}"
    );
    assert_eq!(tree_digest(&rennes), before);

    // Forced elsewhere, then rolled back: only its own target goes, the
    // first relocation's target is intact, and the source it did not stop
    // is not started (that would make two live copies).
    let second = ok(&run(&forced(&config, "dc-paris", "edge-nantes")));
    let second_id = relocation_id(&second);
    assert_eq!(instance_state(&dir, "edge-nantes", "web"), "running");
    let err = fails(&run(&["--config", &config, "rollback", &second_id]), 7);
    assert!(
        err.contains("succeeded") && err.contains("discards") && err.contains("--force"),
        "{err}"
    );
    ok(&run(&[
        "--config", &config, "rollback", &second_id, "--force",
    ]));
    assert!(
        !dir.join("sites/edge-nantes/instances/web.toml").exists(),
        "the second relocation's target instance is still defined"
    );
    assert_eq!(tree_digest(&rennes), before, "the first target was touched");
    for i in ["web", "app", "db"] {
        assert_eq!(instance_state(&dir, "dc-paris", i), "stopped", "{i}");
        assert_eq!(instance_state(&dir, "edge-rennes", i), "running", "{i}");
    }
}

#[test]
fn two_concurrent_relocations_of_one_service_run_exactly_once() {
    let (dir, config) = common::fresh_demo("concurrent");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
            .args(relocate_shop(&config, "dc-paris", "edge-rennes"))
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .env_remove("FLUIDCLOUD_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    let lost: Vec<_> = outs.iter().filter(|o| !o.status.success()).collect();
    assert_eq!(won.len(), 1, "{outs:?}");
    let err = common::stderr(lost[0]);
    assert_eq!(lost[0].status.code(), Some(7), "{err}");
    assert!(
        err.contains("is being relocated by")
            || err.contains("is running already")
            || err.contains("already moved shop"),
        "{err}"
    );
    let records = std::fs::read_dir(dir.join(".fluidcloud/relocations"))
        .unwrap()
        .count();
    assert_eq!(records, 1, "exactly one relocation was recorded");
}

#[test]
fn demo_refuses_a_directory_holding_a_sites_file_no_demo_made_and_removes_nothing() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("fluidcloud.toml"),
        "[sites.prod]\nkind = \"local\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("sites/prod/images")).unwrap();
    std::fs::write(d.join("sites/prod/images/db.raw"), b"production data").unwrap();
    std::fs::create_dir_all(d.join(".fluidcloud/relocations")).unwrap();
    let before = tree_digest(d);
    for args in [
        vec!["demo", "--dir", d.to_str().unwrap()],
        vec!["demo", "init", d.to_str().unwrap(), "--force"],
    ] {
        let err = fails(&run(&args), 7);
        assert!(
            err.contains("no demo made") && err.contains(".fluidcloud-demo"),
            "{err}"
        );
        assert_eq!(tree_digest(d), before, "{args:?} changed something");
    }
}

#[test]
fn relocation_ids_and_service_names_never_name_paths() {
    let (_, config) = common::fresh_demo("names");
    for id in ["../../etc", "a/b", ".hidden"] {
        let err = fails(&run(&["--config", &config, "report", id]), 7);
        assert!(err.contains("not a valid name"), "{id}: {err}");
    }
    let err = fails(
        &run(&[
            "--config",
            &config,
            "relocate",
            "--from",
            "dc-paris",
            "--service",
            "../shop",
            "--to",
            "edge-rennes",
            "--yes",
        ]),
        3,
    );
    assert!(
        err.contains("`../shop` is not a valid service name"),
        "{err}"
    );
}
