"""nodepass: a TCP/UDP tunnel daemon with a REST master, built the Twisted way."""

__version__ = "0.1.0"
