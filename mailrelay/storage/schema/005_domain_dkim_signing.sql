-- Per-domain DKIM signing switch (mailrelay.queue.render): a verified
-- sending domain's mail is signed with its key unless this is off, for
-- applications that sign their mail themselves.  Existing domains keep
-- signing.
ALTER TABLE sending_domains ADD COLUMN dkim_signing @BOOL@ NOT NULL DEFAULT @TRUE@;
