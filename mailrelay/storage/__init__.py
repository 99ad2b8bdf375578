"""mailrelay.storage"""
