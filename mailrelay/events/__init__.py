"""mailrelay.events"""
