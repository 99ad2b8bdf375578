"""mailrelay.delivery"""
