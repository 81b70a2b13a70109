//! Replays every seed of the `cargo fuzz` manifest target (fuzz/corpus/manifest) through the
//! same path the fuzz target exercises: `load_str`, then `cluster::load` when loading succeeds.
//! Errors are fine; a panic is a bug. Runs on stable, without libFuzzer.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use palisade_policy::{cluster, Config};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/manifest")
}

/// What the fuzz target does with one input.
fn replay(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bundle) = palisade_policy_api::load_str("fuzz.yaml", text) {
        let _ = cluster::load(&bundle, Config::default());
    }
}

#[test]
fn fuzz_corpus_never_panics() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 50,
        "expected the committed seeds in {}, found {} files",
        dir.display(),
        files.len()
    );

    let mut panicked = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("readable seed");
        if panic::catch_unwind(AssertUnwindSafe(|| replay(&data))).is_err() {
            panicked.push(file.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{} of {} seeds panicked:\n  {}",
        panicked.len(),
        files.len(),
        panicked.join("\n  ")
    );
}
