//! One test's world: a database, an exchange and queues, an SMTP server on
//! a port and a mailbox of its own, and the roles running against them;
//! everything is stopped, dropped or deleted when the fixture is dropped,
//! even when the test fails (the logs and the mailbox are then kept).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::common::{DeleteQueues, DropDatabase, create_database, test_amqp};
use crate::smtp::{Behaviour, Mail, SmtpServer, free_port, read_mailbox};
use crate::stack::{Role, Stack};

/// A row of `mail_outbox`, with its payload's fields.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MailOutboxRow {
    pub transaction_id: Uuid,
    pub aggregate_id: String,
    pub event_type: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub published: bool,
    pub attempts: i32,
    /// `next_attempt_at = 'infinity'`.
    pub given_up: bool,
    pub last_error: Option<String>,
}

/// `rows` (in id order) split into the first pending row of each order and
/// the rows waiting behind one: the mailer hands one order's mails over in
/// their order, one at a time, so while the server refuses only the first
/// of each order is tried.
pub fn first_of_each_order(rows: &[MailOutboxRow]) -> (Vec<&MailOutboxRow>, Vec<&MailOutboxRow>) {
    let mut seen = std::collections::HashSet::new();
    rows.iter()
        .partition(|row| seen.insert(row.aggregate_id.clone()))
}

/// The `Message-ID` a row's mail must carry.
pub fn message_id(transaction_id: Uuid) -> String {
    format!("<{transaction_id}@order-service>")
}

pub async fn mail_rows(pool: &PgPool) -> Vec<MailOutboxRow> {
    sqlx::query_as(
        "SELECT transaction_id, aggregate_id, event_type, payload->>'to' AS \"to\", \
           payload->>'subject' AS subject, payload->>'body' AS body, \
           published_at IS NOT NULL AS published, attempts, \
           next_attempt_at = 'infinity' AS given_up, last_error \
         FROM mail_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("reading mail_outbox")
}

/// How many unpublished `mail_outbox` rows are locked (claimed by a
/// mailer's round in hand); takes the free ones' locks for a moment, then
/// rolls back.
pub async fn locked(pool: &PgPool) -> Result<i64, String> {
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    let (unpublished, free): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM mail_outbox WHERE published_at IS NULL), \
           (SELECT count(*) FROM (SELECT id FROM mail_outbox WHERE published_at IS NULL \
              FOR UPDATE SKIP LOCKED) s)",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    tx.rollback().await.map_err(|e| e.to_string())?;
    Ok(unpublished - free)
}

/// `Ok` once no mailer holds a claim on a `mail_outbox` row.
pub async fn unlocked(pool: &PgPool) -> Result<(), String> {
    match locked(pool).await? {
        0 => Ok(()),
        n => Err(format!("{n} rows locked")),
    }
}

/// The value of the unlabelled sample `name` in an OpenMetrics text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// The section of `order-service outbox status` titled `title`: its title
/// line and the indented lines under it.
pub fn section<'a>(status: &'a str, title: &str) -> &'a str {
    let start = status
        .find(title)
        .unwrap_or_else(|| panic!("no {title:?} in outbox status:\n{status}"));
    let rest = &status[start..];
    let end = rest
        .match_indices('\n')
        .find(|(i, _)| {
            rest[i + 1..]
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace())
        })
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Removes the test's directory (logs, mailbox) when dropped, unless the
/// test failed or `MAIL_TEST_KEEP_LOGS` is set.
struct TestDir(PathBuf);

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("MAIL_TEST_KEEP_LOGS").is_some() {
            eprintln!("mail test: logs and mailbox kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub struct Fixture {
    // Dropped in this order: the roles, the SMTP server, the directory,
    // the queues, the database.
    pub stack: Stack,
    smtp: Option<SmtpServer>,
    pub pool: PgPool,
    client: reqwest::Client,
    pub mailbox: PathBuf,
    smtp_port: u16,
    _dir: TestDir,
    _queues: DeleteQueues,
    _db: DropDatabase,
}

impl Fixture {
    /// Starts the SMTP server (unless `smtp_up` is false: then nothing
    /// listens on its port until [`Fixture::start_smtp`]) and the roles,
    /// the mailer on `smtp://127.0.0.1:<port>`; returns once every role is
    /// ready.
    pub async fn start(tag: &str, behaviour: Behaviour, smtp_up: bool) -> Self {
        let plain = |port| vec![("SMTP_URL", format!("smtp://127.0.0.1:{port}"))];
        Self::start_with(tag, behaviour, smtp_up, plain).await
    }

    /// [`Fixture::start`], with the e-mail consumer's mailer settings
    /// (`SMTP_URL` and the like) made by `mailer_env` from the SMTP port.
    pub async fn start_with(
        tag: &str,
        behaviour: Behaviour,
        smtp_up: bool,
        mailer_env: impl FnOnce(u16) -> Vec<(&'static str, String)>,
    ) -> Self {
        let (db_name, db_url) = create_database().await;
        let db = DropDatabase(db_name.clone());
        let mut amqp = test_amqp();
        amqp = amqp.with_retry_delays(vec![
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(500),
        ]);
        let queues = DeleteQueues::orders(&amqp);
        let dir = std::env::temp_dir().join(format!("mail_{tag}_{db_name}"));
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let dir = TestDir(dir);
        let mailbox = dir.0.join("mailbox.jsonl");
        let smtp_port = free_port();
        eprintln!(
            "{tag}: database {db_name}, exchange {}, SMTP port {smtp_port}, files in {}",
            amqp.exchange(),
            dir.0.display()
        );
        let smtp = smtp_up.then(|| SmtpServer::start(smtp_port, &mailbox, &behaviour));
        let mut stack = Stack::start(&db_url, &amqp, mailer_env(smtp_port), &dir.0.join("logs"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        stack.wait_ready(&client).await;
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&db_url)
            .await
            .expect("connecting to the test database");
        Self {
            stack,
            smtp,
            pool,
            client,
            mailbox,
            smtp_port,
            _dir: dir,
            _queues: queues,
            _db: db,
        }
    }

    /// Starts the SMTP server on the fixture's port (it was down).
    pub fn start_smtp(&mut self, behaviour: Behaviour) {
        assert!(self.smtp.is_none(), "the SMTP server already runs");
        self.smtp = Some(SmtpServer::start(self.smtp_port, &self.mailbox, &behaviour));
    }

    /// The messages the SMTP server accepted so far.
    pub fn mails(&self) -> Vec<Mail> {
        read_mailbox(&self.mailbox)
    }

    /// Posts `count` orders of `user`; returns their ids.
    pub async fn post_orders(&self, user: &str, count: usize) -> Vec<Uuid> {
        let api = self.stack.processes.addr(Role::Api);
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let response = self
                .client
                .post(format!("http://{api}/orders"))
                .json(&json!({"productId": format!("p{i}"), "userId": user, "amount": 500 + i}))
                .send()
                .await
                .expect("POST /orders");
            assert_eq!(response.status(), StatusCode::ACCEPTED, "POST /orders");
            let body: Value = response.json().await.expect("a JSON answer");
            let id = body["orderId"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no orderId in {body}"));
            ids.push(id);
        }
        ids
    }

    /// A role's `/metrics` text.
    pub async fn metrics(&self, role: Role) -> String {
        let url = format!("http://{}/metrics", self.stack.processes.addr(role));
        self.client
            .get(url)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("a /metrics body")
    }

    /// The value of the unlabelled sample `name` on a role's `/metrics`.
    pub async fn metric(&self, role: Role, name: &str) -> Option<f64> {
        sample(&self.metrics(role).await, name)
    }

    /// Polls `check` every 50 ms until it is `Ok`; fails after `deadline`
    /// (or as soon as a role exits) with `check`'s last answer and the
    /// roles' last warnings.
    pub async fn until<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        let started = tokio::time::Instant::now();
        loop {
            let last = match check().await {
                Ok(value) => return value,
                Err(last) => last,
            };
            let exited = self.stack.processes.exited();
            if !exited.is_empty() || started.elapsed() >= deadline {
                panic!(
                    "{what}: not so after {:?}; exited roles: {exited:?}; last: {last}\n{}",
                    started.elapsed(),
                    self.stack.processes.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `mail_outbox` holds `rows` rows, all published.
    pub async fn until_delivered(&mut self, rows: usize) -> Vec<MailOutboxRow> {
        let pool = self.pool.clone();
        let mailbox = self.mailbox.clone();
        self.until(&format!("{rows} mails sent"), crate::SETTLE, async || {
            let all = mail_rows(&pool).await;
            let published = all.iter().filter(|r| r.published).count();
            if all.len() == rows && published == rows {
                Ok(all)
            } else {
                Err(format!(
                    "{} rows, {published} published, {} arrivals; unpublished: {:#?}",
                    all.len(),
                    read_mailbox(&mailbox).len(),
                    all.iter().filter(|r| !r.published).collect::<Vec<_>>()
                ))
            }
        })
        .await
    }

    /// Waits until `mail_outbox` holds `rows` rows, each published or given up.
    pub async fn until_delivered_or_given_up(&mut self, rows: usize) -> Vec<MailOutboxRow> {
        let pool = self.pool.clone();
        self.until(
            &format!("{rows} mails sent or given up"),
            crate::SETTLE,
            async || {
                let all = mail_rows(&pool).await;
                let settled = all.iter().filter(|r| r.published || r.given_up).count();
                if all.len() == rows && settled == rows {
                    Ok(all)
                } else {
                    Err(format!("{} rows, {settled} settled: {all:#?}", all.len()))
                }
            },
        )
        .await
    }

    /// Each mail row is one event of the events' outbox: its
    /// `transaction_id` is the event's id, its order and type the event's.
    pub async fn check_rows_are_the_events(&self, rows: &[MailOutboxRow]) {
        let events: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT transaction_id, event_type, aggregate_id FROM outbox")
                .fetch_all(&self.pool)
                .await
                .expect("reading the events' outbox");
        let events: HashSet<(Uuid, String, String)> = events.into_iter().collect();
        let mails: HashSet<(Uuid, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.transaction_id,
                    r.event_type.clone(),
                    r.aggregate_id.clone(),
                )
            })
            .collect();
        assert_eq!(mails, events, "one mail per event, under the event's id");
    }
}
