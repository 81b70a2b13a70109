//! Fuzzes the manifest parser end to end: text → YAML/JSON documents → typed, validated objects
//! (`load_str`), and, when that succeeds, the whole bundle → compiled policies and a resolved
//! engine (`cluster::load`). Errors are expected; panics, aborts and hangs are bugs.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bundle) = palisade_policy_api::load_str("fuzz.yaml", text) {
        let _ = palisade_policy::cluster::load(&bundle, palisade_policy::Config::default());
    }
});
