//! The shared state every handler works with: store, push providers per app, keyring, limits, counters.
//!
//! Built once from the [`Config`] (or piece by piece in tests, with any [`Provider`]); handlers borrow it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use xmpp_parsers::jid::BareJid;

use crate::config::Config;
use crate::config::{AppConfig, PushType};
use crate::limits::Coalescer;
use crate::limits::RegistrationLimiter;
use crate::push::{ApnsClient, DryRun, Provider, ProviderKind, WakeKind};
use crate::stats::Stats;
use crate::store::secrets::Keyring;
use crate::store::{KeyFileError, Store, StoreError, StoreKey, StoreOptions};

/// Why knock could not be assembled from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The store could not be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The configured path.
        path: String,
        /// What failed.
        source: StoreError,
    },
    /// The store key could not be read.
    #[error("store.key_file: {0}")]
    StoreKey(#[from] KeyFileError),
    /// An app's APNs client could not be built.
    #[error("apns app {app:?}: {source}")]
    Apns {
        /// The app's name.
        app: String,
        /// What failed.
        source: crate::push::apns::ApnsSetupError,
    },
}

/// One configured app and the provider that wakes it.
#[derive(Clone)]
pub struct PushApp {
    /// The name clients use in the `app` field.
    pub name: String,
    /// How its wake-ups are sent, and whose token rules its registrations follow.
    pub provider: Arc<dyn Provider>,
    /// How its wake-ups show on the device (the app's `push_type`).
    pub wake_kind: WakeKind,
}

impl PushApp {
    /// An app whose wake-ups are silent (the default `push_type`).
    pub fn new(name: impl Into<String>, provider: Arc<dyn Provider>) -> PushApp {
        PushApp {
            name: name.into(),
            provider,
            wake_kind: WakeKind::default(),
        }
    }
}

/// Everything the handlers need. Built whole by [`App::from_config`] or an [`AppBuilder`], then shared
/// read-only; only the set of apps changes, on a reload.
pub struct App {
    /// The component's own JID; replies come from it and `<enable/>` must name it.
    pub jid: BareJid,
    /// The registration store.
    pub store: Arc<dyn Store>,
    /// Keyed hashes for device and owner identities and node secrets.
    pub keys: Keyring,
    /// The configured apps; the first is the default. Replaced whole when the configuration is reloaded
    /// (SIGHUP), so a publish uses either the old set or the new one, never a mix.
    apps: RwLock<Arc<[Arc<PushApp>]>>,
    /// Per-node push coalescing.
    pub coalescer: Coalescer,
    /// Every publish is answered within this.
    pub publish_deadline: Duration,
    /// What happened, in counts, and the link's state. Shared (not owned) so the link and the push clients
    /// can record into it too, and the HTTP listener read it.
    pub stats: Arc<Stats>,
    /// Domains whose users may register; empty means any.
    pub allowed_domains: Vec<String>,
    /// Registration flood caps per owner and per domain.
    pub registration_limit: RegistrationLimiter,
}

/// Assembles an [`App`] from parts: tests plug in their own store and providers. Starts with no app, no
/// coalescing, a 10 s publish deadline, fresh counters, any domain and no registration cap (as tests
/// want; [`App::from_config`] applies `[limits]`, whose defaults are on).
pub struct AppBuilder {
    jid: BareJid,
    store: Arc<dyn Store>,
    apps: Vec<PushApp>,
    push_interval: Duration,
    publish_deadline: Duration,
    stats: Arc<Stats>,
    allowed_domains: Vec<String>,
    registration_limit: RegistrationLimiter,
}

impl AppBuilder {
    /// The apps; the first is the default.
    pub fn apps(mut self, apps: Vec<PushApp>) -> Self {
        self.apps = apps;
        self
    }
    /// At most one push per node per this interval.
    pub fn push_interval(mut self, interval: Duration) -> Self {
        self.push_interval = interval;
        self
    }
    /// Every publish is answered within this.
    pub fn publish_deadline(mut self, deadline: Duration) -> Self {
        self.publish_deadline = deadline;
        self
    }
    /// Counters shared with the link and the push clients.
    pub fn stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }
    /// Only users of these domains may register (already normalised); empty lets anyone.
    pub fn allowed_domains(mut self, domains: Vec<String>) -> Self {
        self.allowed_domains = domains;
        self
    }
    /// Registration flood caps.
    pub fn registration_limit(mut self, limit: RegistrationLimiter) -> Self {
        self.registration_limit = limit;
        self
    }
    /// The app; fails only if the store cannot give its instance key.
    pub fn build(self) -> Result<App, StoreError> {
        Ok(App {
            keys: Keyring::new(self.store.instance_key()?),
            jid: self.jid,
            store: self.store,
            apps: RwLock::new(self.apps.into_iter().map(Arc::new).collect()),
            coalescer: Coalescer::new(self.push_interval),
            publish_deadline: self.publish_deadline,
            stats: self.stats,
            allowed_domains: self.allowed_domains,
            registration_limit: self.registration_limit,
        })
    }
}

impl App {
    /// Start assembling an app from parts.
    pub fn builder(jid: BareJid, store: Arc<dyn Store>) -> AppBuilder {
        AppBuilder {
            jid,
            store,
            apps: Vec::new(),
            push_interval: Duration::ZERO,
            publish_deadline: Duration::from_secs(10),
            stats: Arc::default(),
            allowed_domains: Vec::new(),
            registration_limit: RegistrationLimiter::unlimited(),
        }
    }

    /// Build every configured app's push provider: reads keys and certificates, connects nowhere.
    pub fn apps_from_config(
        config: &Config,
        stats: &Arc<Stats>,
    ) -> Result<Vec<PushApp>, SetupError> {
        // The provider's own deadline leaves room to send the reply before the publish deadline.
        let push_deadline = config.publish_deadline().mul_f64(0.9);
        config
            .apps
            .iter()
            .map(|app| {
                let dry_run = |kind| -> Arc<dyn Provider> {
                    Arc::new(DryRun {
                        kind,
                        app: app.name().to_owned(),
                    })
                };
                // One arm per provider: its client, and how the app's wake-ups show.
                let (provider, wake_kind) = match app {
                    AppConfig::Apns(apns) => {
                        let provider = if apns.dry_run {
                            dry_run(ProviderKind::Apns)
                        } else {
                            Arc::new(ApnsClient::new(apns, push_deadline, stats.clone()).map_err(
                                |source| SetupError::Apns {
                                    app: apns.name.clone(),
                                    source,
                                },
                            )?)
                        };
                        let wake_kind = match apns.push_type {
                            PushType::Background => WakeKind::Background,
                            PushType::Alert => WakeKind::Alert,
                        };
                        (provider, wake_kind)
                    }
                };
                Ok(PushApp {
                    name: app.name().to_owned(),
                    provider,
                    wake_kind,
                })
            })
            .collect()
    }

    /// The store key `store.key_file` names, read, if it names one.
    pub fn store_key(config: &Config) -> Result<Option<StoreKey>, SetupError> {
        Ok(config
            .store
            .key_file
            .as_deref()
            .map(StoreKey::load)
            .transpose()?)
    }

    /// What `[store]` says, with the store key read.
    pub fn store_options(config: &Config) -> Result<StoreOptions, SetupError> {
        Ok(StoreOptions {
            path: config.store.path.clone(),
            key: App::store_key(config)?,
            plaintext_tokens: config.store.plaintext_tokens,
        })
    }

    /// Open the configured store, with its store key if one is configured (the admin commands use this too).
    pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, SetupError> {
        crate::store::open(&App::store_options(config)?).map_err(|source| SetupError::Store {
            path: config.store.path.display().to_string(),
            source,
        })
    }

    /// Open the store and build every app's provider from the configuration.
    pub fn from_config(config: &Config) -> Result<App, SetupError> {
        let stats = Arc::new(Stats::default());
        let apps = App::apps_from_config(config, &stats)?;
        let store = App::open_store(config)?;
        if !store.is_sealed() {
            tracing::warn!("device tokens are stored in the clear: seal the store with a store key (README: Sealing a store kept in the clear)");
        }
        App::builder(config.component_jid(), store)
            .apps(apps)
            .push_interval(config.push_interval())
            .publish_deadline(config.publish_deadline())
            .stats(stats)
            // Validation already refused anything that is not a domain.
            .allowed_domains(
                config
                    .limits
                    .allowed_domains
                    .iter()
                    .filter_map(|d| crate::config::normalize_domain(d))
                    .collect(),
            )
            .registration_limit(RegistrationLimiter::new(
                config.limits.registrations_per_user_per_hour,
                config.limits.registrations_per_domain_per_hour,
            ))
            .build()
            .map_err(|source| SetupError::Store {
                path: config.store.path.display().to_string(),
                source,
            })
    }

    /// The configured apps, as they are now; the first is the default.
    pub fn apps(&self) -> Arc<[Arc<PushApp>]> {
        self.apps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The app with this name, or the default app when `name` is `None`.
    pub fn app(&self, name: Option<&str>) -> Option<Arc<PushApp>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        match name {
            None => apps.first().cloned(),
            Some(name) => apps.iter().find(|a| a.name == name).cloned(),
        }
    }

    /// Reload the apps from a new configuration (SIGHUP): every key and certificate is read and every
    /// provider built before any is replaced, so a bad file leaves the old set in force. Returns how many
    /// apps are now in force.
    pub fn reload_apps(&self, config: &Config) -> Result<usize, SetupError> {
        let apps = App::apps_from_config(config, &self.stats)?;
        let count = apps.len();
        self.replace_apps(apps);
        Ok(count)
    }

    /// Put a new set of apps in force (a reloaded configuration). Publishes already pushing finish with
    /// the providers they started with.
    pub fn replace_apps(&self, apps: Vec<PushApp>) {
        *self.apps.write().unwrap_or_else(|p| p.into_inner()) =
            apps.into_iter().map(Arc::new).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(apns: &str) -> Config {
        Config::parse(&format!(
            "[component]\njid = \"push.example.org\"\nserver = \"127.0.0.1:5347\"\nsecret = \"s\"\n\
             [store]\npath = \"unused\"\n{apns}"
        ))
        .expect("config")
    }

    fn names(app: &App) -> Vec<String> {
        app.apps().iter().map(|a| a.name.clone()).collect()
    }

    #[test]
    fn a_reload_puts_new_apps_in_force_and_a_bad_one_changes_nothing() {
        use crate::store::SledStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store");
        let first = config("[[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n");
        let app = App::builder("push.example.org".parse().expect("jid"), Arc::new(store))
            .apps(App::apps_from_config(&first, &Arc::default()).expect("providers"))
            .build()
            .expect("app");
        let old = app.app(None).expect("default app");

        let two = config(
            "[[apns]]\nname = \"beta\"\ntopic = \"t\"\ndry_run = true\n\
             [[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n",
        );
        assert_eq!(app.reload_apps(&two).expect("reload"), 2);
        assert_eq!(names(&app), ["beta", "chat"]);
        assert!(!Arc::ptr_eq(&old, &app.app(Some("chat")).expect("chat")));

        let broken = config(
            "[[apns]]\nname = \"gamma\"\ntopic = \"t\"\n[apns.auth]\nkey_file = \"/nonexistent/AuthKey.p8\"\n\
             key_id = \"ABC123DEFG\"\nteam_id = \"TEAM123456\"\n",
        );
        let err = app
            .reload_apps(&broken)
            .expect_err("a missing key is refused");
        assert!(err.to_string().contains("gamma"), "{err}");
        assert_eq!(names(&app), ["beta", "chat"], "the running apps stay");
    }
}
