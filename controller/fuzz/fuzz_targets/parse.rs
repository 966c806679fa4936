//! Feeds arbitrary bytes to the changeset language: parse, validate and,
//! when that succeeds, render against a small fleet. Any panic is a bug;
//! errors are the expected outcome for almost every input.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use modi_controller::changeset::{Sources, render, validate};
use modi_controller::spec::HostInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sources = Sources::single("fuzz.yaml", text);
    let cli = BTreeMap::new();
    let Ok(changeset) = validate(&sources, &cli, &Default::default()) else {
        return;
    };
    let fleet = [
        HostInfo {
            name: "web-1".into(),
            labels: BTreeMap::from([("role".into(), "web".into())]),
            facts: BTreeMap::new(),
        },
        HostInfo {
            name: "db-1".into(),
            labels: BTreeMap::from([("role".into(), "db".into())]),
            facts: BTreeMap::new(),
        },
    ];
    let _ = render(&changeset, &fleet, &Default::default(), &cli);
});
