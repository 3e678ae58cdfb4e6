//! Service discovery (XEP-0030): who knock is, what it supports, and which commands it offers.
//!
//! XEP-0357 §4 asks an App Server to show the identity `pubsub`/`push`; clients find the registration
//! commands through disco#items on the commands node (XEP-0050 §2.2). Tigase-dialect clients pick their
//! App Server by its features: the `provider` ids it serves, and what it does with encrypted payloads and
//! calls (Siskin looks for `urn:xmpp:push:0` and its provider id together).

use std::collections::BTreeSet;

use xmpp_parsers::disco::{
    DiscoInfoQuery, DiscoInfoResult, DiscoItemsQuery, DiscoItemsResult, Identity, Item,
};
use xmpp_parsers::ns;

use super::{commands, tigase, HandlerError};
use crate::app::App;

fn features(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|f| (*f).to_owned()).collect()
}

/// Answer disco#info on the component or on one of its command nodes.
pub fn info(app: &App, query: DiscoInfoQuery) -> Result<DiscoInfoResult, HandlerError> {
    match query.node.as_deref() {
        None => {
            let mut features = features(&[
                ns::PUSH,
                crate::stanza::xep0050::NS,
                ns::DISCO_INFO,
                ns::PING,
            ]);
            let tigase: Vec<String> = app
                .apps()
                .iter()
                .flat_map(|a| a.tigase_providers.iter().cloned())
                .collect();
            if app.knock_tokens_per_user > 0 {
                features.insert(crate::stanza::knock::NS.to_owned());
            }
            if !tigase.is_empty() {
                features.extend(tigase);
                features.extend(tigase::FEATURES.iter().map(|f| (*f).to_owned()));
            }
            Ok(DiscoInfoResult {
                node: None,
                identities: vec![Identity::new("pubsub", "push", "en", "knock push service")],
                features,
                extensions: Vec::new(),
            })
        }
        Some(node) if node == crate::stanza::xep0050::NS => Ok(DiscoInfoResult {
            node: Some(node.to_owned()),
            identities: vec![Identity::new(
                "automation",
                "command-list",
                "en",
                "Commands",
            )],
            features: features(&[crate::stanza::xep0050::NS, ns::DISCO_INFO]),
            extensions: Vec::new(),
        }),
        Some(node) => match commands::by_node(node) {
            Some(command) => Ok(DiscoInfoResult {
                node: Some(node.to_owned()),
                identities: vec![Identity::new(
                    "automation",
                    "command-node",
                    "en",
                    command.name,
                )],
                features: features(&[crate::stanza::xep0050::NS, ns::DATA_FORMS]),
                extensions: Vec::new(),
            }),
            None => Err(HandlerError::item_not_found("no such node")),
        },
    }
}

/// Answer disco#items: the command list on the commands node, nothing elsewhere.
pub fn items(app: &App, query: DiscoItemsQuery) -> Result<DiscoItemsResult, HandlerError> {
    let items = match query.node.as_deref() {
        Some(node) if node == crate::stanza::xep0050::NS => commands::COMMANDS
            .iter()
            .filter(|c| commands::offered(app, c))
            .map(|c| Item {
                jid: app.jid.clone().into(),
                node: Some(c.node.to_owned()),
                name: Some(c.name.to_owned()),
            })
            .collect(),
        None => Vec::new(),
        Some(_) => return Err(HandlerError::item_not_found("no such node")),
    };
    Ok(DiscoItemsResult {
        node: query.node,
        items,
        rsm: None,
    })
}
