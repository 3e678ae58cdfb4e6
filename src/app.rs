//! The shared state every handler works with: store, push providers per app, keyring, limits, counters.
//!
//! Built once from the [`Config`] (or piece by piece in tests, with any [`Provider`]); handlers borrow it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use xmpp_parsers::jid::BareJid;

use crate::config::Config;
use crate::config::{AppConfig, PushType, StoreEngine};
use crate::limits::RegistrationLimiter;
use crate::limits::{Budget, Coalescer};
use crate::push::fcm::FcmClient;
use crate::push::{ApnsClient, DryRun, Provider, ProviderKind, WakeKind};
use crate::stats::Stats;
use crate::store::postgres::PostgresOptions;
use crate::store::secrets::Keyring;
use crate::store::{Digest, KeyFileError, Store, StoreError, StoreKey, StoreOptions};

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
    /// Another part of `[store]` could not be used (its password file, its CA file).
    #[error("{0}")]
    StoreSetting(String),
    /// An app's push client could not be built.
    #[error("app {app:?}: {source}")]
    Provider {
        /// The app's name.
        app: String,
        /// What failed.
        source: crate::push::http::ClientSetupError,
    },
}

/// How an app's wake-ups show (its `push_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Always this kind (calls excepted: a call is always a call).
    Fixed(WakeKind),
    /// Visible for what the user's server marks important, silent for the rest, at most this many silent
    /// ones per device per hour (0: no limit).
    Auto {
        /// Silent wake-ups per device per hour.
        background_per_hour: u32,
    },
}

impl Delivery {
    /// What an app's `push_type` and `background_per_hour` say.
    pub fn of(push_type: PushType, background_per_hour: u32) -> Delivery {
        match push_type {
            PushType::Auto => Delivery::Auto {
                background_per_hour,
            },
            PushType::Background => Delivery::Fixed(WakeKind::Background),
            PushType::Alert => Delivery::Fixed(WakeKind::Alert),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery::Auto {
            background_per_hour: crate::config::DEFAULT_BACKGROUND_PER_HOUR,
        }
    }
}

/// One configured app and the provider that wakes it.
#[derive(Clone)]
pub struct PushApp {
    /// The name clients use in the `app` field.
    pub name: String,
    /// How its wake-ups are sent, and whose token rules its registrations follow.
    pub provider: Arc<dyn Provider>,
    /// How its wake-ups show on the device.
    pub delivery: Delivery,
    /// Registration-free mode: the publish-options `pushModule` values that select this app (Monal's
    /// dialect). Empty: off.
    pub push_modules: Vec<String>,
    /// Where push modules named with a `-sandbox` suffix push (the provider's development environment).
    pub sandbox: Option<Arc<dyn Provider>>,
    /// Tigase dialect: the `register-device` provider ids that register for this app. Empty: off.
    pub tigase_providers: Vec<String>,
    /// Largest client-encrypted payload passed through (base64 characters).
    pub max_payload_size: usize,
}

impl PushApp {
    /// An app with the defaults of an `[[app]]` table that sets only its name and provider: `auto`
    /// delivery, no registration-free mode, no Tigase dialect.
    pub fn new(name: impl Into<String>, provider: Arc<dyn Provider>) -> PushApp {
        PushApp {
            name: name.into(),
            provider,
            delivery: Delivery::default(),
            push_modules: Vec::new(),
            sandbox: None,
            tigase_providers: Vec::new(),
            max_payload_size: crate::config::DEFAULT_MAX_PAYLOAD_SIZE,
        }
    }

    /// The same app with wake-ups of one fixed kind.
    pub fn with_kind(mut self, kind: WakeKind) -> PushApp {
        self.delivery = Delivery::Fixed(kind);
        self
    }

    /// Which provider a publish naming push module `module` goes to, if the module names this app: the
    /// app's own, or its sandbox for the module's `-sandbox` variant (`Some(None)`: the app has none).
    pub fn module_provider(&self, module: &str) -> Option<Option<&Arc<dyn Provider>>> {
        if self.push_modules.iter().any(|m| m == module) {
            return Some(Some(&self.provider));
        }
        let base = module.strip_suffix("-sandbox")?;
        self.push_modules
            .iter()
            .any(|m| m == base)
            .then_some(self.sandbox.as_ref())
    }
}

/// Where a registration-free publish naming a push module goes.
pub struct ModuleRoute {
    /// The app the module names.
    pub app: Arc<PushApp>,
    /// Whether the module is the `-sandbox` variant.
    pub sandbox: bool,
    /// The provider to push with; `None` for the module's `-sandbox` variant when the app has no sandbox
    /// endpoint.
    pub provider: Option<Arc<dyn Provider>>,
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
    /// Silent wake-ups left per node this hour (`auto` delivery).
    pub background_budget: Budget<String>,
    /// Wake-ups left per device token this hour in registration-free mode, by the token's keyed hash.
    pub token_budget: Budget<Digest>,
    /// Self-tests left per owner this hour.
    pub self_test_budget: Budget<Digest>,
    /// The per-token cap of registration-free wake-ups per hour (0: none).
    pub registration_free_per_hour: u32,
    /// How long a token a push service called dead is refused without asking it again (registration-free).
    pub dead_token_memory: Duration,
    /// Knocks left per knock token this hour, by the token's opaque id (each token has its own rate).
    pub knock_budget: Budget<[u8; 8]>,
    /// Most knock tokens one user may hold; 0 turns knock tokens off (neither offered nor answered).
    pub knock_tokens_per_user: u32,
    /// Knock tokens created per owner and per domain per hour: a user may make all the tokens they may hold
    /// within an hour (a client handing one to each contact), and no faster, however many they revoke.
    pub knock_token_limit: RegistrationLimiter,
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
    registration_free_per_hour: u32,
    dead_token_memory: Duration,
    knock_tokens_per_user: u32,
    knock_token_limit: RegistrationLimiter,
}

impl AppBuilder {
    /// Knock-token creation caps per owner and per domain.
    pub fn knock_token_limit(mut self, limit: RegistrationLimiter) -> Self {
        self.knock_token_limit = limit;
        self
    }
    /// Most knock tokens per user (0: knock tokens off).
    pub fn knock_tokens_per_user(mut self, most: u32) -> Self {
        self.knock_tokens_per_user = most;
        self
    }
    /// Registration-free wake-ups per token per hour (0: no cap).
    pub fn registration_free_per_hour(mut self, per_hour: u32) -> Self {
        self.registration_free_per_hour = per_hour;
        self
    }
    /// How long a dead token is remembered in registration-free mode.
    pub fn dead_token_memory(mut self, memory: Duration) -> Self {
        self.dead_token_memory = memory;
        self
    }
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
            background_budget: Budget::default(),
            token_budget: Budget::default(),
            self_test_budget: Budget::default(),
            registration_free_per_hour: self.registration_free_per_hour,
            dead_token_memory: self.dead_token_memory,
            knock_budget: Budget::default(),
            knock_tokens_per_user: self.knock_tokens_per_user,
            knock_token_limit: self.knock_token_limit,
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
            registration_free_per_hour: 0,
            dead_token_memory: Duration::from_secs(crate::config::DEFAULT_DEAD_TOKEN_DAYS * 86_400),
            knock_tokens_per_user: crate::config::DEFAULT_KNOCK_TOKENS_PER_USER,
            knock_token_limit: RegistrationLimiter::unlimited(),
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
                // One arm per provider: its clients, and what the app's table says of delivery and dialects.
                match app {
                    AppConfig::Apns(apns) => {
                        let client = |endpoint: &str| -> Result<Arc<dyn Provider>, SetupError> {
                            if apns.dry_run {
                                return Ok(dry_run(ProviderKind::Apns));
                            }
                            let config = crate::config::ApnsConfig {
                                endpoint: endpoint.to_owned(),
                                ..apns.clone()
                            };
                            let client = ApnsClient::new(&config, push_deadline, stats.clone())
                                .map_err(|source| SetupError::Provider {
                                    app: apns.name.clone(),
                                    source,
                                })?;
                            Ok(Arc::new(client))
                        };
                        let sandbox = match apns.sandbox() {
                            Some(endpoint) if !apns.push_modules.is_empty() => {
                                Some(client(endpoint)?)
                            }
                            _ => None,
                        };
                        Ok(PushApp {
                            name: app.name().to_owned(),
                            provider: client(&apns.endpoint)?,
                            delivery: Delivery::of(apns.push_type, apns.background_per_hour),
                            push_modules: apns.push_modules.clone(),
                            sandbox,
                            tigase_providers: apns.tigase_providers.clone(),
                            max_payload_size: apns.max_payload_size,
                        })
                    }
                    AppConfig::Fcm(fcm) => {
                        let provider: Arc<dyn Provider> = if fcm.dry_run {
                            dry_run(ProviderKind::Fcm)
                        } else {
                            let client = FcmClient::new(fcm, push_deadline, stats.clone())
                                .map_err(|source| SetupError::Provider {
                                    app: fcm.name.clone(),
                                    source,
                                })?;
                            Arc::new(client)
                        };
                        Ok(PushApp {
                            delivery: Delivery::of(fcm.push_type, fcm.background_per_hour),
                            push_modules: fcm.push_modules.clone(),
                            ..PushApp::new(&fcm.name, provider)
                        })
                    }
                }
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

    /// What `[store]` says, with the store key (and a database's password) read.
    pub fn store_options(config: &Config) -> Result<StoreOptions, SetupError> {
        let store = &config.store;
        let postgres = match store.engine {
            StoreEngine::Sled => None,
            StoreEngine::Postgres => {
                let url = store.url.clone().unwrap_or_default();
                let password = store
                    .password()
                    .map_err(|e| SetupError::StoreSetting(e.to_string()))?;
                let tls = crate::push::http::tls_builder(store.ca_file.as_deref())
                    .map_err(|e| SetupError::StoreSetting(format!("store.ca_file: {e}")))?
                    .with_no_client_auth();
                Some(PostgresOptions {
                    require_tls: store.tls.unwrap_or_else(|| !is_local_database(&url)),
                    url,
                    password,
                    tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                })
            }
        };
        Ok(StoreOptions {
            path: store.sled_path(),
            postgres,
            key: App::store_key(config)?,
            plaintext_tokens: store.plaintext_tokens,
        })
    }

    /// Open the configured store, with its store key if one is configured (the admin commands use this too).
    pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, SetupError> {
        crate::store::open(&App::store_options(config)?).map_err(|source| SetupError::Store {
            path: config.store.describe(),
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
            .registration_free_per_hour(config.limits.registration_free_per_token_per_hour)
            .knock_tokens_per_user(config.limits.knock_tokens_per_user)
            .knock_token_limit(RegistrationLimiter::new(
                config.limits.knock_tokens_per_user,
                config.limits.registrations_per_domain_per_hour,
            ))
            .dead_token_memory(Duration::from_secs(
                u64::from(config.limits.dead_token_days) * 86_400,
            ))
            .build()
            .map_err(|source| SetupError::Store {
                path: config.store.describe(),
                source,
            })
    }

    /// The configured apps, as they are now; the first is the default.
    pub fn apps(&self) -> Arc<[Arc<PushApp>]> {
        self.apps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The app and provider a registration-free publish naming push module `module` goes to.
    pub fn app_for_module(&self, module: &str) -> Option<ModuleRoute> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.iter().find_map(|app| {
            let provider = app.module_provider(module)?.cloned();
            Some(ModuleRoute {
                app: app.clone(),
                sandbox: !app.push_modules.iter().any(|m| m == module),
                provider,
            })
        })
    }

    /// The app a Tigase-dialect `provider` id registers for.
    pub fn app_for_tigase_provider(&self, provider: &str) -> Option<Arc<PushApp>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.iter()
            .find(|app| app.tigase_providers.iter().any(|p| p == provider))
            .cloned()
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

/// Whether a database URL names a database on this machine (a loopback address or a Unix socket), which
/// needs no TLS by default.
fn is_local_database(url: &str) -> bool {
    use tokio_postgres::config::Host;
    url.parse::<tokio_postgres::Config>().is_ok_and(|config| {
        config.get_hosts().iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
    })
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
