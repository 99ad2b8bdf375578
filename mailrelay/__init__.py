"""mailrelay: a self-hosted SMTP relay for transactional email, on Twisted."""

__version__ = "0.1.0"
