//! The checkpoint manifest a restore receives, decoded from any bytes: decoding never panics and
//! re-encodes to the same message; a manifest that passes the restore's check yields a plan
//! that restores every entry, only at clean relative paths, each directory before what it holds.
#![no_main]

use std::{
    collections::HashSet,
    path::{Component, Path},
};

use heist_proto::v1::Manifest;
use heist_worker::fuzzing;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode(data) else {
        return;
    };
    let bytes = manifest.encode_to_vec();
    let again = Manifest::decode(bytes.as_slice()).expect("a re-encoded manifest decodes");
    assert_eq!(
        again, manifest,
        "decode → encode → decode changed the manifest"
    );
    assert_eq!(again.encode_to_vec(), bytes, "the encoding is not stable");

    if fuzzing::validate_manifest(&manifest).is_err() {
        return;
    }
    let (dirs, files, symlinks) = fuzzing::restore_plan(&manifest);
    assert_eq!(
        dirs.len() + files.len() + symlinks.len(),
        manifest.entries.len(),
        "a validated entry is missing from the restore plan"
    );
    for path in dirs.iter().chain(&files).chain(&symlinks) {
        assert!(
            Path::new(path)
                .components()
                .all(|c| matches!(c, Component::Normal(_))),
            "{path:?} would not stay beneath the staging directory"
        );
    }
    let mut made: HashSet<&str> = HashSet::new();
    let parent_made = |made: &HashSet<&str>, path: &str| {
        path.rsplit_once('/')
            .is_none_or(|(parent, _)| made.contains(parent))
    };
    for dir in &dirs {
        assert!(
            parent_made(&made, dir),
            "{dir:?} comes before its directory"
        );
        made.insert(dir);
    }
    for path in files.iter().chain(&symlinks) {
        assert!(
            parent_made(&made, path),
            "{path:?} is outside every directory made"
        );
    }
});
