"""l5dproxy: a protocol-aware proxy on Twisted, in the spirit of Linkerd's data-plane proxy."""

#: The one place the version is written (setup.cfg reads it; /version and
#: the build_info metric report it).
__version__ = "0.1.0"
