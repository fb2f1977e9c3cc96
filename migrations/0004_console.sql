-- The people side: the three-tier region network, console users and their scopes, device
-- credentials and binding history, care work (work orders, visits, calls) and the audit of
-- who looked at whose record.

-- Regions: city -> township/street -> village/community -> grid. `path` is the chain of ids
-- from the root ('/1/4/17/'), kept by a trigger, so "this region's subtree" is one indexed
-- prefix match instead of a recursive query per request.
CREATE TABLE regions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    parent_id   bigint REFERENCES regions (id) ON DELETE RESTRICT,
    level       text   NOT NULL CHECK (level IN ('city', 'township', 'community', 'grid')),
    code        text   NOT NULL UNIQUE CHECK (code ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name        text   NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    path        text   NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX regions_parent ON regions (parent_id);
CREATE INDEX regions_path ON regions (path text_pattern_ops);

CREATE FUNCTION sg_region_path() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    parent_path  text;
    parent_level text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.parent_id IS DISTINCT FROM OLD.parent_id THEN
        RAISE EXCEPTION 'a region cannot be moved (region %)', OLD.code
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.parent_id IS NULL THEN
        IF NEW.level <> 'city' THEN
            RAISE EXCEPTION 'a % needs a parent region', NEW.level USING ERRCODE = 'check_violation';
        END IF;
        NEW.path := '/' || NEW.id || '/';
    ELSE
        SELECT path, level INTO parent_path, parent_level FROM regions WHERE id = NEW.parent_id;
        IF NOT ((parent_level = 'city' AND NEW.level = 'township')
             OR (parent_level = 'township' AND NEW.level = 'community')
             OR (parent_level = 'community' AND NEW.level = 'grid')) THEN
            RAISE EXCEPTION 'a % cannot sit under a %', NEW.level, parent_level
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.path := parent_path || NEW.id || '/';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER regions_path BEFORE INSERT OR UPDATE ON regions
    FOR EACH ROW EXECUTE FUNCTION sg_region_path();

-- Elders: where they live in the network (a grid), who they are to the programme, and what a
-- responder needs to know at the door.
ALTER TABLE elders
    ADD COLUMN region_id    bigint REFERENCES regions (id) ON DELETE SET NULL,
    ADD COLUMN gender       text CHECK (gender IS NULL OR gender IN ('female', 'male')),
    ADD COLUMN categories   text[] NOT NULL DEFAULT '{}'
        CHECK (categories <@ ARRAY['living_alone', 'empty_nest', 'left_behind', 'special_hardship']),
    ADD COLUMN conditions   text[] NOT NULL DEFAULT '{}',
    ADD COLUMN medications  text[] NOT NULL DEFAULT '{}';
CREATE INDEX elders_region ON elders (region_id);

-- Devices: identity from the ledger, and every bind/unbind kept.
ALTER TABLE devices
    ADD COLUMN imei      text UNIQUE CHECK (imei IS NULL OR imei ~ '^[0-9]{15}$'),
    ADD COLUMN bound_at  timestamptz;

CREATE TABLE device_bindings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   text        NOT NULL,
    elder_id    bigint      REFERENCES elders (id) ON DELETE SET NULL,
    bound_at    timestamptz NOT NULL DEFAULT now(),
    bound_by    text,
    unbound_at  timestamptz,
    unbound_by  text
);
-- At most one open binding per device.
CREATE UNIQUE INDEX device_bindings_open ON device_bindings (device_id) WHERE unbound_at IS NULL;
CREATE INDEX device_bindings_elder ON device_bindings (elder_id, bound_at DESC);
-- Bindings made before this migration start their history now.
INSERT INTO device_bindings (device_id, elder_id, bound_at, bound_by)
    SELECT device_id, elder_id, created_at, 'migration' FROM devices WHERE elder_id IS NOT NULL;
UPDATE devices SET bound_at = created_at WHERE elder_id IS NOT NULL;

-- MQTT credentials of a device. The broker holds the secret (dynamic security plugin or a
-- password file); Silverguard keeps only who has a live credential and its generation, so a
-- rotation or revocation is recorded and auditable.
CREATE TABLE device_credentials (
    device_id    text PRIMARY KEY,
    username     text        NOT NULL UNIQUE,
    generation   integer     NOT NULL DEFAULT 1,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz,
    revoked_at   timestamptz
);

-- Console and API users.
CREATE TABLE users (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username       text   NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.@-]{2,64}$'),
    display_name   text   NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    role           text   NOT NULL CHECK (role IN ('admin', 'supervisor', 'grid_worker', 'guardian')),
    password_hash  text   NOT NULL,               -- argon2id PHC string
    -- The contact this user is in the registry (grid workers and guardians), so "my elders"
    -- follows the same links the alert engine notifies along.
    contact_id     bigint REFERENCES contacts (id) ON DELETE SET NULL,
    language       text   NOT NULL DEFAULT 'zh-CN' CHECK (language IN ('zh-CN', 'en')),
    disabled       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The regions a supervisor oversees (with their subtrees) or the grids a grid worker covers.
CREATE TABLE user_regions (
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    region_id  bigint NOT NULL REFERENCES regions (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, region_id)
);

-- Console sessions and API tokens. Only a SHA-256 of the secret is stored.
CREATE TABLE user_sessions (
    token_hash    bytea PRIMARY KEY,
    user_id       bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX user_sessions_user ON user_sessions (user_id);

CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text        NOT NULL,
    token_hash    bytea       NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

-- The one definition of "the elders this user may see", used by every query of the API and
-- the console: admin all; supervisors and grid workers the elders whose grid lies in a
-- region they hold; guardians the elders they are a guardian of. Each branch is driven from
-- the user, so a grid worker's scope costs a few index lookups, not a pass over all elders.
CREATE FUNCTION sg_user_elder_ids(p_user bigint) RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    SELECT e.id
      FROM users u JOIN elders e ON true
     WHERE u.id = p_user AND NOT u.disabled AND u.role = 'admin'
    UNION
    SELECT e.id
      FROM users u
      JOIN user_regions ur ON ur.user_id = u.id
      JOIN regions top     ON top.id = ur.region_id
      JOIN regions r       ON left(r.path, length(top.path)) = top.path
      JOIN elders e        ON e.region_id = r.id
     WHERE u.id = p_user AND NOT u.disabled AND u.role IN ('supervisor', 'grid_worker')
    UNION
    SELECT ec.elder_id
      FROM users u
      JOIN elder_contacts ec ON ec.contact_id = u.contact_id AND ec.role = 'guardian'
     WHERE u.id = p_user AND NOT u.disabled AND u.role = 'guardian'
$$;

-- The regions a user may see: admin all; others the subtrees of the regions they hold.
-- Guardians hold none.
CREATE FUNCTION sg_user_region_ids(p_user bigint) RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    SELECT r.id
      FROM regions r, users u
     WHERE u.id = p_user AND NOT u.disabled
       AND (u.role = 'admin'
            OR (u.role IN ('supervisor', 'grid_worker') AND EXISTS (
                    SELECT 1 FROM user_regions ur JOIN regions top ON top.id = ur.region_id
                     WHERE ur.user_id = u.id AND left(r.path, length(top.path)) = top.path)))
$$;

-- Who viewed or changed which elder's record, and when.
CREATE TABLE access_audit (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    user_id    bigint      REFERENCES users (id) ON DELETE SET NULL,
    username   text        NOT NULL,
    action     text        NOT NULL,     -- view_elder, view_telemetry, export, update_elder, ...
    elder_id   bigint,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX access_audit_elder ON access_audit (elder_id, at DESC);
CREATE INDEX access_audit_user ON access_audit (user_id, at DESC);

-- Work orders: a service call from the bracelet (SERVICE_CALL) or the console, dispatched to
-- a helper, accepted, completed and settled. They replace the bare service_requests rows.
CREATE TABLE work_orders (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    elder_id         bigint      REFERENCES elders (id) ON DELETE SET NULL,
    device_id        text,
    source_event_id  bigint      UNIQUE REFERENCES device_events (id) ON DELETE SET NULL,
    source           text        NOT NULL CHECK (source IN ('device', 'console', 'api')),
    category         text        NOT NULL DEFAULT 'other'
                                 CHECK (category IN ('meals', 'medicine', 'housekeeping', 'repair',
                                                     'escort', 'other')),
    description      text,
    status           text        NOT NULL DEFAULT 'new'
                                 CHECK (status IN ('new', 'dispatched', 'accepted', 'completed',
                                                   'cancelled')),
    requested_at     timestamptz NOT NULL,
    created_by       text,
    helper_name      text,
    helper_phone     text,
    dispatched_at    timestamptz,
    dispatched_by    text,
    accepted_at      timestamptz,
    completed_at     timestamptz,
    completed_by     text,
    cost_cents       integer     CHECK (cost_cents IS NULL OR cost_cents >= 0),
    completion_note  text,
    cancelled_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX work_orders_elder ON work_orders (elder_id, requested_at DESC);
CREATE INDEX work_orders_open ON work_orders (status) WHERE status IN ('new', 'dispatched', 'accepted');

INSERT INTO work_orders (elder_id, device_id, source_event_id, source, requested_at, created_at)
    SELECT elder_id, device_id, source_event_id, 'device', requested_at, created_at
      FROM service_requests;
DROP TABLE service_requests;

-- Home visits and phone calls: who, when, notes. Weekly compliance (a visit and two calls
-- per ISO week) is computed from these rows.
CREATE TABLE care_contacts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    elder_id     bigint      NOT NULL REFERENCES elders (id) ON DELETE CASCADE,
    kind         text        NOT NULL CHECK (kind IN ('visit', 'call')),
    at           timestamptz NOT NULL,
    by_user_id   bigint      REFERENCES users (id) ON DELETE SET NULL,
    by_name      text        NOT NULL,
    notes        text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX care_contacts_elder ON care_contacts (elder_id, at DESC);

-- The live board: every alert change is announced, so each instance's SSE streams learn of a
-- new SOS whichever instance opened it.
CREATE FUNCTION sg_alert_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sg_alert_changed', json_build_object(
        'id', NEW.id, 'elder_id', NEW.elder_id, 'kind', NEW.kind, 'severity', NEW.severity,
        'status', NEW.status, 'repeat_count', NEW.repeat_count)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER alerts_changed AFTER INSERT OR UPDATE ON alerts
    FOR EACH ROW EXECUTE FUNCTION sg_alert_changed();
