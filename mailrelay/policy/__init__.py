"""mailrelay.policy"""
