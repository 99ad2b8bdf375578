"""mailrelay.smtp"""
