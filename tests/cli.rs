//! The `knock` command line as an admin meets it: `check` accepts a good config and names the key at fault
//! in a bad one; `--version` answers.

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

#[test]
fn version_answers() {
    let (ok, text) = knock(&["--version"]);
    assert!(ok);
    assert!(text.contains(env!("CARGO_PKG_VERSION")));
}
