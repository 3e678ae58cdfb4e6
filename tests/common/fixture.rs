//! The router and handlers below the socket: a real sled store, apps over a scripted push backend, and
//! helpers to put stanzas through the router as the link would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use knock::app::{App, AppBuilder, PushApp};
use knock::push::{Provider, ProviderKind, PushOutcome, WakeKind, Wakeup};
use knock::router;
use knock::stanza::frame::Frame;
use knock::store::SledStore;
use minidom::Element;
use xmpp_parsers::iq::Iq;

use super::{node_and_secret, register_xml};

/// One wake-up the backend was handed, as owned values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Woken {
    /// The token, hex.
    pub token: String,
    pub node: String,
    pub kind: WakeKind,
    pub account: Option<String>,
    /// (data, iv), as passed through.
    pub encrypted: Option<(String, String)>,
    /// A knock's token id.
    pub knock: Option<String>,
}

/// A backend that answers what the test scripted per token and records every wake-up.
#[derive(Default)]
pub struct Scripted {
    /// The push service it stands in for (APNs unless [`Scripted::of`] says otherwise).
    kind: Option<ProviderKind>,
    outcomes: Mutex<HashMap<String, PushOutcome>>,
    woken: Mutex<Vec<Woken>>,
}

impl Scripted {
    /// A backend standing in for `kind`.
    pub fn of(kind: ProviderKind) -> Scripted {
        Scripted {
            kind: Some(kind),
            ..Scripted::default()
        }
    }

    /// Answer `outcome` for `token` (hex) from now on.
    pub fn set(&self, token: &str, outcome: PushOutcome) {
        self.outcomes.lock().unwrap().insert(token.into(), outcome);
    }
    /// (token, node) of every wake-up so far.
    pub fn woken(&self) -> Vec<(String, String)> {
        let woken = self.woken.lock().unwrap();
        woken
            .iter()
            .map(|w| (w.token.clone(), w.node.clone()))
            .collect()
    }
    /// Every wake-up so far, whole.
    pub fn wakeups(&self) -> Vec<Woken> {
        self.woken.lock().unwrap().clone()
    }
}

impl Provider for Scripted {
    fn kind(&self) -> ProviderKind {
        self.kind.unwrap_or(ProviderKind::Apns)
    }

    fn wake<'a>(&'a self, w: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        let token = hex::encode(w.token);
        self.woken.lock().unwrap().push(Woken {
            token: token.clone(),
            node: w.node.into(),
            kind: w.kind,
            account: w.account.map(String::from),
            encrypted: w.encrypted.map(|e| (e.data.to_owned(), e.iv.to_owned())),
            knock: w.knock.map(String::from),
        });
        let outcome = self
            .outcomes
            .lock()
            .unwrap()
            .get(&token)
            .cloned()
            .unwrap_or(PushOutcome::Delivered);
        Box::pin(async move { outcome })
    }
}

/// An app over a temporary store and a scripted backend.
pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub app: App,
    pub backend: Arc<Scripted>,
}

pub fn fixture_with(interval: Duration) -> Fixture {
    fixture_built(|b| b.push_interval(interval))
}

/// The fixture with its app assembled by `build` beyond the two apps (`chat`, `beta`, both with the
/// defaults of an `[[app]]` table) and the 2 s deadline.
pub fn fixture_built(build: impl FnOnce(AppBuilder) -> AppBuilder) -> Fixture {
    fixture_of(
        |backend| {
            vec![
                PushApp::new("chat", backend.clone()),
                PushApp::new("beta", backend),
            ]
        },
        build,
    )
}

/// The fixture with apps of the test's own making over the scripted backend.
pub fn fixture_of(
    apps: impl FnOnce(Arc<Scripted>) -> Vec<PushApp>,
    build: impl FnOnce(AppBuilder) -> AppBuilder,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let backend = Arc::new(Scripted::default());
    let builder = App::builder("push.localhost".parse().unwrap(), Arc::new(store))
        .apps(apps(backend.clone()))
        .publish_deadline(Duration::from_secs(2));
    let app = build(builder).build().unwrap();
    Fixture {
        _dir: dir,
        app,
        backend,
    }
}

pub fn fixture() -> Fixture {
    fixture_with(Duration::ZERO)
}

pub fn iq(xml: &str) -> Iq {
    let elem: Element = xml.parse().expect("test XML parses");
    Iq::try_from(elem).expect("test IQ parses")
}

/// The stanza as the link hands it over: raw bytes (publishes take the fast path).
pub fn frame(xml: &str) -> Frame {
    Frame {
        bytes: xml.as_bytes().to_vec().into(),
        depth: 1,
    }
}

pub async fn ask(f: &Fixture, xml: &str) -> Element {
    let reply = router::handle_frame(&f.app, frame(xml))
        .await
        .expect("every IQ gets a reply");
    Element::from(reply)
}

/// Register and return (node, secret).
pub async fn register(f: &Fixture, from: &str, device: &str, token: &str) -> (String, String) {
    node_and_secret(&ask(f, &register_xml("r1", from, device, token, "")).await)
}
