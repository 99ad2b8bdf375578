-- One counter that moves on every change to accounts, credentials and sending
-- domains, made by triggers so every writer is seen (the admin command, the API,
-- another node).  Each relay process reads it every second and drops what it
-- cached of those tables when it has moved (mailrelay.storage.changes): a
-- revoked credential, a suspended account or a removed domain takes effect on
-- every process and node within about a second, not when the caches expire.
CREATE TABLE admin_changes (id INTEGER PRIMARY KEY CHECK (id = 1), generation BIGINT NOT NULL);
INSERT INTO admin_changes (id, generation) VALUES (1, 0);
-- Once per statement; the function's body stays on one line (statements split at a ';' ending a line).
CREATE FUNCTION mailrelay_admin_changed() RETURNS trigger LANGUAGE plpgsql
AS $$ BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; RETURN NULL; END $$;
CREATE TRIGGER accounts_changes AFTER INSERT OR UPDATE OR DELETE ON accounts
FOR EACH STATEMENT EXECUTE FUNCTION mailrelay_admin_changed();
CREATE TRIGGER credentials_changes AFTER INSERT OR UPDATE OR DELETE ON credentials
FOR EACH STATEMENT EXECUTE FUNCTION mailrelay_admin_changed();
CREATE TRIGGER sending_domains_changes AFTER INSERT OR UPDATE OR DELETE ON sending_domains
FOR EACH STATEMENT EXECUTE FUNCTION mailrelay_admin_changed();
