"""mailrelay.cli"""
