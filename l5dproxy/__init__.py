"""l5dproxy: a protocol-aware proxy on Twisted, in the spirit of Linkerd's data-plane proxy.

The code map, in the order a connection meets the code. Each folder imports
only the folders after it and the leaves (``tests/test_layout.py`` checks
it); README's "Code map" names every module. Package ``__init__`` modules
import nothing (twistd imports the plugin for ``--help``; ``app.lean`` must
run before Twisted imports OpenSSL).

``app/``
    Running it, everything below built from a config: ``command`` (the
    ``l5dproxy`` command), ``cli`` (twistd's options, ``--check``), ``lean``,
    ``service`` (listeners, ends, dispatcher; reload, drain), ``listeners``
    (each listener's records and handler table), ``sites`` (what each HTTP
    server end is given), ``tlsterm`` (terminating listeners' TLS state),
    ``workers``, ``logs``, and the admin server: ``admin``, ``stats``,
    ``tap``.
``accept/``
    A connection arrives: ``listener`` (admit, count, start detection),
    ``proxyproto`` (PROXY protocol in), ``transparent`` (the original
    destination of a redirected connection).
``detect/``
    What does the client speak? ``sniff`` (first bytes to a verdict, pure),
    ``protocol`` (peek until a verdict, hand over), ``terminate`` (TLS
    handshake on a terminating listener, then detect inside), ``early``
    (early connect while the client is silent), ``memory`` (destinations
    that spoke first).
``tcp/``
    Opaque connections: ``relay`` (bytes both ways, half-close, splice),
    ``sni`` (SNI passthrough: TLS relayed by its ClientHello's name).
``http/``
    The wire, HTTP/1 and HTTP/2 to and from the neutral exchange, both ends,
    no policy: ``headers``; ``h1/`` (``framing``, ``request``, ``upgrade``,
    ``server``, ``pool``, ``client``); ``h2/`` (``translate``,
    ``connection``, ``abuse``, ``stream``, ``protocol``, ``server``,
    ``pool``, ``client``).
``route/``
    The middle: ``dispatcher`` (route, balance, time out, retry, count),
    ``forwarded``, ``retry``, ``classify`` (gRPC), ``errors``, ``labels``.
``balance/``
    Which endpoint: ``backends`` (endpoints, P2C peak-EWMA, failure accrual,
    the retry budget).
``exchange/``
    What the HTTP ends and the middle hand each other: ``message`` (heads,
    streaming bodies, trailers, the proxy's errors), ``contracts``.

The leaves, each importing only the leaves after it:

``discovery.py``
    A service's endpoints from a static list, DNS A/AAAA or SRV.
``config/``
    The TOML file in, frozen records out: ``model``, ``parse``, ``tls``
    (the TLS tables), ``table``, ``checks``.
``tls/``
    Certificates, peer identities, termination and origination: ``certs``,
    ``identity``, ``server``, ``client``, ``errors``.
``net/``
    Connections and transports, the only users of Twisted's internals:
    ``connection``, ``proxyheader``, ``origdst``, ``batchsend``, ``splice``,
    ``writebound``, ``deadline``, ``dns``, ``listening``.
``telemetry.py``
    The metrics, under Linkerd's names and labels.
"""

#: The one place the version is written (setup.cfg reads it; /version and
#: the build_info metric report it).
__version__ = "0.1.0"
