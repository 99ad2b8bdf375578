-- Durable webhook delivery (mailrelay.events.webhooks): each endpoint's
-- position in the events table, so what it has not acknowledged survives a
-- restart, and a lease, so that of several nodes sharing the database one
-- delivers to an endpoint at a time (in order, without every node sending
-- every event).

-- The id of the last event acknowledged by the endpoint (or skipped: events
-- older than the webhook, events that arrived while it was failing).
ALTER TABLE webhooks ADD COLUMN delivered_through @BIGINT@ NOT NULL DEFAULT 0;
-- Existing endpoints start at the present: their backlog was in memory.
UPDATE webhooks SET delivered_through = (SELECT COALESCE(MAX(id), 0) FROM events);
-- The node delivering to the endpoint, until when (Unix seconds).
ALTER TABLE webhooks ADD COLUMN lease_owner TEXT;
ALTER TABLE webhooks ADD COLUMN lease_until @REAL@ NOT NULL DEFAULT 0;
