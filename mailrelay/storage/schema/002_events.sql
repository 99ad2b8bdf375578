-- Events: indexes for the queries of the API and CLI (mailrelay.events.queries),
-- and the ids of stored event batches (mailrelay.events.sink).

-- Cursor pagination of one account's events (by event id).
CREATE INDEX events_account_id ON events (account_id, id);
-- One recipient's events; one message's history by Message-ID or transmission.
CREATE INDEX events_recipient ON events (recipient);
CREATE INDEX events_message ON events (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX events_transmission ON events (transmission_id) WHERE transmission_id IS NOT NULL;

-- One row per stored batch, written in the batch's own transaction: a batch
-- written twice (replayed from a node's outage buffer after a commit whose
-- answer was lost) is stored once.  Rows older than the retention are pruned.
CREATE TABLE event_batches (
    id TEXT PRIMARY KEY,
    ts @REAL@ NOT NULL
);
CREATE INDEX event_batches_ts ON event_batches (ts);
