"""Tests for the pure output parsers of the benchmark harness (bench/tools.py), fed
with output captured from the Debian 12 tools (wrk 4.1.0, h2load 1.52, iperf3 3.12)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from bench.tools import (
    ParseError,
    accept_queue,
    duration_ms,
    listening_ports,
    log_exceptions,
    parse_curl_write_out,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3_json,
    parse_vmrss_kib,
    parse_wrk,
    percentile,
    pid_stat_session_ticks,
    proc_stat_busy_ticks,
    prometheus_samples,
)

WRK_OK = """\
Running 2s test @ http://127.0.0.1:18081/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   153.16us   55.27us   1.63ms   90.94%
    Req/Sec   174.69k     5.87k  183.14k    65.00%
  Latency Distribution
     50%  140.00us
     75%  149.00us
     90%  182.00us
     99%  301.00us
  347437 requests in 2.00s, 50.69MB read
Requests/sec: 173610.08
Transfer/sec:     25.33MB
"""

WRK_ERRORS = """\
Running 10s test @ http://127.0.0.1:4143/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms   10.89ms   1.20s    97.10%
    Req/Sec     9.80k     1.02k   11.10k    70.00%
  Latency Distribution
     50%    4.01ms
     75%    5.50ms
     90%    7.20ms
     99%    1.05s
  97512 requests in 10.00s, 8.09MB read
  Socket errors: connect 0, read 12, write 3, timeout 7
  Non-2xx or 3xx responses: 42
Requests/sec:   9751.20
Transfer/sec:    828.70KB
"""

H2LOAD_OK = """\
starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and \
2s of main duration for measurements.
Warm-up started for thread #0.
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 92254.00 req/s, 6.33MB/s
requests: 184508 total, 184608 started, 184508 done, 184508 succeeded, 0 failed, \
0 errored, 0 timeout
status codes: 184509 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 12.67MB (13285123) total, 8.45MB (8856432) headers (space savings 51.02%), \
1.06MB (1107048) data
                     min         max         mean         sd        +/- sd
time for request:       39us      4.30ms      1.08ms       277us    88.93%
time for connect:       49us       171us       115us        40us    70.00%
time to 1st byte:     1.56ms      1.72ms      1.65ms        51us    60.00%
req/s           :    9199.35     9269.65     9224.57       26.49    80.00%
"""

H2LOAD_REFUSED = """\
starting benchmark...
spawning thread #0: 10 total client(s). 1000 total requests

finished in 657us, 0.00 req/s, 0B/s
requests: 1000 total, 0 started, 0 done, 0 succeeded, 1000 failed, 1000 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:        0us         0us         0us         0us     0.00%
"""

IPERF_OK = json.dumps({
    "start": {"version": "iperf 3.12"},
    "intervals": [],
    "end": {
        "sum_sent": {"seconds": 1.0, "bytes": 3552214016, "bits_per_second": 28419165347.0,
                     "retransmits": 0},
        "sum_received": {"seconds": 1.0, "bytes": 3552035840,
                         "bits_per_second": 28417716437.59},
    },
})

IPERF_REFUSED = """\
{
\t"start":\t{
\t\t"connected":\t[],
\t\t"version":\t"iperf 3.12"
\t},
\t"intervals":\t[],
\t"end":\t{
\t},
\t"error":\t"unable to connect to server: Connection refused"
}
"""

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


class DurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        self.assertAlmostEqual(duration_ms("140.00us"), 0.14)
        self.assertAlmostEqual(duration_ms("1.63ms"), 1.63)
        self.assertAlmostEqual(duration_ms("2.00s"), 2000.0)
        self.assertAlmostEqual(duration_ms("1.50m"), 90_000.0)

    def test_garbage(self) -> None:
        self.assertRaises(ParseError, duration_ms, "fast")


class WrkTests(SynchronousTestCase):
    def test_clean_run(self) -> None:
        r = parse_wrk(WRK_OK)
        self.assertEqual(r.requests_per_sec, 173610.08)
        self.assertEqual(r.requests, 347437)
        self.assertEqual(r.duration_s, 2.0)
        self.assertAlmostEqual(r.latency_ms["50"], 0.14)
        self.assertAlmostEqual(r.latency_ms["99"], 0.301)
        self.assertEqual(r.non_2xx_3xx, 0)
        self.assertEqual(r.errors, 0)

    def test_errors_and_non_2xx(self) -> None:
        r = parse_wrk(WRK_ERRORS)
        self.assertEqual(r.requests_per_sec, 9751.2)
        self.assertEqual(r.socket_errors, {"connect": 0, "read": 12, "write": 3, "timeout": 7})
        self.assertEqual(r.errors, 22)
        self.assertEqual(r.non_2xx_3xx, 42)
        self.assertAlmostEqual(r.latency_ms["99"], 1050.0)

    def test_not_wrk_output(self) -> None:
        self.assertRaises(ParseError, parse_wrk,
                          "unable to connect to 127.0.0.1:1 Connection refused")


class H2loadTests(SynchronousTestCase):
    def test_clean_run(self) -> None:
        r = parse_h2load(H2LOAD_OK)
        self.assertEqual(r.requests_per_sec, 92254.0)
        self.assertEqual(r.duration_s, 2.0)
        self.assertEqual((r.total, r.succeeded, r.failed), (184508, 184508, 0))
        self.assertEqual(r.status["2xx"], 184509)
        self.assertAlmostEqual(r.request_time_ms["mean"], 1.08)
        self.assertAlmostEqual(r.request_time_ms["min"], 0.039)

    def test_refused(self) -> None:
        r = parse_h2load(H2LOAD_REFUSED)
        self.assertEqual(r.requests_per_sec, 0.0)
        self.assertAlmostEqual(r.duration_s, 0.000657)
        self.assertEqual((r.succeeded, r.failed, r.errored), (0, 1000, 1000))

    def test_usage_error(self) -> None:
        self.assertRaises(ParseError, parse_h2load, "--warm-up-time: value error 0.5\n")

    def test_log_file(self) -> None:
        log = parse_h2load_log("1795574708438960\t200\t131\n1795574708438960\t200\t244\n"
                               "1795574708439960\t503\t1249\n")
        self.assertEqual(log.durations_ms, [0.131, 0.244, 1.249])
        self.assertEqual(log.statuses, {200: 2, 503: 1})

    def test_log_file_garbage(self) -> None:
        self.assertRaises(ParseError, parse_h2load_log, "not a log line\n")


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self) -> None:
        values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
        self.assertEqual(percentile(values, 50), 50.0)
        self.assertEqual(percentile(values, 99), 99.0)
        self.assertEqual(percentile(values, 100), 100.0)
        self.assertEqual(percentile([7.0], 99.9), 7.0)

    def test_empty(self) -> None:
        self.assertRaises(ValueError, percentile, [], 50)


class IperfTests(SynchronousTestCase):
    def test_clean_run(self) -> None:
        r = parse_iperf3_json(IPERF_OK)
        self.assertAlmostEqual(r.gbits, 28.41771643759)
        self.assertEqual(r.retransmits, 0)

    def test_error_key(self) -> None:
        exc = self.assertRaises(ParseError, parse_iperf3_json, IPERF_REFUSED)
        self.assertIn("Connection refused", str(exc))

    def test_not_json(self) -> None:
        self.assertRaises(ParseError, parse_iperf3_json, "iperf3: error - unable to connect")


class ProcTests(SynchronousTestCase):
    def test_vmrss(self) -> None:
        status = "Name:\ttwistd\nVmPeak:\t  300000 kB\nVmRSS:\t   54321 kB\nThreads:\t1\n"
        self.assertEqual(parse_vmrss_kib(status), 54321)
        self.assertRaises(ParseError, parse_vmrss_kib, "Name:\tkthreadd\n")

    def test_listening_ports_and_accept_queue(self) -> None:
        self.assertEqual(listening_ports(PROC_NET_TCP), {8080, 8081})
        self.assertEqual(accept_queue(PROC_NET_TCP, 8080), 3)
        self.assertEqual(accept_queue(PROC_NET_TCP, 8081), 0)
        self.assertIsNone(accept_queue(PROC_NET_TCP, 50000))

    def test_curl_write_out(self) -> None:
        self.assertEqual(parse_curl_write_out("200 1073741824 912345678"),
                         {"http_code": 200.0, "bytes": 1073741824.0, "bytes_per_s": 912345678.0})
        self.assertRaises(ParseError, parse_curl_write_out, "")


TWISTD_LOG = """\
2026-11-25T03:08:33+0000 [twisted.internet.defer#critical] Unhandled error in Deferred:
2026-11-25T03:08:33+0000 [twisted.internet.defer#critical]
\tTraceback (most recent call last):
\t  File "/work/main/l5dproxy/http/h2/protocol.py", line 384, in _send_stream
\t    h2.send_headers(sid, headers, end_stream=True)
\t  File "/work/venv/lib/python3.11/site-packages/h2/connection.py", line 267, in process_input
\t    raise ProtocolError(msg) from e
\th2.exceptions.ProtocolError: Invalid input ConnectionInputs.SEND_HEADERS in state \
ConnectionState.CLOSED
\t
2026-11-25T03:08:34+0000 [l5dproxy.net.connection#info] closed listener=h2c end=client closed
2026-11-25T03:08:35+0000 [H2ClientProtocol,client] Unhandled Error
\tTraceback (most recent call last):
\t    raise ProtocolError(msg) from e
\th2.exceptions.ProtocolError: Invalid input ConnectionInputs.SEND_HEADERS in state \
ConnectionState.CLOSED
"""

METRICS = """\
# HELP http_errors_total Requests refused or failed by the proxy itself
# TYPE http_errors_total counter
http_errors_total{direction="inbound",listener="h2c",reason="reset"} 3.0
http_errors_total{direction="inbound",listener="http",reason="timeout"} 0.0
tcp_open_connections{direction="inbound",listener="http"} 8.0
response_total{listener="http",status_code="200",classification="success"} 25.0
"""


class LogAndMetricsTests(SynchronousTestCase):
    def test_log_exceptions(self) -> None:
        self.assertEqual(log_exceptions(TWISTD_LOG), {
            "h2.exceptions.ProtocolError: Invalid input ConnectionInputs.SEND_HEADERS in "
            "state ConnectionState.CLOSED": 2,
        })

    def test_prometheus_samples(self) -> None:
        found = prometheus_samples(METRICS, ("http_errors_total", "tcp_open_connections"))
        self.assertEqual(found, {
            'http_errors_total{direction="inbound",listener="h2c",reason="reset"}': 3.0,
            'tcp_open_connections{direction="inbound",listener="http"}': 8.0,
        })


class CpuStatTests(SynchronousTestCase):
    def test_proc_stat(self) -> None:
        stat = "cpu  100 5 50 1000 20 0 3 7 0 0\ncpu0 50 2 25 500 10 0 1 3 0 0\n"
        # busy = total - idle - iowait; total = first 8 fields (guest is inside user)
        self.assertEqual(proc_stat_busy_ticks(stat), (165, 1185))

    def test_pid_stat(self) -> None:
        line = ("4242 (twistd (x) y) S 1 4242 4240 0 -1 4194560 1234 0 0 0 "
                "310 95 0 0 20 0 1 0 100 70000000 15000 18446744073709551615")
        self.assertEqual(pid_stat_session_ticks(line), (4240, 405))


class WorkersTests(SynchronousTestCase):
    """The workers scenario's choice of N, its table and its ratios to N=1."""

    def test_worker_counts(self) -> None:
        from bench.workers import worker_counts

        self.assertEqual(worker_counts(1), (1, 2))
        self.assertEqual(worker_counts(2), (1, 2))
        self.assertEqual(worker_counts(6), (1, 2, 4, 6))
        self.assertEqual(worker_counts(16), (1, 2, 4, 8, 16))
        self.assertEqual(worker_counts(None), (1, 2))
        self.assertEqual(worker_counts(64, quick=True), (1, 2))

    def test_table_and_ratios(self) -> None:
        from bench.scenarios import Sample
        from bench.workers import WorkersSection

        sec = WorkersSection((1, 2, 4))
        for rps in (10_000.0, 12_000.0, 11_000.0):
            sec.add("h1", 1, Sample(metrics={"rps": rps, "socket_errors": 0.0,
                                             "non_2xx": 0.0}))
        sec.add("h1", 2, Sample(metrics={"rps": 16_500.0, "socket_errors": 1.0,
                                         "non_2xx": 2.0}, notes=["wrk: 2 non-2xx/3xx"]))
        sec.add("tcp_r", 1, Sample(metrics={"gbits": 10.0}))
        sec.add("tcp_r", 2, Sample(error="iperf3: boom"))
        sec.skipped[4] = "did not become ready"
        rows = {r["key"]: r for r in sec.rows()}
        self.assertEqual(rows["rps"]["values"], {1: 11_000.0, 2: 16_500.0, 4: None})
        self.assertEqual(rows["rps"]["over_n1"], {2: 1.5, 4: None})
        self.assertEqual(rows["socket_errors"]["values"][2], 3.0)
        self.assertIsNone(rows["socket_errors"]["over_n1"][2])  # a count: no ratio
        table = sec.table().splitlines()
        self.assertIn("N=2/N=1", table[0])
        rps_line = next(line for line in table if line.startswith("| h1 req/s"))
        self.assertEqual([c.strip() for c in rps_line.strip("|").split("|")][1:],
                         ["11,000", "16,500", "skip", "1.50", ""])
        tcp_line = next(line for line in table if line.startswith("| tcp -R"))
        self.assertIn("ERR", tcp_line)
        footer = "\n".join(sec.footer())
        self.assertIn("--workers 4 not measured: did not become ready", footer)
        self.assertIn("[workers/tcp_r/N=2] ERROR x1: iperf3: boom", footer)
        json.dumps(sec.to_json())

    def test_free_port_block(self) -> None:
        import socket

        from bench.procs import free_port_block

        base = free_port_block(3)
        for port in range(base, base + 3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # each of them is free
