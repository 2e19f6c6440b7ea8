//! Replays every committed fuzz input (crashes found and fixed, plus a small minimized corpus)
//! through the same target functions the fuzzer ran, on the stable toolchain: `cargo test`
//! (and so `make test`) keeps every finding fixed. See SECURITY.md, "Fuzzing".

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

/// Runs `target` on every file in `fuzz/regressions/<name>/`; fails naming the input that panics.
fn replay(name: &str, target: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    // An empty directory would make this test pass without checking anything.
    assert!(!files.is_empty(), "no regression inputs in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            panic!("fuzz regression input {} fails", f.display());
        }
    }
}

#[test]
fn envelope_inputs() {
    replay("envelope", targets::envelope);
}

#[test]
fn canonical_inputs() {
    replay("canonical", targets::canonical);
}

#[test]
fn http_response_inputs() {
    replay("http_response", targets::http_response);
}

#[test]
fn store_recovery_inputs() {
    replay("store_recovery", targets::store_recovery);
}

#[test]
fn config_inputs() {
    replay("config", targets::config);
}
