"""mailrelay.web"""
