//! Embedded, numbered, append-only SQL migrations.
//!
//! All pending migrations are applied in one transaction under an advisory lock, so two
//! processes starting at once serialize: the second waits, then finds nothing to do. Each
//! applied file's checksum is recorded, and an edited migration stops the start with a clear
//! error instead of silently diverging schemas.

use super::{locks, StoreError};
use deadpool_postgres::Pool;

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ingest",
        sql: include_str!("../../migrations/0001_ingest.sql"),
    },
    Migration {
        version: 2,
        name: "registry",
        sql: include_str!("../../migrations/0002_registry.sql"),
    },
    Migration {
        version: 3,
        name: "alerts",
        sql: include_str!("../../migrations/0003_alerts.sql"),
    },
    Migration {
        version: 4,
        name: "console",
        sql: include_str!("../../migrations/0004_console.sql"),
    },
    Migration {
        version: 5,
        name: "outbox_claimer",
        sql: include_str!("../../migrations/0005_outbox_claimer.sql"),
    },
    Migration {
        version: 6,
        name: "latest_hot_updates",
        sql: include_str!("../../migrations/0006_latest_hot_updates.sql"),
    },
    Migration {
        version: 7,
        name: "device_current",
        sql: include_str!("../../migrations/0007_device_current.sql"),
    },
];

fn checksum(sql: &str) -> String {
    // FNV-1a 64: stable across builds and platforms, enough to notice an edit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Applies every pending migration; returns the versions applied now.
pub async fn run(pool: &Pool) -> Result<Vec<i32>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&locks::MIGRATE])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let rows = tx
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut applied_now = Vec::new();
    for row in &rows {
        let version: i32 = row.get(0);
        let Some(m) = MIGRATIONS.iter().find(|m| m.version == version) else {
            return Err(StoreError::SchemaTooNew(version));
        };
        let applied: String = row.get(2);
        let found = checksum(m.sql);
        if applied != found {
            return Err(StoreError::MigrationEdited {
                version,
                name: m.name.into(),
                applied,
                found,
            });
        }
    }
    for m in MIGRATIONS {
        if rows.iter().any(|r| r.get::<_, i32>(0) == m.version) {
            continue;
        }
        tracing::info!(version = m.version, name = m.name, "applying migration");
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &checksum(m.sql)],
        )
        .await?;
        applied_now.push(m.version);
    }
    tx.commit().await?;
    Ok(applied_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_unique() {
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].version < w[1].version);
        }
    }

    #[test]
    fn checksum_notices_edits() {
        assert_ne!(
            checksum("CREATE TABLE a ()"),
            checksum("CREATE TABLE a ( )")
        );
    }
}
