"""Scenarios for the iOS client dialects knock is gaining (issue 17), against a real Prosody 0.12 with trixie's
mod_cloud_notify_encrypted, _priority_tag and _filters (and, for Monal, against ejabberd too).

Every stanza a client sends here is replayed as that client sends it; where it comes from is cited at each one
(the facts are collected in /work/notes/clients.md on the machine these were written on). knock's side is the
config bed.py writes (apps `auto`, `monal`, `siskin`); an app the knock build under test refuses makes its
scenario fail at once, saying so.
"""

import asyncio
import base64
import json
import secrets
import time
import xml.etree.ElementTree as ET

from bed import (AUTO_ALERT_TITLE, COMPONENT, DOMAIN, MONAL_MODULE, MONAL_TOPIC, SISKIN_PROVIDER, SISKIN_TOPIC,
                 SISKIN_VOIP_TOPIC, TOPIC)
from client import CommandError
from procs import wait_for
from scenarios import (PUBSUB, PUSH_WAIT, RECEIPT, XDATA, Ctx, Failure, check, need_app, new_token, no_leaks,
                       notification, one_publish, send_stanza, summary_fields, text_for)
import tigase_crypto

TIGASE_ENCRYPT = "{tigase:push:encrypt:0}"
TIGASE_PRIORITY = "{tigase:push:priority:0}"
# knock's default background_per_hour in auto mode
BACKGROUND_PER_HOUR = 3


# ------------------------------------------------------------------------------------------------ helpers

def payload_of(req: dict) -> dict:
    try:
        p = json.loads(req.get("body", ""))
    except ValueError:
        raise Failure(f"APNs payload is not JSON: {req.get('body')!r}")
    check(isinstance(p, dict), f"APNs payload is not an object: {p!r}")
    return p


def requests_for(ctx: Ctx, token: str) -> list[dict]:
    """The mock's requests for a token, its hex compared without case (Siskin's APNs token is upper-case hex,
    its PushKit token lower-case; knock may send either form)."""
    return [r for r in ctx.bed.apns.requests() if r.get("token", "").lower() == token.lower()]


async def expect_pushes(ctx: Ctx, token: str, before: int, count: int = 1) -> list[dict]:
    """Exactly `count` new APNs requests for `token` (any hex case): waits for them, then settles for extras."""
    try:
        await wait_for(lambda: len(requests_for(ctx, token)) >= before + count, PUSH_WAIT,
                       f"{count} APNs request(s)", interval=0.05)
    except TimeoutError:
        pass
    got = len(requests_for(ctx, token)) - before
    check(got >= count, f"expected {count} APNs request(s) for the token within {PUSH_WAIT:g} s, got {got}")
    await asyncio.sleep(0.7)
    reqs = requests_for(ctx, token)
    check(len(reqs) == before + count, f"expected exactly {count} new APNs request(s) for the token, "
                                       f"got {len(reqs) - before}")
    return reqs[before:]


async def expect_no_push(ctx: Ctx, token: str, before: int, why: str):
    await asyncio.sleep(0.7)
    reqs = requests_for(ctx, token)
    check(len(reqs) == before, f"{why}, yet APNs got {len(reqs) - before} request(s) for the token: "
                               f"{[(r['status'], r.get('push_type')) for r in reqs[before:]]}")


def publish_options(pub) -> dict[str, str]:
    x = pub.stanza.find(f"{PUBSUB}pubsub/{PUBSUB}publish-options/{XDATA}x")
    if x is None:
        return {}
    return {f.get("var", ""): (f.findtext(f"{XDATA}value") or "") for f in x.findall(f"{XDATA}field")}


# ------------------------------------------------------------------------------------------------ 12: auto

async def auto_delivery(ctx: Ctx):
    """knock's own dialect with push_type left at its default (auto): a chat message (Prosody marks it important
    with its placeholder last-message-body) is a visible push: alert, priority 10, mutable-content, the app's
    fixed title; a body-less stanza (a receipt) is a silent one: background, priority 5, with a collapse id,
    BACKGROUND_PER_HOUR of them per device, further ones answered `result` without a push; an important one
    after that is still pushed."""
    need_app(ctx, "auto")
    user, token = "u12", new_token()
    c = await ctx.login(user)
    jid, node, secret = await c.register_device(COMPONENT, "phone", token, app="auto")
    check(jid == COMPONENT and node and secret, f"register-push-apns (app auto) gave jid={jid!r}, empty node/secret")
    await c.enable_push(COMPONENT, node, secret)
    await ctx.go_offline(c)
    leaks = [f"{user}@{DOMAIN}", f"bob@{DOMAIN}", "New Message!", "New message", secret]

    async def important(tag: str, before: int):
        text = text_for(tag)
        since = time.monotonic()
        await ctx.send(user, text)
        pub = await one_publish(ctx, node, since)
        check(summary_fields(pub).get("last-message-body"),
              f"the server did not mark the chat message important (summary {summary_fields(pub)})")
        check(pub.reply == "result", f"knock answered an important publish with {pub.reply}")
        r = (await expect_pushes(ctx, token, before, 1))[0]
        check(r["status"] == 200, f"mock APNs answered {r['status']} {r.get('reason')}")
        check((r["push_type"], r["priority"]) == ("alert", "10"),
              f"important publish: apns-push-type {r['push_type']!r} / priority {r['priority']!r}, "
              "expected alert / 10")
        check(r["topic"] == TOPIC, f"apns-topic {r['topic']!r}")
        aps = payload_of(r).get("aps", {})
        check(aps.get("mutable-content") == 1, f"alert without mutable-content: aps={aps}")
        alert = aps.get("alert")
        title = alert.get("title") if isinstance(alert, dict) else alert
        check(title == AUTO_ALERT_TITLE, f"alert title {title!r}, expected the app's alert_title {AUTO_ALERT_TITLE!r}")
        no_leaks(r, leaks + [text, "confidential"])
        return r

    await important("s12-1", 0)
    pushed = 1

    collapse_ids = []
    for i in range(BACKGROUND_PER_HOUR + 1):
        since = time.monotonic()
        await send_stanza(ctx, user, RECEIPT.format(id=f"r12-{i}-{secrets.token_hex(3)}"))
        pub = await one_publish(ctx, node, since)
        check(not summary_fields(pub).get("last-message-body"),
              f"the server marked a body-less receipt important (summary {summary_fields(pub)}); this bed "
              "needs an unimportant publish")
        check(pub.reply == "result", f"knock answered unimportant publish {i + 1} with {pub.reply}")
        if i < BACKGROUND_PER_HOUR:
            r = (await expect_pushes(ctx, token, pushed, 1))[0]
            pushed += 1
            check(r["status"] == 200, f"mock APNs answered {r['status']} {r.get('reason')}")
            check((r["push_type"], r["priority"]) == ("background", "5"),
                  f"unimportant publish {i + 1}: apns-push-type {r['push_type']!r} / priority {r['priority']!r}, "
                  "expected background / 5")
            check(r.get("collapse_id"), f"unimportant publish {i + 1}: background push without apns-collapse-id")
            collapse_ids.append(r["collapse_id"])
            p = payload_of(r)
            check(p.get("aps") == {"content-available": 1},
                  f"background payload aps should be exactly {{'content-available': 1}}, got {p.get('aps')}")
            no_leaks(r, leaks)
        else:
            await expect_no_push(ctx, token, pushed,
                                 f"unimportant publish {i + 1} is past background_per_hour ({BACKGROUND_PER_HOUR})")
    ctx.note(f"{BACKGROUND_PER_HOUR} silent pushes (collapse ids {sorted(set(collapse_ids))}), the next one "
             "answered result without a push")

    await important("s12-2", pushed)
    ctx.summary = (f"important -> alert/10/mutable-content; unimportant -> background/5 + collapse id, "
                   f"{BACKGROUND_PER_HOUR}/hour then result without a push; important still pushed after that")


# ------------------------------------------------------------------------------------------------ 13: Monal

# Monal's <enable/>, as monal-im/Monal Monal/Classes/XMPPIQ.m (-setPushEnableWithNode:onAppserver:) builds it:
# node = the APNs token as lower-case hex (HelperTools.m +stringFromToken: "%02x"), a publish-options form made
# by XMPPDataForm (FORM_TYPE as a hidden field; pushModule without a type), no secret, no registration with the
# App Server. pushModule is monalProdiOS, with "-sandbox" appended for a sandbox APNs token.
MONAL_ENABLE = (
    "<enable xmlns='urn:xmpp:push:0' jid='{jid}' node='{node}'>"
    "<x xmlns='jabber:x:data' type='submit'>"
    "<field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
    "<field var='pushModule'><value>{module}</value></field>"
    "</x></enable>"
)


async def monal(ctx: Ctx):
    """Monal's registration-free dialect: the node is the token, publish-options name the push module. A
    message pushes to that token (production endpoint); a `-sandbox` module pushes through the sandbox
    endpoint; an unknown module is answered item-not-found; a token APNs calls dead is remembered: the next
    publish for it is item-not-found with no APNs request."""
    need_app(ctx, "monal")
    apns = ctx.bed.apns
    production = apns.url.split("://", 1)[1]
    sandbox = production.replace("127.0.0.1:", "localhost:")

    async def device(user: str, module: str) -> str:
        token = secrets.token_hex(32)  # lower-case, as Monal writes it
        c = await ctx.login(user)
        await c.send_iq_set(MONAL_ENABLE.format(jid=COMPONENT, node=token, module=module), "Monal's <enable/>")
        await ctx.go_offline(c)
        return token

    # production
    token = await device("m13a", MONAL_MODULE)
    since = time.monotonic()
    text = text_for("s13a")
    await ctx.send("m13a", text)
    pub = await one_publish(ctx, token, since)
    opts = publish_options(pub)
    check(opts.get("pushModule") == MONAL_MODULE and "secret" not in opts,
          f"the server's publish-options were {opts}, expected pushModule={MONAL_MODULE!r} and no secret")
    check(pub.reply == "result", f"knock answered Monal's publish with {pub.reply}")
    r = (await expect_pushes(ctx, token, 0, 1))[0]
    check(r["status"] == 200, f"mock APNs answered {r['status']} {r.get('reason')}")
    check(r["topic"] == MONAL_TOPIC, f"apns-topic {r['topic']!r}, expected the monal app's {MONAL_TOPIC!r}")
    check(r.get("authority") == production, f"pushed via {r.get('authority')!r}, expected the production "
                                            f"endpoint {production!r}")
    # Monal's Notification Service Extension fetches the message itself: a visible, mutable push (fpush sends
    # the same: alert, priority 10, mutable-content)
    check((r["push_type"], r["priority"]) == ("alert", "10"),
          f"apns-push-type {r['push_type']!r} / priority {r['priority']!r}, expected alert / 10")
    check(payload_of(r).get("aps", {}).get("mutable-content") == 1, f"no mutable-content: {r['body']}")
    no_leaks(r, [text, "confidential", f"m13a@{DOMAIN}", f"bob@{DOMAIN}"])
    ctx.note(f"monalProdiOS: {r['push_type']}/{r['priority']} to {MONAL_TOPIC} via {production}")

    # sandbox
    token_b = await device("m13b", MONAL_MODULE + "-sandbox")
    since = time.monotonic()
    await ctx.send("m13b", text_for("s13b"))
    pub = await one_publish(ctx, token_b, since)
    check(pub.reply == "result", f"knock answered the -sandbox module's publish with {pub.reply}")
    r = (await expect_pushes(ctx, token_b, 0, 1))[0]
    check(r["status"] == 200 and r.get("authority") == sandbox,
          f"-sandbox module: pushed via {r.get('authority')!r} (status {r['status']}), expected the sandbox "
          f"endpoint {sandbox!r}")
    check(r["topic"] == MONAL_TOPIC, f"-sandbox module: apns-topic {r['topic']!r}")

    # an unknown module
    token_c = await device("m13c", "monalAlpha")
    since = time.monotonic()
    await ctx.send("m13c", text_for("s13c"))
    pub = await one_publish(ctx, token_c, since)
    check(pub.reply == "error:cancel:item-not-found",
          f"knock answered a publish for an unknown push module with {pub.reply}, expected cancel/item-not-found")
    await expect_no_push(ctx, token_c, 0, "the push module is unknown")

    # a token APNs calls dead
    token_d = await device("m13d", MONAL_MODULE)
    apns.behave(token_d, "unregistered")
    since = time.monotonic()
    await ctx.send("m13d", text_for("s13d-1"))
    pub = await one_publish(ctx, token_d, since)
    reqs = requests_for(ctx, token_d)
    check(len(reqs) == 1 and reqs[0]["status"] == 410, f"expected one 410 from APNs, got {[x['status'] for x in reqs]}")
    check(pub.reply == "error:cancel:item-not-found",
          f"knock answered the publish APNs called Unregistered with {pub.reply}, expected cancel/item-not-found")
    apns.clear_behaviour(token_d)  # APNs would say 410 again; knock must not even ask
    since = time.monotonic()
    text = text_for("s13d-2")
    await ctx.send("m13d", text)
    c = await ctx.login("m13d")
    check(await c.expect_message(text, 10), "m13d did not get the second message from offline storage")
    await ctx.go_offline(c)
    await asyncio.sleep(0.3)
    later = ctx.bed.tap.publishes_to(token_d, since)
    check(all(p.reply == "error:cancel:item-not-found" for p in later),
          f"after the 410 knock answered {[p.reply for p in later]}, expected item-not-found")
    await expect_no_push(ctx, token_d, 1, "APNs called the token dead")
    ctx.note(f"dead token: the server published {len(later)} more time(s) {[p.reply for p in later]}, "
             "no APNs request")
    ctx.summary = "production and -sandbox modules pushed; unknown module and dead token item-not-found"


# ------------------------------------------------------------------------------------------------ 14: Siskin

# Siskin's <enable/>, as tigase/siskin-im SiskinIM/service/SiskinPushNotificationsModule.swift
# (prepareExtensions, enable(settings:)) and tigase/Martin Sources/Martin/modules/push/
# TigasePushNotificationsModule.swift build it when the account advertises every feature (Prosody with the
# trixie modules does): <groupchat/> (no room rules here), <muted/> left out (no muted chat: Martin omits it when
# the list is empty), <priority/>, <encrypt alg='aes-128-gcm' max-size='3072'>key</encrypt>, <jingle/>; no
# publish-options form. <ignore-unknown/> is sent only when the user turned notifications from unknown senders
# off, which is not the case here (bob is not in the user's roster).
SISKIN_ENABLE = (
    "<enable xmlns='urn:xmpp:push:0' jid='{jid}' node='{node}'>"
    "<groupchat xmlns='tigase:push:filter:groupchat:0'/>"
    "<priority xmlns='tigase:push:priority:0'/>"
    "<encrypt xmlns='tigase:push:encrypt:0' alg='aes-128-gcm' max-size='3072'>{key}</encrypt>"
    "<jingle xmlns='tigase:push:jingle:0'/>"
    "</enable>"
)
# what the account's disco#info must list for Siskin to send the extensions above (prepareExtensions,
# isSupported: the account features)
SISKIN_NEEDS = {"urn:xmpp:push:0", "tigase:push:filter:groupchat:0", "tigase:push:filter:muted:0",
                "tigase:push:priority:0", "tigase:push:encrypt:0", "tigase:push:encrypt:aes-128-gcm",
                "tigase:push:jingle:0"}
# what Siskin reads from register-device's reply to turn encryption on (older Siskin) and what knock says
KNOCK_FEATURES = {"tigase:push:encrypt:0", "tigase:push:encrypt:aes-128-gcm", "tigase:push:jingle:0"}
# an OMEMO message as Conversations-style clients send it: the encrypted element, EME, and a fallback body
OMEMO = ("<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='12345'>"
         "<key rid='67890'>{key}</key><iv>{iv}</iv></header><payload>{payload}</payload></encrypted>"
         "<encryption xmlns='urn:xmpp:eme:0' namespace='eu.siacs.conversations.axolotl' name='OMEMO'/>"
         "<store xmlns='urn:xmpp:hints'/>")
OMEMO_FALLBACK = "I sent you an OMEMO encrypted message but your client doesn't seem to support that."
# XEP-0353 call proposal (what Siskin/Conversations send to the callee's bare JID)
PROPOSE = ("<propose xmlns='urn:xmpp:jingle-message:0' id='{sid}'>"
           "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
           "<store xmlns='urn:xmpp:hints'/>")


def encrypted_of(pub) -> ET.Element:
    n = notification(pub)
    enc = n.find(f"{TIGASE_ENCRYPT}encrypted") if n is not None else None
    if enc is None:
        raise Failure("the server's publish has no <encrypted xmlns='tigase:push:encrypt:0'>: "
                      + ET.tostring(pub.stanza, encoding="unicode")[:400])
    return enc


def check_tigase_payload(r: dict, pub, key: bytes, account: str) -> dict:
    """The payload carries account, and encrypted/iv exactly as the server published them; returns the
    decrypted JSON."""
    p = payload_of(r)
    enc = encrypted_of(pub)
    check(p.get("account") == account, f"payload account {p.get('account')!r}, expected {account!r}")
    check(p.get("encrypted") == (enc.text or "").strip() and p.get("iv") == enc.get("iv"),
          "payload encrypted/iv are not the server's <encrypted> copied untouched: "
          f"{str(p.get('encrypted'))[:40]}.../{p.get('iv')} vs {(enc.text or '')[:40]}.../{enc.get('iv')}")
    try:
        plain, zero_tag = tigase_crypto.decrypt(key, p["iv"], p["encrypted"])
        data = json.loads(plain)
    except (ValueError, KeyError) as e:
        raise Failure(f"the pushed payload does not decrypt with the client's key to JSON: {e}")
    return data | {"_zero_tag": zero_tag}


async def siskin(ctx: Ctx):
    """Siskin (Tigase dialect): register-device with an APNs and a PushKit token, the <enable/> with an
    encryption key, Jingle and priority; a chat message -> an alert push whose encrypted payload decrypts to
    the message; an OMEMO message -> an alert push; a call proposal -> a VoIP push to the PushKit token at the
    .voip topic; a call without a PushKit token -> an error; unregister-device -> item-not-found."""
    need_app(ctx, "siskin")
    user = "s14"
    account = f"{user}@{DOMAIN}"
    token = secrets.token_hex(32).upper()   # Siskin: "%02X" (AppDelegate.swift)
    voip_token = secrets.token_hex(32)      # Siskin: "%02.2hhx" (CallManager.swift)
    key = secrets.token_bytes(16)           # SymmetricKey(size: .bits128)
    c = await ctx.login(user)

    # How Siskin finds its push component (TigasePushNotificationsModule.findPushComponents): the server's
    # disco#items, then each item's disco#info: identity pubsub/push and both urn:xmpp:push:0 and the
    # provider id. Otherwise it uses push.tigase.im. Checked now, asserted last (the rest still runs).
    discovery = None
    try:
        items = await c.disco_items(DOMAIN)
        if COMPONENT not in items:
            discovery = f"{DOMAIN}'s disco#items do not list {COMPONENT} ({items})"
        else:
            ids, feats = await c.disco_info(COMPONENT)
            missing = {"urn:xmpp:push:0", SISKIN_PROVIDER} - feats
            if ("pubsub", "push") not in ids or missing:
                discovery = (f"{COMPONENT}'s disco#info has identities {sorted(ids)} and lacks {sorted(missing)}: "
                             "Siskin needs identity pubsub/push and features urn:xmpp:push:0 + "
                             f"{SISKIN_PROVIDER}, or it registers at push.tigase.im instead")
    except Exception as e:  # noqa: BLE001 - reported below
        discovery = f"disco failed: {e}"
    ctx.note("Siskin's component discovery: " + (discovery or f"{COMPONENT} found (pubsub/push + {SISKIN_PROVIDER})"))

    # The account's features: Siskin sends <encrypt>/<jingle>/<priority> only when they are all there.
    _, account_features = await c.disco_info(None)
    check(SISKIN_NEEDS <= account_features,
          f"the account lacks {sorted(SISKIN_NEEDS - account_features)}: Siskin would not enable encryption "
          "(are the trixie modules loaded?)")

    reg = await c.tigase_register(COMPONENT, SISKIN_PROVIDER, token, voip_token)
    node = (reg.get("node") or [""])[0]
    check(node, f"register-device's reply has no node: {reg}")
    features = set(reg.get("features", []))
    check(KNOCK_FEATURES <= features, f"register-device's features {sorted(features)} lack "
                                      f"{sorted(KNOCK_FEATURES - features)}")
    mps = (reg.get("max-payload-size") or [""])[0]
    check(mps.isdigit(), f"register-device's max-payload-size {mps!r} is not a number")
    ctx.note(f"register-device: node, features {sorted(features)}, max-payload-size {mps}")

    await c.send_iq_set(SISKIN_ENABLE.format(jid=COMPONENT, node=node, key=base64.b64encode(key).decode()),
                        "Siskin's <enable/>")
    await ctx.go_offline(c)

    # 1. a chat message
    text = text_for("s14-chat")
    since = time.monotonic()
    await ctx.send(user, text)
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"knock answered the encrypted chat publish with {pub.reply}")
    r = (await expect_pushes(ctx, token, 0, 1))[0]
    check(r["status"] == 200, f"mock APNs answered {r['status']} {r.get('reason')}")
    check((r["push_type"], r["priority"], r["topic"]) == ("alert", "10", SISKIN_TOPIC),
          f"chat: {r['push_type']}/{r['priority']} to {r['topic']!r}, expected alert/10 to {SISKIN_TOPIC!r}")
    check(payload_of(r).get("aps", {}).get("mutable-content") == 1, f"no mutable-content: {r['body']}")
    data = check_tigase_payload(r, pub, key, account)
    check(data.get("message") == text and data.get("type") == "chat" and data.get("sender") == f"bob@{DOMAIN}",
          f"decrypted chat payload {data}")
    check(text not in r["body"], "the message text is in the clear in the APNs payload")
    ctx.note(f"chat: alert push, decrypts to type={data['type']} sender={data['sender']} "
             f"(tag {'16 zero bytes: luaossl' if data['_zero_tag'] else 'real'})")
    voip_before = len(requests_for(ctx, voip_token))
    check(voip_before == 0, "a chat message went to the PushKit token")

    # 2. an OMEMO message
    since = time.monotonic()
    await send_stanza(ctx, user, OMEMO.format(key=base64.b64encode(secrets.token_bytes(32)).decode(),
                                              iv=base64.b64encode(secrets.token_bytes(12)).decode(),
                                              payload=base64.b64encode(secrets.token_bytes(24)).decode()),
                      body=OMEMO_FALLBACK)
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"knock answered the OMEMO publish with {pub.reply}")
    r = (await expect_pushes(ctx, token, 1, 1))[0]
    check((r["status"], r["push_type"], r["priority"]) == (200, "alert", "10"),
          f"OMEMO: {r['status']} {r['push_type']}/{r['priority']}, expected 200 alert/10")
    data = check_tigase_payload(r, pub, key, account)
    check(data.get("type") == "chat" and data.get("message") != OMEMO_FALLBACK,
          f"decrypted OMEMO payload {data}")
    ctx.note(f"OMEMO: alert push, decrypts to message={data.get('message')!r}")

    # 3. a call
    sid = "call-" + secrets.token_hex(4)
    since = time.monotonic()
    await send_stanza(ctx, user, PROPOSE.format(sid=sid))
    pub = await one_publish(ctx, node, since)
    enc = encrypted_of(pub)
    check(enc.get("type") == "voip", f"the server's publish for a call has <encrypted type={enc.get('type')!r}>")
    check(pub.reply == "result", f"knock answered the call publish with {pub.reply}")
    r = (await expect_pushes(ctx, voip_token, 0, 1))[0]
    check(r["status"] == 200, f"VoIP push: mock APNs answered {r['status']} {r.get('reason')}")
    check((r["push_type"], r["topic"], r["priority"], r.get("expiration")) == ("voip", SISKIN_VOIP_TOPIC, "10", "0"),
          f"call: {r['push_type']} to {r['topic']!r}, priority {r['priority']!r}, expiration "
          f"{r.get('expiration')!r}; expected voip to {SISKIN_VOIP_TOPIC!r}, 10, 0")
    data = check_tigase_payload(r, pub, key, account)
    # Siskin's PushKit handler (CallManager, VoIPPayload) needs sid, the caller's full JID and media (a push
    # without media means "hang up")
    check(data.get("type") == "call" and data.get("sid") == sid and data.get("media") == ["audio"]
          and str(data.get("sender", "")).startswith(f"bob@{DOMAIN}/"), f"decrypted call payload {data}")
    check(len(requests_for(ctx, token)) == 2, "the call also went to the APNs (non-VoIP) token")
    ctx.note(f"call: voip push to the PushKit token at {SISKIN_VOIP_TOPIC}, decrypts to type=call sid={sid}")

    # 3b. the PushKit token dies (the user turned calls off, say): the call is refused with `wait`, only the
    #     call token goes, and messages still reach the device
    ctx.bed.apns.behave(voip_token, "unregistered")
    since = time.monotonic()
    await send_stanza(ctx, user, PROPOSE.format(sid="call-" + secrets.token_hex(4)))
    call_reply = (await one_publish(ctx, node, since)).reply
    check(call_reply and call_reply.startswith("error:wait:"),
          f"a call to a dead PushKit token was answered {call_reply}; expected wait (the registration serves "
          "messages, and a server drops it on cancel)")
    before = len(requests_for(ctx, token))
    since = time.monotonic()
    await ctx.send(user, text_for("s14-after-dead-call-token"))
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "result", f"a message after the PushKit token died was answered {pub.reply}")
    await expect_pushes(ctx, token, before, 1)
    ctx.note(f"dead PushKit token: the call answered {call_reply}, messages still pushed")

    # 4. a call for a device that registered no PushKit token
    c2 = await ctx.login("s14b")
    token2 = secrets.token_hex(32).upper()
    reg2 = await c2.tigase_register(COMPONENT, SISKIN_PROVIDER, token2)
    node2 = (reg2.get("node") or [""])[0]
    await c2.send_iq_set(SISKIN_ENABLE.format(jid=COMPONENT, node=node2, key=base64.b64encode(key).decode()),
                         "Siskin's <enable/>")
    await ctx.go_offline(c2)
    since = time.monotonic()
    await send_stanza(ctx, "s14b", PROPOSE.format(sid="call-" + secrets.token_hex(4)))
    pub = await one_publish(ctx, node2, since)
    check(pub.reply and pub.reply.startswith("error:") and not pub.reply.endswith(":item-not-found"),
          f"a call for a device without a PushKit token was answered {pub.reply}; expected an error other "
          "than item-not-found (the registration is fine, the call cannot be delivered)")
    await expect_no_push(ctx, token2, 0, "the device has no PushKit token")
    ctx.note(f"call without a PushKit token: {pub.reply}")

    # 5. unregister-device
    c = await ctx.login(user)
    try:
        await c.tigase_unregister(COMPONENT, SISKIN_PROVIDER, token)
    except CommandError as e:
        raise Failure(f"unregister-device: {e}")
    await ctx.go_offline(c)
    before = len(requests_for(ctx, token))
    since = time.monotonic()
    await ctx.send(user, text_for("s14-after"))
    pub = await one_publish(ctx, node, since)
    check(pub.reply == "error:cancel:item-not-found",
          f"after unregister-device knock answered {pub.reply}, expected cancel/item-not-found")
    await expect_no_push(ctx, token, before, "the device unregistered")

    if discovery:
        raise Failure("everything else passed, but Siskin would not find knock: " + discovery)
    ctx.summary = "register-device, encrypted chat/OMEMO alerts, VoIP call to the PushKit token, unregister"


SCENARIOS = [
    ("12-auto-delivery", auto_delivery),
    ("13-monal", monal),
    ("14-siskin", siskin),
]
# which servers each runs against (the others run against both)
SERVERS = {"12-auto-delivery": {"prosody"}, "14-siskin": {"prosody"}}
USERS = {"12-auto-delivery": ["u12"], "13-monal": ["m13a", "m13b", "m13c", "m13d"], "14-siskin": ["s14", "s14b"]}
