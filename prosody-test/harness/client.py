"""A real XMPP client (slixmpp) doing what an iOS or Android app does with knock.

slixmpp 1.17 has no XEP-0357 plugin, so the `<enable/>` and `<disable/>` payloads are defined here as slixmpp
stanza plugins (ElementBase), with XEP-0004's Form as a sub-plugin of `<enable/>` for the publish-options. The
registration with knock uses XEP-0050 ad-hoc commands through slixmpp's xep_0050 `send_command`.

Plain loopback, no TLS: SCRAM over an unencrypted stream must be allowed explicitly. Stream management is never
enabled, so a client that disconnects is offline at once and its messages go to offline storage (and to push).
"""

import asyncio
import logging
import xml.etree.ElementTree as ET

from slixmpp import ClientXMPP, Iq
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004 import Form
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

NS_PUSH = "urn:xmpp:push:0"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
REGISTER = "register-push-apns"
UNREGISTER = "unregister-push-apns"
# the Tigase dialect's commands (Siskin, via tigase/Martin's TigasePushNotificationsModule)
TIGASE_REGISTER = "register-device"
TIGASE_UNREGISTER = "unregister-device"
XDATA = "{jabber:x:data}"

log = logging.getLogger("harness.client")


class PushEnable(ElementBase):
    """XEP-0357 §5: <enable xmlns='urn:xmpp:push:0' jid='...' node='...'> + optional publish-options form."""

    namespace = NS_PUSH
    name = "enable"
    plugin_attrib = "push_enable"
    interfaces = {"jid", "node"}


class PushDisable(ElementBase):
    """XEP-0357 §6: <disable xmlns='urn:xmpp:push:0' jid='...' node='...'/>."""

    namespace = NS_PUSH
    name = "disable"
    plugin_attrib = "push_disable"
    interfaces = {"jid", "node"}


register_stanza_plugin(Iq, PushEnable)
register_stanza_plugin(Iq, PushDisable)
register_stanza_plugin(PushEnable, Form)


class StepFailed(Exception):
    pass


class CommandError(StepFailed):
    """An ad-hoc command answered with an error."""

    def __init__(self, node: str, etype: str, condition: str, text: str = ""):
        super().__init__(f"{node} failed: {etype}/{condition} {text}".strip())
        self.etype, self.condition = etype, condition


class Client(ClientXMPP):
    def __init__(self, jid: str, password: str):
        super().__init__(jid, password,
                         plugin_config={"feature_mechanisms": {"unencrypted_scram": True}})
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0004")
        self.register_plugin("xep_0050")
        self.inbox: asyncio.Queue = asyncio.Queue()
        # every <message/> received, body or not, as (from, XML text): the remote-disable scenario looks
        # for the App Server's body-less stanzas among the offline messages (slixmpp's "message" event only
        # fires for messages with a body)
        self.received: list[tuple[str, str]] = []
        self.register_handler(Callback("every message", StanzaPath("message"),
                                       lambda m: self.received.append((str(m["from"]), str(m)))))
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.auth_failed = False

    def _on_message(self, msg):
        if msg["type"] in ("chat", "normal") and msg["body"]:
            self.inbox.put_nowait(msg["body"])

    def _on_failed_auth(self, _):
        self.auth_failed = True

    async def online(self, port: int, timeout: float = 10.0):
        """Connect, authenticate, bind, and send initial presence (so offline messages are delivered)."""
        self.connect("127.0.0.1", port)
        try:
            await self.wait_until("session_start", timeout)
        except asyncio.TimeoutError:
            self.abort()
            why = "authentication failed" if self.auth_failed else "no session"
            raise StepFailed(f"{self.boundjid.bare} could not log in within {timeout:g} s ({why})")
        self.send_presence()
        return self

    async def offline(self, timeout: float = 5.0):
        """Close the stream and wait until the TCP connection is gone."""
        if not self.is_connected():
            return
        waiter = asyncio.ensure_future(self.wait_until("disconnected", timeout))
        self.disconnect(wait=1.0)
        try:
            await waiter
        except asyncio.TimeoutError:
            self.abort()

    async def expect_message(self, text: str, timeout: float = 10.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                body = await asyncio.wait_for(self.inbox.get(), left)
            except asyncio.TimeoutError:
                return False
            if body == text:
                return True

    # ---- knock: XEP-0050 registration

    async def register_device(self, app_server: str, device_id: str, token: str, timeout: float = 10.0,
                              app: str | None = None):
        """`register-push-apns` in one step; returns (jid, node, secret) from the completed command's form.
        `app` names one of knock's apps (the first is the default)."""
        form = self["xep_0004"].make_form(ftype="submit")
        form.add_field(var="token", value=token)
        form.add_field(var="device-id", value=device_id)
        if app is not None:
            form.add_field(var="app", value=app)
        return await self._register_with(app_server, form, "execute", None, timeout)

    # ---- the Tigase dialect (Siskin)

    async def completed(self, app_server: str, node: str, payload, timeout: float = 10.0):
        """A one-step XEP-0050 execute carrying `payload` (a slixmpp Form, an XML element, or None for no form);
        the completed reply's <command/> stanza. CommandError on an error reply, StepFailed on silence or a
        command that did not complete."""
        try:
            reply = await self["xep_0050"].send_command(app_server, node, action="execute", payload=payload,
                                                        timeout=timeout)
        except IqError as e:
            raise CommandError(node, e.iq["error"]["type"], e.iq["error"]["condition"], e.iq["error"]["text"])
        except IqTimeout:
            raise StepFailed(f"{node}: no answer from {app_server} within {timeout:g} s")
        command = reply["command"]
        if command["status"] != "completed":
            raise StepFailed(f"{node} not completed: status={command['status']!r}")
        return command

    async def execute(self, app_server: str, node: str, payload, timeout: float = 10.0) -> dict[str, list[str]]:
        """[`completed`] with a client's form (a slixmpp Form, or an XML element: a client's form as that client
        writes it). Returns the reply's form as {var: [values]} (every <value>, so a multi-value field keeps
        each one)."""
        command = await self.completed(app_server, node, payload, timeout)
        values: dict[str, list[str]] = {}
        x = command.xml.find(f"{XDATA}x")
        if x is not None:
            for field in x.findall(f"{XDATA}field"):
                values[field.get("var", "")] = [v.text or "" for v in field.findall(f"{XDATA}value")]
        return values

    async def _tigase_command(self, app_server: str, node: str, fields: list[tuple[str, str]], timeout: float):
        """`execute` with a submitted form as tigase/Martin's TigasePushNotificationsModule sends it
        (`DataForm(type: .submit)` + `.TextSingle` fields, no FORM_TYPE)."""
        form = self["xep_0004"].make_form(ftype="submit")
        for var, value in fields:
            form.add_field(var=var, ftype="text-single", value=value)
        return await self.execute(app_server, node, form, timeout)

    async def tigase_register(self, app_server: str, provider: str, token: str, second_token: str | None = None,
                              timeout: float = 10.0) -> dict[str, list[str]]:
        """`register-device` exactly as Siskin sends it: provider, device-token, and device-second-token (the
        PushKit token) only when there is one."""
        fields = [("provider", provider), ("device-token", token)]
        if second_token is not None:
            fields.append(("device-second-token", second_token))
        return await self._tigase_command(app_server, TIGASE_REGISTER, fields, timeout)

    async def tigase_unregister(self, app_server: str, provider: str, token: str, timeout: float = 10.0):
        """`unregister-device` as Siskin sends it: provider and device-token (never the second token)."""
        return await self._tigase_command(app_server, TIGASE_UNREGISTER,
                                          [("provider", provider), ("device-token", token)], timeout)

    async def disco_info(self, jid: str | None, timeout: float = 10.0):
        """(identities as {(category, type)}, features as a set) of `jid` (None: the user's own account)."""
        # local=False: slixmpp would otherwise answer a query about the user's own JID from its own plugins
        info = await self["xep_0030"].get_info(jid=jid or self.boundjid.bare, local=False, cached=False,
                                               timeout=timeout)
        q = info["disco_info"]
        return {(i[0], i[1]) for i in q["identities"]}, set(q["features"])

    async def disco_items(self, jid: str, timeout: float = 10.0) -> list[str]:
        items = await self["xep_0030"].get_items(jid=jid, local=False, timeout=timeout)
        return [str(i[0]) for i in items["disco_items"]["items"]]

    async def send_iq_set(self, payload_xml: str, what: str, to: str | None = None, timeout: float = 10.0):
        """An IQ set carrying `payload_xml` verbatim (a client's own stanza replayed as it sends it)."""
        iq = self.Iq()
        iq["type"] = "set"
        if to:
            iq["to"] = to
        iq.append(ET.fromstring(payload_xml))
        return await self._ask_server(iq, what, timeout)

    async def _register_with(self, app_server: str, form, action: str, session, timeout: float):
        """Submit a filled-in `register-push-apns` form; (jid, node, secret) from the completed reply."""
        try:
            reply = await self["xep_0050"].send_command(
                app_server, REGISTER, action=action, payload=form, sessionid=session, timeout=timeout)
        except IqError as e:
            raise StepFailed(f"{REGISTER} failed: {e.iq['error']['type']}/{e.iq['error']['condition']} "
                             f"{e.iq['error']['text']}")
        except IqTimeout:
            raise StepFailed(f"{REGISTER}: no answer from {app_server} within {timeout:g} s")
        command = reply["command"]
        if command["status"] != "completed":
            raise StepFailed(f"{REGISTER} not completed: status={command['status']!r}")
        values = command["form"].get_values()
        try:
            return values["jid"], values["node"], values["secret"]
        except KeyError as e:
            raise StepFailed(f"{REGISTER} result form lacks {e}: {values}")

    async def register_device_as_a_person_would(self, app_server: str, device_id: str, token: str,
                                                timeout: float = 10.0):
        """`register-push-apns` the way a generic ad-hoc UI runs it: execute without a form, show the form knock
        sends (every field must say its type, and the form what to enter), fill it in, and submit it with the
        session id. Returns (jid, node, secret) from the completed command's form."""
        try:
            first = await self["xep_0050"].send_command(app_server, REGISTER, action="execute", timeout=timeout)
        except (IqError, IqTimeout) as e:
            raise StepFailed(f"{REGISTER} without a form failed: {e}")
        command = first["command"]
        if command["status"] != "executing":
            raise StepFailed(f"{REGISTER} without a form: status={command['status']!r}, expected 'executing'")
        session = command["sessionid"]
        shown = command["form"]
        untyped = [var for var, field in shown.get_fields().items() if not field._get_attr("type")]
        if untyped:
            raise StepFailed(f"the form's fields {untyped} do not say their type: a UI cannot edit them")
        if not shown["instructions"]:
            raise StepFailed("the form has no instructions")
        filled = self["xep_0004"].make_form(ftype="submit")
        for var in shown.get_fields():
            if var == "token":
                filled.add_field(var=var, value=token)
            elif var == "device-id":
                filled.add_field(var=var, value=device_id)
        return await self._register_with(app_server, filled, "complete", session, timeout)

    async def unregister_device(self, app_server: str, device_id: str, timeout: float = 10.0):
        form = self["xep_0004"].make_form(ftype="submit")
        form.add_field(var="device-id", value=device_id)
        try:
            reply = await self["xep_0050"].send_command(
                app_server, UNREGISTER, action="execute", payload=form, timeout=timeout)
        except IqError as e:
            raise StepFailed(f"{UNREGISTER} failed: {e.iq['error']['type']}/{e.iq['error']['condition']}")
        except IqTimeout:
            raise StepFailed(f"{UNREGISTER}: no answer within {timeout:g} s")
        if reply["command"]["status"] != "completed":
            raise StepFailed(f"{UNREGISTER} not completed: {reply['command']['status']!r}")

    # ---- the user's own server: XEP-0357 enable / disable

    async def enable_push(self, app_server: str, node: str, secret: str, timeout: float = 10.0):
        iq = self.Iq()
        iq["type"] = "set"
        iq["push_enable"]["jid"] = app_server
        iq["push_enable"]["node"] = node
        form = iq["push_enable"]["form"]
        form["type"] = "submit"
        form.add_field(var="FORM_TYPE", ftype="hidden", value=PUBLISH_OPTIONS)
        form.add_field(var="secret", value=secret)
        await self._ask_server(iq, "enable", timeout)

    async def disable_push(self, app_server: str, node: str, timeout: float = 10.0):
        iq = self.Iq()
        iq["type"] = "set"
        iq["push_disable"]["jid"] = app_server
        iq["push_disable"]["node"] = node
        await self._ask_server(iq, "disable", timeout)

    async def _ask_server(self, iq, what, timeout):
        try:
            return await iq.send(timeout=timeout)
        except IqError as e:
            raise StepFailed(f"the server refused <{what}/>: {e.iq['error']['type']}/"
                             f"{e.iq['error']['condition']} {e.iq['error']['text']}")
        except IqTimeout:
            raise StepFailed(f"the server did not answer <{what}/> within {timeout:g} s")
