//! The typed TOML configuration: what an admin writes, checked before anything starts.
//!
//! Every field is documented here and in `config/knock.example.toml`. Unknown keys are errors, and every
//! error, from the parser or from validation, names the dotted key at fault and its line ([`locate`]), so
//! `knock check` can tell an admin exactly what to fix. The file is read as written ([`RawConfig`]), then
//! turned into the [`Config`] the rest of knock reads, each app typed by its provider.
//!
//! This module names no other part of knock: everything else depends on it, never the reverse.

mod locate;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use xmpp_parsers::jid::BareJid;

use self::locate::Locator;

/// The push services an `[[app]]` may name in `provider`.
pub const PROVIDERS: &[&str] = &["apns", "fcm"];

/// Anything that makes a configuration unusable, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not a usable configuration: the TOML did not parse, did not match the schema (unknown
    /// key, wrong type, missing key), or a value makes no sense. Says where: `path:line: key: message`.
    #[error("{}", where_and_what(path, *line, key.as_deref(), message))]
    At {
        /// The configuration file.
        path: PathBuf,
        /// The 1-based line at fault, when the file has one for it (a missing key has none of its own: the
        /// line of its table, if the table is written).
        line: Option<usize>,
        /// The dotted key at fault, e.g. `apns[0].auth.key_id`.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but makes no sense (before it is placed in a file: [`Config::parse`] turns it into
    /// [`ConfigError::At`]; reading `secret_file` at start reports it as it is).
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// The dotted key at fault, e.g. `apns[0].topic`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The same error, said of the file at `path`.
    fn in_file(self, path: &Path) -> ConfigError {
        match self {
            ConfigError::At {
                line, key, message, ..
            } => ConfigError::At {
                path: path.to_owned(),
                line,
                key,
                message,
            },
            other => other,
        }
    }
}

/// `path:line: key: message`, leaving out what is not known.
fn where_and_what(path: &Path, line: Option<usize>, key: Option<&str>, message: &str) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if let Some(key) = key {
        out.push_str(&format!(": {key}"));
    }
    out.push_str(&format!(": {message}"));
    out
}

/// The whole configuration, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// How knock attaches to the XMPP server (XEP-0114).
    pub component: ComponentConfig,
    /// Where registrations live.
    pub store: StoreConfig,
    /// Limits that protect the push services, the server and knock itself.
    pub limits: LimitsConfig,
    /// The apps knock can wake, in file order; the first is the default for registrations that name none.
    pub apps: Vec<AppConfig>,
    /// The HTTP admin listener (`/metrics`, `/health`); off unless `listen` is set.
    pub admin: AdminConfig,
    /// Which table the apps were written in (`app` or its alias `apns`), to name their keys as written.
    apps_table: &'static str,
}

/// The file as written: [`Config`] before its apps are typed by provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    component: ComponentConfig,
    store: StoreConfig,
    #[serde(default)]
    limits: LimitsConfig,
    /// `[[app]]` tables.
    #[serde(default)]
    app: Vec<AppTable>,
    /// `[[apns]]` tables: the older spelling of an `[[app]]` with `provider = "apns"`.
    #[serde(default)]
    apns: Vec<AppTable>,
    #[serde(default)]
    admin: AdminConfig,
}

/// One `[[app]]` (or `[[apns]]`) table as written: the keys every app has, and each provider's own, which
/// are checked against `provider` when the table becomes an [`AppConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppTable {
    name: String,
    /// Required in `[[app]]`; `[[apns]]` implies `apns`.
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    dry_run: bool,
    // APNs: see [`ApnsConfig`] for each.
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    push_type: Option<PushType>,
    #[serde(default)]
    alert_title: Option<String>,
    #[serde(default)]
    include_node: Option<bool>,
    #[serde(default)]
    expiration_secs: Option<u64>,
    #[serde(default)]
    auth: Option<ApnsAuthConfig>,
    #[serde(default)]
    voip_topic: Option<String>,
    #[serde(default)]
    sandbox_endpoint: Option<String>,
    #[serde(default)]
    background_per_hour: Option<u32>,
    #[serde(default)]
    push_module: Option<OneOrMany>,
    #[serde(default)]
    tigase_provider: Option<OneOrMany>,
    #[serde(default)]
    max_payload_size: Option<usize>,
    // FCM: see [`FcmConfig`] for each.
    #[serde(default)]
    service_account_file: Option<PathBuf>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A key that takes one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

impl AppTable {
    /// The app this table configures; `key` is how its keys are named in errors (`app[1]`).
    fn into_app(self, key: &str, implied: Option<&str>) -> Result<AppConfig, ConfigError> {
        let provider = match (self.provider.as_deref(), implied) {
            (Some(p), Some(implied)) if p != implied => {
                return Err(ConfigError::invalid(
                    format!("{key}.provider"),
                    format!(
                    "an [[{implied}]] table is an {implied} app; use [[app]] for another provider"
                ),
                ))
            }
            (Some(p), _) | (None, Some(p)) => p.to_owned(),
            (None, None) => {
                return Err(ConfigError::invalid(
                    format!("{key}.provider"),
                    format!(
                        "missing: which push service, one of {}",
                        PROVIDERS.join(", ")
                    ),
                ))
            }
        };
        let fcm_only = [
            ("service_account_file", self.service_account_file.is_some()),
            ("project_id", self.project_id.is_some()),
            ("token_uri", self.token_uri.is_some()),
        ];
        if provider == "apns" {
            if let Some((name, _)) = fcm_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError::invalid(
                    format!("{key}.{name}"),
                    "is an FCM setting; this app has provider = \"apns\"",
                ));
            }
        }
        match provider.as_str() {
            "apns" => Ok(AppConfig::Apns(ApnsConfig {
                topic: self.topic.ok_or_else(|| {
                    ConfigError::invalid(format!("{key}.topic"), "missing: the app's bundle id")
                })?,
                name: self.name,
                endpoint: self.endpoint.unwrap_or_else(default_endpoint),
                ca_file: self.ca_file,
                push_type: self.push_type.unwrap_or_default(),
                alert_title: self.alert_title.unwrap_or_else(default_alert_title),
                include_node: self.include_node.unwrap_or(true),
                expiration_secs: self.expiration_secs.unwrap_or_else(default_expiration),
                dry_run: self.dry_run,
                auth: self.auth,
                voip_topic: self.voip_topic,
                sandbox_endpoint: self.sandbox_endpoint,
                background_per_hour: self
                    .background_per_hour
                    .unwrap_or(DEFAULT_BACKGROUND_PER_HOUR),
                push_modules: self
                    .push_module
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default(),
                tigase_providers: self
                    .tigase_provider
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default(),
                max_payload_size: self.max_payload_size.unwrap_or(DEFAULT_MAX_PAYLOAD_SIZE),
            })),
            "fcm" => {
                // Said by name rather than ignored: an admin who sets one expects it to do something.
                let apns_only = [
                    ("topic", self.topic.is_some()),
                    ("voip_topic", self.voip_topic.is_some()),
                    ("alert_title", self.alert_title.is_some()),
                    ("include_node", self.include_node.is_some()),
                    ("auth", self.auth.is_some()),
                    ("sandbox_endpoint", self.sandbox_endpoint.is_some()),
                    ("tigase_provider", self.tigase_provider.is_some()),
                    ("max_payload_size", self.max_payload_size.is_some()),
                ];
                if let Some((name, _)) = apns_only.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::invalid(
                        format!("{key}.{name}"),
                        "is an APNs setting; this app has provider = \"fcm\"",
                    ));
                }
                Ok(AppConfig::Fcm(FcmConfig {
                    name: self.name,
                    service_account_file: self.service_account_file,
                    project_id: self.project_id,
                    endpoint: self.endpoint.unwrap_or_else(|| FCM_ENDPOINT.to_owned()),
                    token_uri: self.token_uri,
                    ca_file: self.ca_file,
                    push_type: self.push_type.unwrap_or_default(),
                    background_per_hour: self.background_per_hour.unwrap_or(0),
                    push_modules: self
                        .push_module
                        .map(OneOrMany::into_vec)
                        .unwrap_or_default(),
                    expiration_secs: self.expiration_secs.unwrap_or(FCM_MAX_TTL_SECS),
                    dry_run: self.dry_run,
                }))
            }
            other => Err(ConfigError::invalid(
                format!("{key}.provider"),
                format!(
                    "unknown push service {other:?}; knock has {}",
                    PROVIDERS.join(", ")
                ),
            )),
        }
    }
}

/// One app knock can wake, typed by its push service.
#[derive(Debug, Clone)]
pub enum AppConfig {
    /// An iOS app, woken through APNs.
    Apns(ApnsConfig),
    /// An Android app, woken through FCM.
    Fcm(FcmConfig),
}

/// What every app says, whatever its push service: how it is named, how its wake-ups show, and who may
/// push to it without registering.
#[derive(Debug, Clone, Copy)]
pub struct AppBasics<'a> {
    /// The name clients use in the `app` field.
    pub name: &'a str,
    /// Whether pushes are only logged.
    pub dry_run: bool,
    /// How wake-ups show.
    pub push_type: PushType,
    /// In `auto`: silent wake-ups per device per hour (0: no limit).
    pub background_per_hour: u32,
    /// Registration-free push modules.
    pub push_modules: &'a [String],
    /// Tigase-dialect provider ids (APNs apps only).
    pub tigase_providers: &'a [String],
}

impl AppConfig {
    /// What every app says, whatever its push service.
    pub fn basics(&self) -> AppBasics<'_> {
        match self {
            AppConfig::Apns(app) => AppBasics {
                name: &app.name,
                dry_run: app.dry_run,
                push_type: app.push_type,
                background_per_hour: app.background_per_hour,
                push_modules: &app.push_modules,
                tigase_providers: &app.tigase_providers,
            },
            AppConfig::Fcm(app) => AppBasics {
                name: &app.name,
                dry_run: app.dry_run,
                push_type: app.push_type,
                background_per_hour: app.background_per_hour,
                push_modules: &app.push_modules,
                tigase_providers: &[],
            },
        }
    }

    /// The name clients use in the `app` field.
    pub fn name(&self) -> &str {
        self.basics().name
    }

    /// Whether pushes are only logged.
    pub fn dry_run(&self) -> bool {
        self.basics().dry_run
    }

    /// One line for `knock check`: the name, the push service, how pushes show, and the client dialects
    /// beyond p2's that the app serves.
    pub fn summary(&self) -> String {
        let app = self.basics();
        let (silent, visible) = match self {
            AppConfig::Apns(_) => ("silent", "alert"),
            AppConfig::Fcm(_) => ("normal priority", "high priority"),
        };
        let mut parts = vec![
            self.provider().to_owned(),
            match (app.push_type, app.background_per_hour) {
                (PushType::Auto, 0) => format!("auto: {visible} or {silent}"),
                (PushType::Auto, n) => format!("auto: {visible} or {silent}, {n} {silent}/hour"),
                (PushType::Background, _) => silent.to_owned(),
                (PushType::Alert, _) => visible.to_owned(),
            },
        ];
        if !app.push_modules.is_empty() {
            parts.push(format!(
                "registration-free for {}",
                app.push_modules.join(", ")
            ));
        }
        if !app.tigase_providers.is_empty() {
            parts.push(format!(
                "Tigase provider {}",
                app.tigase_providers.join(", ")
            ));
        }
        if app.dry_run {
            parts.push("dry run".to_owned());
        }
        format!("{} ({})", app.name, parts.join("; "))
    }

    /// The push service's name, as `provider` says it.
    pub fn provider(&self) -> &'static str {
        match self {
            AppConfig::Apns(_) => "apns",
            AppConfig::Fcm(_) => "fcm",
        }
    }
}

/// The `[admin]` table: the HTTP listener for `/metrics` (Prometheus) and `/health`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` to listen on, e.g. `127.0.0.1:9357`; unset (the default) means no listener. The endpoints
    /// have no authentication, so anything but a loopback address is logged loudly at start.
    #[serde(default)]
    pub listen: Option<String>,
}

/// The `[component]` table: the XEP-0114 link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The component's JID, as configured on the server (`Component "push.example.org"`).
    pub jid: String,
    /// `host:port` of the server's component listener.
    pub server: String,
    /// The shared secret, inline. Exactly one of `secret` and `secret_file` must be set.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the shared secret (surrounding whitespace is ignored), to keep it out of the config.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Seconds between XEP-0199 keepalive pings to the server. A link silent for three intervals is dead.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_secs: u64,
    /// Most stanzas handled at once; beyond this knock stops reading, so memory stays bounded.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// While another knock holds the component (Prosody refuses a second connection with `<conflict/>`), how
    /// often this one, a standby, tries again: the longest a takeover waits after the active knock's
    /// connection drops. Prosody logs four lines per refused attempt, so shorter costs its log.
    #[serde(default = "default_standby_retry_ms")]
    pub standby_retry_ms: u64,
}

/// The `[store]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where registrations live: `sled` (the default: embedded, nothing to run) or `postgres` (a database
    /// several knock instances can share).
    #[serde(default)]
    pub engine: StoreEngine,
    /// sled: directory of the database; created if missing.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// postgres: the database, as a `postgres://user@host:port/database` URL or `key=value` pairs, without
    /// the password.
    #[serde(default)]
    pub url: Option<String>,
    /// postgres: a file holding the password (surrounding whitespace ignored). Otherwise the environment's
    /// `KNOCK_STORE_PASSWORD`, if set; otherwise none (trust or peer authentication).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// postgres: require TLS, verified against the public roots and `ca_file`. Default: on, except for a
    /// database on a loopback address or a Unix socket.
    #[serde(default)]
    pub tls: Option<bool>,
    /// postgres: extra PEM CA certificates to trust for the database's TLS certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The store key (written by `knock keygen`): device tokens and the instance key are sealed under it,
    /// so a copy of the database alone reveals no token. Kept outside the database and its backups.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Allow creating a store whose device tokens are kept in the clear, without `key_file`: for tests and
    /// throwaway setups only. Without it, knock refuses to create a new store unless `key_file` is set; a
    /// store already in the clear opens either way.
    #[serde(default)]
    pub plaintext_tokens: bool,
}

/// Which engine keeps the registrations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    /// Embedded: a sled database in `path`.
    #[default]
    Sled,
    /// A PostgreSQL database at `url`, which several instances may share.
    Postgres,
}

/// The environment variable a PostgreSQL password may come from.
pub const STORE_PASSWORD_ENV: &str = "KNOCK_STORE_PASSWORD";

impl StoreConfig {
    /// The store, for people: the sled directory or the database URL (never a password).
    pub fn describe(&self) -> String {
        match self.engine {
            StoreEngine::Sled => self
                .path
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            StoreEngine::Postgres => self.url.clone().unwrap_or_default(),
        }
    }

    /// The sled directory, for engine sled (validated when the config was loaded).
    pub fn sled_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_default()
    }

    /// The PostgreSQL password: `password_file`'s content, or the environment's, or none.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let password = text.trim().to_owned();
            if password.is_empty() {
                return Err(ConfigError::invalid(
                    "store.password_file",
                    "the file is empty",
                ));
            }
            return Ok(Some(password));
        }
        Ok(std::env::var(STORE_PASSWORD_ENV)
            .ok()
            .filter(|p| !p.is_empty()))
    }
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// At most one APNs push per node in this many milliseconds; publishes inside the window are coalesced.
    #[serde(default = "default_push_interval_ms")]
    pub push_interval_ms: u64,
    /// Every publish is answered within this many milliseconds, pushed or not (ejabberd gives up after 32 s,
    /// Prosody never does, so a late answer is lost or holds state on the server).
    #[serde(default = "default_publish_deadline_ms")]
    pub publish_deadline_ms: u64,
    /// Only users of these XMPP domains may register; empty (the default) lets anyone register.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Registrations that change something, per user (bare JID) per hour: a bucket of this many, refilled
    /// continuously; 0 is unlimited. The default, 10, covers a user re-registering several devices and apps
    /// after a token change or a reinstall, while one account can add at most 240 records a day. Re-sending an
    /// unchanged registration (every app start, say) costs nothing.
    #[serde(default = "default_registrations_per_user_per_hour")]
    pub registrations_per_user_per_hour: u32,
    /// Registrations that change something, per user domain per hour, shared by all of its users, refilled
    /// the same way; 0 is unlimited. The default, 10000, leaves a large public server room for thousands an
    /// hour (a new app release, a restore to new phones), while bounding what one hostile server, which can
    /// invent users at will, adds to the store. Lower it, or set `allowed_domains`, on a private service.
    #[serde(default = "default_registrations_per_domain_per_hour")]
    pub registrations_per_domain_per_hour: u32,
    /// Registration-free mode: wake-ups per device token per hour, a bucket refilled continuously; 0 is
    /// unlimited. Anyone who knows a token and a push module can publish to it, so this is what bounds how
    /// often a stranger can wake that phone.
    #[serde(default = "default_registration_free_per_token_per_hour")]
    pub registration_free_per_token_per_hour: u32,
    /// Registration-free mode: days a token the push service called dead is refused without asking it
    /// again (kept in the store, as a keyed hash).
    #[serde(default = "default_dead_token_days")]
    pub dead_token_days: u32,
    /// Knock tokens (per-contact wake-up tokens, `xep/knock-registration.md` §19): most one user may hold at
    /// once. 0 turns the feature off: its commands are not offered and knocks are not answered.
    #[serde(default = "default_knock_tokens_per_user")]
    pub knock_tokens_per_user: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            push_interval_ms: default_push_interval_ms(),
            publish_deadline_ms: default_publish_deadline_ms(),
            allowed_domains: Vec::new(),
            registrations_per_user_per_hour: default_registrations_per_user_per_hour(),
            registrations_per_domain_per_hour: default_registrations_per_domain_per_hour(),
            registration_free_per_token_per_hour: default_registration_free_per_token_per_hour(),
            dead_token_days: default_dead_token_days(),
            knock_tokens_per_user: default_knock_tokens_per_user(),
        }
    }
}

/// An `[[app]]` with `provider = "apns"` (or an `[[apns]]` table): an iOS app knock can wake.
#[derive(Debug, Clone)]
pub struct ApnsConfig {
    /// The name clients use in the `app` field; unique.
    pub name: String,
    /// The app's bundle id, sent as `apns-topic`.
    pub topic: String,
    /// The `apns-topic` of call (PushKit VoIP) pushes; `None`: the bundle id with `.voip` appended, as Apple
    /// names it.
    pub voip_topic: Option<String>,
    /// `production`, `sandbox`, or any `https://` base URL (a test server).
    pub endpoint: String,
    /// Extra PEM CA certificates to trust for the endpoint, besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// `auto` (visible for what the user's server marks important, silent otherwise, within
    /// `background_per_hour`), `background` (always silent `content-available`, priority 5) or `alert`
    /// (always visible, for apps with a Notification Service Extension: a generic title, `mutable-content`,
    /// priority 10).
    pub push_type: PushType,
    /// In `auto`: how many silent wake-ups one device gets per hour; further unimportant publishes are
    /// answered without a push. Apple delivers two or three an hour and throttles the rest. 0: no limit.
    pub background_per_hour: u32,
    /// Registration-free mode (Monal's dialect, as fpush serves it): publish-options `pushModule` values
    /// that select this app, with the node being the device token. Empty: off.
    pub push_modules: Vec<String>,
    /// Where a push module named with a `-sandbox` suffix pushes: `sandbox` by default when `endpoint` is
    /// `production`; otherwise such modules are not served unless this is set.
    pub sandbox_endpoint: Option<String>,
    /// Tigase dialect: the `provider` ids of `register-device` that register for this app
    /// (e.g. `tigase:messenger:apns:1`, Siskin's). Empty: the dialect is off for this app.
    pub tigase_providers: Vec<String>,
    /// Largest client-encrypted payload (base64 characters) passed through; said to Tigase-dialect clients
    /// as `max-payload-size`.
    pub max_payload_size: usize,
    /// The title of alert pushes. It is the same for every push: knock never forwards content.
    pub alert_title: String,
    /// Put the pubsub node in the payload (key `node`), so an app with several accounts wakes only the one with mail.
    pub include_node: bool,
    /// How long Apple may hold an undelivered push, in seconds (0: try once, do not store).
    pub expiration_secs: u64,
    /// Log pushes instead of sending them (for staging and benchmarks). Auth is then optional.
    pub dry_run: bool,
    /// How knock authenticates to APNs.
    pub auth: Option<ApnsAuthConfig>,
}

/// An `[[app]]` with `provider = "fcm"`: an Android app knock wakes through Firebase Cloud Messaging (HTTP v1).
#[derive(Debug, Clone)]
pub struct FcmConfig {
    /// The name clients use in the `app` field; unique.
    pub name: String,
    /// The Firebase project's service-account key (JSON, from the Firebase console: Project settings,
    /// Service accounts, Generate new private key). Required unless `dry_run`.
    pub service_account_file: Option<PathBuf>,
    /// The Firebase project id; `None`: the service account's `project_id`.
    pub project_id: Option<String>,
    /// The FCM API's base URL: Google's by default, or any `https://` URL (a test server).
    pub endpoint: String,
    /// Where access tokens are asked for; `None`: the service account's `token_uri`.
    pub token_uri: Option<String>,
    /// Extra PEM CA certificates to trust for the endpoint and the token URI, besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// `auto` (high priority for what the user's server marks important, normal priority otherwise),
    /// `background` (always normal) or `alert` (always high). Google deprioritises an app's high-priority
    /// messages that do not lead to a visible notification, so `auto` is the default.
    pub push_type: PushType,
    /// In `auto`: normal-priority wake-ups per device per hour; further unimportant publishes are answered
    /// without a push. 0 (the default): no limit, since Google does not ration them as Apple does.
    pub background_per_hour: u32,
    /// Registration-free mode: publish-options `pushModule` values that select this app, with the node
    /// being the FCM token. Empty: off.
    pub push_modules: Vec<String>,
    /// How long Google may hold an undelivered message, in seconds (`android.ttl`): 0 to 2419200 (four
    /// weeks, Google's own default and knock's).
    pub expiration_secs: u64,
    /// Log pushes instead of sending them (for staging and benchmarks); the service account is then optional.
    pub dry_run: bool,
}

/// Google's FCM API.
pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
/// The longest `android.ttl` Google accepts, which is also its default: four weeks.
pub const FCM_MAX_TTL_SECS: u64 = 2_419_200;

/// Which kind of push knock sends for an app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushType {
    /// Visible for important publishes, silent (and budgeted) for the rest.
    #[default]
    Auto,
    /// Always a silent `content-available` push.
    Background,
    /// Always a visible push with a fixed title and `mutable-content`.
    Alert,
}

/// Silent wake-ups per device per hour in `auto`: what Apple says it delivers ("two or three per hour").
pub const DEFAULT_BACKGROUND_PER_HOUR: u32 = 3;
/// Largest encrypted payload passed through by default: Siskin asks for 3072, and with the rest of the
/// payload it stays under APNs' 4096 bytes.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 3072;

/// The `[apns.auth]` table, as written. Either token auth (`key_file`, `key_id`, `team_id`) or certificate auth
/// (`cert_file`, `key_file`); [`ApnsAuthConfig::kind`] tells which, with a clear error for mixtures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsAuthConfig {
    /// The `.p8` signing key (token auth) or the PEM private key of the certificate (certificate auth).
    pub key_file: PathBuf,
    /// The 10-character key id Apple shows next to the `.p8` key (token auth).
    #[serde(default)]
    pub key_id: Option<String>,
    /// The 10-character Apple developer team id (token auth).
    #[serde(default)]
    pub team_id: Option<String>,
    /// The PEM client certificate Apple issued (certificate auth).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
}

/// The authentication an app uses, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsAuth {
    /// A `.p8` ES256 key that signs short-lived JWTs.
    Token {
        /// The `.p8` file.
        key_file: PathBuf,
        /// Apple's key id (JWT `kid`).
        key_id: String,
        /// Apple's team id (JWT `iss`).
        team_id: String,
    },
    /// A TLS client certificate.
    Certificate {
        /// The PEM certificate chain.
        cert_file: PathBuf,
        /// The PEM private key.
        key_file: PathBuf,
    },
}

impl ApnsAuthConfig {
    /// Decide token or certificate auth; `key` is the dotted key of this table for error messages.
    pub fn kind(&self, key: &str) -> Result<ApnsAuth, ConfigError> {
        match (&self.cert_file, &self.key_id, &self.team_id) {
            (Some(cert), None, None) => Ok(ApnsAuth::Certificate {
                cert_file: cert.clone(),
                key_file: self.key_file.clone(),
            }),
            (Some(_), _, _) => Err(ConfigError::invalid(
                key,
                "set either cert_file + key_file (certificate auth) or key_file + key_id + team_id (token auth), not both",
            )),
            (None, Some(key_id), Some(team_id)) => {
                for (name, value) in [("key_id", key_id), ("team_id", team_id)] {
                    if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(ConfigError::invalid(
                            format!("{key}.{name}"),
                            "must be Apple's alphanumeric id (10 characters)",
                        ));
                    }
                }
                Ok(ApnsAuth::Token {
                    key_file: self.key_file.clone(),
                    key_id: key_id.clone(),
                    team_id: team_id.clone(),
                })
            }
            (None, None, _) => Err(ConfigError::invalid(
                format!("{key}.key_id"),
                "token auth needs key_id (or set cert_file for certificate auth)",
            )),
            (None, _, None) => Err(ConfigError::invalid(
                format!("{key}.team_id"),
                "token auth needs team_id",
            )),
        }
    }
}

fn default_ping_interval() -> u64 {
    30
}
/// A domain as knock compares it with a sender's (nameprep'd, as in a JID), or `None` if it is not one.
pub fn normalize_domain(domain: &str) -> Option<String> {
    let jid: BareJid = domain.parse().ok()?;
    jid.node().is_none().then(|| jid.domain().to_string())
}

fn default_standby_retry_ms() -> u64 {
    1000
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_push_interval_ms() -> u64 {
    1000
}
fn default_publish_deadline_ms() -> u64 {
    10_000
}
fn default_registrations_per_user_per_hour() -> u32 {
    10
}
fn default_registrations_per_domain_per_hour() -> u32 {
    10_000
}
fn default_registration_free_per_token_per_hour() -> u32 {
    120
}
/// The default of `[limits] knock_tokens_per_user`: room for every contact of a sociable user.
pub const DEFAULT_KNOCK_TOKENS_PER_USER: u32 = 200;
fn default_knock_tokens_per_user() -> u32 {
    DEFAULT_KNOCK_TOKENS_PER_USER
}
fn default_dead_token_days() -> u32 {
    DEFAULT_DEAD_TOKEN_DAYS as u32
}
/// Days a dead token is remembered in registration-free mode: Apple does not hand an old token out again.
pub const DEFAULT_DEAD_TOKEN_DAYS: u64 = 30;
fn default_endpoint() -> String {
    "production".to_owned()
}
fn default_alert_title() -> String {
    "New message".to_owned()
}
fn default_expiration() -> u64 {
    3600
}

/// Apple's production and sandbox hosts.
pub const APNS_PRODUCTION: &str = "https://api.push.apple.com";
/// Apple's development (sandbox) host.
pub const APNS_SANDBOX: &str = "https://api.sandbox.push.apple.com";

impl Config {
    /// Read, parse and validate a configuration file. Relative paths inside it are resolved against the file's
    /// directory, so a config and its keys can be moved together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| e.in_file(path))?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Parse and validate configuration text; paths stay as written. Errors are said of `<config>`
    /// ([`Config::load`] names the file).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let here = PathBuf::from("<config>");
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = Locator::new(text);
            let offset = e.span().map(|span| span.start);
            ConfigError::At {
                path: here.clone(),
                line: offset.map(|o| at.line_of(o)),
                key: offset.and_then(|o| at.key_at(o)),
                message: e.message().trim().to_owned(),
            }
        })?;
        Config::from_raw(raw)
            .and_then(|config| config.validate().map(|()| config))
            .map_err(|e| match e {
                ConfigError::Invalid { key, reason } => ConfigError::At {
                    path: here.clone(),
                    line: Locator::new(text).line_of_key(&key),
                    key: Some(key),
                    message: reason,
                },
                other => other,
            })
    }

    /// Type the apps of a file as written.
    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let (tables, apps_table, implied) = match (raw.app.is_empty(), raw.apns.is_empty()) {
            (false, false) => return Err(ConfigError::invalid(
                "apns",
                "write apps as [[app]] tables or as [[apns]] tables (the older spelling), not both",
            )),
            (true, false) => (raw.apns, "apns", Some("apns")),
            _ => (raw.app, "app", None),
        };
        let apps = tables
            .into_iter()
            .enumerate()
            .map(|(i, table)| table.into_app(&format!("{apps_table}[{i}]"), implied))
            .collect::<Result<_, _>>()?;
        Ok(Config {
            component: raw.component,
            store: raw.store,
            limits: raw.limits,
            apps,
            admin: raw.admin,
            apps_table,
        })
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(p) = self.component.secret_file.as_mut() {
            fix(p);
        }
        for p in [
            &mut self.store.path,
            &mut self.store.password_file,
            &mut self.store.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(p) = self.store.key_file.as_mut() {
            fix(p);
        }
        for app in &mut self.apps {
            match app {
                AppConfig::Apns(app) => {
                    if let Some(p) = app.ca_file.as_mut() {
                        fix(p);
                    }
                    if let Some(auth) = app.auth.as_mut() {
                        fix(&mut auth.key_file);
                        if let Some(p) = auth.cert_file.as_mut() {
                            fix(p);
                        }
                    }
                }
                AppConfig::Fcm(app) => {
                    for p in [&mut app.ca_file, &mut app.service_account_file]
                        .into_iter()
                        .flatten()
                    {
                        fix(p);
                    }
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let jid: BareJid = self
            .component
            .jid
            .parse()
            .map_err(|e| ConfigError::invalid("component.jid", format!("not a JID: {e}")))?;
        if jid.node().is_some() {
            return Err(ConfigError::invalid(
                "component.jid",
                "a component JID is a bare domain such as push.example.org",
            ));
        }
        if self
            .component
            .server
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(ConfigError::invalid(
                "component.server",
                "expected host:port, e.g. 127.0.0.1:5347",
            ));
        }
        match (&self.component.secret, &self.component.secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "component.secret",
                    "set secret or secret_file, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "component.secret",
                    "missing: set secret or secret_file",
                ))
            }
            (Some(s), None) if s.is_empty() => {
                return Err(ConfigError::invalid(
                    "component.secret",
                    "must not be empty",
                ))
            }
            _ => {}
        }
        if self.component.ping_interval_secs == 0 {
            return Err(ConfigError::invalid(
                "component.ping_interval_secs",
                "must be at least 1",
            ));
        }
        if !(100..=10_000).contains(&self.component.standby_retry_ms) {
            return Err(ConfigError::invalid(
                "component.standby_retry_ms",
                "must be between 100 and 10000",
            ));
        }
        if self.component.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "component.max_in_flight",
                "must be at least 1",
            ));
        }
        if !(100..=30_000).contains(&self.limits.publish_deadline_ms) {
            return Err(ConfigError::invalid(
                "limits.publish_deadline_ms",
                "must be between 100 and 30000 (ejabberd stops waiting after 32 s)",
            ));
        }
        for (i, domain) in self.limits.allowed_domains.iter().enumerate() {
            if normalize_domain(domain).is_none() {
                return Err(ConfigError::invalid(
                    format!("limits.allowed_domains[{i}]"),
                    "must be a bare XMPP domain, like example.org",
                ));
            }
        }
        let (per_user, per_domain) = (
            self.limits.registrations_per_user_per_hour,
            self.limits.registrations_per_domain_per_hour,
        );
        // Every user's registration also takes one of the domain's, so a larger user cap could never apply.
        if per_user > per_domain && per_domain != 0 {
            return Err(ConfigError::invalid(
                "limits.registrations_per_user_per_hour",
                format!(
                    "{per_user} is over limits.registrations_per_domain_per_hour ({per_domain}), so it could never be reached; lower it or raise the domain's"
                ),
            ));
        }
        if let Some(listen) = &self.admin.listen {
            if listen.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    "admin.listen",
                    "expected ip:port, e.g. 127.0.0.1:9357 (an IP address, not a host name)",
                ));
            }
        }
        self.validate_store()?;
        if self.store.plaintext_tokens && self.store.key_file.is_some() {
            return Err(ConfigError::invalid(
                "store.plaintext_tokens",
                "contradicts store.key_file: with a store key, tokens are sealed; remove one of the two",
            ));
        }
        if self.apps.is_empty() {
            return Err(ConfigError::invalid(
                self.apps_table,
                "at least one [[app]] is needed",
            ));
        }
        let mut names = HashSet::new();
        // Push modules and Tigase provider ids each select one app.
        let mut served = HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let key = format!("{}[{i}]", self.apps_table);
            let name = app.name();
            if name.is_empty() || name.len() > 64 {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    "must be 1 to 64 characters",
                ));
            }
            if !names.insert(name) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate app name {name:?}"),
                ));
            }
            let basics = app.basics();
            for (what, names) in [
                ("push_module", basics.push_modules),
                ("tigase_provider", basics.tigase_providers),
            ] {
                for (j, name) in names.iter().enumerate() {
                    if name.is_empty() || name.len() > 128 || name.contains(char::is_whitespace) {
                        return Err(ConfigError::invalid(
                            format!("{key}.{what}[{j}]"),
                            "must be 1 to 128 characters without spaces",
                        ));
                    }
                    if !served.insert((what, name.as_str())) {
                        return Err(ConfigError::invalid(
                            format!("{key}.{what}[{j}]"),
                            format!("{name:?} is already served by another app"),
                        ));
                    }
                }
            }
            let app = match app {
                AppConfig::Apns(app) => app,
                AppConfig::Fcm(app) => {
                    self.validate_fcm(&key, app)?;
                    continue;
                }
            };
            if app.topic.is_empty() || app.topic.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("{key}.topic"),
                    "must be the app's bundle id",
                ));
            }
            app.endpoint_url()
                .map_err(|reason| ConfigError::invalid(format!("{key}.endpoint"), reason))?;
            if let Some(sandbox) = &app.sandbox_endpoint {
                endpoint_url(sandbox).map_err(|reason| {
                    ConfigError::invalid(format!("{key}.sandbox_endpoint"), reason)
                })?;
            }
            if app.voip_topic().is_empty() || app.voip_topic().contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("{key}.voip_topic"),
                    "must be the app's PushKit topic, normally the bundle id with .voip appended",
                ));
            }
            if !(256..=4096).contains(&app.max_payload_size) {
                return Err(ConfigError::invalid(
                    format!("{key}.max_payload_size"),
                    "must be between 256 and 4096 (bytes of base64; APNs payloads are at most 4096)",
                ));
            }
            match &app.auth {
                Some(auth) => {
                    auth.kind(&format!("{key}.auth"))?;
                }
                None if !app.dry_run => {
                    return Err(ConfigError::invalid(
                        format!("{key}.auth"),
                        format!(
                            "missing [{}.auth] (only dry_run apps may omit it)",
                            self.apps_table
                        ),
                    ))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// What `[store]` must get right for its engine.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let store = &self.store;
        let (needs, refuses): (&str, &[(&str, bool)]) = match store.engine {
            StoreEngine::Sled => (
                "path",
                &[
                    ("url", store.url.is_some()),
                    ("password_file", store.password_file.is_some()),
                    ("tls", store.tls.is_some()),
                    ("ca_file", store.ca_file.is_some()),
                ],
            ),
            StoreEngine::Postgres => ("url", &[("path", store.path.is_some())]),
        };
        let engine = match store.engine {
            StoreEngine::Sled => "sled",
            StoreEngine::Postgres => "postgres",
        };
        if let Some((name, _)) = refuses.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                format!("store.{name}"),
                format!("is not a setting of engine = \"{engine}\""),
            ));
        }
        let given = match needs {
            "path" => store.path.is_some(),
            _ => store.url.as_deref().is_some_and(|u| !u.trim().is_empty()),
        };
        if !given {
            return Err(ConfigError::invalid(
                format!("store.{needs}"),
                match store.engine {
                    StoreEngine::Sled => "missing: the directory of the database".to_owned(),
                    StoreEngine::Postgres => {
                        "missing: the database, e.g. postgres://knock@db.example.org/knock"
                            .to_owned()
                    }
                },
            ));
        }
        if let Some(url) = &store.url {
            // A password in the URL would end up in logs, process listings and backups of the config.
            let has_password = url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .is_some_and(|(userinfo, _)| userinfo.contains(':'))
                || url
                    .split_whitespace()
                    .any(|pair| pair.starts_with("password="));
            if has_password {
                return Err(ConfigError::invalid(
                    "store.url",
                    format!(
                        "must not hold the password: put it in store.password_file or the environment's {STORE_PASSWORD_ENV}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What an FCM app's table must get right; `key` names it (`app[1]`).
    fn validate_fcm(&self, key: &str, app: &FcmConfig) -> Result<(), ConfigError> {
        https_url(&app.endpoint)
            .map_err(|reason| ConfigError::invalid(format!("{key}.endpoint"), reason))?;
        if let Some(uri) = &app.token_uri {
            https_url(uri)
                .map_err(|reason| ConfigError::invalid(format!("{key}.token_uri"), reason))?;
        }
        if let Some(project) = &app.project_id {
            // Google's project ids: 6 to 30 lowercase letters, digits and hyphens. Checked loosely, but
            // enough that it is safe in a URL path.
            if project.is_empty()
                || project.len() > 64
                || !project
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
            {
                return Err(ConfigError::invalid(
                    format!("{key}.project_id"),
                    "must be the Firebase project id (letters, digits and hyphens)",
                ));
            }
        }
        if app.expiration_secs > FCM_MAX_TTL_SECS {
            return Err(ConfigError::invalid(
                format!("{key}.expiration_secs"),
                format!(
                    "must be at most {FCM_MAX_TTL_SECS} (four weeks, FCM's longest time to live)"
                ),
            ));
        }
        if app.service_account_file.is_none() && !app.dry_run {
            return Err(ConfigError::invalid(
                format!("{key}.service_account_file"),
                "missing: the Firebase service-account key file (only dry_run apps may omit it)",
            ));
        }
        Ok(())
    }

    /// The component JID, already validated.
    pub fn component_jid(&self) -> BareJid {
        self.component
            .jid
            .parse()
            .expect("component.jid was validated when the config was loaded")
    }

    /// The component secret, read from `secret_file` if that is how it was given.
    pub fn component_secret(&self) -> Result<String, ConfigError> {
        if let Some(secret) = &self.component.secret {
            return Ok(secret.clone());
        }
        let path = self
            .component
            .secret_file
            .as_ref()
            .expect("secret or secret_file was validated when the config was loaded");
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let secret = text.trim().to_owned();
        if secret.is_empty() {
            return Err(ConfigError::invalid(
                "component.secret_file",
                "the file is empty",
            ));
        }
        Ok(secret)
    }

    /// Where the admin listener listens, if it is configured (validated when the config was loaded).
    pub fn admin_listen(&self) -> Option<SocketAddr> {
        self.admin.listen.as_ref().map(|listen| {
            listen
                .parse()
                .expect("admin.listen was validated when the config was loaded")
        })
    }

    /// The per-node push interval.
    pub fn push_interval(&self) -> Duration {
        Duration::from_millis(self.limits.push_interval_ms)
    }

    /// The deadline for answering a publish.
    pub fn publish_deadline(&self) -> Duration {
        Duration::from_millis(self.limits.publish_deadline_ms)
    }
}

impl ApnsConfig {
    /// The base URL pushes go to, without a trailing slash.
    pub fn endpoint_url(&self) -> Result<String, String> {
        endpoint_url(&self.endpoint)
    }

    /// The endpoint `-sandbox` push modules go to, if there is one (see [`ApnsConfig::sandbox_endpoint`]).
    pub fn sandbox(&self) -> Option<&str> {
        match (&self.sandbox_endpoint, self.endpoint.as_str()) {
            (Some(sandbox), _) => Some(sandbox),
            (None, "production") => Some("sandbox"),
            (None, _) => None,
        }
    }

    /// The `apns-topic` of call pushes.
    pub fn voip_topic(&self) -> String {
        self.voip_topic
            .clone()
            .unwrap_or_else(|| format!("{}.voip", self.topic))
    }
}

/// The base URL an APNs `endpoint` value names, without a trailing slash.
fn endpoint_url(endpoint: &str) -> Result<String, String> {
    match endpoint {
        "production" => Ok(APNS_PRODUCTION.to_owned()),
        "sandbox" | "development" => Ok(APNS_SANDBOX.to_owned()),
        url => https_url(url)
            .map_err(|_| "expected \"production\", \"sandbox\" or an https:// URL".to_owned()),
    }
}

/// An `https://` URL as written, without a trailing slash.
pub fn https_url(url: &str) -> Result<String, String> {
    match url.strip_prefix("https://") {
        Some(rest) if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            Ok(url.trim_end_matches('/').to_owned())
        }
        _ => Err("expected an https:// URL".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[component]
jid = "push.example.org"
server = "127.0.0.1:5347"
secret = "s"
[store]
path = "/tmp/knock"
[[apns]]
name = "chat"
topic = "org.example.chat"
[apns.auth]
key_file = "AuthKey.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
"#;

    /// The first app, which these tests configure for APNs.
    fn apns(c: &Config) -> &ApnsConfig {
        match &c.apps[0] {
            AppConfig::Apns(app) => app,
            AppConfig::Fcm(_) => panic!("the first app is an FCM one"),
        }
    }

    fn err(text: &str) -> String {
        Config::parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn example_parses_with_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.limits.push_interval_ms, 1000);
        assert_eq!(apns(&c).push_type, PushType::Auto);
        assert!(apns(&c).include_node);
        assert_eq!(apns(&c).endpoint_url().as_deref(), Ok(APNS_PRODUCTION));
        assert!(matches!(
            apns(&c).auth.as_ref().map(|a| a.kind("x")),
            Some(Ok(ApnsAuth::Token { .. }))
        ));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err(&GOOD.replace("secret = \"s\"", "secret = \"s\"\nsecert = 1"));
        assert!(e.contains("secert"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(err(&GOOD.replace("127.0.0.1:5347", "nowhere")).contains("component.server"));
        assert!(err(&GOOD.replace("push.example.org", "a@b")).contains("component.jid"));
        assert!(
            err(&GOOD.replace("topic = ", "endpoint = \"http://x\"\ntopic = "))
                .contains("apns[0].endpoint")
        );
        assert!(err(&GOOD.replace("key_id = \"ABC123DEFG\"\n", "")).contains("apns[0].auth.key_id"));
        assert!(err(&GOOD.replace("secret = \"s\"", "")).contains("component.secret"));
        let two = format!("{GOOD}\n[[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n");
        assert!(err(&two).contains("apns[1].name"));
        let both = GOOD.replace(
            "team_id = \"TEAM123456\"",
            "team_id = \"TEAM123456\"\ncert_file = \"c.pem\"",
        );
        assert!(err(&both).contains("apns[0].auth"));
        let domains = |list: &str| format!("{GOOD}\n[limits]\nallowed_domains = {list}\n");
        assert!(err(&domains("[\"example.org\", \"a@b\"]")).contains("limits.allowed_domains[1]"));
        assert!(err(&domains("[\"\"]")).contains("limits.allowed_domains[0]"));
        let c = Config::parse(&domains("[\"Example.ORG\"]")).expect("valid");
        assert_eq!(
            normalize_domain(&c.limits.allowed_domains[0]).as_deref(),
            Some("example.org"),
            "compared as a JID's domain is"
        );
    }

    #[test]
    fn registration_caps_default_and_are_checked() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.limits.registrations_per_user_per_hour, 10);
        assert_eq!(c.limits.registrations_per_domain_per_hour, 10_000);
        let caps = |user: &str, domain: &str| {
            format!("{GOOD}\n[limits]\nregistrations_per_user_per_hour = {user}\nregistrations_per_domain_per_hour = {domain}\n")
        };
        for (user, domain) in [("0", "0"), ("5", "0"), ("5", "5"), ("1", "100000")] {
            let c = Config::parse(&caps(user, domain)).expect("valid caps");
            assert_eq!(c.limits.registrations_per_user_per_hour.to_string(), user);
            assert_eq!(
                c.limits.registrations_per_domain_per_hour.to_string(),
                domain
            );
        }
        let e = err(&caps("20", "10"));
        assert!(
            e.contains("limits.registrations_per_user_per_hour") && e.contains("never be reached"),
            "{e}"
        );
        assert!(err(&caps("-1", "10")).contains("registrations_per_user_per_hour"));
        assert!(err(&caps("1", "\"many\"")).contains("registrations_per_domain_per_hour"));
        assert!(err(&caps("1", "99999999999")).contains("registrations_per_domain_per_hour"));
    }

    #[test]
    fn the_admin_listener_is_off_unless_listen_is_set() {
        assert_eq!(Config::parse(GOOD).expect("valid").admin_listen(), None);
        let admin = |table: &str| format!("{GOOD}\n[admin]\n{table}\n");
        assert_eq!(
            Config::parse(&admin("")).expect("valid").admin_listen(),
            None
        );
        for listen in ["127.0.0.1:9357", "[::1]:9357", "0.0.0.0:9357"] {
            let c = Config::parse(&admin(&format!("listen = \"{listen}\""))).expect("valid");
            assert_eq!(
                c.admin_listen().map(|a| a.to_string()).as_deref(),
                Some(listen)
            );
        }
        for bad in ["localhost:9357", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = err(&admin(&format!("listen = \"{bad}\"")));
            assert!(e.contains("admin.listen"), "{bad}: {e}");
        }
        assert!(err(&admin("listen = 9357")).contains("listen"));
        assert!(err(&admin("port = 9357")).contains("port"));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("knock.toml");
        std::fs::write(&path, GOOD.replace("/tmp/knock", "data")).expect("write");
        let c = Config::load(&path).expect("valid");
        assert_eq!(c.store.path, Some(dir.path().join("data")));
        assert_eq!(
            apns(&c).auth.as_ref().map(|a| a.key_file.clone()),
            Some(dir.path().join("AuthKey.p8"))
        );
    }

    /// The line, key and message of a refused configuration.
    fn at(text: &str) -> (Option<usize>, Option<String>, String) {
        match Config::parse(text).expect_err("config should be rejected") {
            ConfigError::At {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("not located: {other}"),
        }
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text[..text.find(needle).expect("needle in text")]
            .matches('\n')
            .count()
            + 1
    }

    #[test]
    fn every_kind_of_error_names_its_key_and_line() {
        // Unknown key.
        let text = GOOD.replace("secret = \"s\"", "secret = \"s\"\nfoo = 1");
        let (line, key, message) = at(&text);
        assert_eq!(line, Some(line_of(&text, "foo")));
        assert_eq!(key.as_deref(), Some("component.foo"));
        assert!(
            message.contains("unknown field `foo`, expected one of"),
            "{message}"
        );
        // Wrong type.
        let text = GOOD.replace(
            "secret = \"s\"",
            "secret = \"s\"\nping_interval_secs = \"thirty\"",
        );
        let (line, key, message) = at(&text);
        assert_eq!(line, Some(line_of(&text, "ping_interval_secs")));
        assert_eq!(key.as_deref(), Some("component.ping_interval_secs"));
        assert!(
            message.contains("invalid type: string \"thirty\", expected u64"),
            "{message}"
        );
        // Missing key: the table it belongs in.
        let text = GOOD.replace("path = \"/tmp/knock\"\n", "key_file = \"k\"\n");
        let (line, key, message) = at(&text);
        assert_eq!(key.as_deref(), Some("store.path"), "{message}");
        assert_eq!(line, Some(line_of(&text, "[store]")));
        assert!(message.contains("missing: the directory"), "{message}");
        // A serde-level missing key.
        let text = GOOD.replace("jid = \"push.example.org\"\n", "");
        let (line, key, message) = at(&text);
        assert_eq!(key.as_deref(), Some("component"), "{message}");
        assert_eq!(line, Some(line_of(&text, "[component]")));
        assert!(message.contains("missing field `jid`"), "{message}");
        // A value that makes no sense.
        let text = GOOD.replace("127.0.0.1:5347", "nowhere");
        let (line, key, _) = at(&text);
        assert_eq!(
            (line, key.as_deref()),
            (Some(line_of(&text, "server")), Some("component.server"))
        );
        // Inside the second table of an array of tables.
        let text = format!("{GOOD}\n[[apns]]\nname = \"two\"\ntopic = \"t\"\ndry_run = true\nexpiration_secs = -1\n");
        let (line, key, _) = at(&text);
        assert_eq!(
            (line, key.as_deref()),
            (
                Some(line_of(&text, "expiration_secs")),
                Some("apns[1].expiration_secs")
            )
        );
        let text = format!("{GOOD}\n[[apns]]\nname = \"chat\"\ntopic = \"t\"\ndry_run = true\n");
        let (line, key, _) = at(&text);
        assert_eq!(
            (line, key.as_deref()),
            (
                Some(line_of(&text, "name = \"chat\"\ntopic = \"t\"\ndry")),
                Some("apns[1].name")
            )
        );
        // Not TOML at all: the line, and no key to name.
        let text = GOOD.replace("[store]", "[store");
        let (line, _, _) = at(&text);
        assert_eq!(line, Some(line_of(&text, "[store")));
        // Said as path:line: key: message.
        let shown = err(&GOOD.replace("127.0.0.1:5347", "nowhere"));
        assert!(
            shown.starts_with(&format!(
                "<config>:{}: component.server: expected host:port",
                line_of(GOOD, "server")
            )),
            "{shown}"
        );
    }

    #[test]
    fn apps_are_app_tables_with_a_provider_and_apns_tables_are_their_alias() {
        let app = GOOD
            .replace("[[apns]]", "[[app]]\nprovider = \"apns\"")
            .replace("[apns.auth]", "[app.auth]");
        let c = Config::parse(&app).expect("valid");
        assert_eq!((c.apps[0].name(), c.apps[0].provider()), ("chat", "apns"));
        assert_eq!(apns(&c).topic, "org.example.chat");
        assert!(apns(&c).include_node, "defaults as in [[apns]]");
        let alias = Config::parse(GOOD).expect("valid");
        assert_eq!(alias.apps[0].provider(), "apns");

        let no_provider = GOOD
            .replace("[[apns]]", "[[app]]")
            .replace("[apns.auth]", "[app.auth]");
        let (line, key, message) = at(&no_provider);
        assert_eq!(key.as_deref(), Some("app[0].provider"));
        assert_eq!(line, Some(line_of(&no_provider, "[[app]]")));
        assert!(message.contains("apns"), "{message}");

        let unknown = app.replace("provider = \"apns\"", "provider = \"gcm\"");
        let (line, key, message) = at(&unknown);
        assert_eq!(key.as_deref(), Some("app[0].provider"));
        assert_eq!(line, Some(line_of(&unknown, "provider")));
        assert!(
            message.contains("\"gcm\"") && message.contains("apns"),
            "{message}"
        );

        let both = format!("{app}\n[[apns]]\nname = \"old\"\ntopic = \"t\"\ndry_run = true\n");
        let (_, key, message) = at(&both);
        assert_eq!(key.as_deref(), Some("apns"));
        assert!(message.contains("not both"), "{message}");

        let missing_topic = app.replace("topic = \"org.example.chat\"\n", "");
        let (_, key, _) = at(&missing_topic);
        assert_eq!(key.as_deref(), Some("app[0].topic"));
    }

    #[test]
    fn delivery_and_dialect_keys_default_and_are_checked() {
        let c = Config::parse(GOOD).expect("valid");
        let app = apns(&c);
        assert_eq!(app.push_type, PushType::Auto);
        assert_eq!(app.background_per_hour, 3);
        assert!(app.push_modules.is_empty() && app.tigase_providers.is_empty());
        assert_eq!(app.voip_topic(), "org.example.chat.voip");
        assert_eq!(
            app.sandbox(),
            Some("sandbox"),
            "production's sandbox is Apple's"
        );
        assert_eq!(app.max_payload_size, 3072);
        assert_eq!(c.limits.registration_free_per_token_per_hour, 120);
        assert_eq!(c.limits.dead_token_days, 30);
        assert_eq!(c.limits.knock_tokens_per_user, 200);

        let with = |keys: &str| GOOD.replace("[apns.auth]", &format!("{keys}\n[apns.auth]"));
        let c = Config::parse(&with(
            "push_module = \"monalProdiOS\"\ntigase_provider = [\"tigase:messenger:apns:1\", \"snikket:apns:1\"]\n\
             voip_topic = \"org.example.calls\"\npush_type = \"alert\"\nendpoint = \"https://mock.test\"",
        ))
        .expect("valid");
        let app = apns(&c);
        assert_eq!(app.push_modules, ["monalProdiOS"], "one name or a list");
        assert_eq!(app.tigase_providers.len(), 2);
        assert_eq!(app.voip_topic(), "org.example.calls");
        assert_eq!(app.push_type, PushType::Alert);
        assert_eq!(
            app.sandbox(),
            None,
            "a test endpoint has no implied sandbox"
        );

        for (keys, key) in [
            ("max_payload_size = 10", "apns[0].max_payload_size"),
            (
                "sandbox_endpoint = \"http://x\"",
                "apns[0].sandbox_endpoint",
            ),
            ("push_module = [\"ok\", \"\"]", "apns[0].push_module[1]"),
            (
                "tigase_provider = \"has space\"",
                "apns[0].tigase_provider[0]",
            ),
            ("voip_topic = \"\"", "apns[0].voip_topic"),
            ("push_type = \"loud\"", "push_type"),
        ] {
            assert!(
                err(&with(keys)).contains(key),
                "{keys}: {}",
                err(&with(keys))
            );
        }
        // A module or provider id selects one app: two apps claiming it is a mistake.
        let twice = format!(
            "{}\n[[apns]]\nname = \"other\"\ntopic = \"t\"\ndry_run = true\npush_module = \"monalProdiOS\"\n",
            with("push_module = \"monalProdiOS\"")
        );
        assert!(
            err(&twice).contains("apns[1].push_module[0]"),
            "{}",
            err(&twice)
        );
    }

    #[test]
    fn plaintext_tokens_is_off_by_default_and_contradicts_a_key() {
        assert!(!Config::parse(GOOD).expect("valid").store.plaintext_tokens);
        let clear = GOOD.replace(
            "path = \"/tmp/knock\"",
            "path = \"/tmp/knock\"\nplaintext_tokens = true",
        );
        assert!(Config::parse(&clear).expect("valid").store.plaintext_tokens);
        let both = clear.replace(
            "plaintext_tokens = true",
            "plaintext_tokens = true\nkey_file = \"k\"",
        );
        let (line, key, _) = at(&both);
        assert_eq!(key.as_deref(), Some("store.plaintext_tokens"));
        assert_eq!(line, Some(line_of(&both, "plaintext_tokens")));
    }

    /// `GOOD`'s component and store, with these apps.
    fn with_apps(apps: &str) -> String {
        let head = &GOOD[..GOOD.find("[[apns]]").expect("GOOD has an app")];
        format!("{head}{apps}")
    }

    const FCM: &str =
        "[[app]]\nname = \"android\"\nprovider = \"fcm\"\nservice_account_file = \"sa.json\"\n";

    #[test]
    fn an_fcm_app_takes_its_own_keys_with_googles_defaults() {
        let c = Config::parse(&with_apps(FCM)).expect("valid");
        let AppConfig::Fcm(app) = &c.apps[0] else {
            panic!("an FCM app")
        };
        assert_eq!(app.endpoint, FCM_ENDPOINT);
        assert_eq!(app.expiration_secs, FCM_MAX_TTL_SECS);
        assert_eq!(
            (app.push_type, app.background_per_hour),
            (PushType::Auto, 0)
        );
        assert_eq!(
            (app.project_id.as_deref(), app.token_uri.as_deref()),
            (None, None)
        );
        assert_eq!(
            c.apps[0].summary(),
            "android (fcm; auto: high priority or normal priority)"
        );

        let tuned = format!(
            "{FCM}project_id = \"my-app-1234\"\nendpoint = \"https://127.0.0.1:8443/\"\n\
             token_uri = \"https://127.0.0.1:8443/token\"\nexpiration_secs = 60\npush_type = \"alert\"\n\
             push_module = [\"fcm-prod\"]\n"
        );
        let c = Config::parse(&with_apps(&tuned)).expect("valid");
        let AppConfig::Fcm(app) = &c.apps[0] else {
            panic!("an FCM app")
        };
        assert_eq!(app.project_id.as_deref(), Some("my-app-1234"));
        assert_eq!(app.expiration_secs, 60);
        assert_eq!(
            c.apps[0].summary(),
            "android (fcm; high priority; registration-free for fcm-prod)"
        );
        // Paths are the config file's neighbours.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("knock.toml");
        std::fs::write(&path, with_apps(FCM)).expect("write");
        let AppConfig::Fcm(app) = &Config::load(&path).expect("valid").apps[0] else {
            panic!("an FCM app")
        };
        assert_eq!(
            app.service_account_file.as_deref(),
            Some(dir.path().join("sa.json").as_path())
        );
    }

    #[test]
    fn an_fcm_app_refuses_what_it_cannot_use() {
        for (extra, key, says) in [
            ("topic = \"t\"\n", "app[0].topic", "APNs setting"),
            (
                "tigase_provider = \"x\"\n",
                "app[0].tigase_provider",
                "APNs setting",
            ),
            (
                "[app.auth]\nkey_file = \"k\"\n",
                "app[0].auth",
                "APNs setting",
            ),
            ("endpoint = \"production\"\n", "app[0].endpoint", "https://"),
            (
                "token_uri = \"http://x/token\"\n",
                "app[0].token_uri",
                "https://",
            ),
            (
                "project_id = \"a/b\"\n",
                "app[0].project_id",
                "Firebase project id",
            ),
            (
                "expiration_secs = 2419201\n",
                "app[0].expiration_secs",
                "four weeks",
            ),
        ] {
            let text = with_apps(&format!("{FCM}{extra}"));
            let e = err(&text);
            assert!(e.contains(key) && e.contains(says), "{extra:?}: {e}");
        }
        let without = with_apps("[[app]]\nname = \"android\"\nprovider = \"fcm\"\n");
        assert!(
            err(&without).contains("app[0].service_account_file"),
            "{}",
            err(&without)
        );
        assert!(Config::parse(&format!("{without}dry_run = true\n")).is_ok());
        // And an APNs app refuses FCM's keys.
        let apns = GOOD.replace(
            "topic = \"org.example.chat\"",
            "topic = \"t\"\nproject_id = \"p\"",
        );
        assert!(err(&apns).contains("apns[0].project_id"), "{}", err(&apns));
        // Push modules are one app's, whatever their providers.
        let both = with_apps(&format!(
            "{FCM}push_module = \"m\"\n[[app]]\nname = \"ios\"\nprovider = \"apns\"\ntopic = \"t\"\n\
             dry_run = true\npush_module = \"m\"\n"
        ));
        assert!(
            err(&both).contains("app[1].push_module[0]"),
            "{}",
            err(&both)
        );
    }

    #[test]
    fn the_example_configuration_is_a_valid_one() {
        let example = include_str!("../../config/knock.example.toml");
        let c = Config::parse(example).expect("config/knock.example.toml parses and validates");
        let providers: Vec<_> = c.apps.iter().map(AppConfig::provider).collect();
        assert_eq!(providers, ["apns", "fcm"]);
    }

    #[test]
    fn the_store_engine_takes_its_own_settings_and_never_a_password_in_the_url() {
        let postgres = |settings: &str| {
            GOOD.replace(
                "path = \"/tmp/knock\"",
                &format!("engine = \"postgres\"\n{settings}"),
            )
        };
        let c = Config::parse(&postgres("url = \"postgres://knock@db.example.org/knock\""))
            .expect("valid");
        assert_eq!(c.store.engine, StoreEngine::Postgres);
        assert_eq!(c.store.describe(), "postgres://knock@db.example.org/knock");
        for (settings, key, says) in [
            ("", "store.url", "missing"),
            (
                "url = \"postgres://knock:hunter2@db/knock\"",
                "store.url",
                "must not hold the password",
            ),
            (
                "url = \"host=db user=knock password=hunter2\"",
                "store.url",
                "must not hold the password",
            ),
            (
                "url = \"postgres://knock@db/knock\"\npath = \"/tmp/x\"",
                "store.path",
                "not a setting",
            ),
        ] {
            let e = err(&postgres(settings));
            assert!(e.contains(key) && e.contains(says), "{settings:?}: {e}");
        }
        let sled_with_url = GOOD.replace(
            "path = \"/tmp/knock\"",
            "path = \"/tmp/knock\"\nurl = \"postgres://db/knock\"",
        );
        assert!(
            err(&sled_with_url).contains("store.url"),
            "{}",
            err(&sled_with_url)
        );
    }
}
