//! The typed TOML configuration: what an admin writes, checked before anything starts.
//!
//! Every field is documented here and in `config/knock.example.toml`. Unknown keys are errors, and every
//! validation failure names the key at fault, so `knock check` can tell an admin exactly what to fix.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use xmpp_parsers::jid::BareJid;

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
    /// The TOML did not parse or did not match the schema (unknown key, wrong type, missing key).
    #[error("{path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// The store key file could not be read.
    #[error("store.key_file: {0}")]
    StoreKey(#[from] crate::store::KeyFileError),
    /// A value parsed but makes no sense.
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
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How knock attaches to the XMPP server (XEP-0114).
    pub component: ComponentConfig,
    /// Where registrations live.
    pub store: StoreConfig,
    /// Limits that protect APNs, the server and knock itself.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The iOS apps knock can wake; the first is the default for registrations that name none.
    #[serde(default)]
    pub apns: Vec<ApnsConfig>,
    /// The HTTP admin listener (`/metrics`, `/health`); off unless `listen` is set.
    #[serde(default)]
    pub admin: AdminConfig,
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
}

/// The `[store]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled database; created if missing.
    pub path: PathBuf,
    /// The store key (written by `knock keygen`): device tokens and the instance key are sealed under it,
    /// so a copy of the database alone reveals no token. Kept outside the database and its backups.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            push_interval_ms: default_push_interval_ms(),
            publish_deadline_ms: default_publish_deadline_ms(),
            allowed_domains: Vec::new(),
            registrations_per_user_per_hour: default_registrations_per_user_per_hour(),
            registrations_per_domain_per_hour: default_registrations_per_domain_per_hour(),
        }
    }
}

/// One `[[apns]]` table: an iOS app knock can wake.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// The name clients use in the `app` field; unique.
    pub name: String,
    /// The app's bundle id, sent as `apns-topic`.
    pub topic: String,
    /// `production`, `sandbox`, or any `https://` base URL (a test server).
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Extra PEM CA certificates to trust for the endpoint, besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `background` (silent `content-available` wake-up, priority 5) or `alert` (for apps with a Notification
    /// Service Extension: a generic title, `mutable-content`, priority 10).
    #[serde(default)]
    pub push_type: PushType,
    /// The title of alert pushes. It is the same for every push: knock never forwards content.
    #[serde(default = "default_alert_title")]
    pub alert_title: String,
    /// Put the pubsub node in the payload (key `node`), so an app with several accounts wakes only the one with mail.
    #[serde(default = "default_true")]
    pub include_node: bool,
    /// How long Apple may hold an undelivered push, in seconds (0: try once, do not store).
    #[serde(default = "default_expiration")]
    pub expiration_secs: u64,
    /// Log pushes instead of sending them (for staging and benchmarks). Auth is then optional.
    #[serde(default)]
    pub dry_run: bool,
    /// How knock authenticates to APNs.
    #[serde(default)]
    pub auth: Option<ApnsAuthConfig>,
}

/// Which kind of APNs push knock sends for an app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushType {
    /// A silent `content-available` push.
    #[default]
    Background,
    /// A visible push with a fixed title and `mutable-content`.
    Alert,
}

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
fn default_endpoint() -> String {
    "production".to_owned()
}
fn default_alert_title() -> String {
    "New message".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_expiration() -> u64 {
    3600
}

impl StoreConfig {
    /// The store key named by `key_file`, if any.
    pub fn key(&self) -> Result<Option<crate::store::StoreKey>, ConfigError> {
        self.key_file
            .as_deref()
            .map(crate::store::StoreKey::load)
            .transpose()
            .map_err(ConfigError::from)
    }
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
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Parse and validate configuration text; paths stay as written.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
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
        fix(&mut self.store.path);
        if let Some(p) = self.store.key_file.as_mut() {
            fix(p);
        }
        for app in &mut self.apns {
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
        if self.apns.is_empty() {
            return Err(ConfigError::invalid(
                "apns",
                "at least one [[apns]] app is needed",
            ));
        }
        let mut names = HashSet::new();
        for (i, app) in self.apns.iter().enumerate() {
            let key = format!("apns[{i}]");
            if app.name.is_empty() || app.name.len() > 64 {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    "must be 1 to 64 characters",
                ));
            }
            if !names.insert(app.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate app name {:?}", app.name),
                ));
            }
            if app.topic.is_empty() || app.topic.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("{key}.topic"),
                    "must be the app's bundle id",
                ));
            }
            app.endpoint_url()
                .map_err(|reason| ConfigError::invalid(format!("{key}.endpoint"), reason))?;
            match &app.auth {
                Some(auth) => {
                    auth.kind(&format!("{key}.auth"))?;
                }
                None if !app.dry_run => {
                    return Err(ConfigError::invalid(
                        format!("{key}.auth"),
                        "missing [apns.auth] (only dry_run apps may omit it)",
                    ))
                }
                None => {}
            }
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
        match self.endpoint.as_str() {
            "production" => Ok(APNS_PRODUCTION.to_owned()),
            "sandbox" | "development" => Ok(APNS_SANDBOX.to_owned()),
            url if url.starts_with("https://") && url.len() > "https://".len() => {
                Ok(url.trim_end_matches('/').to_owned())
            }
            _ => Err("expected \"production\", \"sandbox\" or an https:// URL".to_owned()),
        }
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

    fn err(text: &str) -> String {
        Config::parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn example_parses_with_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.limits.push_interval_ms, 1000);
        assert_eq!(c.apns[0].push_type, PushType::Background);
        assert!(c.apns[0].include_node);
        assert_eq!(c.apns[0].endpoint_url().as_deref(), Ok(APNS_PRODUCTION));
        assert!(matches!(
            c.apns[0].auth.as_ref().map(|a| a.kind("x")),
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
        assert_eq!(c.store.path, dir.path().join("data"));
        assert_eq!(
            c.apns[0].auth.as_ref().map(|a| a.key_file.clone()),
            Some(dir.path().join("AuthKey.p8"))
        );
    }
}
