-- One counter that moves on every change to accounts, credentials and sending
-- domains, made by triggers so every writer is seen (the admin command, the API,
-- another node).  Each relay process reads it every second and drops what it
-- cached of those tables when it has moved (mailrelay.storage.changes): a
-- revoked credential, a suspended account or a removed domain takes effect on
-- every process and node within about a second, not when the caches expire.
CREATE TABLE admin_changes (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL);
INSERT INTO admin_changes (id, generation) VALUES (1, 0);
-- SQLite triggers are per row; a trigger body stays on one line (statements split at a ';' ending a line).
CREATE TRIGGER accounts_insert_changes AFTER INSERT ON accounts
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER accounts_update_changes AFTER UPDATE ON accounts
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER accounts_delete_changes AFTER DELETE ON accounts
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER credentials_insert_changes AFTER INSERT ON credentials
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER credentials_update_changes AFTER UPDATE ON credentials
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER credentials_delete_changes AFTER DELETE ON credentials
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER sending_domains_insert_changes AFTER INSERT ON sending_domains
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER sending_domains_update_changes AFTER UPDATE ON sending_domains
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
CREATE TRIGGER sending_domains_delete_changes AFTER DELETE ON sending_domains
BEGIN UPDATE admin_changes SET generation = generation + 1 WHERE id = 1; END;
