"""The operator's view on the real ``twistd l5dproxy`` (issue 15): log level
and format, values written as text, admin endpoints over real HTTP."""

from __future__ import annotations

import http.client
import json

from twisted.trial.unittest import TestCase

from tests.support import ProxyProcess, refused_port, wait_for


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        response = c.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        c.close()


def two_refused_endpoints() -> dict:
    """A service whose every connect is refused: each GET is retried once."""
    return {"app": {"endpoints": [f"127.0.0.1:{refused_port()}",
                                  f"127.0.0.1:{refused_port()}"]}}


class LogTests(TestCase):
    def test_default_level_has_no_debug_and_log_level_turns_it_on(self):
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services=two_refused_endpoints())
        port = proxy.port("in")
        self.assertEqual(request(port, "GET", "/quiet")[0], 502)
        proxy.wait_log(r"closed listener=in .* endpoint=")   # the request is over
        self.assertNotIn("retry", proxy.log_text())
        self.assertNotIn("#debug]", proxy.log_text())
        status, _, body = request(proxy.admin_port, "GET", "/log-level")
        self.assertEqual((status, body), (200, b"info\n"))
        status, _, body = request(proxy.admin_port, "PUT", "/log-level", b"debug")
        self.assertEqual((status, body), (200, b"debug\n"))
        self.assertEqual(request(port, "GET", "/loud")[0], 502)
        line = proxy.wait_log(r"\[l5dproxy\.route\.dispatcher#debug\] retry 1 of .*").group(0)
        self.assertRegex(line, r"retry 1 of GET /loud on 127\.0\.0\.1:\d+$")
        self.assertNotIn("b'", proxy.log_text())

    def test_json_format_and_debug_level_from_config(self):
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services=two_refused_endpoints(),
                             proxy={"log_level": "debug", "log_format": "json"})
        self.assertEqual(request(proxy.port("in"), "GET", "/j?x=1")[0], 502)
        proxy.wait_log(r'"message": "retry 1 of GET /j\?x=1 on')
        proxy.wait_log(r'"message": "closed listener=in')
        records = [json.loads(line) for line in proxy.log_text().splitlines() if line]
        retry = next(r for r in records if r["message"].startswith("retry 1 "))
        self.assertEqual((retry["level"], retry["namespace"], retry["method"], retry["path"],
                          retry["n"]), ("debug", "l5dproxy.route.dispatcher", "GET", "/j?x=1", 1))
        self.assertRegex(retry["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        (closed,) = [r for r in records if r["message"].startswith("closed listener=in")]
        self.assertEqual((closed["level"], closed["listener"], closed["protocol"]),
                         ("info", "in", "http1"))
        self.assertEqual(request(proxy.admin_port, "GET", "/log-level")[2], b"debug\n")


class AdminTests(TestCase):
    def test_head_answers_and_logs_nothing(self):
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services=two_refused_endpoints())
        for path in ("/metrics", "/", "/stats.json", "/opaque", "/dashboard/"):
            status, headers, body = request(proxy.admin_port, "HEAD", path)
            self.assertEqual((status, body), (200, b""), path)
            self.assertGreater(int(headers["content-length"]), 0, path)
        # A GET after them, logged on the same stream as any warning.
        self.assertEqual(request(proxy.port("in"), "GET", "/after")[0], 502)
        proxy.wait_log(r"closed listener=in")
        self.assertNotIn("HEAD", proxy.log_text())

    def test_endpoints_on_twistd(self):
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services=two_refused_endpoints())
        status, _, body = request(proxy.admin_port, "GET", "/config.json")
        self.assertEqual(status, 200)
        config = json.loads(body)
        self.assertEqual(config["source"], proxy.config_path)
        self.assertEqual(config["listeners"][0]["service"], "app")
        status, _, body = request(proxy.admin_port, "GET", "/version")
        version = json.loads(body)["version"]
        self.assertEqual(proxy.metric_value("build_info", version=version), 1)
        self.assertGreater(proxy.metric_value("process_resident_memory_bytes"), 0)
        request(proxy.port("in"), "GET", "/counted")
        stats = wait_for(lambda: (s := json.loads(
            request(proxy.admin_port, "GET", "/stats.json")[2]))["services"][0][
                "requests_total"] == 1 and s, message="the request in /stats.json")
        self.assertEqual(stats["listeners"][0]["detect"], {"http1": 1})
        self.assertEqual(stats["services"][0]["success_rate"], 0.0)
