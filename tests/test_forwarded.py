"""l5dproxy.route.forwarded: X-Forwarded-For, X-Forwarded-Proto, Forwarded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.config.checks import parse_networks
from l5dproxy.exchange.message import RequestHead
from l5dproxy.route.forwarded import ForwardedRule

BOUNDED = settings(max_examples=200, deadline=None, derandomize=True)

TRUSTED = ForwardedRule.from_config("append", ["10.0.0.0/8", "2001:db8::/32"])


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"GET", b"/", b"app.example", list(headers))


def values(h: RequestHead, name: bytes) -> list[bytes]:
    return [v for n, v in h.headers if n.lower() == name]


class RuleTests(SynchronousTestCase):
    def test_untrusted_forged_fields_are_replaced(self) -> None:
        h = head((b"X-Forwarded-For", b"1.2.3.4"), (b"accept", b"*/*"),
                 (b"X-Forwarded-Proto", b"https"), (b"x-forwarded-for", b"5.6.7.8"))
        TRUSTED.apply(h, "192.0.2.7", b"http")
        self.assertEqual(h.headers, [(b"accept", b"*/*"), (b"x-forwarded-for", b"192.0.2.7"),
                                     (b"x-forwarded-proto", b"http")])

    def test_trusted_peer_appends(self) -> None:
        h = head((b"X-Forwarded-For", b"1.2.3.4"), (b"x-forwarded-for", b"5.6.7.8"),
                 (b"X-Forwarded-Proto", b"https"))
        TRUSTED.apply(h, "10.1.2.3", b"http")
        self.assertEqual(values(h, b"x-forwarded-for"), [b"1.2.3.4, 5.6.7.8, 10.1.2.3"])
        self.assertEqual(values(h, b"x-forwarded-proto"), [b"https"])

    def test_trusted_peer_without_fields_sets_them(self) -> None:
        h = head()
        TRUSTED.apply(h, "10.0.0.1", b"https")
        self.assertEqual(h.headers, [(b"x-forwarded-for", b"10.0.0.1"),
                                     (b"x-forwarded-proto", b"https")])

    def test_ipv4_mapped_peer_is_trusted_as_ipv4(self) -> None:
        h = head((b"x-forwarded-for", b"1.2.3.4"))
        TRUSTED.apply(h, "::ffff:10.9.9.9", b"http")
        self.assertEqual(values(h, b"x-forwarded-for"), [b"1.2.3.4, ::ffff:10.9.9.9"])

    def test_replace_ignores_trust(self) -> None:
        rule = ForwardedRule.from_config("replace", ["10.0.0.0/8"])
        h = head((b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-proto", b"https"))
        rule.apply(h, "10.0.0.1", b"http")
        self.assertEqual(h.headers, [(b"x-forwarded-for", b"10.0.0.1"),
                                     (b"x-forwarded-proto", b"http")])

    def test_off_leaves_the_request_alone(self) -> None:
        rule = ForwardedRule.from_config("off", [])
        fields = [(b"x-forwarded-for", b"1.2.3.4"), (b"forwarded", b"for=1.2.3.4")]
        h = head(*fields)
        rule.apply(h, "192.0.2.1", b"http")
        self.assertEqual(h.headers, fields)

    def test_forwarded_kept_consistent_when_present(self) -> None:
        h = head((b"Forwarded", b"for=192.0.2.60;proto=https"), (b"x-forwarded-for", b"192.0.2.60"))
        TRUSTED.apply(h, "2001:db8::5", b"http")
        self.assertEqual(values(h, b"forwarded"),
                         [b'for=192.0.2.60;proto=https, for="[2001:db8::5]";proto=http'])
        self.assertEqual(values(h, b"x-forwarded-for"), [b"192.0.2.60, 2001:db8::5"])

    def test_malformed_forwarded_from_trusted_is_dropped_not_extended(self) -> None:
        # Red-team finding: 'Forwarded: for="1.2.3.4' relayed by a trusted
        # balancer got ', for=10.1.2.3;proto=http' appended inside its open
        # quoted-string, so the endpoint saw no element from the proxy.
        for bad in (b'for="1.2.3.4', b'for="a\\"', b'for=a"b', b'for=', b"for==x"):
            h = head((b"forwarded", bad), (b"Forwarded", b"for=192.0.2.60"))
            TRUSTED.apply(h, "10.1.2.3", b"http")
            self.assertEqual(values(h, b"forwarded"),
                             [b"for=192.0.2.60, for=10.1.2.3;proto=http"], bad)
        good = b'for="[2001:db8::1]:4711";by=x, ;for=_hidden , for="a\\"b"'
        h = head((b"forwarded", good))
        TRUSTED.apply(h, "10.1.2.3", b"http")
        self.assertEqual(values(h, b"forwarded"), [good + b", for=10.1.2.3;proto=http"])

    def test_forged_forwarded_from_untrusted_is_replaced(self) -> None:
        h = head((b"forwarded", b"for=127.0.0.1"))
        TRUSTED.apply(h, "198.51.100.1", b"https")
        self.assertEqual(values(h, b"forwarded"), [b"for=198.51.100.1;proto=https"])

    def test_forwarded_not_introduced(self) -> None:
        h = head()
        TRUSTED.apply(h, "198.51.100.1", b"http")
        self.assertEqual(values(h, b"forwarded"), [])

    def test_no_ip_client_is_unknown(self) -> None:
        h = head((b"forwarded", b"for=x"))
        TRUSTED.apply(h, None, b"http")
        self.assertEqual(values(h, b"x-forwarded-for"), [b"unknown"])
        self.assertEqual(values(h, b"forwarded"), [b"for=unknown;proto=http"])

    def test_bad_config_values(self) -> None:
        with self.assertRaises(ValueError):
            ForwardedRule.from_config("prepend", [])
        for bad in ("10.0.0.1/8", "10.0.0.0/33", "example.com", ""):
            with self.assertRaises(ValueError) as cm:
                parse_networks([bad])
            self.assertIn(repr(bad), str(cm.exception))
        self.assertEqual([str(n) for n in parse_networks(["10.0.0.1", "::1"])],
                         ["10.0.0.1/32", "::1/128"])


_ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_forged = st.lists(st.tuples(
    st.sampled_from([b"X-Forwarded-For", b"x-forwarded-for", b"X-FORWARDED-FOR",
                     b"X-Forwarded-Proto", b"Forwarded", b"forwarded", b"x-other"]),
    st.binary(min_size=1, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)),
    max_size=6)


def _top_level_elements(value: bytes) -> list[bytes]:
    """RFC 7239's list split at the commas outside quoted-strings (a
    backslash escapes inside one); AssertionError when a quote is open at
    the end."""
    elements, current, quoted, escaped = [], b"", False, False
    for byte in value:
        c = bytes([byte])
        if escaped:
            escaped = False
        elif quoted and c == b"\\":
            escaped = True
        elif c == b'"':
            quoted = not quoted
        elif c == b"," and not quoted:
            elements.append(current.strip())
            current = b""
            continue
        current += c
    assert not quoted and not escaped, value
    return [*elements, current.strip()]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, derandomize=True, deadline=None)
    @given(st.lists(st.lists(st.sampled_from(b'for="\\,;= a\t'), max_size=12).map(bytes),
                    max_size=3))
    def test_the_proxy_element_is_always_the_last_for_a_trusted_peer(self, sent) -> None:
        h = head(*[(b"forwarded", v) for v in sent], (b"forwarded", b"for=192.0.2.1"))
        TRUSTED.apply(h, "10.1.2.3", b"http")
        (value,) = values(h, b"forwarded")
        self.assertEqual(_top_level_elements(value)[-1], b"for=10.1.2.3;proto=http")

    @BOUNDED
    @given(_forged, _ips, st.sampled_from([b"http", b"https"]))
    def test_an_untrusted_client_cannot_choose_what_the_endpoint_sees(
            self, fields, client, proto) -> None:
        """Whatever forwarding fields an untrusted client sends, the request
        carries exactly one X-Forwarded-For (its own address), one
        X-Forwarded-Proto (the real scheme), and a Forwarded only naming it;
        every other field is kept in order."""
        rule = ForwardedRule.from_config("append", ["10.0.0.0/8"])
        client = client if not rule.trusts(client) else "192.0.2.1"
        h = head(*fields)
        rule.apply(h, client, proto)
        self.assertEqual(values(h, b"x-forwarded-for"), [client.encode()])
        self.assertEqual(values(h, b"x-forwarded-proto"), [proto])
        forwarded = values(h, b"forwarded")
        had = any(n.lower() == b"forwarded" for n, _ in fields)
        self.assertEqual(len(forwarded), 1 if had else 0)
        if had:
            node = f'"[{client}]"' if ":" in client else client
            self.assertEqual(forwarded[0], f"for={node};proto={proto.decode()}".encode())
        self.assertEqual([f for f in h.headers if f[0] == b"x-other"],
                         [f for f in fields if f[0] == b"x-other"])

    @BOUNDED
    @given(st.lists(_ips, min_size=1, max_size=4), st.ip_addresses(v=4).map(str))
    def test_a_chain_through_trusted_proxies_keeps_every_hop(self, hops, last) -> None:
        """Each trusted hop appends its peer: the endpoint sees the whole
        chain, oldest first, and the last entry is always the address the
        proxy itself saw."""
        rule = ForwardedRule.from_config("append", ["0.0.0.0/0", "::/0"])
        h = head()
        for hop in [*hops, last]:
            rule.apply(h, hop, b"http")
        self.assertEqual(values(h, b"x-forwarded-for"),
                         [", ".join([*hops, last]).encode()])
