# A tester's first push through the docker test stack (prosody-test/docker-compose.yml must be up):
#   pip install slixmpp==1.17.0 && python prosody-test/docker/push_demo.py
# Also run by prosody-test/docker/check, so it keeps working as the README shows it.
import asyncio, json, secrets, urllib.request
import xml.etree.ElementTree as ET
from slixmpp import ClientXMPP

PLAIN = dict(plugin_config={"feature_mechanisms": {"unencrypted_scram": True}})  # test stack: no TLS

def client(jid, password):
    c = ClientXMPP(jid, password, **PLAIN)
    c.enable_starttls = c.enable_direct_tls = False
    c.enable_plaintext = True
    for p in ("xep_0004", "xep_0030", "xep_0050"):
        c.register_plugin(p)
    return c

async def online(c):
    c.connect("127.0.0.1", 5222)
    await c.wait_until("session_start", 10)
    return c

async def main():
    token = secrets.token_hex(32)                      # stands in for the APNs device token
    alice = await online(client("alice@localhost", "alice"))
    # 1. register the device with knock (XEP-0050 ad-hoc command, p2's register-push-apns)
    form = alice.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="token", value=token)
    form.add_field(var="device-id", value="my-test-phone")
    reply = await alice.plugin["xep_0050"].send_command("push.localhost", "register-push-apns",
                                                 action="execute", payload=form)
    values = reply["command"]["form"].get_values()
    node, secret = values["node"], values["secret"]
    print("registered: node", node)
    # 2. enable push at alice's server (XEP-0357) with knock's JID, the node and the secret
    iq = alice.Iq(stype="set")
    iq.append(ET.fromstring(
        f"<enable xmlns='urn:xmpp:push:0' jid='push.localhost' node='{node}'>"
        "<x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        f"<field var='secret'><value>{secret}</value></field></x></enable>"))
    await iq.send()
    print("push enabled")
    # 3. alice goes offline; bob writes to her
    alice.disconnect(); await alice.wait_until("disconnected", 5)
    bob = await online(client("bob@localhost", "bob"))
    bob.send_message(mto="alice@localhost", mbody="hi alice", mtype="chat")
    await asyncio.sleep(0.2); bob.disconnect(); await bob.wait_until("disconnected", 5)
    # 4. what her phone would have got, as the mock APNs received it
    for _ in range(20):                                # it arrives within a moment
        with urllib.request.urlopen(f"http://127.0.0.1:8080/pushes/{token}") as r:
            pushes = json.load(r)
        if pushes:
            break
        await asyncio.sleep(0.5)
    print(json.dumps(pushes, indent=2))
    assert len(pushes) == 1 and pushes[0]["status"] == 200, "expected one push, accepted"

asyncio.run(main())
