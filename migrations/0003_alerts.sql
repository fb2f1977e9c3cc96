-- Removing a device from the registry must not erase its history: events (an SOS among them)
-- and presence are kept like heartbeats, keyed by the device id.
ALTER TABLE device_events DROP CONSTRAINT device_events_device_id_fkey;
ALTER TABLE device_presence DROP CONSTRAINT device_presence_device_id_fkey;

-- Alerts: lifecycle, timeline, escalation steps with due times, the notification outbox and
-- its delivery attempts, rule state that must survive a restart.

CREATE TABLE alerts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Whose alert: the elder when the device is bound, else the device itself.
    subject          text        NOT NULL,
    elder_id         bigint      REFERENCES elders (id) ON DELETE SET NULL,
    device_id        text,
    kind             text        NOT NULL,
    severity         text        NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    status           text        NOT NULL DEFAULT 'open'
                                 CHECK (status IN ('open', 'acknowledged', 'resolved')),
    opened_at        timestamptz NOT NULL DEFAULT now(),
    -- When the condition started on the device (event time, or start of a sustained reading).
    occurred_at      timestamptz NOT NULL,
    last_repeat_at   timestamptz NOT NULL DEFAULT now(),
    repeat_count     integer     NOT NULL DEFAULT 1,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    ack_channel      text,
    resolved_at      timestamptz,
    resolved_by      text,
    resolution_note  text,
    auto_resolved    boolean     NOT NULL DEFAULT false,
    source_event_id  bigint      REFERENCES device_events (id) ON DELETE SET NULL,
    lat_e7           integer,
    lon_e7           integer,
    detail           jsonb       NOT NULL DEFAULT '{}'::jsonb
);
-- One open (or acknowledged) alert per subject and kind; repeats are counted on it.
CREATE UNIQUE INDEX alerts_one_active ON alerts (subject, kind) WHERE status <> 'resolved';
CREATE INDEX alerts_status_opened ON alerts (status, opened_at DESC);
CREATE INDEX alerts_elder ON alerts (elder_id, opened_at DESC);

-- Everything that happened to an alert, in order: transitions, notifications, attempts.
CREATE TABLE alert_timeline (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id  bigint      NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    entry     text        NOT NULL,   -- opened, repeated, escalated, notification_queued,
                                      -- delivered, delivery_failed, acknowledged, resolved, ...
    actor     text,
    channel   text,
    detail    jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX alert_timeline_alert ON alert_timeline (alert_id, id);

-- Escalation steps are rows with due times. A worker takes due rows with
-- FOR UPDATE SKIP LOCKED, so each runs once however many instances are running.
CREATE TABLE escalation_steps (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id  bigint      NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    step      integer     NOT NULL,
    round     integer     NOT NULL DEFAULT 0,      -- repetitions of a repeating step
    purpose   text        NOT NULL DEFAULT 'notify' CHECK (purpose IN ('notify', 'reminder')),
    due_at    timestamptz NOT NULL,
    state     text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'skipped')),
    done_at   timestamptz,
    UNIQUE (alert_id, purpose, step, round)
);
CREATE INDEX escalation_steps_due ON escalation_steps (due_at) WHERE state = 'pending';

-- The outbox: one row per (alert, step, contact, channel), written in the same transaction
-- as the alert change that caused it. The notifier claims rows with SKIP LOCKED and a lease.
CREATE TABLE outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id         bigint      NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    contact_id       bigint      REFERENCES contacts (id) ON DELETE SET NULL,
    role             text,
    channel          text        NOT NULL CHECK (channel IN ('sms', 'email', 'im', 'downlink')),
    recipient        text        NOT NULL,
    language         text        NOT NULL DEFAULT 'zh-CN',
    urgent           boolean     NOT NULL,   -- SOS/fall: never quiet hours, never rate limited
    step             integer     NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'suppressed', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_error       text,
    provider         text,
    provider_ref     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    -- Fallback rows point at the row whose channel failed.
    fallback_of      bigint      REFERENCES outbox (id) ON DELETE SET NULL,
    dedupe_key       text        NOT NULL UNIQUE
);
CREATE INDEX outbox_ready ON outbox (next_attempt_at) WHERE status IN ('pending', 'sending');
CREATE INDEX outbox_contact_sent ON outbox (contact_id, sent_at) WHERE status = 'sent';

CREATE TABLE delivery_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id    bigint      NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    ok           boolean     NOT NULL,
    provider     text,
    error        text,
    duration_ms  integer     NOT NULL
);
CREATE INDEX delivery_attempts_outbox ON delivery_attempts (outbox_id);

-- Single-use acknowledge links: a link's nonce is recorded when it is used.
CREATE TABLE ack_link_uses (
    nonce     text PRIMARY KEY,
    alert_id  bigint      NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    used_at   timestamptz NOT NULL DEFAULT now()
);

-- Sustained-condition rules (HR high for 2 minutes...) remember when a condition began, so
-- a restart neither forgets a condition in progress nor restarts its clock.
CREATE TABLE rule_state (
    device_id  text        NOT NULL,
    rule       text        NOT NULL,
    since      timestamptz NOT NULL,
    PRIMARY KEY (device_id, rule)
);

-- Silence detection: the device_latest flush keeps a deadline, and the sweeper reads only the
-- devices past it (an index range, not a scan of the fleet).
ALTER TABLE device_latest
    ADD COLUMN silent_after     timestamptz,
    ADD COLUMN silence_alerted  boolean NOT NULL DEFAULT false;
CREATE INDEX device_latest_silent_after ON device_latest (silent_after) WHERE NOT silence_alerted;

-- Non-emergency requests from the SERVICE_CALL key; the work-order flow builds on these.
CREATE TABLE service_requests (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    elder_id         bigint      REFERENCES elders (id) ON DELETE SET NULL,
    device_id        text        NOT NULL,
    source_event_id  bigint      UNIQUE REFERENCES device_events (id) ON DELETE SET NULL,
    requested_at     timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'new',
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- The daily knock runs once a day across all instances.
CREATE TABLE wellness_runs (
    day      date PRIMARY KEY,
    ran_at   timestamptz NOT NULL DEFAULT now(),
    checked  integer NOT NULL,
    raised   integer NOT NULL
);

-- Secrets the instances must share (the acknowledge-link key when none is configured).
CREATE TABLE app_secrets (
    name   text PRIMARY KEY,
    value  text NOT NULL
);

-- A phone number identifies a contact (the same grid worker serves many elders); imports
-- match contacts by it.
CREATE UNIQUE INDEX contacts_phone_key ON contacts (phone) WHERE phone IS NOT NULL;
