from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay", "mailrelay.tap", "Self-hosted SMTP relay for transactional email.", "mailrelay"
)
