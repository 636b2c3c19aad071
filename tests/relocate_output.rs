//! What a person sees: the plan, the progress lines, the report, compared
//! whole with the files in `tests/golden/`, after filtering what changes
//! from run to run (times, rates, ids, the temporary directory).
//!
//! After an intended change of the output, regenerate them with
//! `UPDATE_GOLDEN=1 cargo test --test relocate_output` and review the diff.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{fresh_demo, ok, relocation_id, run, stderr};
use regex::Regex;

/// Replaces what varies between runs by placeholders.
fn normalize(text: &str, dir: &Path) -> String {
    let mut t = text.to_owned();
    let canonical = dir.canonicalize().unwrap();
    for d in [canonical.as_path(), dir] {
        t = t.replace(&d.display().to_string(), "<DIR>");
    }
    let rules = [
        (r"shop-\d{8}-\d{6}", "<ID>"),
        (r"wf-[0-9a-f]{16}", "<WF>"),
        (r"\d+(\.\d+)? ?[KMGT]?i?B/s", "<RATE>"),
        (r"~?\d+(\.\d+)? ?s\b", "<T>"),
        // Column widths follow the widest time or rate: align on nothing.
        (r" {2,}", "  "),
        (r"(?m) +$", ""),
    ];
    for (pattern, with) in rules {
        t = Regex::new(pattern)
            .unwrap()
            .replace_all(&t, with)
            .into_owned();
    }
    t
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares `actual` with the golden file `name` (or rewrites it when
/// `UPDATE_GOLDEN` is set).
fn check(name: &str, actual: &str) {
    let path = golden(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (UPDATE_GOLDEN=1 creates it)\nactual:\n{actual}",
            path.display()
        )
    });
    if expected != actual {
        let got = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&got, actual).unwrap();
        let (n, (e, a)) = expected
            .lines()
            .chain(std::iter::repeat("<end>"))
            .zip(actual.lines().chain(std::iter::repeat("<end>")))
            .enumerate()
            .find(|(_, (e, a))| e != a)
            .unwrap();
        panic!(
            "{name} differs from {} at line {}:\n  expected: {e}\n  actual:   {a}\n(whole output in {}; `diff` them, or UPDATE_GOLDEN=1 if the change is intended)",
            path.display(),
            n + 1,
            got.display()
        );
    }
}

#[test]
fn plan_progress_and_report_read_as_the_golden_files_say() {
    let (dir, config) = fresh_demo("golden");
    let args = ["--config", &config];
    let relocate = ["--from", "dc-paris", "--service", "shop"];

    let plan = ok(&run(&[&args[..], &["plan"], &relocate[..]].concat()));
    check("plan.txt", &normalize(&plan, &dir));

    let out = run(&[&args[..], &["relocate", "--yes"], &relocate[..]].concat());
    let stdout = ok(&out);
    check("relocate.stdout.txt", &normalize(&stdout, &dir));
    // Progress lines arrive in the order the steps finish, which varies
    // with the machine: compare them sorted.
    let mut progress: Vec<String> = normalize(&stderr(&out), &dir)
        .lines()
        .map(str::to_owned)
        .collect();
    progress.sort();
    check("relocate.stderr.txt", &(progress.join("\n") + "\n"));

    let id = relocation_id(&stdout);
    let report = ok(&run(&[&args[..], &["report", &id]].concat()));
    check("report.txt", &normalize(&report, &dir));
    let status = ok(&run(&[&args[..], &["status"]].concat()));
    check("status.txt", &normalize(&status, &dir));
    let one = ok(&run(&[&args[..], &["status", &id]].concat()));
    check("status-id.txt", &normalize(&one, &dir));

    let rollback = ok(&run(&[&args[..], &["rollback", &id, "--force"]].concat()));
    check("rollback.txt", &normalize(&rollback, &dir));
}

#[test]
fn normalizing_keeps_what_does_not_vary() {
    let dir = Path::new("/nonexistent-but-absolute");
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let t = format!(
        "relocation shop-20261122-115256: 2.7s total, downtime 0.17 s, 640 MiB written\n\
         image  succeeded  0.05 s  32.4 MiB  655 MiB/s\nport 5432 at {}/x\n",
        d.display()
    );
    let n = normalize(&t, &d);
    assert_eq!(
        n,
        "relocation <ID>: <T> total, downtime <T>, 640 MiB written\n\
         image  succeeded  <T>  32.4 MiB  <RATE>\nport 5432 at <DIR>/x\n"
    );
    assert!(!dir.exists());
}
