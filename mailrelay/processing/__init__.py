"""mailrelay.processing"""
