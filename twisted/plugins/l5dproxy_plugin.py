"""The ``twistd l5dproxy`` entry point: options and the service maker, nothing else."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from l5dproxy.app import cli


@implementer(IServiceMaker, IPlugin)
class _ServiceMaker:
    tapname = "l5dproxy"
    description = "A protocol-aware proxy: HTTP/1, HTTP/2, gRPC and opaque TCP."
    options = cli.Options

    def makeService(self, options):
        return cli.make_service(options)


service_maker = _ServiceMaker()
