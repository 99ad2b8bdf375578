"""mailrelay.spool"""
