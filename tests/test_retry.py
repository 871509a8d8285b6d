"""HTTP retries in the middle: which requests, on what, where, within the budget."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.sites import http_site
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import (
    FailureAccrualConfig,
    HostPort,
    RouteConfig,
    ServiceConfig,
)
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    Response,
    ResponseHead,
)
from l5dproxy.route.dispatcher import HttpProxy
from l5dproxy.route.retry import Replay, replay_for, retryable
from l5dproxy.telemetry import Metrics
from tests.fakes import FakeClient, FakeConnection, FakeListener, dispatch


class RetryTests(SynchronousTestCase):

    def make(self, n: int = 2, **kw) -> None:
        self.clock = Clock()
        config = ServiceConfig("app", tuple(HostPort("127.0.0.1", 8000 + i) for i in range(n)),
                               **kw)
        self.backends = BackendSet(config, frozenset(), clock=self.clock, rng=random.Random(0))
        self.client = FakeClient(consume_bodies=True)
        self.proxy = HttpProxy({"app": self.backends}, Metrics(), self.clock,
                               {"http1": self.client})

    def setUp(self) -> None:
        self.make()

    def dispatch(self, method=b"GET", body: Body | None = None, target=b"/", listener=None):
        request = Request(RequestHead(method, target, b"app"), body or Body.empty())
        return dispatch(self.proxy, request, RequestContext(http_site(listener or FakeListener()),
                                                            FakeConnection(), "http1"))

    def answer(self, index: int, status: int) -> Body:
        body = Body()
        self.client.calls[index][2].callback(Response(ResponseHead(status), body))
        return body

    def test_connect_refused_retried_on_the_other_endpoint(self):
        d = self.dispatch()
        self.client.calls[0][2].errback(error.ConnectionRefusedError())
        self.assertEqual(len(self.client.calls), 2)
        first, second = self.client.calls[0][0], self.client.calls[1][0]
        self.assertIsNot(first, second)
        self.answer(1, 200).finish()
        self.assertEqual(self.successResultOf(d).head.status, 200)
        self.assertEqual((first.active, second.active), (0, 0))
        self.assertEqual(first.failures, 1)
        self.assertEqual(self.backends.retries, 1)

    def test_reset_before_headers_retried(self):
        d = self.dispatch()
        self.client.calls[0][2].errback(error.ConnectionLost())
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_retry_status(self):
        d = self.dispatch()
        first = self.answer(0, 503)
        self.assertTrue(first.ended)  # cancelled: nobody reads a retried response
        self.assertNoResult(d)
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_status_not_in_the_list_is_answered(self):
        d = self.dispatch()
        self.answer(0, 500)
        self.assertEqual(self.successResultOf(d).head.status, 500)
        self.assertEqual(len(self.client.calls), 1)

    def test_post_is_not_retried(self):
        d = self.dispatch(method=b"POST")
        self.client.calls[0][2].errback(error.ConnectionRefusedError())
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)
        self.assertEqual(len(self.client.calls), 1)

    def test_retry_limit(self):
        self.make(n=3, retry_limit=2)
        d = self.dispatch()
        for i in range(3):
            self.client.calls[i][2].errback(error.ConnectionRefusedError())
        self.assertEqual(len(self.client.calls), 3)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_single_endpoint_retried_on_itself(self):
        self.make(n=1)
        d = self.dispatch()
        self.answer(0, 502)
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_streamed_body_replayed(self):
        self.make(n=2, retry_max_body=10)
        body = Body()
        d = self.dispatch(method=b"PUT", body=body)
        body.write(b"ab")
        self.assertEqual(self.client.calls[0][3].bytes, b"ab")
        self.client.calls[0][2].errback(error.ConnectionLost())
        # The retry gets what was sent so far, then the rest as it comes.
        retry = self.client.calls[1][3]
        self.assertEqual(retry.bytes, b"ab")
        body.write(b"cd")
        body.finish()
        self.assertEqual(retry.bytes, b"abcd")
        self.assertTrue(retry.ended)
        self.assertEqual(self.client.calls[0][3].bytes, b"ab")  # the failed attempt: no more
        self.answer(1, 200)
        self.successResultOf(d)

    def test_body_over_the_limit_is_not_retried(self):
        self.make(n=2, retry_max_body=10)
        body = Body()
        d = self.dispatch(method=b"PUT", body=body)
        body.write(b"x" * 11)
        self.client.calls[0][2].errback(error.ConnectionLost())
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_declared_length_over_the_limit(self):
        request = Request(RequestHead(b"PUT", b"/", b"a"), Body(length=100))
        self.assertFalse(retryable(request, 64))
        self.assertTrue(retryable(request, 100))

    def test_replay_flow_control_reaches_the_original(self):
        original = Body()
        paused = []

        class Source:
            def pause_body(self):
                paused.append(True)

            def resume_body(self):
                paused.append(False)

            def stop_body(self):
                paused.append("stop")

        original.set_source(Source())
        replay = Replay(original, 100)
        first = replay.body_for_attempt()
        first.pause()
        first.resume()
        second = replay.body_for_attempt()  # the first is stale from now on
        self.assertEqual(paused, [True, False])
        first.pause()
        self.assertEqual(paused, [True, False])
        second.cancel()
        self.assertEqual(paused, [True, False, "stop"])

    def test_body_stopped_before_its_end_is_not_replayed(self):
        """An attempt that gives the body up before it has all arrived (the
        endpoint answered 503 early): the rest is lost, so no retry, and the
        client gets that 503 (issue 10, item 8)."""
        self.make(n=2, retry_max_body=100)
        body = Body(length=4)
        d = self.dispatch(method=b"PUT", body=body)
        body.write(b"ab")
        self.client.calls[0][1].body.cancel()   # the client end stops the body
        self.assertTrue(body.ended)              # the original stops too
        self.answer(0, 503)
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(self.successResultOf(d).head.status, 503)

    def test_body_stopped_after_its_end_is_replayed_whole(self):
        self.make(n=2, retry_max_body=100)
        body = Body(length=4)
        d = self.dispatch(method=b"PUT", body=body)
        body.write(b"abcd")
        body.finish()
        self.client.calls[0][1].body.cancel()
        self.client.calls[0][2].errback(error.ConnectionLost())
        retry = self.client.calls[1][3]
        self.assertEqual((retry.bytes, retry.ended), (b"abcd", True))
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_pause_of_a_replaced_attempt_is_lifted(self):
        """The failed attempt had paused the original; the retry, which has
        not, must not inherit that pause (it would wait for ever)."""
        original = Body()
        calls = []

        class Source:
            def pause_body(self):
                calls.append("pause")

            def resume_body(self):
                calls.append("resume")

            def stop_body(self):
                calls.append("stop")

        original.set_source(Source())
        replay = Replay(original, 100)
        first = replay.body_for_attempt()
        first.pause()
        self.assertEqual(calls, ["pause"])
        second = replay.body_for_attempt()
        self.assertEqual(calls, ["pause", "resume"])
        second.pause()
        third = replay.body_for_attempt()
        self.assertEqual(calls, ["pause", "resume", "pause", "resume"])
        self.assertFalse(third.ended)

    def test_bodiless_request_replayed_with_a_fresh_empty_body(self):
        """One shared EmptyReplay: the first attempt is the request itself,
        each retry a new request with the same head and hook, a new empty body."""
        def hook(head):
            pass

        request = Request(RequestHead(b"GET", b"/", b"a"), Body.empty(), hook)
        replay = replay_for(request, 64)
        self.assertIs(replay, replay_for(Request(RequestHead(b"GET", b"/x", b"a"),
                                                 Body.empty()), 64))
        self.assertIs(replay.request_for_attempt(request, 0), request)
        retries = [replay.request_for_attempt(request, n) for n in (1, 2)]
        for retry in retries:
            self.assertIsNot(retry, request)
            self.assertIs(retry.head, request.head)
            self.assertIs(retry.interim, hook)
            self.assertTrue(retry.body.is_empty)
            self.assertIsNot(retry.body, request.body)
        self.assertIsNot(retries[0].body, retries[1].body)

    def test_budget_caps_retries_when_every_endpoint_fails(self):
        """Every endpoint fails: retries stop at the budget (ratio 0.2, no floor)."""
        self.make(n=3, retry_budget_ratio=0.2, retry_budget_min_per_second=0, retry_limit=2,
                  failure_accrual=FailureAccrualConfig(consecutive_failures=0))
        results = []
        for _ in range(100):
            d = self.dispatch()
            results.append(d)
            while self.client.calls:
                _, _, attempt, _ = self.client.calls.pop(0)
                attempt.errback(error.ConnectionRefusedError())
            self.clock.advance(0.01)
        for d in results:
            self.failureResultOf(d, ProxyError)
        print(f"\n100 requests, every endpoint failing: {self.backends.retries} retries, "
              f"{self.backends.retry_overflows} refused by the budget")
        self.assertEqual(self.backends.retries, 20)  # 0.2 of 100 requests, not 200
        self.assertGreaterEqual(self.backends.retry_overflows, 80)

    def test_response_timeout_spans_the_retries(self):
        self.make(n=2, response_timeout=1.0)
        d = self.dispatch()
        self.clock.advance(0.6)
        self.client.calls[0][2].errback(error.ConnectionRefusedError())
        self.clock.advance(0.5)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 504)

    def test_route_marked_retryable_retries_post(self):
        listener = FakeListener(routes=[RouteConfig("app", path_prefix="/idem", retryable=True)])
        d = self.dispatch(method=b"POST", target=b"/idem/x", listener=listener)
        self.client.calls[0][2].errback(error.ConnectionRefusedError())
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)
        d = self.dispatch(method=b"POST", target=b"/other", listener=listener)
        self.client.calls[2][2].errback(error.ConnectionRefusedError())
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_route_timeout_overrides_the_service(self):
        self.make(n=1, response_timeout=10.0)
        listener = FakeListener(routes=[RouteConfig("app", path_prefix="/fast", timeout=0.5)])
        d = self.dispatch(target=b"/fast", listener=listener)
        other = self.dispatch(target=b"/slow", listener=listener)
        self.clock.advance(0.6)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 504)
        self.assertNoResult(other)
        self.clock.advance(10)
        self.assertEqual(self.failureResultOf(other, ProxyError).value.status, 504)

    # -- a request the proxy could not place (issue 11: MCS = 0 took 3 x 5 s) --

    def not_placed(self, index: int) -> None:
        self.client.calls[index][2].errback(
            ProxyError.not_placed(f"endpoint {self.client.calls[index][0].label}"
                                  " accepts no streams"))

    def test_not_placed_on_the_only_endpoint_is_not_retried(self):
        """One endpoint that took no stream for the connect timeout: 503 then,
        not after ``retry_limit`` more waits on the same endpoint."""
        self.make(n=1, connect_timeout=5.0)
        d = self.dispatch()
        self.clock.advance(5.0)   # the client end's wait for a place ran out
        self.not_placed(0)
        failure = self.failureResultOf(d, ProxyError)
        self.assertEqual((failure.value.status, failure.value.reason),
                         (503, "endpoint 127.0.0.1:8000 accepts no streams"))
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(self.backends.retries, 0)

    def test_not_placed_at_once_is_retried_on_another_endpoint_only(self):
        self.make(n=2, connect_timeout=5.0)
        d = self.dispatch()
        self.not_placed(0)   # e.g. the endpoint's queue was full
        self.assertEqual(len(self.client.calls), 2)
        self.assertIsNot(self.client.calls[1][0], self.client.calls[0][0])
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_not_placed_after_the_connect_timeout_is_not_retried(self):
        self.make(n=3, connect_timeout=5.0)
        d = self.dispatch()
        self.clock.advance(5.0)
        self.not_placed(0)
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 503)
        self.assertEqual(len(self.client.calls), 1)

    def test_not_placed_within_the_response_timeout_is_retried(self):
        """With a response timeout the request's time to be placed is that."""
        self.make(n=2, connect_timeout=5.0, response_timeout=20.0)
        d = self.dispatch()
        self.clock.advance(5.0)
        self.not_placed(0)
        self.assertEqual(len(self.client.calls), 2)
        self.assertIsNot(self.client.calls[1][0], self.client.calls[0][0])
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_upstream_refusal_on_the_only_endpoint_is_still_retried(self):
        """The endpoint's own refusal (REFUSED_STREAM: RFC 9113 8.7, safe to
        retry) is no ``NotPlacedError``: the same endpoint may take it next."""
        self.make(n=1)
        d = self.dispatch()
        self.client.calls[0][2].errback(ProxyError.unavailable("upstream refused stream"))
        self.assertEqual(len(self.client.calls), 2)
        self.answer(1, 200)
        self.assertEqual(self.successResultOf(d).head.status, 200)

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.differing_executors])  # run per subclass
    @given(n=st.integers(1, 4), retry_limit=st.integers(0, 3),
           delays=st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4),
           response_timeout=st.sampled_from([None, 4.0, 12.0]))
    def test_not_placed_never_on_the_same_endpoint_nor_late(self, n, retry_limit, delays,
                                                             response_timeout):
        """Every attempt fails as not placed, each after some delay: a retry
        never goes to the endpoint that just refused, no attempt starts after
        the placement time, and the client gets the 503 (or the 504 of its
        response timeout)."""
        connect_timeout = 2.0
        self.make(n=n, connect_timeout=connect_timeout, retry_limit=retry_limit,
                  response_timeout=response_timeout,
                  failure_accrual=FailureAccrualConfig(consecutive_failures=0))
        start = self.clock.seconds()
        place_by = start + (response_timeout or connect_timeout)
        d = self.dispatch()
        started = [self.clock.seconds()]
        for delay in delays:
            if len(self.client.calls) < len(started):
                break
            index = len(started) - 1
            self.clock.advance(delay)
            if self.client.calls[index][2].called:
                break   # the response timeout answered
            self.not_placed(index)
            if len(self.client.calls) > len(started):
                started.append(self.clock.seconds())
        self.clock.advance(max(delays) + 20)
        result = self.failureResultOf(d, ProxyError).value
        self.assertIn(result.status, (503, 504))
        endpoints = [call[0] for call in self.client.calls]
        for before, after in itertools.pairwise(endpoints):
            self.assertIsNot(before, after)
        for at in started:
            self.assertLess(at, place_by)
        self.assertLessEqual(len(self.client.calls), retry_limit + 1)
