-- Who answers for an elder: contacts (grid workers, guardians, supervisors) and their roles,
-- plus what the alert engine needs to know about the elder.

ALTER TABLE elders
    ADD COLUMN external_ref   text UNIQUE,           -- the office ledger's id, for re-imports
    ADD COLUMN id_number      text,
    ADD COLUMN birth_date     date,
    ADD COLUMN phone          text,
    ADD COLUMN address        text,
    ADD COLUMN community      text,                  -- village/community (region tree comes later)
    ADD COLUMN home_lat_e7    integer,
    ADD COLUMN home_lon_e7    integer,
    ADD COLUMN home_radius_m  integer NOT NULL DEFAULT 300 CHECK (home_radius_m > 0),
    ADD COLUMN wander_risk    boolean NOT NULL DEFAULT false,   -- geofence alerts only for these
    ADD COLUMN language       text NOT NULL DEFAULT 'zh-CN' CHECK (language IN ('zh-CN', 'en')),
    -- Per-elder overrides of the vital-sign rules, e.g. {"hr_high": {"above": 120, "for": "5m"}}.
    ADD COLUMN thresholds     jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN notes          text,
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now();

CREATE TABLE contacts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_ref text UNIQUE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    phone        text CHECK (phone IS NULL OR phone ~ '^\+?[0-9]{5,20}$'),
    email        text CHECK (email IS NULL OR email ~ '^[^@\s]+@[^@\s]+$'),
    language     text NOT NULL DEFAULT 'zh-CN' CHECK (language IN ('zh-CN', 'en')),
    -- WeCom / DingTalk group-robot URL for a grid-worker team.
    im_webhook   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The role a contact plays for one elder. Guardians carry a priority (1 first).
CREATE TABLE elder_contacts (
    elder_id    bigint NOT NULL REFERENCES elders (id) ON DELETE CASCADE,
    contact_id  bigint NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    role        text   NOT NULL CHECK (role IN ('grid_worker', 'backup_grid_worker', 'guardian',
                                                'community_supervisor', 'township_supervisor')),
    priority    integer NOT NULL DEFAULT 1 CHECK (priority BETWEEN 1 AND 99),
    PRIMARY KEY (elder_id, contact_id, role)
);
CREATE INDEX elder_contacts_contact ON elder_contacts (contact_id);
