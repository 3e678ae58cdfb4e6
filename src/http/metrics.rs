//! `/metrics`: a [`Snapshot`] in the Prometheus text exposition format (version 0.0.4).
//!
//! Every label value comes from a fixed table in [`crate::stats`] (outcomes, APNs statuses and reasons), never
//! from what a peer or user sent, so no node, token, secret or JID can appear here; the one label from the
//! configuration, an app's name on `knock_stored_registrations_by_app`, is escaped all the same. Families are always listed with
//! their `# HELP` and `# TYPE`, and fixed-outcome series from zero, so `rate()` sees the first event.

use std::fmt::Write;

use crate::stats::{ExchangeSnapshot, Histogram, Snapshot};

/// Write the exposition of `s`; `stored_registrations` is `None` when the store could not count in time
/// (the gauge is then left out, rather than shown as a false zero).
pub fn render(
    s: &Snapshot,
    stored_registrations: Option<u64>,
    by_app: Option<&[(String, usize)]>,
) -> String {
    let mut out = Exposition(String::with_capacity(4096));

    out.family(
        "knock_build_info",
        "gauge",
        "Always 1; the version is in the label.",
    );
    out.sample(
        "knock_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    out.family(
        "knock_publishes_total",
        "counter",
        "XEP-0357 publishes answered, by outcome. over_budget was answered without a push (the device had \
         its silent wake-ups for the hour); transient_failure was answered wait (push service down, \
         throttling, misconfigured, or the store failed).",
    );
    for (outcome, n) in [
        ("pushed", s.pushed),
        ("coalesced", s.coalesced),
        ("over_budget", s.over_budget),
        ("unknown_node", s.unknown_node),
        ("forbidden", s.forbidden),
        ("dead_token", s.dead_token),
        ("transient_failure", s.transient_failure),
    ] {
        out.sample("knock_publishes_total", &[("outcome", outcome)], n);
    }
    out.family(
        "knock_pushes_total",
        "counter",
        "Publishes' pushes the push service accepted, by kind: background (silent; Apple delivers two or \
         three an hour), alert (visible, with the fixed title), call (PushKit). Knocks are counted in \
         knock_knocks_total.",
    );
    for (kind, n) in [
        ("background", s.pushed_background),
        ("alert", s.pushed_alert),
        ("call", s.pushed_call),
    ] {
        out.sample("knock_pushes_total", &[("kind", kind)], n);
    }
    out.family(
        "knock_bad_requests_total",
        "counter",
        "Malformed requests of any kind (publishes, registrations, unparseable IQs), answered bad-request.",
    );
    out.sample("knock_bad_requests_total", &[], s.bad_request);
    out.family(
        "knock_publishes_in_flight",
        "gauge",
        "Publishes being handled right now.",
    );
    out.sample("knock_publishes_in_flight", &[], s.publishes_in_flight);

    out.family(
        "knock_registrations_total",
        "counter",
        "Registration requests, by outcome. saved: created or changed; unchanged: a re-registration that \
         changed nothing; capped: refused by a flood cap; not_allowed: refused by allowed_domains; failed: \
         the store failed (answered wait, nothing acknowledged).",
    );
    out.sample(
        "knock_registrations_total",
        &[("outcome", "saved")],
        s.registered,
    );
    for (outcome, n) in [
        ("capped", s.registration_capped),
        ("unchanged", s.registration_unchanged),
        ("not_allowed", s.registration_not_allowed),
        ("failed", s.registration_failed),
    ] {
        out.sample("knock_registrations_total", &[("outcome", outcome)], n);
    }
    out.family(
        "knock_knocks_total",
        "counter",
        "Knocks (a contact holding a knock token asked for a wake-up), by outcome. unknown: an unknown, \
         revoked or expired token; limited: over the token's hourly rate; failed: answered wait.",
    );
    let k = &s.knocks;
    for (outcome, n) in [
        ("pushed", k.pushed),
        ("unknown", k.unknown),
        ("limited", k.limited),
        ("failed", k.failed),
    ] {
        out.sample("knock_knocks_total", &[("outcome", outcome)], n);
    }
    out.family(
        "knock_knock_tokens_total",
        "counter",
        "Knock tokens created (rotations included) and revoked by their owners, and creations refused by \
         the hourly creation cap (capped).",
    );
    for (change, n) in [
        ("created", k.created),
        ("revoked", k.revoked),
        ("capped", k.capped),
    ] {
        out.sample("knock_knock_tokens_total", &[("change", change)], n);
    }
    out.family(
        "knock_unregistrations_total",
        "counter",
        "Unregistration requests, by outcome. removed: a registration was deleted by its owner.",
    );
    out.sample(
        "knock_unregistrations_total",
        &[("outcome", "removed")],
        s.unregistered,
    );
    if let Some(n) = stored_registrations {
        out.family(
            "knock_stored_registrations",
            "gauge",
            "Registrations in the store.",
        );
        out.sample("knock_stored_registrations", &[], n);
    }
    if let Some(by_app) = by_app {
        out.family(
            "knock_stored_registrations_by_app",
            "gauge",
            "Registrations in the store, by the configured app they were made for.",
        );
        for (app, n) in by_app {
            out.sample(
                "knock_stored_registrations_by_app",
                &[("app", app)],
                *n as u64,
            );
        }
    }

    out.family(
        "knock_component_link_up",
        "gauge",
        "1 while the XEP-0114 link to the XMPP server is authenticated and serving.",
    );
    out.sample("knock_component_link_up", &[], u64::from(s.link_up));
    out.family(
        "knock_component_link_standby",
        "gauge",
        "1 while the server refuses this knock because another one holds the component JID (Prosody's \
         conflict): it stands by and takes over when the other lets go. Alert on no instance up, not on this.",
    );
    out.sample(
        "knock_component_link_standby",
        &[],
        u64::from(s.link_standby),
    );
    out.family(
        "knock_component_link_reconnects_total",
        "counter",
        "Handshakes completed after the first.",
    );
    out.sample(
        "knock_component_link_reconnects_total",
        &[],
        s.link_reconnects,
    );
    out.family(
        "knock_component_link_downs_total",
        "counter",
        "Times a serving link ended (lost, or closed for shutdown).",
    );
    out.sample("knock_component_link_downs_total", &[], s.link_downs);

    exchanges(
        &mut out,
        "apns",
        "APNs",
        "Apple's reason (none: no reason given; other: not one Apple documents)",
        &s.apns,
    );
    exchanges(
        &mut out,
        "fcm",
        "FCM",
        "FCM's errorCode, or Google's status when it gives none (none: success; other: not one Google \
         documents)",
        &s.fcm,
    );
    out.0
}

/// One push service's families: `knock_<service>_responses_total`, `_transport_errors_total` and
/// `_request_duration_seconds`.
fn exchanges(out: &mut Exposition, service: &str, name: &str, reason: &str, s: &ExchangeSnapshot) {
    let responses = format!("knock_{service}_responses_total");
    out.family(
        &responses,
        "counter",
        &format!("{name} HTTP answers, by status and {reason}. Each retry is one answer."),
    );
    for (status, reason, n) in &s.responses {
        let status = status.map(|code| code.to_string());
        let status = status.as_deref().unwrap_or("other");
        out.sample(&responses, &[("status", status), ("reason", reason)], *n);
    }
    let errors = format!("knock_{service}_transport_errors_total");
    out.family(
        &errors,
        "counter",
        &format!(
            "{name} requests that got no HTTP answer (connect, TLS or stream failure, or the deadline)."
        ),
    );
    out.sample(&errors, &[], s.transport_errors);
    out.histogram(
        &format!("knock_{service}_request_duration_seconds"),
        &format!("Time from sending an {name} request to its answer or failure, per attempt."),
        &s.latency,
    );
}

/// The text being built. Writing to a `String` cannot fail, so `write!` results are dropped.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.series(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn series(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.0.push_str(name);
        if labels.is_empty() {
            return;
        }
        self.0.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{key}=\"{}\"", escape_label(value));
        }
        self.0.push('}');
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for &(bound, n) in &h.buckets {
            let le = if bound == u64::MAX {
                "+Inf".to_owned()
            } else {
                seconds(bound)
            };
            self.sample(&bucket, &[("le", &le)], n);
        }
        self.series(&format!("{name}_sum"), &[]);
        let _ = writeln!(self.0, " {}", seconds(h.sum_micros));
        self.sample(&format!("{name}_count"), &[], h.count);
    }
}

/// Microseconds as seconds, shortest form: 1000 -> `0.001`, 2500000 -> `2.5`, 10000000 -> `10`.
fn seconds(micros: u64) -> String {
    (micros as f64 / 1e6).to_string()
}

/// A label value as the text format wants it: backslash, double quote and line feed escaped.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A `# HELP` text: backslash and line feed escaped (quotes are fine there).
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    /// `series -> value` of every sample, checking the format on the way: each sample belongs to a family
    /// declared before it with HELP and TYPE, each series appears once, names and label keys are legal.
    fn parse(text: &str) -> HashMap<String, String> {
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        let mut types = HashMap::new();
        let mut helped = HashSet::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("HELP has a text");
                assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let name = series.split('{').next().expect("a name");
                assert!(
                    name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{name}"
                );
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                    .unwrap_or(name);
                assert!(types.contains_key(family), "no TYPE for {name}");
                if family.ends_with("_total") {
                    assert_eq!(types[family], "counter", "{family}");
                }
                assert!(value.parse::<f64>().is_ok(), "{line}");
                assert!(
                    samples
                        .insert(series.to_owned(), value.to_owned())
                        .is_none(),
                    "{series} twice"
                );
            }
        }
        samples
    }

    #[test]
    fn an_idle_knock_shows_every_family_from_zero() {
        let text = render(&Stats::default().snapshot(), Some(0), None);
        let m = parse(&text);
        for outcome in [
            "pushed",
            "coalesced",
            "over_budget",
            "unknown_node",
            "forbidden",
            "dead_token",
            "transient_failure",
        ] {
            assert_eq!(
                m[&format!("knock_publishes_total{{outcome=\"{outcome}\"}}")],
                "0"
            );
        }
        for kind in ["background", "alert", "call"] {
            assert_eq!(m[&format!("knock_pushes_total{{kind=\"{kind}\"}}")], "0");
        }
        for series in [
            "knock_bad_requests_total",
            "knock_publishes_in_flight",
            "knock_registrations_total{outcome=\"saved\"}",
            "knock_registrations_total{outcome=\"capped\"}",
            "knock_unregistrations_total{outcome=\"removed\"}",
            "knock_stored_registrations",
            "knock_component_link_up",
            "knock_component_link_standby",
            "knock_component_link_reconnects_total",
            "knock_component_link_downs_total",
            "knock_apns_transport_errors_total",
            "knock_apns_request_duration_seconds_count",
            "knock_apns_request_duration_seconds_sum",
            "knock_apns_request_duration_seconds_bucket{le=\"+Inf\"}",
        ] {
            assert_eq!(m.get(series).map(String::as_str), Some("0"), "{series}");
        }
        assert!(text.contains("# TYPE knock_apns_responses_total counter"));
        assert!(
            !text.contains("knock_apns_responses_total{"),
            "none seen yet"
        );
        assert_eq!(
            m[&format!(
                "knock_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )],
            "1"
        );
    }

    #[test]
    fn a_standby_shows_as_standby_and_not_up() {
        let stats = Stats::default();
        stats.link_standby(true);
        let m = parse(&render(&stats.snapshot(), None, None));
        assert_eq!(
            m.get("knock_component_link_standby").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            m.get("knock_component_link_up").map(String::as_str),
            Some("0")
        );
    }

    #[test]
    fn counts_show_under_their_names_and_labels() {
        let stats = Stats::default();
        for _ in 0..3 {
            Stats::bump(&stats.pushed);
        }
        Stats::bump(&stats.dead_token);
        Stats::bump(&stats.transient_failure);
        Stats::bump(&stats.registered);
        Stats::bump(&stats.registration_capped);
        stats.link_up();
        stats.link_down();
        stats.link_up();
        let _in_flight = stats.publish_started();
        stats.apns.response(200, "", Duration::from_millis(2));
        stats
            .apns
            .response(503, "ServiceUnavailable", Duration::from_millis(30));
        stats.apns.response(599, "Teapot", Duration::from_secs(20));
        let m = parse(&render(
            &stats.snapshot(),
            None,
            Some(&[("chat".to_string(), 2)]),
        ));
        let at = |series: &str| m.get(series).map(String::as_str);
        assert_eq!(at("knock_publishes_total{outcome=\"pushed\"}"), Some("3"));
        assert_eq!(
            at("knock_publishes_total{outcome=\"unknown_node\"}"),
            Some("0")
        );
        assert_eq!(
            at("knock_publishes_total{outcome=\"dead_token\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_publishes_total{outcome=\"transient_failure\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_registrations_total{outcome=\"saved\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_registrations_total{outcome=\"capped\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_stored_registrations"),
            None,
            "unknown is left out"
        );
        assert_eq!(at("knock_component_link_up"), Some("1"));
        assert_eq!(at("knock_component_link_reconnects_total"), Some("1"));
        assert_eq!(at("knock_component_link_downs_total"), Some("1"));
        assert_eq!(at("knock_publishes_in_flight"), Some("1"));
        assert_eq!(
            at("knock_apns_responses_total{status=\"200\",reason=\"none\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_apns_responses_total{status=\"503\",reason=\"ServiceUnavailable\"}"),
            Some("1")
        );
        assert_eq!(
            at("knock_apns_responses_total{status=\"other\",reason=\"other\"}"),
            Some("1")
        );
        let bucket = |le: &str| {
            at(&format!(
                "knock_apns_request_duration_seconds_bucket{{le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.001"), Some("0"));
        assert_eq!(bucket("0.0025"), Some("1"));
        assert_eq!(bucket("0.05"), Some("2"), "cumulative");
        assert_eq!(bucket("10"), Some("2"));
        assert_eq!(bucket("+Inf"), Some("3"));
        assert_eq!(at("knock_apns_request_duration_seconds_count"), Some("3"));
        assert_eq!(
            at("knock_apns_request_duration_seconds_sum"),
            Some("20.032")
        );
    }

    #[test]
    fn nothing_a_peer_sends_becomes_a_label() {
        let token = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
        let stats = Stats::default();
        for reason in [token, "alice@example.org/phone", "node-Xy_12", "\"}\n# x"] {
            stats.apns.response(400, reason, Duration::ZERO);
        }
        let text = render(&stats.snapshot(), Some(1), None);
        for leak in [token, "alice", "example.org", "node-Xy", "# x"] {
            assert!(!text.contains(leak), "{leak:?} in\n{text}");
        }
        assert!(text.contains("knock_apns_responses_total{status=\"400\",reason=\"other\"} 4"));
        parse(&text);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("plain chat"), "plain chat");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(
            escape_help("one\\two\nthree \"q\""),
            "one\\\\two\\nthree \"q\""
        );
        let mut out = Exposition(String::new());
        out.sample("knock_x", &[("app", "we\"ird\napp"), ("k", "\\")], 2);
        assert_eq!(out.0, "knock_x{app=\"we\\\"ird\\napp\",k=\"\\\\\"} 2\n");
    }

    #[test]
    fn bounds_read_as_seconds() {
        assert_eq!(seconds(1_000), "0.001");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(0), "0");
    }
}
