"""A transparent TCP relay on the component link (knock <-> XMPP server) that also reads what passes.

knock connects to the relay; the relay connects to the server's component port and copies bytes both ways,
unchanged. When either side closes, it closes the other, so the server sees exactly what knock does (a closed
link when knock stops, a connection refused-then-closed when the server is down). A copy of each direction goes
through a real XML stream parser (xml.etree's pull parser), so the tests can see every publish the server sends
(node, IQ id) and knock's reply to it (result, or the error type and condition), every knock (`<knock
xmlns='knock:token:0'/>`, as the server hands it over: who sent it) and knock's reply, and when the handshake
completes.

`inject_to_server` is the one exception to "changes nothing": it lets a scenario send the server a stanza as if
knock had sent it (XEP-0357's remote-disable message, which knock itself never sends), written only between two
of knock's top-level elements so the server's parser never sees it inside one of knock's stanzas.
"""

import asyncio
import time
import xml.etree.ElementTree as ET

PUBSUB = "{http://jabber.org/protocol/pubsub}"
KNOCK = "{knock:token:0}"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class Publish:
    def __init__(self, at: float, conn: int, iq_id: str, node: str, sender: str):
        self.at = at
        self.conn = conn
        self.iq_id = iq_id
        self.node = node
        self.sender = sender
        self.reply = None  # "result" or "error:<type>:<condition>"
        self.reply_at = None
        self.stanza = None  # the publish <iq/> as parsed (xml.etree), for what the server put in it

    def __repr__(self):
        return f"<publish id={self.iq_id} from={self.sender} reply={self.reply}>"


class KnockIq:
    """A knock the server handed knock: who it came from (the server stamps the knocker's full JID) and the reply."""

    def __init__(self, at: float, conn: int, iq_id: str, sender: str):
        self.at = at
        self.conn = conn
        self.iq_id = iq_id
        self.sender = sender
        self.reply = None  # as Publish.reply
        self.reply_at = None

    def __repr__(self):
        return f"<knock id={self.iq_id} from={self.sender} reply={self.reply}>"


class _StreamReader:
    """Feeds one direction of one connection into a pull parser and hands out its top-level elements."""

    def __init__(self):
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.broken = False
        self.root = None

    def feed(self, data: bytes):
        if self.broken:
            return []
        out = []
        try:
            self.parser.feed(data)
            for event, elem in self.parser.read_events():
                if event == "start":
                    self.depth += 1
                    if self.depth == 1:
                        self.root = elem
                else:
                    self.depth -= 1
                    if self.depth == 1:
                        out.append(elem)
                        if self.root is not None:
                            try:
                                self.root.remove(elem)
                            except ValueError:
                                pass
        except ET.ParseError:
            # Only the observer gives up; the bytes are still relayed untouched.
            self.broken = True
        return out


class Wiretap:
    def __init__(self, upstream_port: int, listen_port: int = 0):
        self.upstream_port = upstream_port
        self.listen_port = listen_port
        self.server = None
        self.conn_count = 0
        self.publishes: list[Publish] = []
        self.knocks: list[KnockIq] = []
        self._by_id: dict[str, Publish | KnockIq] = {}
        # connection number -> (opened_at, handshake_at or None, closed_at or None)
        self.links: dict[int, list] = {}
        self._writers = set()
        self.parse_errors = 0
        # connection number -> (writer towards the server, the parser of knock's direction)
        self._to_server: dict[int, tuple] = {}

    async def start(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]
        return self.listen_port

    async def close(self):
        if self.server is not None:
            self.server.close()
        for w in list(self._writers):
            w.close()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):
                pass

    # ---- what the tests ask

    def link_up(self) -> bool:
        """True when the newest connection completed its handshake and is still open."""
        if not self.links:
            return False
        last = self.links[max(self.links)]
        return last[1] is not None and last[2] is None

    def up_at(self):
        """When the newest link completed its handshake, if it is still open; else None (as Relay.up_at)."""
        return self.last_up_at() if self.link_up() else None

    def last_up_at(self):
        """When the newest link completed its handshake (monotonic), or None."""
        if not self.links:
            return None
        return self.links[max(self.links)][1]

    def last_down_at(self):
        """When the latest link that had been up closed (monotonic), or None."""
        closed = [l[2] for l in self.links.values() if l[1] is not None and l[2] is not None]
        return max(closed) if closed else None

    def publishes_to(self, node: str, since: float = 0.0) -> list[Publish]:
        return [p for p in self.publishes if p.node == node and p.at >= since]

    def knocks_since(self, since: float = 0.0) -> list[KnockIq]:
        return [k for k in self.knocks if k.at >= since]

    async def inject_to_server(self, data: bytes, timeout: float = 5.0):
        """Write `data` (whole stanzas) to the server on the newest link, as if knock had sent it.

        Waits until every byte knock sent so far ends at a stanza boundary (depth 1 in knock's stream), so the
        injected stanza never lands inside one of knock's."""
        deadline = time.monotonic() + timeout
        while True:
            conn = max(self.links) if self.links else None
            if conn is not None and self.link_up() and conn in self._to_server:
                writer, from_knock = self._to_server[conn]
                if from_knock.depth == 1 and not from_knock.broken:
                    writer.write(data)
                    await writer.drain()
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no idle component link to inject into within {timeout:g} s")
            await asyncio.sleep(0.01)

    # ---- relay

    async def _accept(self, k_reader, k_writer):
        self.conn_count += 1
        conn = self.conn_count
        self.links[conn] = [time.monotonic(), None, None]
        self._writers.add(k_writer)
        try:
            s_reader, s_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5)
        except (OSError, asyncio.TimeoutError):
            self.links[conn][2] = time.monotonic()
            self._writers.discard(k_writer)
            k_writer.close()
            return
        self._writers.add(s_writer)
        from_server = _StreamReader()
        from_knock = _StreamReader()
        self._to_server[conn] = (s_writer, from_knock)

        def on_server_element(elem):
            tag = elem.tag.split("}")[-1]
            if tag == "handshake" and self.links[conn][1] is None:
                self.links[conn][1] = time.monotonic()
            elif tag == "iq" and elem.get("type") == "set":
                pubsub = elem.find(f"{PUBSUB}pubsub")
                publish = pubsub.find(f"{PUBSUB}publish") if pubsub is not None else None
                if publish is not None:
                    p = Publish(time.monotonic(), conn, elem.get("id", ""), publish.get("node", ""),
                                elem.get("from", ""))
                    p.stanza = elem
                    self.publishes.append(p)
                    self._by_id[p.iq_id] = p
                elif elem.find(f"{KNOCK}knock") is not None:
                    k = KnockIq(time.monotonic(), conn, elem.get("id", ""), elem.get("from", ""))
                    self.knocks.append(k)
                    self._by_id[k.iq_id] = k

        def on_knock_element(elem):
            tag = elem.tag.split("}")[-1]
            if tag != "iq" or elem.get("type") not in ("result", "error"):
                return
            p = self._by_id.get(elem.get("id", ""))
            if p is None or p.reply is not None:
                return
            if elem.get("type") == "result":
                p.reply = "result"
            else:
                kind, condition = "?", "?"
                for child in elem:
                    if child.tag.split("}")[-1] == "error":
                        kind = child.get("type", "?")
                        for c in child:
                            name = c.tag.split("}")[-1]
                            if c.tag.startswith("{" + STANZAS) and name != "text":
                                condition = name
                p.reply = f"error:{kind}:{condition}"
            p.reply_at = time.monotonic()

        async def pump(reader, writer, observer, handler):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                    # parsed before the next await, so at any await the parser has seen every byte written
                    # (inject_to_server relies on that to find stanza boundaries)
                    elems = observer.feed(data)
                    await writer.drain()
                    for elem in elems:
                        handler(elem)
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                # one side closed: close both, as a direct connection would be
                for w in (writer,):
                    try:
                        w.close()
                    except Exception:
                        pass

        t1 = asyncio.create_task(pump(s_reader, k_writer, from_server, on_server_element))
        t2 = asyncio.create_task(pump(k_reader, s_writer, from_knock, on_knock_element))
        done, pending = await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        for w in (k_writer, s_writer):
            try:
                w.close()
            except Exception:
                pass
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.links[conn][2] = time.monotonic()
        self._to_server.pop(conn, None)
        self._writers.discard(k_writer)
        self._writers.discard(s_writer)
