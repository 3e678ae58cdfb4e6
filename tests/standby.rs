//! Two real `knock` binaries for one component JID, behind the server stand-in playing Prosody's rule of one
//! connection per component (a second one is refused with `<conflict/>`): the second knock stands by, quietly,
//! and says so in `/metrics` and `/health`; when the active one is killed with SIGKILL, the standby is serving
//! within a bound, and the killed one, started again, is the standby now.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::harness::*;
use common::*;

#[path = "common/admin.rs"]
#[allow(dead_code)] // shared with tests/admin.rs, which uses all of it
mod admin;
use admin::{free_port, Scrape};

/// The longest a takeover may take here: 250 ms between a standby's attempts plus a handshake is the design,
/// the rest is slack for a loaded 2-core CI machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(2);

/// A second knock beside a [`Harness`]: the same config (server, secret, apps), its own store and admin port.
struct Standby {
    dir: tempfile::TempDir,
    admin: SocketAddr,
    knock: Option<Child>,
}

impl Standby {
    /// Copy the first knock's config and keys next to a fresh store and start the binary.
    fn start(first: &Harness) -> Standby {
        let dir = tempfile::tempdir().expect("tempdir");
        let from = first.dir.path();
        for file in ["store.key", "AuthKey.p8", "AuthKey2.p8"] {
            std::fs::copy(from.join(file), dir.path().join(file)).expect("copy a key");
        }
        let admin = free_port();
        let mine = format!("listen = \"{admin}\"");
        let config: String = std::fs::read_to_string(first.config_path())
            .expect("read the first knock's config")
            .lines()
            .map(|line| match line {
                l if l.starts_with("listen = ") => mine.clone(),
                // Four attempts a second, so the test can see it knocks without waiting seconds for it.
                l if l.starts_with("ping_interval_secs") => format!("{l}\nstandby_retry_ms = 250"),
                l => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            config.contains(&mine),
            "the first knock has an admin listener"
        );
        std::fs::write(dir.path().join("knock.toml"), config).expect("write config");
        let log = std::fs::File::create(dir.path().join("knock.log")).expect("create log");
        let knock = Command::new(env!("CARGO_BIN_EXE_knock"))
            .args(["run", "--config"])
            .arg(dir.path().join("knock.toml"))
            .env("KNOCK_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the second knock");
        Standby {
            dir,
            admin,
            knock: Some(knock),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("knock.log")
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(mut child) = self.knock.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Scrape for Standby {
    fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    fn log(&self) -> String {
        read(&self.log_path())
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Wait until `text` is in the log `who` keeps; panics with it if not within [`WAIT`].
async fn wait_for_log(who: &impl Scrape, text: &str) {
    let deadline = Instant::now() + WAIT;
    while !who.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "never logged {text:?}\n--- log ---\n{}",
            who.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const DISCO_INFO: &str = "<iq xmlns='jabber:component:accept' type='get' id='disco' \
     from='alice@localhost/phone' to='push.localhost'>\
     <query xmlns='http://jabber.org/protocol/disco#info'/></iq>";

#[tokio::test]
async fn a_standby_waits_quietly_and_serves_within_two_seconds_of_the_active_knock_dying() {
    let mut active = Harness::start_with(Options {
        admin: Some(free_port()),
        ..Options::default()
    })
    .await;
    active.server.set_refuse_duplicates(true);
    let mut first = active.accept().await;
    assert_eq!(error_of(&ask(&mut first, DISCO_INFO).await), None);
    active.wait_for_admin().await;
    active.wait_for_metric("knock_component_link_up", 1).await;

    let standby = Standby::start(&active);
    // From here the stand-in must keep accepting: every refusal is a connection it answers. The future that
    // does so lives across the checks below and, once the active knock is gone, yields the standby's link.
    let mut second = {
        let takeover = active
            .server
            .accept_past_duplicates(Duration::from_secs(60));
        tokio::pin!(takeover);

        let quietly = async {
            // 1. It says once that it stands by, and shows it: standby 1, up 0, /health 200 "standby".
            wait_for_log(&standby, "standing by, taking over when it lets go").await;
            standby.wait_for_admin().await;
            standby
                .wait_for_metric("knock_component_link_standby", 1)
                .await;
            let (m, _) = standby.metrics().await;
            assert_eq!(m.get("knock_component_link_up"), Some(0));
            let (status, body) = standby.health().await;
            assert_eq!(
                (status, body["status"].as_str()),
                (200, Some("standby")),
                "{body}"
            );
            let (m, _) = active.metrics().await;
            assert_eq!(m.get("knock_component_link_standby"), Some(0));
            assert_eq!(active.health().await.1["status"], "ok");

            // 2. It knocks at a short fixed interval, not a growing backoff (capped at 1 s that would be about
            // two attempts in these two seconds), and logs nothing per attempt, even at debug.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (refused, lines) = (
                active.server.duplicates_refused(),
                standby.log().lines().count(),
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            let refused = active.server.duplicates_refused() - refused;
            let logged: Vec<String> = standby
                .log()
                .lines()
                .skip(lines)
                .map(str::to_owned)
                .collect();
            assert!(
                refused >= 5,
                "only {refused} attempts in 2 s: the standby backs off"
            );
            assert!(
                logged.len() <= 1,
                "{refused} refusals logged {} lines:\n{}",
                logged.len(),
                logged.join("\n")
            );
            refused
        };
        let refused_in_2s = tokio::select! {
            biased;
            conn = &mut takeover => panic!(
                "the standby got in while the active knock held the component: {:?}\n--- standby log ---\n{}",
                conn.err(),
                standby.log()
            ),
            refused = quietly => refused,
        };
        // The active knock still serves, undisturbed.
        assert_eq!(error_of(&ask(&mut first, DISCO_INFO).await), None);

        // 3. kill -9 the active knock: the kernel closes its socket, the stand-in drops it, and the standby's next
        // attempt gets in. Timed up to the first answered IQ on the new link.
        let killed = Instant::now();
        // By pid, as an operator would: the stand-in is still borrowed by the takeover in progress.
        active.signal("KILL");
        let mut second = match takeover.await {
            Ok(conn) => conn,
            Err(e) => panic!("no takeover: {e}\n--- standby log ---\n{}", standby.log()),
        };
        let answer = ask(&mut second, DISCO_INFO).await;
        let took = killed.elapsed();
        assert_eq!(error_of(&answer), None);
        println!(
        "takeover: {} ms from SIGKILL to the first answered IQ ({refused_in_2s} refused attempts in 2 s)",
        took.as_millis()
    );
        assert!(
            took < TAKEOVER_BOUND,
            "the standby took {took:?} to serve\n--- standby log ---\n{}",
            standby.log()
        );
        second
    };
    drop(first);
    active.kill9(); // reaps it

    // 4. The new active knock does the whole job (its own store for now: the device registers again), says
    // it took over, and its gauges follow.
    let (node, secret) = register(&mut second, "dev1", TOKEN).await;
    assert_eq!(
        error_of(&publish(&mut second, "p1", &node, &secret).await),
        None
    );
    assert_eq!(active.apns.wait_for_requests(1, WAIT).await.len(), 1);
    wait_for_log(&standby, "has taken over").await;
    standby.wait_for_metric("knock_component_link_up", 1).await;
    let (m, _) = standby.metrics().await;
    assert_eq!(m.get("knock_component_link_standby"), Some(0));
    assert_eq!(standby.health().await.1["status"], "ok");

    // 5. The killed knock comes back: it is the standby now.
    active.spawn();
    let back = async {
        active
            .wait_for_log("standing by, taking over when it lets go")
            .await;
        active
            .wait_for_metric("knock_component_link_standby", 1)
            .await;
    };
    tokio::select! {
        biased;
        conn = active.server.accept_past_duplicates(WAIT * 2) => panic!(
            "the restarted knock got in beside the serving one: {:?}",
            conn.err()
        ),
        _ = back => {}
    }
    assert_eq!(error_of(&ask(&mut second, DISCO_INFO).await), None);
}
