//! The sled store's tests: the index kept in step with sled, group commit, sealing at rest, reopening.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::push::ProviderKind;
use crate::store::conformance::{self, Opened};
use crate::store::KnockToken;

/// Import into the store at `path`, as `knock import` does (a store in the clear allowed).
fn import_into(path: &Path, key: Option<StoreKey>, file: &Path) -> Result<usize, BackupError> {
    SledStore::import(
        &StoreOptions {
            postgres: None,
            path: path.to_path_buf(),
            key,
            plaintext_tokens: true,
        },
        file,
    )
}

/// A token from its hex spelling, as the tests write tokens.
fn tok(hex: &str) -> Token {
    Token::from_bytes(hex::decode(hex).expect("test tokens are hex"))
}

fn reg(node: &str, device: u8, token: &str) -> Registration {
    Registration {
        node: node.into(),
        device: [device; 32],
        owner: [device; 32],
        domain: "example.org".into(),
        app: "chat".into(),
        provider: ProviderKind::Apns,
        token: tok(token),
        secret_hash: Some([1; 32]),
        call_token: None,
        account: None,
    }
}

/// What sled itself says a publish to `node` would find.
fn from_sled(store: &SledStore, node: &str) -> Option<PublishTarget> {
    store
        .get(node)
        .expect("get")
        .as_ref()
        .map(PublishTarget::from)
}

/// The index answers every node as sled does.
fn assert_index_agrees(store: &SledStore, nodes: &[&str]) {
    for node in nodes {
        assert_eq!(
            store.publish_target(node).expect("target"),
            from_sled(store, node),
            "{node}"
        );
    }
}

fn wait_for_index(store: &SledStore) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !store.is_warm() {
        assert!(
            std::time::Instant::now() < deadline,
            "index rebuild never finished"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn open() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    (dir, store)
}

#[test]
fn put_get_remove_keep_the_device_index_in_step() {
    let (_dir, store) = open();
    wait_for_index(&store);
    let nodes = ["n1", "n2"];
    store.put(&reg("n1", 1, "aa")).expect("put");
    assert_eq!(store.get("n1").expect("get"), Some(reg("n1", 1, "aa")));
    assert_index_agrees(&store, &nodes);
    assert_eq!(
        store.node_for_device(&[1; 32]).expect("idx").as_deref(),
        Some("n1")
    );
    // Same device, same node: token update.
    store.put(&reg("n1", 1, "bb")).expect("update");
    assert_eq!(
        store
            .get("n1")
            .expect("get")
            .map(|r| hex::encode(r.token.as_bytes()))
            .as_deref(),
        Some("bb")
    );
    // Another owner may not take the node.
    assert!(matches!(
        store.put(&reg("n1", 2, "cc")),
        Err(StoreError::Conflict)
    ));
    // The owner may re-bind it to another device identity; the old identity lets go.
    let rebound = Registration {
        device: [3; 32],
        ..reg("n1", 1, "bb")
    };
    store.put(&rebound).expect("rebind");
    assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
    assert_eq!(
        store.node_for_device(&[3; 32]).expect("idx").as_deref(),
        Some("n1")
    );
    store.put(&reg("n1", 1, "bb")).expect("and back");
    assert_index_agrees(&store, &nodes);
    // Same device moving to a new node drops the old node.
    store.put(&reg("n2", 1, "dd")).expect("move");
    assert_eq!(store.get("n1").expect("get"), None);
    assert_eq!(store.len().expect("len"), 1);
    assert_index_agrees(&store, &nodes);
    assert_eq!(
        store.remove("n2").expect("rm").map(|r| r.node).as_deref(),
        Some("n2")
    );
    assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
    assert_index_agrees(&store, &nodes);
    assert_eq!(store.len().expect("len"), 0);
}

#[test]
fn remove_if_token_spares_a_fresh_token() {
    let (_dir, store) = open();
    store.put(&reg("n1", 1, "0e")).expect("put");
    assert!(!store.remove_if_token("n1", &tok("01")).expect("rm"));
    assert!(store.get("n1").expect("get").is_some());
    assert!(store.publish_target("n1").expect("target").is_some());
    assert!(store.remove_if_token("n1", &tok("0e")).expect("rm"));
    assert!(store.get("n1").expect("get").is_none());
    assert!(store.publish_target("n1").expect("target").is_none());
    assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_flushes_all_finish_and_all_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let tasks: Vec<_> = (0..200u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.put(&reg(&format!("n{i}"), i, "aa")).expect("put");
                store.flush().await
            })
        })
        .collect();
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("no flush hangs");
    assert!(results.into_iter().all(|r| matches!(r, Ok(Ok(())))));
    // Far fewer disk flushes than requests: they were shared.
    let flushes = store.shared.commit.flushes.load(Ordering::SeqCst);
    assert!(
        (1..100).contains(&flushes),
        "{flushes} disk flushes for 200 requests"
    );
    drop(store);
    let again = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(again.len().expect("len"), 200);
}

#[test]
fn the_index_is_rebuilt_from_disk_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    // More than one rebuild batch, in two apps and two domains.
    let nodes: Vec<String> = (0..3000).map(|i| format!("node-{i:05}")).collect();
    {
        let store = SledStore::open(dir.path()).expect("open");
        for (i, node) in nodes.iter().enumerate() {
            let mut r = reg(node, 0, &format!("{:064x}", i + 1));
            r.device = [0; 32];
            r.device[..8].copy_from_slice(&(i as u64).to_be_bytes());
            if i % 2 == 0 {
                r.domain = "other.example".into();
                r.app = "beta".into();
            }
            store.put(&r).expect("put");
        }
        store.remove(&nodes[7]).expect("remove");
        store.database().expect("open").db.flush().expect("flush");
    }
    let store = SledStore::open(dir.path()).expect("reopen");
    wait_for_index(&store);
    assert_eq!(store.len().expect("len"), 2999);
    assert_eq!(store.database().expect("open").index.len(), 2999);
    let all: Vec<&str> = nodes.iter().map(String::as_str).collect();
    assert_index_agrees(&store, &all);
    assert_eq!(store.publish_target(&nodes[7]).expect("target"), None);
    assert_eq!(
        store.publish_target("never-registered").expect("target"),
        None
    );
}

#[test]
fn a_store_closed_while_its_index_rebuilds_can_be_reopened_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SledStore::open(dir.path()).expect("open");
        for i in 0..2000u32 {
            let mut r = reg(&format!("n{i}"), 0, "aa");
            r.device[..4].copy_from_slice(&i.to_be_bytes());
            store.put(&r).expect("put");
        }
    }
    for _ in 0..5 {
        // Dropping joins the rebuild thread, so the database's lock is free for the next open.
        let store = SledStore::open(dir.path()).expect("reopen while a rebuild may run");
        drop(store);
    }
    let store = SledStore::open(dir.path()).expect("reopen");
    wait_for_index(&store);
    assert_eq!(store.len().expect("len"), 2000);
}

/// Every byte of every file under `dir`.
fn files_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                pending.push(entry.expect("entry").path());
            }
        } else {
            all.extend(std::fs::read(&path).expect("read"));
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn sealed_reg(i: u32) -> Registration {
    let mut r = reg(
        &format!("sealed-node-{i}"),
        0,
        &format!("{:064x}", 0x5eed_0000_u64 + u64::from(i)),
    );
    r.device[..4].copy_from_slice(&i.to_be_bytes());
    r
}

#[test]
fn a_copied_database_reveals_no_token_and_opens_only_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let instance = {
        let store = SledStore::open_with_key(dir.path(), Some(key.clone())).expect("open");
        for i in 0..50 {
            store.put(&sealed_reg(i)).expect("put");
        }
        store.database().expect("open").db.flush().expect("flush");
        store.instance_key().expect("instance key")
    };
    let files = files_bytes(dir.path());
    assert!(files.len() > 1000, "the database was written");
    for i in 0..50 {
        let r = sealed_reg(i);
        let raw = r.token.as_bytes();
        assert!(!contains(&files, raw), "token {i} in the clear on disk");
        assert!(
            !contains(&files, hex::encode(raw).as_bytes()),
            "token {i} as hex on disk"
        );
    }
    assert!(
        !contains(&files, &instance),
        "instance key in the clear on disk"
    );

    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::KeyRequired)
    ));
    assert!(matches!(
        SledStore::open_with_key(dir.path(), Some(StoreKey::generate())),
        Err(StoreError::WrongKey)
    ));
    let store = SledStore::open_with_key(dir.path(), Some(key)).expect("reopen");
    assert_eq!(store.instance_key().expect("instance key"), instance);
    wait_for_index(&store);
    let nodes: Vec<String> = (0..50).map(|i| sealed_reg(i).node).collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    assert_index_agrees(&store, &nodes);
    assert_eq!(store.get(nodes[3]).expect("get"), Some(sealed_reg(3)));
}

#[test]
fn a_key_given_to_a_clear_store_seals_it_and_keeps_its_hashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let instance = {
        let store = SledStore::open(dir.path()).expect("open");
        for i in 0..2500 {
            store.put(&sealed_reg(i)).expect("put");
        }
        store.instance_key().expect("instance key")
    };
    let key = StoreKey::generate();
    {
        let store = SledStore::open_with_key(dir.path(), Some(key.clone())).expect("open");
        // The same instance key, so every device hash and node secret stays valid.
        assert_eq!(store.instance_key().expect("instance key"), instance);
        wait_for_index(&store);
        let open = store.database().expect("open");
        let sealed = open
            .registrations
            .iter()
            .filter(|kv| {
                kv.as_ref()
                    .is_ok_and(|(_, v)| store.shared.codec.is_current(v))
            })
            .count();
        assert_eq!(sealed, 2500, "every record rewritten sealed");
        assert_eq!(
            store.get("sealed-node-7").expect("get"),
            Some(sealed_reg(7))
        );
    }
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::KeyRequired)
    ));
    let store = SledStore::open_with_key(dir.path(), Some(key)).expect("reopen");
    wait_for_index(&store);
    assert_eq!(store.len().expect("len"), 2500);
    assert_index_agrees(&store, &["sealed-node-0", "sealed-node-2499"]);
}

#[test]
fn instance_key_is_stable_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = SledStore::open(dir.path())
        .expect("open")
        .instance_key()
        .expect("key");
    let again = SledStore::open(dir.path())
        .expect("open")
        .instance_key()
        .expect("key");
    assert_eq!(first, again);
}

/// A tmpfs of a given size on a fresh directory, unmounted on drop: a disk that really fills.
struct Tmpfs {
    mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mount one; `None` when this process may not mount (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { mnt, _dir: dir })
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.mnt)
            .status()
            .expect("mount");
        assert!(status.success(), "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

fn numbered(i: u32) -> Registration {
    let mut r = reg(
        &format!("disk-node-{i:07}"),
        0,
        &format!("{:064x}", u64::from(i) + 1),
    );
    r.device[..4].copy_from_slice(&i.to_be_bytes());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_publishes_and_recovers_when_space_returns() {
    // SAFETY: geteuid has no preconditions. CI runs as root; elsewhere there is no disk to fill safely.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs to fill needs root");
        return;
    }
    let disk = Tmpfs::mount("3m").expect("root may mount a tmpfs");
    let path = disk.mnt.join("db");
    let store = SledStore::open(&path).expect("open");
    wait_for_index(&store);

    // 1. Register until the disk is full; a registration counts only once put and flushed.
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for i in 0..500_000 {
        let put = store.put(&numbered(i));
        let flushed = match put {
            Ok(()) => store.flush().await,
            Err(e) => Err(e),
        };
        match flushed {
            Ok(()) => acknowledged.push(i),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("a 3 MiB disk fills");
    assert!(matches!(refused, StoreError::Io(_)), "{refused:?}");
    assert!(acknowledged.len() > 100, "only {} fit", acknowledged.len());

    // 2. While full: writes are refused, every acknowledged registration still gets its pushes.
    for i in 0..3 {
        let again = store.put(&numbered(900_000 + i));
        let flushed = match again {
            Ok(()) => store.flush().await,
            Err(e) => Err(e),
        };
        assert!(flushed.is_err(), "a write on a full disk was confirmed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for &i in acknowledged.iter().step_by(97) {
        let node = numbered(i).node;
        assert!(
            store
                .publish_target(&node)
                .expect("publishes are answered")
                .is_some(),
            "{node} lost its pushes on a full disk"
        );
    }

    // 3. Space comes back: within seconds, registrations work again without a restart.
    disk.resize("64m");
    let fresh = numbered(1_000_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let flushed = match store.put(&fresh) {
            Ok(()) => store.flush().await,
            Err(e) => Err(e),
        };
        match flushed {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() > deadline => panic!("never recovered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    wait_for_index(&store);
    assert!(store.publish_target(&fresh.node).expect("target").is_some());

    // 4. Nothing acknowledged was lost, across the reopen and a restart.
    drop(store);
    let store = SledStore::open(&path).expect("reopen");
    wait_for_index(&store);
    for &i in &acknowledged {
        assert_eq!(
            store.get(&numbered(i).node).expect("get"),
            Some(numbered(i)),
            "registration {i}"
        );
    }
    assert_eq!(store.get(&fresh.node).expect("get"), Some(fresh));
}

/// A store in `dir` holding `n` registrations (and one removed), with `key`.
fn filled(dir: &Path, key: Option<StoreKey>, n: u32) -> SledStore {
    let store = SledStore::open_with_key(dir, key).expect("open");
    for i in 0..n {
        store.put(&numbered(i)).expect("put");
    }
    store.remove(&numbered(3).node).expect("remove");
    store
}

fn export_of(store: &SledStore) -> Vec<u8> {
    let mut out = Vec::new();
    store.export(&mut out).expect("export");
    out
}

/// Every registration of `store`, by reading each numbered node.
fn all(store: &SledStore, n: u32) -> Vec<Option<Registration>> {
    (0..n)
        .map(|i| store.get(&numbered(i).node).expect("get"))
        .collect()
}

#[test]
fn export_then_import_into_a_new_store_round_trips_exactly() {
    for key in [None, Some(StoreKey::generate())] {
        let (from, to, file) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
            tempfile::NamedTempFile::new().expect("file"),
        );
        let source = filled(from.path(), key.clone(), 300);
        let exported = export_of(&source);
        assert_eq!(exported.iter().filter(|&&b| b == b'\n').count(), 1 + 299);
        std::fs::write(file.path(), &exported).expect("write");
        let count = import_into(to.path(), key.clone(), file.path()).expect("import");
        assert_eq!(count, 299);
        let copy = SledStore::open_with_key(to.path(), key.clone()).expect("open the copy");
        wait_for_index(&copy);
        assert_eq!(all(&copy, 300), all(&source, 300));
        assert_eq!(
            copy.instance_key().expect("key"),
            source.instance_key().expect("key")
        );
        assert_eq!(
            copy.node_for_device(&numbered(7).device).expect("idx"),
            Some(numbered(7).node)
        );
        assert!(export_of(&copy) == exported, "not byte for byte");
        assert_index_agrees(
            &copy,
            &[
                "disk-node-0000000",
                "disk-node-0000003",
                "disk-node-0000299",
            ],
        );
    }
}

#[test]
fn a_sealed_export_hides_tokens_and_imports_only_with_its_key() {
    let key = StoreKey::generate();
    let from = tempfile::tempdir().expect("dir");
    let source = filled(from.path(), Some(key.clone()), 50);
    let exported = export_of(&source);
    let text = String::from_utf8(exported.clone()).expect("utf8");
    for i in 0..50 {
        assert!(
            !text.contains(&hex::encode(numbered(i).token.as_bytes())),
            "token {i} in the export"
        );
    }
    assert!(!text.contains(&hex::encode(source.instance_key().expect("key"))));
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), &exported).expect("write");
    for (wrong, expected) in [
        (None, "KeyRequired"),
        (Some(StoreKey::generate()), "WrongKey"),
    ] {
        let to = tempfile::tempdir().expect("dir");
        let err = import_into(to.path(), wrong.clone(), file.path()).expect_err("refused");
        assert!(format!("{err:?}").contains(expected), "{err:?}");
        let target = SledStore::open_with_key(to.path(), wrong).expect("open");
        assert_eq!(target.len().expect("len"), 0, "nothing written");
    }
}

#[test]
fn a_damaged_export_or_a_full_target_writes_nothing() {
    let (from, to) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let source = filled(from.path(), None, 20);
    let exported = String::from_utf8(export_of(&source)).expect("utf8");
    let mut lines: Vec<&str> = exported.lines().collect();
    lines[12] = r#"{"node":"x","domain":"example.org","app":"chat","record":"AQ=="}"#;
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), lines.join("\n")).expect("write");
    let err = import_into(to.path(), None, file.path()).expect_err("damaged");
    assert!(
        matches!(err, BackupError::Format { line: 13, .. }),
        "{err:?}"
    );
    assert_eq!(
        SledStore::open(to.path())
            .expect("open")
            .len()
            .expect("len"),
        0
    );

    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), exported).expect("write");
    drop(source);
    let err = import_into(from.path(), None, file.path()).expect_err("not empty");
    assert!(matches!(err, BackupError::NotEmpty(19)), "{err:?}");
}

#[test]
fn a_clear_export_imported_with_a_key_is_sealed() {
    let (from, to, file) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
        tempfile::NamedTempFile::new().expect("file"),
    );
    let source = filled(from.path(), None, 40);
    std::fs::write(file.path(), export_of(&source)).expect("write");
    let key = StoreKey::generate();
    import_into(to.path(), Some(key.clone()), file.path()).expect("import");
    let copy = SledStore::open_with_key(to.path(), Some(key)).expect("open");
    wait_for_index(&copy);
    assert_eq!(all(&copy, 40), all(&source, 40));
    let open = copy.database().expect("open");
    assert!(open
        .registrations
        .iter()
        .all(|kv| kv.is_ok_and(|(_, v)| copy.shared.codec.is_current(&v))));
    assert!(matches!(
        SledStore::open(to.path()),
        Err(StoreError::InUse) | Err(StoreError::KeyRequired)
    ));
}

#[test]
fn a_store_in_use_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    let _running = SledStore::open(dir.path()).expect("open");
    // Another process would get this; within one process sled's lock is per file description as well.
    match SledStore::open(dir.path()) {
        Err(StoreError::InUse) => {}
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("opened a store that is in use"),
    }
}

/// Every raw record of the store in `dir` (the store closed), by node.
fn raw_records(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = open_db(dir).expect("open sled");
    let tree = db.open_tree("registrations").expect("tree");
    tree.iter()
        .map(|item| {
            let (k, v) = item.expect("read");
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// Rewrite every record of the closed store in `dir` as knock wrote it before records named a provider.
fn make_legacy(dir: &Path, codec: &Codec) {
    let db = open_db(dir).expect("open sled");
    let tree = db.open_tree("registrations").expect("tree");
    for item in tree.iter() {
        let (node, record) = item.expect("read");
        let registration = codec.decode(&node, &record).expect("decodes");
        tree.insert(
            node,
            crate::store::record::tests::legacy(codec, &registration),
        )
        .expect("write");
    }
    db.flush().expect("flush");
}

#[test]
fn a_store_from_before_providers_opens_as_apns_and_is_rewritten_at_its_first_open() {
    for key in [None, Some(StoreKey::generate())] {
        let dir = tempfile::tempdir().expect("dir");
        drop(filled(dir.path(), key.clone(), 40));
        make_legacy(dir.path(), &Codec::new(key.clone()));
        let old = raw_records(dir.path());
        assert!(old.iter().all(|(_, r)| r[0] == 1 || r[0] == 2), "legacy");

        let store = SledStore::open_with_key(dir.path(), key.clone()).expect("reopen");
        let expected: Vec<_> = (0..40).map(|i| (i != 3).then(|| numbered(i))).collect();
        // Answered right before the rebuild has rewritten anything, and after.
        assert_eq!(all(&store, 40), expected);
        wait_for_index(&store);
        assert_eq!(all(&store, 40), expected);
        let target = store
            .publish_target(&numbered(5).node)
            .expect("target")
            .expect("found");
        assert_eq!(target.provider, ProviderKind::Apns);
        drop(store);

        let codec = Codec::new(key);
        let rewritten = raw_records(dir.path());
        assert_eq!(rewritten.len(), 39);
        assert!(
            rewritten.iter().all(|(_, r)| codec.is_current(r)),
            "migrated"
        );
    }
}

#[test]
fn an_export_from_before_providers_imports_and_is_migrated() {
    for key in [None, Some(StoreKey::generate())] {
        let (from, to, file) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
            tempfile::NamedTempFile::new().expect("file"),
        );
        // An export as the knock of before wrote it: the same lines, every record in its old format.
        drop(filled(from.path(), key.clone(), 60));
        make_legacy(from.path(), &Codec::new(key.clone()));
        let source = SledStore::open_with_key(from.path(), key.clone()).expect("open");
        let exported = export_of(&source);
        drop(source);
        let text = String::from_utf8(exported).expect("utf8");
        let codec = Codec::new(key.clone());
        let old_export: String = text
            .lines()
            .enumerate()
            .map(|(i, line)| {
                if i == 0 {
                    return format!("{line}\n");
                }
                let mut value: serde_json::Value = serde_json::from_str(line).expect("json");
                let node = value["node"].as_str().expect("node").to_string();
                let record = STANDARD
                    .decode(value["record"].as_str().expect("record"))
                    .expect("b64");
                let registration = codec.decode(node.as_bytes(), &record).expect("decodes");
                value["record"] = STANDARD
                    .encode(crate::store::record::tests::legacy(&codec, &registration))
                    .into();
                format!("{value}\n")
            })
            .collect();
        std::fs::write(file.path(), old_export).expect("write");

        assert_eq!(
            import_into(to.path(), key.clone(), file.path()).expect("import"),
            59
        );
        let store = SledStore::open_with_key(to.path(), key.clone()).expect("open");
        wait_for_index(&store);
        let expected: Vec<_> = (0..60).map(|i| (i != 3).then(|| numbered(i))).collect();
        assert_eq!(all(&store, 60), expected);
        drop(store);
        assert!(raw_records(to.path())
            .iter()
            .all(|(_, r)| codec.is_current(r)));
    }
}

#[test]
fn a_new_store_is_not_created_in_the_clear_unless_asked() {
    let dir = tempfile::tempdir().expect("dir");
    let options = |key: Option<StoreKey>, plaintext_tokens| StoreOptions {
        postgres: None,
        path: dir.path().join("store"),
        key,
        plaintext_tokens,
    };
    assert!(matches!(
        SledStore::open_as(&options(None, false)),
        Err(StoreError::KeyNeeded)
    ));
    let message = StoreError::KeyNeeded.to_string();
    assert!(message.contains("knock keygen --out"), "{message}");
    assert!(message.contains("plaintext_tokens"), "{message}");
    // Asked for: created in the clear, and then it opens either way, as every store of before does.
    drop(SledStore::open_as(&options(None, true)).expect("created in the clear"));
    let store = SledStore::open_as(&options(None, false)).expect("an existing clear store opens");
    assert!(!store.is_sealed());
    drop(store);
    // With a key, a new store needs nothing else.
    let sealed = StoreOptions {
        postgres: None,
        path: dir.path().join("sealed"),
        ..options(Some(StoreKey::generate()), false)
    };
    assert!(SledStore::open_as(&sealed).expect("sealed").is_sealed());
    // An import creates a store too: the same rule.
    let file = tempfile::NamedTempFile::new().expect("file");
    let source = filled(&dir.path().join("source"), None, 3);
    std::fs::write(file.path(), export_of(&source)).expect("write");
    let into_new = StoreOptions {
        postgres: None,
        path: dir.path().join("imported"),
        ..options(None, false)
    };
    assert!(matches!(
        SledStore::import(&into_new, file.path()),
        Err(BackupError::Store(StoreError::KeyNeeded))
    ));
}

#[test]
fn an_export_taken_as_a_store_is_first_sealed_holds_no_clear_token() {
    let dir = tempfile::tempdir().expect("dir");
    drop(filled(dir.path(), None, 2000));
    let key = StoreKey::generate();
    // Exported at once, while the rebuild may still be rewriting the clear records.
    let store = SledStore::open_with_key(dir.path(), Some(key.clone())).expect("open");
    let exported = export_of(&store);
    drop(store);
    let codec = Codec::new(Some(key));
    let text = String::from_utf8(exported).expect("utf8");
    for line in text.lines().skip(1) {
        let value: serde_json::Value = serde_json::from_str(line).expect("json");
        let record = STANDARD
            .decode(value["record"].as_str().expect("record"))
            .expect("b64");
        assert!(codec.is_current(&record), "exported sealed: {line}");
    }
    for i in [0, 1, 999, 1999] {
        let token = numbered(i).token;
        assert!(!text.contains(&hex::encode(token.as_bytes())));
    }
}

/// The sled engine as the store conformance suite drives it: every store in a directory of its own.
struct SledEngine;

/// A sled store's directory, and the key it is opened with.
struct SledPlace {
    dir: tempfile::TempDir,
    key: Option<StoreKey>,
}

impl conformance::Engine for SledEngine {
    type Place = SledPlace;

    fn fresh(&self, key: Option<StoreKey>) -> Opened<SledPlace> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open_with_key(dir.path(), key.clone()).expect("open");
        (SledPlace { dir, key }, Arc::new(store))
    }

    fn reopen(&self, place: &SledPlace, store: Arc<dyn Store>) -> Arc<dyn Store> {
        // Dropping the last handle closes the database and releases its lock for the open below.
        drop(store);
        Arc::new(SledStore::open_with_key(place.dir.path(), place.key.clone()).expect("reopen"))
    }

    fn import(
        &self,
        file: &Path,
        key: Option<StoreKey>,
    ) -> Result<(usize, Opened<SledPlace>), BackupError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = import_into(dir.path(), key.clone(), file)?;
        let store = SledStore::open_with_key(dir.path(), key.clone())?;
        Ok((count, (SledPlace { dir, key }, Arc::new(store))))
    }
}

#[test]
fn sled_passes_the_store_conformance_suite() {
    conformance::run_all(&SledEngine);
}

#[test]
fn a_store_from_before_the_owner_index_gets_it_at_its_first_open() {
    for key in [None, Some(StoreKey::generate())] {
        let dir = tempfile::tempdir().expect("dir");
        drop(filled(dir.path(), key.clone(), 40));
        {
            let db = open_db(dir.path()).expect("open sled");
            db.drop_tree("owners").expect("drop the owner index");
            db.flush().expect("flush");
        }
        let store = SledStore::open_with_key(dir.path(), key).expect("reopen");
        let mut nodes = store.nodes_of(&[0; 32]).expect("nodes_of");
        nodes.sort();
        let mut expected: Vec<String> = (0..40)
            .filter(|&i| i != 3)
            .map(|i| numbered(i).node)
            .collect();
        expected.sort();
        assert_eq!(nodes, expected);
    }
}

#[test]
fn a_format_1_export_is_still_read_but_may_not_carry_knock_tokens() {
    let dir = tempfile::tempdir().expect("dir");
    let store = SledStore::open(dir.path()).expect("open");
    let r = Registration {
        node: "format-1-node".into(),
        device: [1; 32],
        owner: [2; 32],
        domain: "example.org".into(),
        app: "chat".into(),
        provider: ProviderKind::Apns,
        token: Token::from_bytes(vec![3; 32]),
        secret_hash: Some([4; 32]),
        call_token: None,
        account: None,
    };
    store.put(&r).expect("put");
    let export = |store: &SledStore| {
        let mut out = Vec::new();
        store.export(&mut out).expect("export");
        String::from_utf8(out).expect("an export is text").replacen(
            "\"knock_export\":2",
            "\"knock_export\":1",
            1,
        )
    };
    let import = |text: &str| {
        let file = tempfile::NamedTempFile::new().expect("file");
        std::fs::write(file.path(), text).expect("write");
        let target = tempfile::tempdir().expect("dir");
        import_into(target.path(), None, file.path())
    };
    let old = export(&store);
    assert!(old.starts_with("{\"knock_export\":1"), "{old}");
    assert_eq!(import(&old).expect("a format 1 export imports"), 1);

    let token = KnockToken {
        id: [5; 8],
        node: r.node.clone(),
        owner: r.owner,
        expires: 10,
        per_hour: 1,
        grace_until: None,
        uses: 0,
    };
    store
        .put_knock_token(&[6; 32], &token)
        .expect("put_knock_token");
    match import(&export(&store)) {
        Err(BackupError::Format { line: 3, why }) => assert!(why.contains("format 1"), "{why}"),
        other => panic!("a knock token in a format 1 export: {other:?}"),
    }
}
