//! Postgres for the archive tests: the shared test server (`STARCITE_TEST_POSTGRES_URL`,
//! set by `source scripts/test-postgres.sh start`), one fresh database per test
//! ([`TestDb`]), and a private server a test may stop and start ([`PrivatePostgres`]).
//!
//! Without `STARCITE_TEST_POSTGRES_URL` the tests fail when `CI` or
//! `STARCITE_CI_POSTGRES=1` is set, and otherwise print a notice and pass.
//!
//! Also the rows a test compares with what the API serves ([`event_rows`],
//! [`session_row`]), read as text so that JSON keeps its exact bytes.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::postgres::{Client, NoTls};

/// True when the environment says Postgres tests must run (CI): a missing Postgres is
/// then a failure, not a skip.
pub fn ci_requires_postgres() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    ci || std::env::var("STARCITE_CI_POSTGRES").is_ok_and(|v| v == "1")
}

/// The test server's admin URL, or None (after a notice) when tests may skip.
pub fn postgres_url() -> Option<String> {
    match std::env::var("STARCITE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if ci_requires_postgres() => panic!(
            "STARCITE_TEST_POSTGRES_URL is not set, and CI requires the Postgres archive \
             tests: run `source scripts/test-postgres.sh start` first"
        ),
        _ => {
            eprintln!(
                "notice: STARCITE_TEST_POSTGRES_URL not set; Postgres archive test skipped \
                 (`source scripts/test-postgres.sh start` to run it)"
            );
            None
        }
    }
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let slash = base.rfind('/').expect("a postgres:// url");
    assert!(
        slash > "postgres://".len() - 1,
        "url without a database path: {url}"
    );
    format!("{}/{database}{query}", &base[..slash])
}

/// A database created for one test and dropped after it.
pub struct TestDb {
    pub admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// `CREATE DATABASE starcite_test_<test>_<pid>_<n>` on the server of `admin_url`.
    /// `test` must be a valid part of an unquoted identifier (lowercase, digits, `_`).
    pub fn create(admin_url: &str, test: &str) -> TestDb {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "starcite_test_{test}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = Client::connect(admin_url, NoTls).expect("connect to the test postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        TestDb {
            admin_url: admin_url.to_owned(),
            url: with_database(admin_url, &name),
            name,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// A private server
// ---------------------------------------------------------------------------------------

/// A Postgres server of the test's own (initdb'd in `/var/tmp`, on its own port), so that
/// stopping and starting it disturbs no other test. Runs as the `postgres` user; removed
/// (immediate stop) when dropped.
pub struct PrivatePostgres {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// A running private server, or None (after a notice, or a panic in CI) when this
    /// machine cannot run one: the server binaries are missing or we are not root
    /// (initdb runs as `postgres`).
    pub fn init() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                dirs.filter_map(|d| d.ok())
                    .map(|d| d.path().join("bin"))
                    .max()
            });
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        let Some(bin) = bin.filter(|_| is_root) else {
            assert!(
                !ci_requires_postgres(),
                "the restart test needs root and /usr/lib/postgresql"
            );
            eprintln!("notice: restart test skipped (needs root and Postgres binaries)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = PathBuf::from(format!(
            "/var/tmp/starcite-test-pg-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chown", &["postgres:postgres", path_str(&dir)]);
        let initdb = bin.join("initdb");
        as_postgres(
            &initdb,
            &["-D", path_str(&dir), "-A", "trust", "-U", "postgres"],
        );
        let server = PrivatePostgres { bin, dir, port };
        server.start();
        Some(server)
    }

    /// URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start(&self) {
        let options = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1", self.port);
        let log = self.dir.join("log");
        as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                path_str(&self.dir),
                "-l",
                path_str(&log),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m fast` (clients are disconnected), waiting until it is down.
    pub fn stop(&self) {
        as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", path_str(&self.dir), "-m", "fast", "-w", "stop"],
        );
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self, bytes: usize) -> String {
        let text = std::fs::read(self.dir.join("log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let mut start = text.len().saturating_sub(bytes);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                path_str(&pg_ctl),
                "-D",
                path_str(&self.dir),
            ])
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `program` to completion, asserting success.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect("spawn");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `program` as the `postgres` user (runuser), asserting success.
pub fn as_postgres(program: &Path, args: &[&str]) {
    let mut all = vec!["-u", "postgres", "--", path_str(program)];
    all.extend_from_slice(args);
    run("runuser", &all);
}

// ---------------------------------------------------------------------------------------
// Archived rows as text
// ---------------------------------------------------------------------------------------

/// One row of `events`, JSON columns as their stored text and `inserted_at` rendered like
/// the API (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub session_id: String,
    pub seq: i64,
    pub inserted_at: String,
    pub event_type: String,
    pub payload: String,
    pub actor: Option<String>,
    pub source: Option<String>,
    pub metadata: String,
    pub refs: String,
    pub idempotency_key: Option<String>,
    pub producer_id: Option<String>,
    pub producer_seq: Option<i64>,
}

/// SQL rendering a `timestamptz` column like the API does.
pub fn rfc3339_us_sql(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// Every row of `events` of `session`, in seq order.
pub fn event_rows(client: &mut Client, session: &str) -> Vec<EventRow> {
    let sql = format!(
        "SELECT session_id, seq, {}, type, payload::text, actor, source, metadata::text, \
         refs::text, idempotency_key, producer_id, producer_seq \
         FROM events WHERE session_id = $1 ORDER BY seq",
        rfc3339_us_sql("inserted_at")
    );
    client
        .query(&sql, &[&session])
        .unwrap_or_else(|e| panic!("read events of {session}: {e}"))
        .iter()
        .map(|row| EventRow {
            session_id: row.get(0),
            seq: row.get(1),
            inserted_at: row.get(2),
            event_type: row.get(3),
            payload: row.get(4),
            actor: row.get(5),
            source: row.get(6),
            metadata: row.get(7),
            refs: row.get(8),
            idempotency_key: row.get(9),
            producer_id: row.get(10),
            producer_seq: row.get(11),
        })
        .collect()
}

/// One row of `sessions`, JSON as its stored text, timestamps rendered like the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub title: Option<String>,
    pub metadata: String,
    pub version: i64,
    pub archived: bool,
    pub created_at: String,
    pub updated_at: String,
    pub archived_seq: i64,
}

/// The `sessions` row of `id`, None when there is none.
pub fn session_row(client: &mut Client, id: &str) -> Option<SessionRow> {
    let sql = format!(
        "SELECT id, title, metadata::text, version, archived, {}, {}, archived_seq \
         FROM sessions WHERE id = $1",
        rfc3339_us_sql("created_at"),
        rfc3339_us_sql("updated_at")
    );
    client
        .query_opt(&sql, &[&id])
        .unwrap_or_else(|e| panic!("read session row {id}: {e}"))
        .map(|row| SessionRow {
            id: row.get(0),
            title: row.get(1),
            metadata: row.get(2),
            version: row.get(3),
            archived: row.get(4),
            created_at: row.get(5),
            updated_at: row.get(6),
            archived_seq: row.get(7),
        })
}

/// `(count(*), count(DISTINCT seq), max(seq))` of `session`'s rows (0s when none):
/// a cheap summary for progress and failure messages.
pub fn event_counts(client: &mut Client, session: &str) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT seq), COALESCE(max(seq), 0) \
             FROM events WHERE session_id = $1",
            &[&session],
        )
        .unwrap_or_else(|e| panic!("count events of {session}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}
