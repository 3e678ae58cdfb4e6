//! The `knock` command line as an admin meets it: `check` accepts a good config and names the key and line
//! of every kind of error; `keygen` writes a private key once; `stats`, `export`, `delete` and `import` work
//! on a stopped store and refuse a running one; a new store needs a store key unless `plaintext_tokens`
//! says otherwise; `--version` answers.

use std::process::Command;

fn knock(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_knock"))
        .args(args)
        .output()
        .expect("run knock");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write_config(dir: &std::path::Path, apns: &str) -> String {
    let (p8, _) = testkit::apns::generate_apns_key();
    std::fs::write(dir.join("AuthKey.p8"), p8).expect("write key");
    std::fs::write(dir.join("secret"), "s3cret\n").expect("write secret");
    let path = dir.join("knock.toml");
    std::fs::write(
        &path,
        format!(
            "[component]\njid = \"push.example.org\"\nserver = \"127.0.0.1:5347\"\nsecret_file = \"secret\"\n\
             [store]\npath = \"data\"\n[[apns]]\nname = \"chat\"\ntopic = \"org.example.chat\"\n{apns}"
        ),
    )
    .expect("write config");
    path.display().to_string()
}

#[test]
fn check_accepts_a_good_config_and_loads_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "[apns.auth]\nkey_file = \"AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n",
    );
    let (ok, text) = knock(&["check", "--config", &config]);
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "check does not create the store"
    );
}

#[test]
fn check_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[apns.auth]\nkey_file = \"missing.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n", "missing.p8"),
        ("[apns.auth]\nkey_file = \"secret\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n", "not an ES256 .p8 key"),
        ("[apns.auth]\nkey_file = \"AuthKey.p8\"\nteam_id = \"TEAM123456\"\n", "apns[0].auth.key_id"),
        ("tpoic = \"x\"\n", "unknown field `tpoic`"),
        ("", "apns[0].auth"),
    ];
    for (apns, expected) in cases {
        let config = write_config(dir.path(), apns);
        let (ok, text) = knock(&["check", "--config", &config]);
        assert!(!ok, "{apns}");
        assert!(text.contains(expected), "expected {expected:?} in: {text}");
    }
}

#[tokio::test]
async fn check_loads_an_fcm_service_account_and_names_what_is_wrong_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fcm = testkit::fcm::MockFcm::start(testkit::fcm::MockFcmConfig::new("knock-test"))
        .await
        .expect("mock FCM");
    let account = fcm
        .write_service_account_file(dir.path())
        .expect("write the service account");
    std::fs::write(dir.path().join("not-json.json"), "{").expect("write");
    std::fs::write(
        dir.path().join("not-rsa.json"),
        r#"{"type":"service_account","project_id":"p","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n","client_email":"a@p.iam.gserviceaccount.com"}"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("user.json"),
        r#"{"type":"authorized_user","private_key":"x","client_email":"x"}"#,
    )
    .expect("write");
    let fcm_app = |file: &str| {
        format!(
            "dry_run = true\n[[apns]]\nname = \"android\"\nprovider = \"fcm\"\nservice_account_file = \"{file}\"\n"
        )
    };
    // An FCM app is written as an [[app]] table; so is the APNs one then.
    let write = |file: &str| {
        let path = write_config(dir.path(), &fcm_app(file));
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace(
                "[[apns]]\nname = \"chat\"",
                "[[app]]\nname = \"chat\"\nprovider = \"apns\"",
            )
            .replace(
                "[[apns]]\nname = \"android\"",
                "[[app]]\nname = \"android\"",
            );
        std::fs::write(&path, text).expect("write");
        path
    };
    let (ok, text) = knock(&["check", "--config", &write(&account.display().to_string())]);
    assert!(ok, "{text}");
    assert!(
        text.contains("android (fcm; auto: high priority or normal priority)"),
        "{text}"
    );
    for (file, expected) in [
        ("missing.json", "missing.json"),
        ("not-json.json", "not a service-account key file"),
        ("not-rsa.json", "not an RSA key"),
        ("user.json", "service_account"),
    ] {
        let (ok, text) = knock(&["check", "--config", &write(file)]);
        assert!(!ok, "{file}: {text}");
        assert!(
            text.contains(expected) && text.contains("android"),
            "{file}: expected {expected:?} in: {text}"
        );
    }
}

/// The config `write_config` writes, with `from` replaced by `to`, and where `needle` stands in it (1-based
/// line).
fn config_with(dir: &std::path::Path, from: &str, to: &str, needle: &str) -> (String, usize) {
    let path = write_config(dir, "dry_run = true\n");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(from, to);
    std::fs::write(&path, &text).expect("write");
    let line = text[..text.find(needle).expect("needle")]
        .matches('\n')
        .count()
        + 1;
    (path, line)
}

#[test]
fn check_names_the_key_and_the_line_of_every_kind_of_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = "server = \"127.0.0.1:5347\"\n";
    let cases = [
        // (replace, with, the line's text, what the first line of the error says after `path:line: `)
        (
            server,
            "server = \"127.0.0.1:5347\"\nfoo = 1\n",
            "foo = 1",
            "component.foo: unknown field `foo`, expected one of",
        ),
        (
            server,
            "server = \"127.0.0.1:5347\"\nping_interval_secs = \"thirty\"\n",
            "ping_interval_secs",
            "component.ping_interval_secs: invalid type: string \"thirty\", expected u64",
        ),
        (
            "path = \"data\"\n",
            "",
            "[store]",
            "store.path: missing: the directory of the database",
        ),
        (
            server,
            "server = \"nowhere\"\n",
            "server = ",
            "component.server: expected host:port",
        ),
        (
            "dry_run = true\n",
            "dry_run = true\n[[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n",
            "name = \"chat\"\ntopic = \"t\"",
            "apns[1].name: duplicate app name",
        ),
        ("[store]", "[store", "[store", "TOML parse error"),
    ];
    for (from, to, needle, expected) in cases {
        let (config, line) = config_with(dir.path(), from, to, needle);
        let (ok, text) = knock(&["check", "--config", &config]);
        assert!(!ok, "{to}: {text}");
        let at = format!("{config}:{line}: ");
        assert!(text.contains(&at), "expected {at:?} in: {text}");
        if expected != "TOML parse error" {
            assert!(
                text.contains(&format!("{at}{expected}")),
                "expected {at}{expected:?} in: {text}"
            );
        }
    }
}

#[test]
fn a_new_store_needs_a_key_unless_plaintext_is_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "dry_run = true\n");
    let (ok, text) = knock(&["stats", "--config", &config]);
    assert!(!ok && text.contains("knock keygen --out"), "{text}");
    assert!(
        !dir.path().join("data").join("db").exists(),
        "no store was made"
    );
    let (ok, text) = knock(&["check", "--config", &config]);
    assert!(ok && text.contains("a new store is refused"), "{text}");
    let clear = std::fs::read_to_string(&config).expect("read").replace(
        "path = \"data\"\n",
        "path = \"data\"\nplaintext_tokens = true\n",
    );
    std::fs::write(&config, clear).expect("write");
    let (ok, text) = knock(&["stats", "--config", &config]);
    assert!(
        ok && text.contains("0 registrations") && text.contains("in the clear"),
        "{text}"
    );
    // Once made, a store in the clear opens without the option too.
    let (config_without, _) = config_with(dir.path(), "plaintext_tokens = true\n", "", "[store]");
    let (ok, text) = knock(&["stats", "--config", &config_without]);
    assert!(ok && text.contains("0 registrations"), "{text}");
}

#[test]
fn version_answers() {
    let (ok, text) = knock(&["--version"]);
    assert!(ok);
    assert!(text.contains(env!("CARGO_PKG_VERSION")));
}

/// A registration as the handlers would store it (the hashes are arbitrary here).
fn registration(i: u8, app: &str, domain: &str) -> knock::store::Registration {
    knock::store::Registration {
        node: format!("node-of-device-number-{i:03}"),
        device: [i; 32],
        owner: [i; 32],
        domain: domain.into(),
        app: app.into(),
        provider: knock::push::ProviderKind::Apns,
        token: knock::push::Token::from_bytes(vec![i; 32]),
        secret_hash: Some([7; 32]),
        call_token: None,
        account: None,
    }
}

#[test]
fn keygen_writes_a_private_key_once_and_check_reports_sealing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("store.key");
    let key_arg = key.display().to_string();
    let (ok, text) = knock(&["keygen", "--out", &key_arg]);
    assert!(ok, "{text}");
    assert!(text.contains("key_file"), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let before = std::fs::read(&key).expect("read");
    let (ok, text) = knock(&["keygen", "--out", &key_arg]);
    assert!(!ok && text.contains("already exists"), "{text}");
    assert_eq!(
        std::fs::read(&key).expect("read"),
        before,
        "not overwritten"
    );

    let auth = "[apns.auth]\nkey_file = \"AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n";
    let config = write_config(dir.path(), auth);
    let (ok, text) = knock(&["check", "--config", &config]);
    assert!(ok && text.contains("in the clear"), "{text}");
    let sealed = std::fs::read_to_string(&config).expect("read").replace(
        "path = \"data\"\n",
        "path = \"data\"\nkey_file = \"store.key\"\n",
    );
    std::fs::write(&config, sealed).expect("write");
    let (ok, text) = knock(&["check", "--config", &config]);
    assert!(ok && text.contains("sealed at rest"), "{text}");
    std::fs::write(&key, "not a key\n").expect("write");
    let (ok, text) = knock(&["check", "--config", &config]);
    assert!(
        !ok && text.contains("store.key_file") && text.contains("not a knock store key"),
        "{text}"
    );
}

#[test]
fn stats_export_delete_import_work_on_a_stopped_store_and_refuse_a_running_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("store.key");
    let (ok, text) = knock(&["keygen", "--out", &key.display().to_string()]);
    assert!(ok, "{text}");
    let auth = "[apns.auth]\nkey_file = \"AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n";
    let config = write_config(dir.path(), auth);
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "path = \"data\"\n",
        "path = \"data\"\nkey_file = \"store.key\"\n",
    );
    std::fs::write(&config, text).expect("write");
    let store_key = knock::store::StoreKey::load(&key).expect("key");
    {
        let store = knock::store::SledStore::open_with_key(
            &dir.path().join("data"),
            Some(store_key.clone()),
        )
        .expect("open");
        use knock::store::Store as _;
        for i in 0..5 {
            store
                .put(&registration(i, "chat", "example.org"))
                .expect("put");
        }
        store
            .put(&registration(9, "beta", "other.example"))
            .expect("put");

        // While knock (here: this test) holds the store, the commands refuse and say why.
        let (ok, text) = knock(&["stats", "--config", &config]);
        assert!(!ok && text.contains("in use"), "{text}");
    }

    let (ok, text) = knock(&["stats", "--config", &config]);
    assert!(ok, "{text}");
    assert!(
        text.contains("6 registrations") && text.contains("sealed"),
        "{text}"
    );
    assert!(
        text.contains("app chat: 5")
            && text.contains("app beta: 1")
            && text.contains("not configured"),
        "{text}"
    );
    assert!(
        !text.contains(&hex::encode(registration(1, "chat", "x").token.as_bytes())),
        "stats shows no token: {text}"
    );

    let export = dir.path().join("backup.jsonl");
    let export_arg = export.display().to_string();
    let (ok, text) = knock(&["export", "--config", &config, "--out", &export_arg]);
    assert!(ok && text.contains("exported 6"), "{text}");
    let exported = std::fs::read_to_string(&export).expect("read");
    assert!(
        !exported.contains(&hex::encode(registration(1, "chat", "x").token.as_bytes())),
        "the export keeps tokens sealed"
    );

    let node = registration(2, "chat", "x").node;
    let (ok, text) = knock(&["delete", "--config", &config, "--node", &node]);
    assert!(ok, "{text}");
    let (ok, text) = knock(&["delete", "--config", &config, "--node", &node]);
    assert!(!ok && text.contains("no registration"), "{text}");

    // Import refuses a store that holds registrations; into a wiped one it restores all six.
    let (ok, text) = knock(&["import", "--config", &config, &export_arg]);
    assert!(!ok && text.contains("already holds 5"), "{text}");
    std::fs::remove_dir_all(dir.path().join("data")).expect("wipe");
    let (ok, text) = knock(&["import", "--config", &config, &export_arg]);
    assert!(ok && text.contains("imported 6"), "{text}");
    let (ok, text) = knock(&["stats", "--config", &config]);
    assert!(ok && text.contains("6 registrations"), "{text}");
    let store = knock::store::SledStore::open_with_key(&dir.path().join("data"), Some(store_key))
        .expect("open");
    use knock::store::Store as _;
    assert_eq!(
        store.get(&node).expect("get"),
        Some(registration(2, "chat", "example.org"))
    );
}
