"""mailrelay.queue"""
