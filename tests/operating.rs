//! Operating knock, end to end with the real binary: rotating the APNs key with SIGHUP (and refusing a broken
//! one), a backup's round trip — export, wipe, import — after which the same nodes and secrets push again,
//! and the same export moving a sled store to PostgreSQL.

use std::process::Command;
use std::time::Duration;

mod common;
use common::harness::*;
use common::*;

/// Publish, check it was answered `result`, and return the push the mock received for it.
async fn pushed(
    h: &Harness,
    conn: &mut testkit::server::ComponentConn,
    node: &str,
    secret: &str,
) -> testkit::apns::ReceivedPush {
    h.apns.clear_requests();
    let reply = publish(conn, "p", node, secret).await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "{}",
        String::from(&reply)
    );
    h.apns.wait_for_requests(1, WAIT).await.remove(0)
}

/// The `kid` of the provider JWT a push carried.
async fn push_kid(
    h: &Harness,
    conn: &mut testkit::server::ComponentConn,
    node: &str,
    secret: &str,
) -> String {
    pushed(h, conn, node, secret).await.kid.unwrap_or_default()
}

fn rewrite_config(h: &Harness, from: &str, to: &str) {
    let text = std::fs::read_to_string(h.config_path()).expect("read config");
    assert!(text.contains(from), "{text}");
    std::fs::write(h.config_path(), text.replace(from, to)).expect("write config");
}

#[tokio::test]
async fn sighup_rotates_the_apns_key_and_a_broken_one_leaves_the_old_in_force() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    assert_eq!(push_kid(&h, &mut conn, &node, &secret).await, KEY_ID);

    // 1. The admin puts the team's second key in the config and sends SIGHUP: pushes carry the new kid.
    rewrite_config(
        &h,
        &format!("key_file = \"AuthKey.p8\"\nkey_id = \"{KEY_ID}\""),
        &format!("key_file = \"AuthKey2.p8\"\nkey_id = \"{SECOND_KEY_ID}\""),
    );
    h.signal("HUP");
    h.wait_for_log("[[apns]] reloaded").await;
    assert_eq!(push_kid(&h, &mut conn, &node, &secret).await, SECOND_KEY_ID);

    // 2. A broken key is refused, loudly, and pushes go on with the key in force.
    rewrite_config(
        &h,
        "key_file = \"AuthKey2.p8\"",
        "key_file = \"missing.p8\"",
    );
    h.signal("HUP");
    h.wait_for_log("the new configuration was refused").await;
    assert!(h.log_text().contains("missing.p8"), "{}", h.log_text());
    assert_eq!(push_kid(&h, &mut conn, &node, &secret).await, SECOND_KEY_ID);

    // 3. So is a file that does not parse.
    std::fs::write(h.config_path(), "[component\n").expect("write");
    h.signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.log_text()
            .matches("the new configuration was refused")
            .count(),
        2,
        "{}",
        h.log_text()
    );
    assert_eq!(push_kid(&h, &mut conn, &node, &secret).await, SECOND_KEY_ID);
}

/// Run the knock binary's admin command against the harness's config.
fn knock(h: &Harness, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_knock"))
        .args(args)
        .arg("--config")
        .arg(h.config_path())
        .output()
        .expect("run knock");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "knock {args:?}: {text}");
    text
}

#[tokio::test]
async fn export_wipe_import_and_the_same_nodes_and_secrets_push_again() {
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    let (node2, secret2) = register(&mut conn, "dev2", TOKEN2).await;
    push_kid(&h, &mut conn, &node, &secret).await;
    drop(conn);
    h.terminate();

    let backup = h.dir.path().join("backup.jsonl");
    let text = knock(&h, &["export", "--out", &backup.display().to_string()]);
    assert!(text.contains("exported 2"), "{text}");
    std::fs::remove_dir_all(h.dir.path().join("store")).expect("wipe the store");
    let text = knock(&h, &["import", &backup.display().to_string()]);
    assert!(text.contains("imported 2"), "{text}");

    h.spawn();
    let mut conn = h.accept().await;
    for (node, secret, token) in [(&node, &secret, TOKEN), (&node2, &secret2, TOKEN2)] {
        assert_eq!(pushed(&h, &mut conn, node, secret).await.token, token);
    }
    // The device hashes survived too: re-registering the same device keeps its node and secret.
    assert_eq!(register(&mut conn, "dev1", TOKEN).await, (node, secret));
}

#[tokio::test]
async fn a_sled_store_moves_to_postgresql_with_export_and_import_and_pushes_on() {
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    let (node2, secret2) = register(&mut conn, "dev2", TOKEN2).await;
    drop(conn);
    h.terminate();

    let backup = h.dir.path().join("backup.jsonl");
    let text = knock(&h, &["export", "--out", &backup.display().to_string()]);
    assert!(text.contains("exported 2"), "{text}");

    // The admin points [store] at a PostgreSQL database, the password in a file, and imports.
    let cluster = testkit::postgres::TempCluster::start()
        .unwrap_or_else(|e| panic!("a throwaway PostgreSQL: {e:#}"));
    std::fs::write(h.dir.path().join("db.password"), cluster.password()).expect("password file");
    rewrite_config(
        &h,
        "path = \"store\"",
        &format!(
            "engine = \"postgres\"\nurl = \"postgres://{}@127.0.0.1:{}/{}\"\npassword_file = \"db.password\"",
            cluster.user(),
            cluster.port(),
            cluster.database()
        ),
    );
    let text = knock(&h, &["import", &backup.display().to_string()]);
    assert!(text.contains("imported 2"), "{text}");
    let text = knock(&h, &["stats"]);
    assert!(text.contains("2 registrations"), "{text}");
    assert!(
        !text.contains(cluster.password()),
        "no password in what knock prints"
    );

    h.spawn();
    let mut conn = h.accept().await;
    for (node, secret, token) in [(&node, &secret, TOKEN), (&node2, &secret2, TOKEN2)] {
        assert_eq!(pushed(&h, &mut conn, node, secret).await.token, token);
    }
    // Same instance key, so the same device keeps its node and secret; and a new one is committed there.
    assert_eq!(register(&mut conn, "dev1", TOKEN).await, (node, secret));
    let token3 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let (node3, _) = register(&mut conn, "dev3", token3).await;
    let rows = cluster
        .psql_knock(&format!(
            "SELECT count(*) FROM knock_registrations WHERE node = '{node3}'"
        ))
        .expect("psql");
    assert_eq!(rows.trim(), "1", "the new registration is in the database");
    assert!(!h.log_text().contains(cluster.password()));
}
