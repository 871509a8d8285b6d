"""Tests for the abuse and soak scenarios' parsers and verdicts (bench/tools.py,
bench/attackers.py, bench/abuse.py): the attackers' and the gRPC client's JSON
reports, the h2 frame reader the attackers use, and the met / NOT met cells."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading

from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.trial.unittest import SynchronousTestCase

from bench.abuse import AbuseResult, Honest, SoakResult
from bench.attackers import FrameReader, headers_frame, main, with_stream_id
from bench.tools import ParseError, parse_attack_report, parse_grpc_load, parse_mcs0_stats


def report(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "attack": "slowloris-h1", "port": 4143, "seconds": 12.5, "opened": 10,
        "connect_failed": 2, "closed_by_peer": 6, "closed_by_us": 1, "throttled": 1,
        "open_at_end": 2, "work": 77, "work_unit": "bytes",
        "goaway": {"ENHANCE_YOUR_CALM": 3}, "statuses": {"408": 6}, "errors": ["connect: x"],
        "cpu_s": 1.25}
    doc.update(over)
    return doc


class AttackReportTests(SynchronousTestCase):
    def test_parses_the_last_json_line(self) -> None:
        text = "some warning\n" + json.dumps(report()) + "\n"
        r = parse_attack_report(text)
        self.assertEqual((r.attack, r.opened, r.closed_by_peer, r.throttled, r.open_at_end),
                         ("slowloris-h1", 10, 6, 1, 2))
        self.assertEqual(r.goaway, {"ENHANCE_YOUR_CALM": 3})
        self.assertEqual(r.statuses, {"408": 6})
        self.assertEqual((r.work, r.work_unit, r.seconds, r.cpu_s), (77, "bytes", 12.5, 1.25))
        self.assertEqual(r.max_work_per_conn, 0)  # absent: 0
        r = parse_attack_report(json.dumps(report(max_work_per_conn=500)))
        self.assertEqual(r.max_work_per_conn, 500)

    def test_connections_must_add_up(self) -> None:
        with self.assertRaisesRegex(ParseError, "10 connections opened but 11"):
            parse_attack_report(json.dumps(report(open_at_end=3)))
        # The endpoint counts accepted connections, which it does not end itself.
        r = parse_attack_report(json.dumps(report(attack="mcs0-endpoint", open_at_end=0)))
        self.assertEqual(r.open_at_end, 0)

    def test_rejects_bad_counts_and_missing_fields(self) -> None:
        for bad in (report(opened=-1), report(opened=True), report(work="many"),
                    report(goaway={"CANCEL": "1"}), report(goaway=[1])):
            with self.assertRaises(ParseError, msg=str(bad)):
                parse_attack_report(json.dumps(bad))
        doc = report()
        del doc["throttled"]
        with self.assertRaisesRegex(ParseError, "throttled"):
            parse_attack_report(json.dumps(doc))
        with self.assertRaisesRegex(ParseError, "no JSON object"):
            parse_attack_report("Traceback (most recent call last):\n  boom\n")
        with self.assertRaisesRegex(ParseError, "not JSON"):
            parse_attack_report('{"attack": ')


class GrpcLoadTests(SynchronousTestCase):
    OK = {"calls": 103, "ok": 100, "failed": 3, "codes": {"OK": 100, "UNAVAILABLE": 3},
          "seconds": 2.0, "rps": 50.0, "p50_ms": 1.5, "p99_ms": 9.25}

    def test_parses(self) -> None:
        r = parse_grpc_load(json.dumps(self.OK))
        self.assertEqual((r.calls, r.ok, r.failed, r.rps, r.p50_ms, r.p99_ms),
                         (103, 100, 3, 50.0, 1.5, 9.25))
        self.assertEqual(r.codes["UNAVAILABLE"], 3)
        none = dict(self.OK, calls=0, ok=0, failed=0, codes={}, rps=0.0, p50_ms=None,
                    p99_ms=None)
        self.assertIsNone(parse_grpc_load(json.dumps(none)).p99_ms)

    def test_counts_must_add_up(self) -> None:
        for bad in (dict(self.OK, failed=4), dict(self.OK, codes={"OK": 100}),
                    dict(self.OK, codes={"OK": 99, "UNAVAILABLE": 4})):
            with self.assertRaisesRegex(ParseError, "do not add up"):
                parse_grpc_load(json.dumps(bad))


class GrpcLoadRunTests(SynchronousTestCase):
    """The honest gRPC client against a real grpcio server: its report parses, the
    closed loop completes calls, the paced loop keeps to its rate."""

    def setUp(self) -> None:
        from bench.grpcload import make_server

        self.server, self.port = make_server(0)
        self.addCleanup(self.server.stop, None)

    def test_closed_loop(self) -> None:
        from bench.grpcload import load

        r = parse_grpc_load(json.dumps(load(self.port, 1.0, 2, 0.0)))
        self.assertGreater(r.ok, 0)
        self.assertEqual((r.failed, r.codes), (0, {"OK": r.ok}))
        assert r.p50_ms is not None and r.p99_ms is not None
        self.assertLessEqual(r.p50_ms, r.p99_ms)

    def test_paced(self) -> None:
        from bench.grpcload import load

        r = parse_grpc_load(json.dumps(load(self.port, 1.0, 2, 20.0)))
        self.assertGreaterEqual(r.ok, 5)  # slow calls on a busy machine fall behind
        self.assertLessEqual(r.ok, 21)  # but never ahead: a closed loop makes hundreds

    def test_unreachable_server_fails_calls(self) -> None:
        from bench.grpcload import load

        self.server.stop(None)
        r = parse_grpc_load(json.dumps(load(self.port, 0.5, 1, 0.0)))
        self.assertEqual(r.ok, 0)
        self.assertGreater(r.failed, 0)
        self.assertIn("UNAVAILABLE", r.codes)


class Mcs0StatsTests(SynchronousTestCase):
    def test_parses_and_checks(self) -> None:
        s = parse_mcs0_stats('{"accepted": 3, "open": 1, "times": [0.1, 0.1, 2.5]}')
        self.assertEqual((s.accepted, s.open, s.times), (3, 1, [0.1, 0.1, 2.5]))
        for bad in ('{"accepted": 2, "open": 0, "times": [1.0]}',
                    '{"accepted": 2, "open": 3, "times": [1.0, 2.0]}',
                    '{"accepted": 2, "open": 0, "times": [2.0, 1.0]}',
                    '{"accepted": 2}', "not json"):
            with self.assertRaises(ParseError, msg=bad):
                parse_mcs0_stats(bad)


class FrameReaderTests(SynchronousTestCase):
    """The attackers' view of what the proxy sends, fed frames serialized by hyperframe."""

    def test_frames_fed_a_byte_at_a_time(self) -> None:
        settings = SettingsFrame(0)
        settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] = 100
        wire = (settings.serialize() + SettingsFrame(0, flags=["ACK"]).serialize()
                + PingFrame(0, opaque_data=b"12345678").serialize()
                + HeadersFrame(1, data=Encoder().encode([(":status", "503")]),
                               flags=["END_HEADERS"]).serialize()
                + HeadersFrame(3, data=Encoder().encode([(":status", "200")]),
                               flags=["END_HEADERS", "PADDED"], pad_length=4).serialize()
                + DataFrame(3, data=b"x" * 100).serialize()
                + RstStreamFrame(5, error_code=8).serialize()
                + b"\x00\x00\x02\xfa\x00\x00\x00\x00\x00ab"  # unknown type 0xfa: ignored
                + GoAwayFrame(0, last_stream_id=3, error_code=11).serialize())
        r = FrameReader()
        for i in range(len(wire)):
            r.feed(wire[i:i + 1])
        self.assertEqual(r.settings_to_ack, 1)  # the ACK needs none
        self.assertEqual((r.headers, r.header_streams, r.statuses), (2, [1, 3], ["503", "200"]))
        self.assertEqual((r.data_bytes, r.rst, r.goaway, r.goaway_last_stream),
                         (100, 1, 11, 3))
        self.assertEqual(bytes(r.buf), b"")

    def test_statuses_use_the_connections_hpack_state(self) -> None:
        # The second block refers to the dynamic-table entry the first one added.
        enc = Encoder()
        first, second = (HeadersFrame(sid, data=enc.encode([(":status", "418"), ("x", "y")]),
                                      flags=["END_HEADERS"]).serialize() for sid in (1, 3))
        self.assertLess(len(second), len(first))
        r = FrameReader()
        r.feed(first + second)
        self.assertEqual(r.statuses, ["418", "418"])

    def test_with_stream_id_keeps_the_block(self) -> None:
        frame = headers_frame(1, path="/big")
        moved = with_stream_id(frame, 2**31 - 1)
        r = FrameReader()
        r.feed(moved)
        self.assertEqual(r.header_streams, [2**31 - 1])
        self.assertEqual(moved[9:], frame[9:])
        self.assertEqual(moved[:5], frame[:5])


class AttackerRunTests(SynchronousTestCase):
    """A real attacker run against a loopback server that closes every connection: its
    report parses (the connections add up) and counts the closes."""

    def test_slowloris_against_a_closing_server(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        done = threading.Event()

        def serve() -> None:
            server.settimeout(0.05)
            while not done.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    conn.recv(100)
                    conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                main(["slowloris-h1", "--port", str(port), "--seconds", "1.0",
                      "--conns", "20", "--interval", "0.2", "--batch", "5"])
        finally:
            done.set()
            t.join()
            server.close()
        r = parse_attack_report(out.getvalue())
        self.assertEqual(r.opened, 20)
        self.assertEqual(r.closed_by_peer, 20)
        self.assertEqual(r.open_at_end, 0)


class RapidResetRunTests(SynchronousTestCase):
    """rapid-reset against a loopback h2 server that sends GOAWAY(ENHANCE_YOUR_CALM) and
    closes after 200 streams: the attacker counts each close, reconnects, and reports
    the most streams one connection carried."""

    def test_reconnects_after_goaway(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        done = threading.Event()
        served: list[int] = []

        def handle(conn: socket.socket) -> None:
            r = FrameReader()
            conn.settimeout(0.2)
            buf = b""
            with conn:
                while not done.is_set() and len(r.header_streams) < 200:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:  # the attacker's last connection ends with RST
                        return
                    if not data:
                        return
                    buf += data
                    if buf.startswith(b"PRI * HTTP/2.0"):
                        buf = buf[24:]  # the client preface
                    r.feed(buf)
                    buf = b""
                if done.is_set():
                    return
                served.append(len(r.header_streams))
                with contextlib.suppress(OSError):
                    conn.sendall(GoAwayFrame(0, last_stream_id=r.header_streams[-1],
                                             error_code=11).serialize())

        def serve() -> None:
            server.settimeout(0.05)
            while not done.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    threading.Thread(target=handle, args=(conn,), daemon=True).start()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                main(["rapid-reset", "--port", str(port), "--seconds", "2", "--conns", "1",
                      "--burst", "50", "--rate", "500"])
        finally:
            done.set()
            t.join()
            server.close()
        r = parse_attack_report(out.getvalue())
        self.assertGreaterEqual(r.closed_by_peer, 2)
        self.assertEqual(r.goaway, {"ENHANCE_YOUR_CALM": r.closed_by_peer})
        self.assertEqual(r.opened, r.closed_by_peer + r.open_at_end + r.throttled)
        self.assertGreaterEqual(min(served), 200)
        # The server took at least 200 on each connection (more if they came in one read):
        # the report says what the GOAWAY said, not what the attacker sent.
        self.assertEqual(r.max_work_per_conn, max(served))
        self.assertLess(r.max_work_per_conn, r.work)


class Mcs0ClientPacingTests(SynchronousTestCase):
    """mcs0-client sends one request per interval even when answers come at once (its
    pacing once ignored the interval whenever the run was shorter than the wait)."""

    def test_one_request_per_interval(self) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        done = threading.Event()

        def serve() -> None:
            server.settimeout(0.05)
            while not done.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    conn.close()  # answered: closed

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                main(["mcs0-client", "--port", str(port), "--seconds", "1.0",
                      "--interval", "0.3", "--wait", "8"])
        finally:
            done.set()
            t.join()
            server.close()
        r = parse_attack_report(out.getvalue())
        self.assertIn(r.work, (2, 3, 4))  # 0, 0.3, 0.6, 0.9 s (the bug: ~20)
        self.assertEqual(r.statuses, {"closed": r.work})
        self.assertEqual(r.closed_by_us, r.work)


class SelectionTests(SynchronousTestCase):
    def test_abuse_and_soak_only_when_named(self) -> None:
        from bench.cli import DEFAULT_SECTIONS, parse_args

        self.assertNotIn("abuse", DEFAULT_SECTIONS)
        self.assertNotIn("soak", DEFAULT_SECTIONS)
        self.assertIn("memory", DEFAULT_SECTIONS)
        self.assertEqual(parse_args(["--only", "abuse", "soak"]).only, ["abuse", "soak"])


class VerdictTests(SynchronousTestCase):
    def test_abuse_table_cells(self) -> None:
        res = AbuseResult(settings={"duration": 5, "abuse_seconds": 20})
        res.quiet = {"h1": Honest(rps=1000.0, p99_ms=5.0, ok=5000),
                     "h2c": Honest(rps=2000.0, p99_ms=6.0, ok=10000),
                     "grpc": Honest(rps=500.0, p99_ms=9.0, ok=2500)}
        res.attacked = {"h1": Honest(rps=850.0, p99_ms=7.0, ok=4250),
                        "h2c": Honest(rps=1000.0, p99_ms=60.0, ok=5000, failed=3),
                        "grpc": Honest(ok=0)}
        res.rss_quiet_mib, res.rss_peak_mib = 50.0, 75.5
        res.attackers = {
            "slowloris-h2": parse_attack_report(json.dumps(report(
                attack="slowloris-h2", opened=500, closed_by_peer=500, closed_by_us=0,
                throttled=0, open_at_end=0))),
            "conn-flood": parse_attack_report(json.dumps(report(
                attack="conn-flood", opened=10, closed_by_peer=0, closed_by_us=8,
                throttled=0, open_at_end=2))),
            "mcs0-client": parse_attack_report(json.dumps(report(
                attack="mcs0-client", opened=3, closed_by_peer=0, closed_by_us=3,
                throttled=0, open_at_end=0, statuses={"503": 3}))),
            "ping-flood": "no report",
            "rapid-reset": parse_attack_report(json.dumps(report(
                attack="rapid-reset", opened=2, closed_by_peer=0, closed_by_us=0,
                throttled=2, open_at_end=0, max_work_per_conn=20_000))),
            "zero-window": parse_attack_report(json.dumps(report(
                attack="zero-window", opened=2, closed_by_peer=0, closed_by_us=0,
                throttled=2, open_at_end=0))),
        }
        res.mcs0_dials, res.mcs0_dials_after = 4, 0
        self.assertAlmostEqual(res.honest_ratio("h1"), 0.85)
        self.assertIsNone(res.honest_ratio("grpc"))
        self.assertEqual(res.rss_growth_mib, 25.5)
        self.assertEqual(res.attackers_cpu_pct, 100 * 1.25 * 5 / 20)  # 5 reports, 20 s
        self.assertEqual([res.attacker_met(k) for k in res.attackers],
                         [True, False, True, None, False, True])
        res.mcs0_dials_after = 2  # still dialling after the client left
        self.assertFalse(res.attacker_met("mcs0-client"))
        res.mcs0_dials_after, res.mcs0_dials = 0, 3 * 77 + 1  # more than 3 per request
        self.assertFalse(res.attacker_met("mcs0-client"))
        res.mcs0_dials = 3 * 77
        self.assertTrue(res.attacker_met("mcs0-client"))
        # Rapid reset: closed each time after a few hundred streams, reconnecting; the
        # connections open at its end do not count against it.
        res.attackers["rapid-reset"] = parse_attack_report(json.dumps(report(
            attack="rapid-reset", opened=40, closed_by_peer=38, closed_by_us=0,
            throttled=0, open_at_end=2, max_work_per_conn=600)))
        self.assertTrue(res.attacker_met("rapid-reset"))
        res.attackers["rapid-reset"].max_work_per_conn = 5_001
        self.assertFalse(res.attacker_met("rapid-reset"))
        lines = res.table().splitlines()

        def row(prefix: str) -> list[str]:
            line = next(x for x in lines if x.startswith(prefix))
            return [c.strip() for c in line.strip("|").split("|")]

        self.assertEqual(row("| HTTP/1.1")[3], "0.85")
        self.assertEqual(row("| HTTP/1.1")[-1], "met")
        self.assertEqual(row("| h2c")[-1], "NOT met")
        self.assertEqual(row("| h2c")[-2], "0 / 3")
        self.assertEqual(row("| gRPC")[-1], "?")
        self.assertIn("growth +25.5 MiB < 20: NOT met", row("| RSS")[-1])
        self.assertEqual(row("| conn-flood")[-1], "NOT met")
        self.assertEqual(row("| ping-flood")[2], "ERR")
        json.dumps(res.to_json())

    def test_each_attacker_line(self) -> None:
        from bench.abuse import AbuseEach

        def one(kind: str, attacked_h1: float, peak: float, **counts: int) -> AbuseResult:
            r = AbuseResult(settings={"duration": 5, "abuse_seconds": 20})
            r.quiet = {n: Honest(rps=100.0, ok=500) for n in ("h1", "h2c", "grpc")}
            r.attacked = {"h1": Honest(rps=attacked_h1, ok=1),
                          "h2c": Honest(rps=90.0, ok=1), "grpc": Honest(rps=85.0, ok=1)}
            r.rss_quiet_mib, r.rss_peak_mib = 50.0, peak
            r.attackers = {kind: parse_attack_report(json.dumps(report(attack=kind, **counts)))}
            return r

        each = AbuseEach(results={
            "slowloris-h2": one("slowloris-h2", 95.0, 52.0, opened=500, closed_by_peer=500,
                                closed_by_us=0, throttled=0, open_at_end=0),
            "conn-flood": one("conn-flood", 40.0, 80.0, opened=10, closed_by_peer=2,
                              closed_by_us=0, throttled=0, open_at_end=8)})
        lines = each.table().splitlines()
        cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines
                 if x.startswith("| slowloris") or x.startswith("| conn-flood")]
        self.assertEqual(cells[0], ["slowloris-h2", "0.95", "0.90", "0.85", "+2.0", "-",
                                    "500 / 500", "met", "met"])
        self.assertEqual(cells[1], ["conn-flood", "0.40", "0.90", "0.85", "+30.0", "-",
                                    "2 / 10", "NOT met", "NOT met"])
        json.dumps(each.to_json())

    def test_soak_flatness_after_warmup(self) -> None:
        res = SoakResult(seconds=300, warmup_s=60)
        res.rss_cycle_end_mib = [(30.0, 40.0), (61.0, 50.0), (91.0, 52.0), (121.0, 54.5)]
        self.assertEqual(res.after_warmup(), [50.0, 52.0, 54.5])
        self.assertEqual(res.spread_mib, 4.5)
        self.assertIn("<= 5: met", res.table())
        self.assertIn("| honest requests failed | 0 | 0: met |", res.table())
        res.rss_cycle_end_mib.append((151.0, 56.0))
        res.honest_failed = {"h1": 2}
        self.assertIn("<= 5: NOT met", res.table())
        self.assertIn("| honest requests failed | h1 2 | 0: NOT met |", res.table())
        json.dumps(res.to_json())
