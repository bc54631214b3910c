use std::time::{Duration, SystemTime};

use heist_proto::v1::ManifestEntry;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    cas: Arc<Cas>,
    table: Arc<Checkpoints>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let cas = Arc::new(Cas::open(&dir.path().join("blobs")).expect("cas"));
    let table = Checkpoints::load(&store, cas.clone()).expect("load");
    Fixture {
        _dir: dir,
        store,
        cas,
        table,
    }
}

fn put_blob(cas: &Cas, data: &[u8]) -> Hash {
    let hash = *blake3::hash(data).as_bytes();
    let mut w = cas.writer(hash, data.len() as u64).expect("writer");
    w.write(0, data).expect("io").expect("ok");
    w.finish().expect("io").expect("ok");
    hash
}

fn manifest(cas: &Cas, files: &[&str]) -> Manifest {
    Manifest {
        entries: files
            .iter()
            .map(|content| ManifestEntry {
                path: format!("{content}.txt"),
                kind: EntryKind::File as i32,
                mode: 0o644,
                size: content.len() as u64,
                hash: put_blob(cas, content.as_bytes()).to_vec(),
                symlink_target: String::new(),
            })
            .collect(),
        ..Manifest::default()
    }
}

fn sid(raw: &str) -> SessionId {
    SessionId::parse(raw).expect("id")
}

fn commit_at(f: &Fixture, session: &str, files: &[&str], at: SystemTime) -> CheckpointId {
    let id = CheckpointId::generate();
    let record = Checkpoint {
        id: id.to_string(),
        session_id: session.to_owned(),
        owner: "alice".to_owned(),
        worker_id: "w1".to_owned(),
        created_at: Some(at.into()),
        manifest: Some(manifest(&f.cas, files)),
        ..Checkpoint::default()
    };
    f.table.commit(&sid(session), record).expect("commit");
    id
}

fn commit(f: &Fixture, session: &str, files: &[&str]) -> CheckpointId {
    commit_at(f, session, files, SystemTime::now())
}

fn parent(f: &Fixture, id: &CheckpointId) -> String {
    f.table.get(id).expect("exists").parent_id
}

fn blob(data: &str) -> Hash {
    *blake3::hash(data.as_bytes()).as_bytes()
}

#[test]
fn commits_chain_through_the_session_head_and_count_references() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["one", "shared"]);
    let c2 = commit(&f, "s-a", &["two", "shared"]);
    assert_eq!(parent(&f, &c1), "");
    assert_eq!(parent(&f, &c2), c1.as_str());
    assert_eq!(f.table.head(&sid("s-a")), Some(c2.clone()));

    // A fork's first checkpoint descends from the checkpoint it came from.
    f.table.set_head(&sid("s-b"), &c1).expect("head");
    let b1 = commit(&f, "s-b", &["bee"]);
    assert_eq!(parent(&f, &b1), c1.as_str());

    let full = f.table.get_full(&c2).expect("read").expect("exists");
    assert_eq!(full.manifest.expect("manifest").entries.len(), 2);
    let (page, next) = f.table.list("alice", Some(&sid("s-a")), None, 10);
    assert_eq!(
        page.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [c2.as_str(), c1.as_str()]
    );
    assert!(next.is_none());
    assert!(page.iter().all(|c| c.manifest.is_none()));
    assert!(f.table.list("bob", None, None, 10).0.is_empty());
}

#[test]
fn delete_refuses_parents_and_frees_only_unshared_blobs() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["one", "shared"]);
    let c2 = commit(&f, "s-a", &["two", "shared"]);
    let err = f.table.delete("alice", &c1).expect_err("has a child");
    assert!(matches!(
        err,
        Error::CheckpointHasChildren { children: 1, .. }
    ));
    assert!(matches!(
        f.table.delete("bob", &c2),
        Err(Error::CheckpointNotFound(_))
    ));

    let freed = f.table.delete("alice", &c2).expect("leaf");
    assert_eq!(
        (freed.blobs, freed.bytes),
        (1, 3),
        "only `two` was unshared"
    );
    assert!(!f.cas.contains(&blob("two")));
    assert!(f.cas.contains(&blob("shared")));
    // The session descends from the deleted checkpoint's parent now.
    assert_eq!(f.table.head(&sid("s-a")), Some(c1.clone()));
    let c3 = commit(&f, "s-a", &["three"]);
    assert_eq!(parent(&f, &c3), c1.as_str());
}

#[test]
fn the_agent_state_blob_is_referenced_like_a_file() {
    let f = fixture();
    let state = br#"{"conversations":{}}"#;
    let mut with_state = manifest(&f.cas, &["file"]);
    with_state.agent_state_hash = put_blob(&f.cas, state).to_vec();
    with_state.agent_state_size = state.len() as u64;
    let id = CheckpointId::generate();
    let record = Checkpoint {
        id: id.to_string(),
        session_id: "s-a".to_owned(),
        owner: "alice".to_owned(),
        manifest: Some(with_state),
        ..Checkpoint::default()
    };
    f.table.commit(&sid("s-a"), record).expect("commit");
    let state_hash = *blake3::hash(state).as_bytes();
    assert_eq!(
        f.table.sweep_unreferenced(Duration::ZERO).expect("sweep"),
        0,
        "a checkpoint's agent state is not garbage"
    );
    assert!(f.cas.contains(&state_hash));
    let freed = f.table.delete("alice", &id).expect("delete");
    assert_eq!(freed.blobs, 2, "the file and the agent state");
    assert!(!f.cas.contains(&state_hash));
}

#[test]
fn pinned_blobs_outlive_their_last_reference_until_unpinned() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["solo"]);
    let pin = f.table.pin();
    f.table.delete("alice", &c1).expect("delete");
    assert!(f.cas.contains(&blob("solo")), "a capture may rely on it");
    drop(pin);
    assert!(!f.cas.contains(&blob("solo")));
}

#[test]
fn retention_splices_old_checkpoints_but_keeps_fork_points_and_heads() {
    let f = fixture();
    let limits = Retention {
        max_per_session: 3,
        max_age: Duration::ZERO,
    };
    let c1 = commit(&f, "s-a", &["c1"]);
    let c2 = commit(&f, "s-a", &["c2"]);
    f.table.set_head(&sid("s-fork"), &c1).expect("head");
    let n1 = commit(&f, "s-fork", &["n1"]);
    let c3 = commit(&f, "s-a", &["c3"]);
    let c4 = commit(&f, "s-a", &["c4"]);
    let c5 = commit(&f, "s-a", &["c5"]);
    let freed = f
        .table
        .retain(&sid("s-a"), limits, SystemTime::now())
        .expect("retain");
    assert_eq!(freed.checkpoints, 1, "c1 is a fork point; only c2 goes");
    assert!(f.table.get(&c2).is_none());
    assert!(!f.cas.contains(&blob("c2")));
    assert_eq!(parent(&f, &c3), c1.as_str(), "c3 now descends from c1");
    assert_eq!(parent(&f, &n1), c1.as_str());
    for id in [&c1, &c3, &c4, &c5] {
        assert!(f.table.get(id).is_some());
    }
    // The chain of every retained checkpoint is complete.
    let mut cursor = c5.to_string();
    let mut walked = 0;
    while !cursor.is_empty() {
        let id = CheckpointId::parse(cursor.as_str()).expect("id");
        cursor = f.table.get(&id).expect("ancestor exists").parent_id;
        walked += 1;
    }
    assert_eq!(walked, 4);

    // Age: everything but the newest is too old, except heads and fork points.
    let old = SystemTime::now() - Duration::from_secs(7200);
    let d1 = commit_at(&f, "s-d", &["d1"], old);
    let d2 = commit_at(&f, "s-d", &["d2"], old);
    let d3 = commit_at(&f, "s-d", &["d3"], old);
    let aged = Retention {
        max_per_session: 0,
        max_age: Duration::from_secs(3600),
    };
    f.table
        .retain(&sid("s-d"), aged, SystemTime::now())
        .expect("retain");
    assert!(f.table.get(&d1).is_none() && f.table.get(&d2).is_none());
    assert!(f.table.get(&d3).is_some(), "the newest is never aged out");
}

#[test]
fn reload_recomputes_references_and_removes_orphans() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["kept"]);
    let orphan = put_blob(&f.cas, b"never committed");
    let store = f.store.clone();
    let cas = f.cas.clone();
    drop(f.table);
    let table = Checkpoints::load(&store, cas.clone()).expect("reload");
    assert!(!cas.contains(&orphan));
    assert!(cas.contains(&blob("kept")));
    assert_eq!(table.head(&sid("s-a")), Some(c1.clone()));
    assert!(table.holders(&c1).contains("w1"));
    let freed = table.delete("alice", &c1).expect("delete");
    assert_eq!(freed.blobs, 1, "the reference count survived the reload");

    // A young orphan survives the periodic sweep's grace; an old one does not.
    let young = put_blob(&cas, b"young");
    assert_eq!(
        table
            .sweep_unreferenced(Duration::from_secs(600))
            .expect("sweep"),
        0
    );
    assert!(cas.contains(&young));
    assert_eq!(table.sweep_unreferenced(Duration::ZERO).expect("sweep"), 1);
    assert!(!cas.contains(&young));
}

#[test]
fn page_tokens_round_trip() {
    let id = CheckpointId::generate();
    assert_eq!(decode_page_token(&encode_page_token(&id)), Some(id));
    assert_eq!(decode_page_token("zz"), None);
}

fn entry(f: &Fixture, path: &str, content: &str) -> ManifestEntry {
    ManifestEntry {
        path: path.to_owned(),
        kind: EntryKind::File as i32,
        mode: 0o644,
        size: content.len() as u64,
        hash: put_blob(&f.cas, content.as_bytes()).to_vec(),
        symlink_target: String::new(),
    }
}

/// Commits a checkpoint of `session` stored as a delta against `base`.
fn commit_delta(
    f: &Fixture,
    session: &str,
    base: &CheckpointId,
    changed: &[(&str, &str)],
    removed: &[&str],
) -> Result<CheckpointId, Error> {
    let id = CheckpointId::generate();
    let record = Checkpoint {
        id: id.to_string(),
        session_id: session.to_owned(),
        owner: "alice".to_owned(),
        created_at: Some(SystemTime::now().into()),
        manifest: Some(Manifest {
            entries: changed.iter().map(|(p, c)| entry(f, p, c)).collect(),
            ..Manifest::default()
        }),
        delta: Some(ManifestDelta {
            base_id: base.to_string(),
            removed_paths: removed.iter().map(|p| (*p).to_owned()).collect(),
            depth: 0,
        }),
        ..Checkpoint::default()
    };
    f.table.commit(&sid(session), record)?;
    Ok(id)
}

/// A checkpoint's whole tree as (path, content hash).
fn tree_of(table: &Checkpoints, id: &CheckpointId) -> Vec<(String, Hash)> {
    let full = table.get_full(id).expect("read").expect("exists");
    assert!(full.delta.is_none(), "a read tree is whole");
    full.manifest
        .expect("manifest")
        .entries
        .into_iter()
        .map(|e| (e.path, hash_from_bytes(&e.hash).expect("hash")))
        .collect()
}

fn expect(files: &[(&str, &str)]) -> Vec<(String, Hash)> {
    files
        .iter()
        .map(|(p, c)| ((*p).to_owned(), blob(c)))
        .collect()
}

#[test]
fn deltas_read_back_whole_and_survive_retention_of_their_parents_and_a_reload() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["one", "two", "three"]);
    assert_eq!(f.table.delta_base(&sid("s-a"), 32), Some(c1.clone()));
    let c2 = commit_delta(
        &f,
        "s-a",
        &c1,
        &[("one.txt", "uno"), ("four.txt", "four")],
        &["three.txt"],
    )
    .expect("commit c2");
    let c3 = commit_delta(&f, "s-a", &c2, &[("two.txt", "dos")], &["four.txt"]).expect("c3");
    assert_eq!(parent(&f, &c3), c2.as_str());
    assert_eq!(
        tree_of(&f.table, &c2),
        expect(&[("four.txt", "four"), ("one.txt", "uno"), ("two.txt", "two")])
    );
    let c3_tree = expect(&[("one.txt", "uno"), ("two.txt", "dos")]);
    assert_eq!(tree_of(&f.table, &c3), c3_tree);
    // The chain bound: c3 is two deltas deep.
    assert_eq!(f.table.delta_base(&sid("s-a"), 3), Some(c3.clone()));
    assert_eq!(f.table.delta_base(&sid("s-a"), 2), None);
    assert_eq!(f.table.delta_base(&sid("s-a"), 0), None);

    // Retention removes c1 and c2 (whole, then a delta): c3 keeps its tree, and blobs only
    // the removed checkpoints' trees held are freed.
    let limits = Retention {
        max_per_session: 1,
        max_age: Duration::ZERO,
    };
    let freed = f
        .table
        .retain(&sid("s-a"), limits, SystemTime::now())
        .expect("retain");
    assert_eq!(freed.checkpoints, 2);
    assert_eq!(parent(&f, &c3), "");
    assert_eq!(tree_of(&f.table, &c3), c3_tree);
    for gone in ["one", "two", "three", "four"] {
        assert!(!f.cas.contains(&blob(gone)), "{gone} is garbage");
    }
    for kept in ["uno", "dos"] {
        assert!(f.cas.contains(&blob(kept)), "{kept} is still needed");
    }

    // A restart rebuilds references from the stored records: nothing c3 needs is an orphan.
    let table = Checkpoints::load(&f.store, f.cas.clone()).expect("reload");
    assert_eq!(tree_of(&table, &c3), c3_tree);
    assert!(f.cas.contains(&blob("uno")));
}

#[test]
fn retention_composes_deltas_around_a_kept_checkpoint() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["one", "two"]);
    let c2 = commit_delta(&f, "s-a", &c1, &[("one.txt", "uno")], &[]).expect("c2");
    let c3 = commit_delta(&f, "s-a", &c2, &[("new.txt", "new")], &["two.txt"]).expect("c3");
    let c4 = commit_delta(&f, "s-a", &c3, &[("two.txt", "back")], &["new.txt"]).expect("c4");
    let c4_tree = expect(&[("one.txt", "uno"), ("two.txt", "back")]);
    assert_eq!(tree_of(&f.table, &c4), c4_tree);
    // c1 is another session's head (a fork source): retention keeps it and removes c2, c3.
    f.table.set_head(&sid("s-b"), &c1).expect("head");
    let limits = Retention {
        max_per_session: 1,
        max_age: Duration::ZERO,
    };
    let freed = f
        .table
        .retain(&sid("s-a"), limits, SystemTime::now())
        .expect("retain");
    assert_eq!(freed.checkpoints, 2);
    assert_eq!(parent(&f, &c4), c1.as_str());
    assert_eq!(tree_of(&f.table, &c4), c4_tree);
    assert_eq!(
        tree_of(&f.table, &c1),
        expect(&[("one.txt", "one"), ("two.txt", "two")])
    );
    assert!(
        !f.cas.contains(&blob("new")),
        "only the removed c3 named it"
    );
    assert!(f.cas.contains(&blob("uno")), "c4 took it over from c2");
    // c4 is still a delta, now one link deep.
    assert_eq!(f.table.delta_base(&sid("s-a"), 2), Some(c4.clone()));
    let table = Checkpoints::load(&f.store, f.cas.clone()).expect("reload");
    assert_eq!(tree_of(&table, &c4), c4_tree);
}

#[test]
fn a_delta_against_a_removed_checkpoint_is_refused_and_commits_nothing() {
    let f = fixture();
    let c1 = commit(&f, "s-a", &["one"]);
    let c2 = commit(&f, "s-a", &["two"]);
    f.table.delete("alice", &c2).expect("delete the leaf");
    let err = commit_delta(&f, "s-a", &c2, &[("x.txt", "x")], &[]).expect_err("base gone");
    assert!(matches!(err, Error::DeltaBaseGone { .. }), "{err}");
    assert_eq!(f.table.head(&sid("s-a")), Some(c1));
    assert_eq!(f.table.list("alice", None, None, 10).0.len(), 1);
}
