from mailrelay.reuseport import ReusePortParser

reusetcp = ReusePortParser()
