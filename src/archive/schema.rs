//! The archive schema: versioned migrations from `migrations/`, applied on every
//! connect inside one transaction, and the meta row that ties a database to a cluster.

use std::fmt;

/// The migrations, in order: `MIGRATIONS[i]` takes the schema from version `i` to
/// `i + 1`. Append only; a shipped migration never changes.
pub const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_events_and_sessions",
    include_str!("../../migrations/0001_events_and_sessions.sql"),
)];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Serialises migrations of several nodes starting at once against one database (the
/// first takes the lock and migrates, the others then find the work done). Any fixed
/// number works; this one spells "stcite" in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x7374_6369_7465;

/// The meta table is the migration bookkeeping itself, so it is created outside the
/// numbered migrations. One row (`singleton` is always true).
const CREATE_META: &str = "CREATE TABLE IF NOT EXISTS starcite_meta (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_id     text NOT NULL,
    schema_version integer NOT NULL
)";

/// Why a database cannot be used as this cluster's archive.
#[derive(Debug)]
pub enum SchemaError {
    /// The meta row names another cluster: this database archives someone else's data.
    ForeignCluster { database: String, ours: String },
    /// The schema is newer than this binary understands (a newer Starcite migrated it).
    SchemaTooNew { database: i32, ours: i32 },
    /// Postgres failed or the connection broke: retry later.
    Postgres(postgres::Error),
}

impl SchemaError {
    /// True when retrying cannot help: the database is not ours (or too new for us).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, SchemaError::Postgres(_))
    }
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaError::ForeignCluster { database, ours } => write!(
                f,
                "the archive database belongs to cluster {database:?}, not to this cluster \
                 ({ours:?}); refusing to write into it (point --postgres-url at this \
                 cluster's own database)"
            ),
            SchemaError::SchemaTooNew { database, ours } => write!(
                f,
                "the archive database has schema version {database}, newer than this \
                 binary's {ours}; upgrade Starcite"
            ),
            SchemaError::Postgres(error) => write!(f, "postgres: {error}"),
        }
    }
}

impl std::error::Error for SchemaError {}

impl From<postgres::Error> for SchemaError {
    fn from(error: postgres::Error) -> Self {
        SchemaError::Postgres(error)
    }
}

/// Creates or upgrades the schema and claims an empty database for `cluster_id`, in
/// one transaction: either everything applies or nothing does. Idempotent: on an up to
/// date database of this cluster it only reads the meta row. Returns the version.
pub fn migrate(client: &mut postgres::Client, cluster_id: &str) -> Result<i32, SchemaError> {
    assert!(!cluster_id.is_empty(), "an archive needs a cluster id");
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])?;
    tx.batch_execute(CREATE_META)?;
    let row = tx.query_opt("SELECT cluster_id, schema_version FROM starcite_meta", &[])?;
    let current: i32 = match row {
        Some(row) => {
            let database: String = row.get(0);
            if database != cluster_id {
                return Err(SchemaError::ForeignCluster {
                    database,
                    ours: cluster_id.to_owned(),
                });
            }
            row.get(1)
        }
        None => {
            tx.execute(
                "INSERT INTO starcite_meta (cluster_id, schema_version) VALUES ($1, 0)",
                &[&cluster_id],
            )?;
            0
        }
    };
    if current > SCHEMA_VERSION {
        return Err(SchemaError::SchemaTooNew {
            database: current,
            ours: SCHEMA_VERSION,
        });
    }
    assert!(
        current >= 0,
        "negative schema version {current} in starcite_meta"
    );
    for (version, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql)?;
        let next = version as i32 + 1;
        tx.execute("UPDATE starcite_meta SET schema_version = $1", &[&next])?;
        tracing::info!(migration = name, version = next, "archive schema migrated");
    }
    tx.commit()?;
    Ok(SCHEMA_VERSION)
}
