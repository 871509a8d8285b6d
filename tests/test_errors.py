"""Errors that say what to do: the proxy's own answers name the service, the
endpoint and the cause, in ``l5d-proxy-error`` and (for a client that reads
text) a one-line body; services starting to fail and recovering are logged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.sites import http_site
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    accepts_text,
    error_response,
)
from l5dproxy.route.errors import HEALTH_LOG_INTERVAL
from tests import test_proxy
from tests.fakes import FakeConnection


def read_body(body: Body) -> bytes:
    chunks: list[bytes] = []

    class Sink:
        def body_data(self, data: bytes) -> None:
            chunks.append(data)

        def body_end(self, trailers) -> None:
            chunks.append(b"<end>")

        def body_error(self, reason) -> None:
            chunks.append(b"<error>")

    body.consume(Sink())
    return b"".join(chunks)


class AcceptsTextTests(SynchronousTestCase):
    def head(self, *accept: bytes, grpc: bool = False) -> RequestHead:
        headers = [(b"accept", a) for a in accept]
        if grpc:
            headers.append((b"content-type", b"application/grpc"))
        return RequestHead(b"GET", b"/", b"a", headers)

    def test_cases(self) -> None:
        yes = [(), (b"*/*",), (b"text/plain",), (b"TEXT/*",), (b"application/json, */*;q=0.1",),
               (b"text/html", b"text/plain; charset=utf-8")]
        no = [(b"application/json",), (b"text/html",), (b"text/plain;q=0",),
              (b"*/*; q=0.0",)]
        for accept in yes:
            self.assertTrue(accepts_text(self.head(*accept)), accept)
        for accept in no:
            self.assertFalse(accepts_text(self.head(*accept)), accept)
        self.assertFalse(accepts_text(self.head(grpc=True)))   # gRPC never

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(st.sampled_from([b"application/json", b"image/png", b"text/html", b"x/y"]),
           st.lists(st.sampled_from([b";q=0.5", b";level=1", b""]), max_size=2))
    def test_other_media_types_get_no_text(self, media, params) -> None:
        self.assertFalse(accepts_text(self.head(media + b"".join(params))))


class ErrorResponseTests(SynchronousTestCase):
    def error(self) -> ProxyError:
        err = ProxyError.bad_gateway("connection refused")
        err.where = "service app: 127.0.0.1:8080"
        return err

    def test_text_body_is_one_line_with_its_length(self) -> None:
        response = error_response(self.error(), text=True)
        line = b"l5dproxy: service app: 127.0.0.1:8080: connection refused\n"
        self.assertEqual(response.head.status, 502)
        self.assertEqual(response.head.headers, [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(line)).encode()),
            (b"l5d-proxy-error", b"service app: 127.0.0.1:8080: connection refused"),
        ])
        self.assertEqual(read_body(response.body), line + b"<end>")

    def test_no_text_is_empty(self) -> None:
        response = error_response(self.error())
        self.assertEqual(response.head.headers[0], (b"content-length", b"0"))
        self.assertEqual(read_body(response.body), b"<end>")

    def test_grpc_is_trailers_only_with_the_message(self) -> None:
        response = error_response(self.error(), grpc=True, text=True)
        headers = dict(response.head.headers)
        self.assertEqual((response.head.status, headers[b"grpc-status"]), (200, b"14"))
        self.assertEqual(headers[b"grpc-message"],
                         b"service app: 127.0.0.1:8080: connection refused")
        self.assertEqual(read_body(response.body), b"<end>")


class DispatchedErrorTests(SynchronousTestCase):
    """Through ``dispatch_to`` (what the codec ends use): the answer is a
    response the end writes like any other."""

    value = test_proxy.DispatcherTests.value

    def setUp(self) -> None:
        test_proxy.DispatcherTests.setUp(self)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def answer(self, target=b"/", headers=()):
        answers = []

        class Waiter:
            def dispatch_responded(self, token, response):
                answers.append(response)

            def dispatch_failed(self, token, failure):
                answers.append(failure)

        request = Request(RequestHead(b"GET", target, b"web.example", list(headers)),
                          Body.empty())
        context = RequestContext(http_site(self.listener), FakeConnection(), "http1")
        self.proxy.dispatch_to(request, context, Waiter(), "t")
        return answers

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "l5dproxy.route.errors"
                and e.get("log_level").name == "warn"]

    def test_refused_names_service_and_endpoint(self) -> None:
        answers = self.answer()
        self.h1.calls[0][2].errback(Failure(error.ConnectionRefusedError()))
        [response] = answers
        self.assertEqual(response.head.status, 502)
        self.assertIn((b"l5d-proxy-error", b"service app: 127.0.0.1:8080: connection refused"),
                      response.head.headers)
        self.assertEqual(read_body(response.body),
                         b"l5dproxy: service app: 127.0.0.1:8080: connection refused\n<end>")
        # the metric label keeps the bounded cause
        self.assertEqual(self.value("response_total", service="app", authority="other",
                                    status_code="502", grpc_status="",
                                    classification="failure", error="connection refused"), 1)

    def test_ejected_is_not_no_endpoints(self) -> None:
        [endpoint] = self.backends["app"].endpoints
        for _ in range(7):   # the default consecutive_failures
            self.answer()
            self.h1.calls[-1][2].errback(Failure(error.ConnectionRefusedError()))
        [response] = self.answer()
        headers = dict(response.head.headers)
        self.assertEqual(response.head.status, 503)
        self.assertRegex(headers[b"l5d-proxy-error"].decode(),
                         r"^service app: all 1 endpoints ejected by failure accrual "
                         r"\(next probe in \d\.\d s\)$")
        self.assertEqual(endpoint.state, "ejected")
        [empty] = self.answer(target=b"/empty/x")
        self.assertEqual(dict(empty.head.headers)[b"l5d-proxy-error"],
                         b"service empty: no endpoints")

    def test_failing_and_recovered_logged_once_per_interval(self) -> None:
        for _ in range(3):
            self.answer()
            self.h1.calls[-1][2].errback(Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.warnings(), [
            "service app is failing: service app: 127.0.0.1:8080: connection refused"])
        # recovering within the interval: not said yet (nor forgotten)
        self.clock.advance(1)
        self.answer()
        self.h1.calls[-1][2].callback(self.ok())
        self.assertEqual(len(self.warnings()), 1)
        self.clock.advance(HEALTH_LOG_INTERVAL)
        self.answer()
        self.h1.calls[-1][2].callback(self.ok())
        self.answer()
        self.h1.calls[-1][2].callback(self.ok())
        self.assertEqual(self.warnings()[1:], ["service app recovered"])

    def ok(self):
        from l5dproxy.exchange.message import Response, ResponseHead
        return Response(ResponseHead(200, [(b"content-length", b"0")]), Body.empty())

