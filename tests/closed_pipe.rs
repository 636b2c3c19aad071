//! Output into a pipe whose reader stopped early (`fluidcloud ... | head`):
//! the command ends quietly, exit 0, as ripgrep does — no panic, no
//! "Broken pipe" on stderr.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};

use common::demo_config;

/// Runs the binary with stdout a pipe whose read end is already closed, so
/// its first write fails with EPIPE whatever the timing.
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("FLUIDCLOUD_SERVER")
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet(args: &[&str], out: &std::process::Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.to_lowercase().contains("broken pipe"),
        "{args:?}: {err}"
    );
    assert_eq!(err, "", "{args:?}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let config = demo_config();
    for args in [
        vec!["sites", "kinds"],
        vec!["--json", "sites", "kinds"],
        vec!["--config", &config, "sites", "list"],
        vec!["--config", &config, "--json", "sites", "list"],
        vec!["--config", &config, "status"],
        vec!["--config", &config, "--json", "status"],
        vec![
            "--config",
            &config,
            "introspect",
            "dc-paris",
            "--format",
            "dot",
        ],
    ] {
        assert_quiet(&args, &into_closed_pipe(&args));
    }
}

// What a person types: the reader takes one line and goes.
#[test]
fn a_reader_that_stops_early_leaves_no_trace() {
    let script = format!(
        "set -o pipefail; for i in 1 2 3 4 5; do {} --json sites kinds | head -n 1 >/dev/null || exit $?; done",
        env!("CARGO_BIN_EXE_fluidcloud")
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env_remove("FLUIDCLOUD_CONFIG")
        .output()
        .unwrap();
    assert_quiet(&["--json", "sites", "kinds"], &out);
}
