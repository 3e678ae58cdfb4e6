//! The shared state every handler works with: store, push backends per app, keyring, rate limiters, counters.
//!
//! Built once from the [`Config`] (or piece by piece in tests, with any [`Backend`]); handlers borrow it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use xmpp_parsers::jid::BareJid;

use crate::config::Config;
use crate::limits::Coalescer;
use crate::limits::RegistrationLimiter;
use crate::push::{ApnsClient, Backend, DryRun};
use crate::stats::Stats;
use crate::store::secrets::Keyring;
use crate::store::{SledStore, Store, StoreError};

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
    #[error(transparent)]
    StoreKey(#[from] crate::config::ConfigError),
    /// An app's APNs client could not be built.
    #[error("apns app {app:?}: {source}")]
    Apns {
        /// The app's name.
        app: String,
        /// What failed.
        source: crate::push::apns::ApnsSetupError,
    },
}

/// One configured app and the backend that wakes it.
#[derive(Clone)]
pub struct PushApp {
    /// The name clients use in the `app` field.
    pub name: String,
    /// How its wake-ups are sent.
    pub backend: Arc<dyn Backend>,
}

/// Everything the handlers need.
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
    /// can record into it too, and the admin listener read it.
    pub stats: Arc<Stats>,
    /// Domains whose users may register; empty means any.
    pub allowed_domains: Vec<String>,
    /// Registration flood caps per owner and per domain. [`App::new`] starts unlimited, as tests want;
    /// [`App::from_config`] applies `[limits]`, whose defaults are on.
    pub registration_limit: RegistrationLimiter,
}

impl App {
    /// Assemble an app from parts (tests plug in their own store and backends).
    pub fn new(
        jid: BareJid,
        store: Arc<dyn Store>,
        apps: Vec<PushApp>,
        push_interval: Duration,
        publish_deadline: Duration,
    ) -> Result<App, StoreError> {
        let keys = Keyring::new(store.instance_key()?);
        Ok(App {
            jid,
            store,
            keys,
            apps: RwLock::new(apps.into_iter().map(Arc::new).collect()),
            coalescer: Coalescer::new(push_interval),
            publish_deadline,
            stats: Arc::default(),
            allowed_domains: Vec::new(),
            registration_limit: RegistrationLimiter::unlimited(),
        })
    }

    /// Build every configured app's push backend: reads keys and certificates, connects nowhere.
    pub fn backends_from_config(
        config: &Config,
        stats: &Arc<Stats>,
    ) -> Result<Vec<PushApp>, SetupError> {
        // The backend's own deadline leaves room to send the reply before the publish deadline.
        let push_deadline = config.publish_deadline().mul_f64(0.9);
        config
            .apns
            .iter()
            .map(|app| {
                let backend: Arc<dyn Backend> = if app.dry_run {
                    Arc::new(DryRun {
                        app: app.name.clone(),
                    })
                } else {
                    Arc::new(ApnsClient::new(app, push_deadline, stats.clone()).map_err(
                        |source| SetupError::Apns {
                            app: app.name.clone(),
                            source,
                        },
                    )?)
                };
                Ok(PushApp {
                    name: app.name.clone(),
                    backend,
                })
            })
            .collect()
    }

    /// Open the configured store, with its store key if one is configured (the admin commands use this too).
    pub fn open_store(config: &Config) -> Result<SledStore, SetupError> {
        let key = config.store.key()?;
        SledStore::open_with_key(&config.store.path, key).map_err(|source| SetupError::Store {
            path: config.store.path.display().to_string(),
            source,
        })
    }

    /// Open the store and build every app's backend from the configuration.
    pub fn from_config(config: &Config) -> Result<App, SetupError> {
        let stats = Arc::new(Stats::default());
        let apps = App::backends_from_config(config, &stats)?;
        let store_error = |source| SetupError::Store {
            path: config.store.path.display().to_string(),
            source,
        };
        if config.store.key_file.is_none() {
            tracing::warn!("store.key_file is not set: device tokens are stored in the clear (`knock keygen` writes a key)");
        }
        let store = App::open_store(config)?;
        let mut app = App::new(
            config.component_jid(),
            Arc::new(store),
            apps,
            config.push_interval(),
            config.publish_deadline(),
        )
        .map_err(store_error)?;
        // Validation already refused anything that is not a domain.
        app.allowed_domains = config
            .limits
            .allowed_domains
            .iter()
            .filter_map(|d| crate::config::normalize_domain(d))
            .collect();
        app.stats = stats;
        app.registration_limit = RegistrationLimiter::new(
            config.limits.registrations_per_user_per_hour,
            config.limits.registrations_per_domain_per_hour,
        );
        Ok(app)
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

    /// Reload the `[[apns]]` apps from a new configuration (SIGHUP): every key and certificate is read and
    /// every backend built before any is replaced, so a bad file leaves the old set in force. Returns how
    /// many apps are now in force.
    pub fn reload_apps(&self, config: &Config) -> Result<usize, SetupError> {
        let apps = App::backends_from_config(config, &self.stats)?;
        let count = apps.len();
        self.replace_apps(apps);
        Ok(count)
    }

    /// Put a new set of apps in force (a reloaded configuration). Publishes already pushing finish with
    /// the backends they started with.
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
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store");
        let first = config("[[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n");
        let app = App::new(
            "push.example.org".parse().expect("jid"),
            Arc::new(store),
            App::backends_from_config(&first, &Arc::default()).expect("backends"),
            Duration::ZERO,
            Duration::from_secs(1),
        )
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
