"""l5dproxy.app.logs: the level filter, text and JSON lines, where twistd's log goes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app import logs


class LogsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(logs.set_level, logs.level())

    def emit(self, observer, level=LogLevel.info, **fields) -> None:
        Logger(namespace="l5dproxy.test", observer=observer).emit(
            level, "retry {n} of {method} {path}", **fields)

    def test_level_filter(self):
        out = io.StringIO()
        observer = logs.filtered(logs.text_observer(out))
        logs.set_level("info")
        self.emit(observer, LogLevel.debug, n=1, method=b"GET", path=b"/")
        self.assertEqual(out.getvalue(), "")
        logs.set_level("DEBUG")
        self.assertEqual(logs.level(), "debug")
        self.emit(observer, LogLevel.debug, n=1, method=b"GET", path=b"/a\xff")
        self.assertTrue(out.getvalue().endswith(
            "[l5dproxy.test#debug] retry 1 of GET /a\\xff\n"), out.getvalue())
        logs.set_level("error")
        self.emit(observer, LogLevel.warn, n=2, method="GET", path="/")
        self.assertNotIn("retry 2", out.getvalue())
        self.assertRaises(ValueError, logs.set_level, "loud")
        self.assertEqual(logs.level(), "error")

    def test_json_lines(self):
        out = io.StringIO()
        self.emit(logs.json_observer(out), n=1, method=b"GET", path="/x", extra=object)
        record = json.loads(out.getvalue())
        self.assertEqual({k: record[k] for k in ("level", "namespace", "message", "method",
                                                 "path", "n")},
                         {"level": "info", "namespace": "l5dproxy.test",
                          "message": "retry 1 of GET /x", "method": "GET", "path": "/x",
                          "n": 1})
        self.assertEqual(record["extra"], str(object))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_where_twistd_logs(self):
        """stdout with -n or --logfile=-, the --logfile (or twistd.log) when
        daemonized; --syslog and --logger are left to twistd."""
        self.assertIsNone(logs.twistd_observer({"syslog": 1, "nodaemon": 1}, "text"))
        self.assertIsNone(logs.twistd_observer({"logger": "a.b", "nodaemon": 1}, "text"))
        self.assertIsNotNone(logs.twistd_observer({"nodaemon": 1}, "json"))
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        path = os.path.join(directory, "proxy.log")
        observer = logs.twistd_observer({"logfile": path, "nodaemon": 0}, "json")
        logs.set_level("info")
        self.emit(observer, n=3, method=b"PUT", path=b"/f")
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["message"], "retry 3 of PUT /f")
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))   # rotates, as twistd
