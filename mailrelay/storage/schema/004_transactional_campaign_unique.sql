-- At most one "Transactional Campaign" per account (mailrelay.storage.campaigns).
-- Several nodes (or processes) creating it on an account's first send at once
-- could each insert one; the unique index below makes the loser's insert a
-- no-op.  Databases that already have duplicates are merged first: the oldest
-- (lowest id) stays, and what referred to the others refers to it.  The
-- Transactional lists need nothing: lists_account_name is unique since 001.

CREATE TEMPORARY TABLE transactional_duplicates (
    duplicate_id @BIGINT@ PRIMARY KEY,
    keeper_id @BIGINT@ NOT NULL
);
INSERT INTO transactional_duplicates (duplicate_id, keeper_id)
SELECT c.id, k.keeper_id
FROM campaigns c
JOIN (SELECT account_id, MIN(id) AS keeper_id FROM campaigns
      WHERE name = 'Transactional Campaign' GROUP BY account_id) k ON k.account_id = c.account_id
WHERE c.name = 'Transactional Campaign' AND c.id <> k.keeper_id;

UPDATE messages SET campaign_id = (
    SELECT keeper_id FROM transactional_duplicates WHERE duplicate_id = messages.campaign_id
) WHERE campaign_id IN (SELECT duplicate_id FROM transactional_duplicates);
UPDATE events SET campaign_id = (
    SELECT keeper_id FROM transactional_duplicates WHERE duplicate_id = events.campaign_id
) WHERE campaign_id IN (SELECT duplicate_id FROM transactional_duplicates);

-- Statistics roll-ups (mailrelay.events.stats): the 'campaign:<id>' rows of
-- a duplicate are added to the keeper's, then removed.
INSERT INTO daily_counts (account_id, day, dimension, metric, value)
SELECT d.account_id, d.day, 'campaign:' || CAST(t.keeper_id AS TEXT), d.metric, SUM(d.value)
FROM daily_counts d
JOIN transactional_duplicates t ON d.dimension = 'campaign:' || CAST(t.duplicate_id AS TEXT)
WHERE 1 = 1
GROUP BY d.account_id, d.day, t.keeper_id, d.metric
ON CONFLICT (account_id, day, dimension, metric) DO UPDATE SET value = daily_counts.value + excluded.value;
DELETE FROM daily_counts
WHERE dimension IN (SELECT 'campaign:' || CAST(duplicate_id AS TEXT) FROM transactional_duplicates);

DELETE FROM campaigns WHERE id IN (SELECT duplicate_id FROM transactional_duplicates);
DROP TABLE transactional_duplicates;

CREATE UNIQUE INDEX campaigns_transactional ON campaigns (account_id) WHERE name = 'Transactional Campaign';
