//! Every committed corpus file through its target: the seeds, and the
//! inputs that once crashed a parser, keep passing in the ordinary test
//! suite (the fuzzer itself runs in `scripts/fuzz`).

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    // A corpus directory no target reads would be skipped silently.
    for dir in std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
        let dir = dir.unwrap_or_else(|e| panic!("{}: {e}", root.display()));
        let name = dir.file_name();
        let name = name.to_string_lossy();
        assert!(
            fluidcloud_fuzz::TARGETS.iter().any(|(t, _)| *t == name),
            "{}: no fuzz target of that name",
            dir.path().display()
        );
    }
    for (name, target) in fluidcloud_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        files.sort();
        assert!(!files.is_empty(), "{}: no seeds", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let parsed = target(&data);
            // Seeds must parse, or they teach the fuzzer nothing; inputs
            // kept from crashes, and seeds of what is refused on purpose
            // (named so), need not.
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let seed = !["malformed", "refused-", "crash-"]
                .iter()
                .any(|p| name.starts_with(p));
            assert!(parsed || !seed, "{}: does not parse", f.display());
        }
    }
    fluidcloud_fuzz::remove_workdir();
}
