"""The harness's --profile (bench/pyspy.py): the summary of py-spy's folded stacks, from
canned input (no live py-spy), the py-spy command line, and what happens without py-spy."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import cli
from bench import pyspy as pyspy_mod
from bench.procs import Supervisor
from bench.pyspy import (
    ProfileError,
    module_key,
    parse_folded,
    parse_frame,
    record_argv,
    require_pyspy,
    short_path,
    summarise,
)
from bench.scenarios import SCENARIOS, Settings
from bench.tools import ParseError

SP = "/work/venv/lib/python3.11/site-packages"
TREE = "/home/me/src/l5dproxy/l5dproxy"  # an editable install: the checkout's own path
STDLIB = "/usr/lib/python3.11"
ROOT = (f"<module> (/work/venv/bin/twistd:1);ReactorBase.run ({SP}/twisted/internet/base.py:680)"
        f";EPollReactor.doPoll ({SP}/twisted/internet/epollreactor.py:227)")
PROC = 'process 4242:"/work/venv/bin/python /work/venv/bin/twistd -n l5dproxy"'
# py-spy record --format raw --full-filenames --function --subprocesses: 100 samples.
FOLDED = f"""\
{PROC};{ROOT};Connection.doRead ({SP}/twisted/internet/tcp.py:278) 30
{PROC};{ROOT};H2Protocol._receive ({TREE}/http/h2/protocol.py:90);H2Connection.receive_data \
({SP}/h2/connection.py:1459);Decoder.decode ({SP}/hpack/hpack.py:400) 20
{PROC};{ROOT};H2Protocol._receive ({TREE}/http/h2/protocol.py:90);_check_field \
({TREE}/http/h2/translate.py:40) 15
{PROC};{ROOT};H2Protocol._receive ({TREE}/http/h2/protocol.py:91);H2Protocol._receive \
({TREE}/http/h2/protocol.py:90);Frame.serialize ({SP}/hyperframe/frame.py:120) 10
{PROC};{ROOT};BatchSender.flush ({TREE}/net/batchsend.py:124);socket.send \
({STDLIB}/socket.py:500) 5
{PROC};process 4243:"worker 1";{ROOT};BatchSender.flush ({TREE}/net/batchsend.py:124) 12
{PROC};_find_and_load (<frozen importlib._bootstrap>:1165) 3
{PROC};{ROOT} 5
"""


class FrameTests(SynchronousTestCase):
    def test_parse_frame(self) -> None:
        f = parse_frame(f"Connection.doRead ({SP}/twisted/internet/tcp.py:278)")
        self.assertEqual((f.function, f.line), ("Connection.doRead", 278))
        self.assertEqual(f.name, "Connection.doRead (twisted/internet/tcp.py)")
        self.assertFalse(f.own)
        self.assertEqual(parse_frame("<module> (<string>)").path, "<string>")
        self.assertEqual(parse_frame("no parentheses").path, "?")

    def test_paths(self) -> None:
        self.assertEqual(short_path(f"{TREE}/http/h1/client.py"), "l5dproxy/http/h1/client.py")
        self.assertEqual(short_path(f"{SP}/l5dproxy/route/x.py"), "l5dproxy/route/x.py")
        self.assertEqual(module_key(f"{TREE}/http/h1/client.py"), "l5dproxy/http/h1/client.py")
        self.assertEqual(module_key(f"{SP}/twisted/internet/tcp.py"), "twisted")
        self.assertEqual(module_key(f"{SP}/six.py"), "six")
        self.assertEqual(module_key("/usr/lib/python3/dist-packages/h2/frame.py"), "h2")
        self.assertEqual(module_key(f"{STDLIB}/asyncio/events.py"), "stdlib:asyncio")
        self.assertEqual(module_key(f"{STDLIB}/socket.py"), "stdlib:socket")
        self.assertEqual(module_key("<frozen importlib._bootstrap>"), "stdlib:importlib")
        self.assertEqual(module_key("/work/venv/bin/twistd"), "twistd")
        # py-spy's default (short) file names: the package is the first part.
        self.assertEqual(module_key("hpack/hpack.py"), "hpack")
        self.assertEqual(module_key("l5dproxy/net/batchsend.py"), "l5dproxy/net/batchsend.py")


class SummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.summary = summarise(parse_folded(FOLDED), "h2c", "bench/results/p.txt")

    def test_total(self) -> None:
        self.assertEqual(self.summary.samples, 100)

    def test_self_by_module(self) -> None:
        self.assertEqual(self.summary.self_by_module, [
            ("twisted", 35),  # doRead 30 + the bare reactor stack 5
            ("hpack", 20),
            ("l5dproxy/http/h2/translate.py", 15),
            ("l5dproxy/net/batchsend.py", 12),  # the worker's samples count too
            ("hyperframe", 10),
            ("stdlib:socket", 5),
            ("stdlib:importlib", 3),
        ])

    def test_self_by_function(self) -> None:
        self.assertEqual(self.summary.self_by_function[:3], [
            ("Connection.doRead (twisted/internet/tcp.py)", 30),
            ("Decoder.decode (hpack/hpack.py)", 20),
            ("_check_field (l5dproxy/http/h2/translate.py)", 15),
        ])

    def test_inclusive_own(self) -> None:
        # _receive is in 20 + 15 + 10 samples; its recursion (two frames, different
        # lines) counts once per stack.
        self.assertEqual(self.summary.inclusive_own, [
            ("H2Protocol._receive (l5dproxy/http/h2/protocol.py)", 45),
            ("BatchSender.flush (l5dproxy/net/batchsend.py)", 17),
            ("_check_field (l5dproxy/http/h2/translate.py)", 15),
        ])

    def test_table_and_json(self) -> None:
        self.summary.run = {"rps": 1881.0}
        text = self.summary.table(top=2)
        self.assertIn("profile of l5dproxy under h2c (py-spy, 500/s): 100 samples", text)
        self.assertIn("raw folded stacks: bench/results/p.txt", text)
        self.assertIn("     35.0 %  twisted", text)
        self.assertIn("     45.0 %  H2Protocol._receive (l5dproxy/http/h2/protocol.py)", text)
        self.assertNotIn("hyperframe", text)  # past the top 2
        doc = self.summary.to_json()
        self.assertEqual(doc["self_by_module"][1], {"name": "hpack", "samples": 20,
                                                    "pct": 20.0})
        self.assertEqual(doc["run"], {"rps": 1881.0})

    def test_short_names(self) -> None:
        # Recorded without --full-filenames (py-spy's default), e.g. /work/wt/prof.py's.
        s = summarise(parse_folded(
            "<module> (twistd:8);Connection.doRead (twisted/internet/tcp.py:278) 7\n"
            "<module> (twistd:8);H1Server.dataReceived (l5dproxy/http/h1/server.py:9) 3\n"))
        self.assertEqual(s.self_by_module, [("twisted", 7), ("l5dproxy/http/h1/server.py", 3)])

    def test_garbage(self) -> None:
        self.assertRaises(ParseError, parse_folded, "<module> (x.py:1);f (x.py:2)\n")
        self.assertRaises(ParseError, parse_folded, "Sampling process 500 times a second\n")
        self.assertEqual(summarise(parse_folded("")).samples, 0)


class RecordTests(SynchronousTestCase):
    def test_argv(self) -> None:
        self.assertEqual(
            record_argv("/v/bin/py-spy", 4242, 12.5, Path("/r/p.txt")),
            ["/v/bin/py-spy", "record", "--rate", "500", "--format", "raw",
             "--full-filenames", "--function", "--output", "/r/p.txt", "--pid", "4242",
             "--duration", "13"])
        self.assertEqual(record_argv("py-spy", 1, 2, Path("o"), subprocesses=True)[-1],
                         "--subprocesses")

    def test_found_next_to_python(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        exe = d / "py-spy"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        self.assertEqual(require_pyspy(d, path_env=""), str(exe))

    def test_missing(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        with self.assertRaises(ProfileError) as ctx:
            require_pyspy(d, path_env=str(d))
        self.assertIn("pip install py-spy", str(ctx.exception))

    def test_harness_refuses_without_pyspy(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        self.patch(pyspy_mod.sys, "executable", str(d / "python"))
        self.patch(os, "environ", {**os.environ, "PATH": str(d)})
        self.assertEqual(cli.main(["--quick", "--only", "h1", "--profile"]), 2)

    def test_harness_refuses_nothing_to_profile(self) -> None:
        self.assertEqual(cli.main(["--quick", "--only", "tcp", "--profile"]), 2)

    def test_profile_without_l5dproxy(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        h = cli.Harness(Supervisor(d), Settings(), ["h1"], ["l5dproxy"], 1.0, "py-spy")
        summary = h._profile(SCENARIOS["h1"])
        self.assertEqual(summary.error, "l5dproxy was not started")
        self.assertIn("FAILED -- l5dproxy was not started", summary.table())
