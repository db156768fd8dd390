//! The relay: claims due outbox rows, publishes them with publisher confirms
//! (many in flight), and marks each row by its own confirm. At least once: a
//! crash between the publish and the mark republishes the row with the same
//! `message_id`, and the consumers deduplicate it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::store::{self, OutboxRow};
use super::{NOTIFY_CHANNEL, Wake};
use crate::config::{AmqpConfig, RelayConfig};
use crate::metrics::Metrics;
use crate::shutdown::{Backoff, sleep_or_cancel};
use crate::telemetry::propagation;

/// How long a publish may wait for its confirm before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A confirm-mode channel on its own connection, with the topology declared.
/// Clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Channel,
}

impl Publisher {
    /// Connects (waiting for RabbitMQ), enables confirms and declares the
    /// topology, so no event is published before its queues exist.
    pub async fn open(amqp: &AmqpConfig, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let connection = crate::amqp::connect(amqp, "order-service relay", cancel).await?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        crate::amqp::declare_topology(&channel, amqp).await?;
        Ok(Self {
            connection: Arc::new(connection),
            channel,
        })
    }

    /// False once the channel or connection has failed; open a new one then.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected() && self.connection.status().connected()
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Closes the channel and connection (for every clone).
    pub async fn close(self) {
        if self.connection.status().connected() {
            let close = async {
                let _ = self.channel.close(200, "relay stopping".into()).await;
                let _ = self.connection.close(200, "relay stopping".into()).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        }
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub claimed: usize,
    pub published: usize,
    pub failed: usize,
    /// Rows of other batches, already counted as published there, that this
    /// batch made due again: their returns rode on its confirms.
    pub reopened: usize,
    /// It claimed as many rows as it asked for: more are probably due.
    pub full: bool,
}

/// The rows of one claimed batch, by their confirms.
#[derive(Debug, Default, Clone)]
pub struct PublishedBatch {
    pub claimed: usize,
    /// Ids of the rows confirmed as routed and stored.
    pub published: Vec<i64>,
    /// Nacked, returned or failed: the rows' `transaction_id`s, with the reason.
    pub failed: Vec<(Uuid, String)>,
    /// Returned (unroutable) messages that this batch's confirms carried but
    /// that belong to rows of another batch, by `transaction_id`. lapin hands
    /// a returned message to whichever confirm the broker's next ack
    /// completes, and one ack may complete many publishes (`multiple`), of
    /// any batch on the channel: so a return is matched to its row by its
    /// `message_id`, and that row, perhaps already marked published by its
    /// own batch, must be made due again.
    pub returned_elsewhere: Vec<(Uuid, String)>,
    /// Returns carried by this batch's confirms, not yet matched to rows.
    returned: Vec<(Uuid, String)>,
}

impl PublishedBatch {
    /// Files one row by its confirm's outcome, keeping any returned message
    /// the confirm carried for [`PublishedBatch::match_returns`].
    fn settle(&mut self, confirmed: Confirmed) {
        match confirmed.outcome {
            Ok(()) => self.published.push(confirmed.id),
            Err(error) => self.failed.push((confirmed.transaction_id, error)),
        }
        self.returned.extend(confirmed.returned);
    }

    /// Once every confirm of the batch is in: each returned message fails its
    /// own row, found by `message_id`, whichever confirm carried it.
    fn match_returns(&mut self, rows: &[OutboxRow]) {
        for (transaction_id, error) in std::mem::take(&mut self.returned) {
            let Some(row) = rows.iter().find(|r| r.transaction_id == transaction_id) else {
                self.returned_elsewhere.push((transaction_id, error));
                continue;
            };
            self.published.retain(|id| *id != row.id);
            if !self.failed.iter().any(|(t, _)| *t == transaction_id) {
                self.failed.push((transaction_id, error));
            }
        }
    }
}

/// Rows of other batches whose messages were returned (see
/// [`PublishedBatch::returned_elsewhere`]), waiting to be made due again.
/// They are kept here until that succeeds, so an outage of Postgres at that
/// moment does not leave them marked published.
#[derive(Debug, Clone, Default)]
struct Reopen(Arc<std::sync::Mutex<Vec<(Uuid, String)>>>);

impl Reopen {
    fn keep(&self, rows: &[(Uuid, String)]) {
        self.lock().extend_from_slice(rows);
    }

    /// Makes every waiting row due again (each row's own batch has committed
    /// or holds it until it does: the update waits for its lock). On failure
    /// they wait for the next batch.
    async fn apply(&self, pool: &PgPool) -> anyhow::Result<usize> {
        let waiting = std::mem::take(&mut *self.lock());
        if waiting.is_empty() {
            return Ok(0);
        }
        let result = async {
            let mut conn = pool.acquire().await?;
            store::mark_failed(&mut conn, &waiting).await
        }
        .await;
        match result {
            Ok(_) => Ok(waiting.len()),
            Err(error) => {
                let n = waiting.len();
                self.lock().extend(waiting);
                Err(anyhow::Error::new(error).context(format!(
                    "making {n} returned rows of other batches due again"
                )))
            }
        }
    }

    /// Makes the rows still waiting due again, a last time; logs those
    /// Postgres still refuses: an operator must reset them.
    async fn finish(&self, pool: &PgPool) {
        if let Err(error) = self.apply(pool).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "could not reopen returned rows"
            );
        }
        let waiting = self.lock();
        if !waiting.is_empty() {
            let ids: Vec<String> = waiting.iter().map(|(t, _)| t.to_string()).collect();
            tracing::error!(
                transaction_ids = ids.join(","),
                "returned by the broker but still marked published: set published_at = NULL on these outbox rows"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Uuid, String)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Moves outbox rows to RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    pub config: RelayConfig,
    pub metrics: Arc<Metrics>,
    /// In-process wake-up from the API.
    pub wake: Wake,
    /// Also listen for Postgres `NOTIFY outbox_wake` (API in another process).
    pub listen: bool,
}

impl Relay {
    /// Claims one batch, publishes it, waits for every confirm and marks each
    /// row by its own confirm, all inside the claiming transaction so no other
    /// relay can take these rows meanwhile.
    pub async fn run_once(&self, publisher: &Publisher) -> anyhow::Result<BatchOutcome> {
        self.run_batch(publisher, None, &Reopen::default()).await
    }

    /// [`Relay::run_once`], with the publishes awaiting confirms bounded by
    /// `window`, shared with the other batches in flight.
    #[tracing::instrument(
        name = "relay batch",
        skip_all,
        fields(claimed, published, failed),
        err
    )]
    async fn run_batch(
        &self,
        publisher: &Publisher,
        window: Option<Arc<Semaphore>>,
        reopen: &Reopen,
    ) -> anyhow::Result<BatchOutcome> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting the claim transaction")?;
        let batch = self
            .claim_and_publish_in(&mut tx, publisher, window.as_ref())
            .await?;
        // Kept before anything can fail: a later batch reopens them then.
        reopen.keep(&batch.returned_elsewhere);
        // Both marks do nothing for an empty claim, which still commits and
        // reopens what earlier batches left.
        store::mark_published(&mut tx, &batch.published)
            .await
            .context("marking rows published")?;
        store::mark_failed(&mut tx, &batch.failed)
            .await
            .context("recording failed rows")?;
        tx.commit().await.context("committing the batch")?;
        // After the commit: the other batches' rows may wait for their own
        // batch's commit, and this one holds no lock they could wait for.
        // This batch is done whatever happens here; rows left wait for the next.
        let reopened = match reopen.apply(&self.pool).await {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "will retry with the next batch"
                );
                0
            }
        };

        self.metrics
            .relay_published
            .add(batch.published.len() as u64);
        self.metrics
            .relay_failed
            .add((batch.failed.len() + reopened) as u64);
        let outcome = BatchOutcome {
            claimed: batch.claimed,
            published: batch.published.len(),
            failed: batch.failed.len(),
            reopened,
            full: batch.claimed as i64 >= self.config.batch_size,
        };
        let span = tracing::Span::current();
        span.record("claimed", outcome.claimed);
        span.record("published", outcome.published);
        span.record("failed", outcome.failed);
        Ok(outcome)
    }

    /// The first half of [`Relay::run_once`]: claims due rows on `conn` (a
    /// transaction) and publishes them, returning which were confirmed. Rows
    /// are not marked: if the transaction is dropped now (a crash), they stay
    /// due and are published again.
    pub async fn claim_and_publish(
        &self,
        conn: &mut sqlx::PgConnection,
        publisher: &Publisher,
    ) -> anyhow::Result<PublishedBatch> {
        self.claim_and_publish_in(conn, publisher, None).await
    }

    /// [`Relay::claim_and_publish`] within `window`; see [`Relay::publish_rows`].
    async fn claim_and_publish_in(
        &self,
        conn: &mut sqlx::PgConnection,
        publisher: &Publisher,
        window: Option<&Arc<Semaphore>>,
    ) -> anyhow::Result<PublishedBatch> {
        let rows = store::claim_due(conn, self.config.batch_size)
            .await
            .context("claiming outbox rows")?;
        Ok(self.publish_rows(&rows, publisher, window).await)
    }

    /// Publishes `rows` and waits for their confirms: which were confirmed as
    /// routed and stored, which failed and why. With a `window`, each publish
    /// first takes one permit and gives it back with its confirm, so the
    /// publishes awaiting confirms never exceed the window, as in a raw
    /// confirmed-publish loop; without one, every confirm is in flight at once.
    async fn publish_rows(
        &self,
        rows: &[OutboxRow],
        publisher: &Publisher,
        window: Option<&Arc<Semaphore>>,
    ) -> PublishedBatch {
        let mut batch = PublishedBatch {
            claimed: rows.len(),
            ..Default::default()
        };
        if rows.is_empty() {
            return batch;
        }
        let started = Instant::now();
        let mut pending = FuturesUnordered::new();
        for row in rows {
            let permit = match window {
                // Settle the confirms already in while waiting for room.
                Some(window) => Some(loop {
                    tokio::select! {
                        biased;
                        permit = window.clone().acquire_owned() => {
                            break permit.expect("the window is never closed");
                        }
                        Some(done) = pending.next() => batch.settle(done),
                    }
                }),
                None => None,
            };
            let span = publish_span(&self.amqp.exchange, row);
            let result = self
                .publish(publisher.channel(), row, &span)
                .instrument(span.clone())
                .await;
            match result {
                Ok(confirm) => pending.push(settle_confirm(row, span, confirm, permit)),
                Err(error) => batch
                    .failed
                    .push((row.transaction_id, format!("publish failed: {error}"))),
            }
        }
        while let Some(done) = pending.next().await {
            batch.settle(done);
        }
        batch.match_returns(rows);
        self.metrics
            .relay_publish_latency
            .observe(started.elapsed());
        batch
    }

    async fn publish(
        &self,
        channel: &Channel,
        row: &OutboxRow,
        span: &tracing::Span,
    ) -> lapin::Result<lapin::PublisherConfirm> {
        let mut headers = FieldTable::default();
        propagation::inject_amqp(&span.context(), &mut headers);
        // Lets consumers report how long the message waited in the queue.
        headers.insert(
            "x-published-at-ms".into(),
            lapin::types::AMQPValue::LongString(Utc::now().timestamp_millis().to_string().into()),
        );
        let properties = BasicProperties::default()
            .with_message_id(row.transaction_id.to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(row.event_type.as_str().into())
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_app_id("order-service".into())
            .with_headers(headers);
        channel
            .basic_publish(
                self.amqp.exchange.as_str().into(),
                row.event_type.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                row.payload.as_bytes(),
                properties,
            )
            .await
    }

    /// Publishes until no due row is left, with the same batches in flight
    /// as [`Relay::run`]. Returns the rows published; the first failed batch
    /// is the error, after the others have ended.
    pub async fn drain(&self, publisher: &Publisher) -> anyhow::Result<usize> {
        let mut batches = Batches::new(&self.config);
        // Rows a batch reopened were counted as published by their own batch.
        let (mut published, mut reopened) = (0, 0);
        let mut failure = None;
        // Start as a backlog: open every batch, and keep them open while
        // they come back full.
        let mut due = true;
        loop {
            if due && failure.is_none() && publisher.is_usable() && batches.start(self, publisher) {
                continue;
            }
            match batches.next().await {
                None => break,
                Some(Ok(outcome)) => {
                    published += outcome.published;
                    reopened += outcome.reopened;
                    due = outcome.full;
                }
                Some(Err(error)) => {
                    failure.get_or_insert(error);
                }
            }
        }
        batches.reopen.finish(&self.pool).await;
        match failure {
            Some(error) => Err(error),
            None => Ok(published.saturating_sub(reopened)),
        }
    }

    /// Deletes published rows past the retention period, in bounded batches.
    pub async fn prune(&self) -> anyhow::Result<u64> {
        let retention = self.config.retention_secs as i64;
        let mut total = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            let deleted =
                store::prune_published(&mut conn, retention, self.config.prune_batch).await?;
            total += deleted;
            if (deleted as i64) < self.config.prune_batch {
                return Ok(total);
            }
        }
    }

    /// Runs until `cancel` fires. A wake-up (in-process, a NOTIFY or the poll
    /// interval) starts a batch at once unless `workers + 1` are open, even
    /// while other batches wait for their confirms; a batch that comes back
    /// full keeps every batch open until the backlog is gone. Reconnects to
    /// RabbitMQ and Postgres with backoff and never returns an error for
    /// their outages. On cancel, the batches in hand finish.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut listener = if self.listen {
            self.listener().await
        } else {
            None
        };
        let mut backoff = Backoff::default();
        let mut last_prune: Option<Instant> = None;
        let mut publisher: Option<Publisher> = None;
        let mut batches = Batches::new(&self.config);
        // Claim now: at start, after a wake-up, and while batches come back full.
        let mut due = true;
        let mut backlog = true;
        // After a failed batch no new one starts before this; the batches in
        // flight carry on meanwhile.
        let mut hold_until = tokio::time::Instant::now();
        tracing::info!(exchange = %self.amqp.exchange, "relay started");
        while !cancel.is_cancelled() {
            let current = match publisher.as_ref().filter(|p| p.is_usable()) {
                Some(p) => p,
                None => {
                    // The batches on a failed channel end first (their
                    // confirms are bounded), then a new one is opened.
                    batches.finish().await;
                    if let Some(old) = publisher.take() {
                        old.close().await;
                    }
                    match Publisher::open(&self.amqp, &cancel).await {
                        Ok(p) => publisher = Some(p),
                        Err(error) if cancel.is_cancelled() => {
                            tracing::debug!(%error, "relay stopped while connecting");
                        }
                        Err(error) => {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "relay could not open a publisher"
                            );
                            sleep_or_cancel(backoff.next_delay(), &cancel).await;
                        }
                    }
                    due = true;
                    continue;
                }
            };
            let held = tokio::time::Instant::now() < hold_until;
            if due && !held && batches.start(&self, current) {
                // A backlog opens every batch; a wake-up starts one.
                due = backlog;
                continue;
            }
            if !due
                && batches.is_empty()
                && last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
            {
                last_prune = Some(Instant::now());
                match self.prune().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "pruned published outbox rows"),
                    Err(error) => tracing::warn!(error = format!("{error:#}"), "pruning failed"),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep_until(hold_until), if held => {}
                Some(result) = batches.next() => {
                    match result {
                        Ok(outcome) => {
                            backoff.reset();
                            backlog = outcome.full;
                            due |= backlog;
                        }
                        Err(error) => {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "relay batch failed; will retry"
                            );
                            backlog = false;
                            hold_until = tokio::time::Instant::now() + backoff.next_delay();
                            due = true;
                        }
                    }
                }
                _ = self.wake.notified() => due = true,
                _ = tokio::time::sleep(poll) => due = true,
                _ = wait_notify(&mut listener) => due = true,
            }
        }
        batches.finish().await;
        batches.reopen.finish(&self.pool).await;
        if let Some(p) = publisher {
            p.close().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }

    async fn listener(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(NOTIFY_CHANNEL).await.ok()?;
        Some(listener)
    }
}

/// The batches in flight, for [`Relay::run`] and [`Relay::drain`]: at most
/// `workers + 1` claim transactions open, and between them at most
/// `batch_size × workers` publishes awaiting confirms (the confirm window).
/// Each publish takes a permit of the window and gives it back with its
/// confirm, so the window rolls as in a raw publish loop; the extra batch
/// claims its rows while the window is full, so it stays full while batches
/// claim and mark. Batches make progress only while
/// [`Batches::next`] is polled, so every wait of the scheduler includes it.
struct Batches {
    window: Arc<Semaphore>,
    reopen: Reopen,
    max_open: usize,
    /// Polled by the scheduler's own task: one task drives every batch, as
    /// the raw publish loop it is measured against does.
    set: FuturesUnordered<BoxFuture<'static, anyhow::Result<BatchOutcome>>>,
}

impl Batches {
    fn new(config: &RelayConfig) -> Self {
        let batch_size = config.batch_size.max(1) as usize;
        let workers = config.workers.max(1);
        Self {
            window: Arc::new(Semaphore::new(batch_size * workers)),
            reopen: Reopen::default(),
            max_open: workers + 1,
            set: FuturesUnordered::new(),
        }
    }

    /// Starts a batch unless `workers + 1` are open already.
    fn start(&mut self, relay: &Relay, publisher: &Publisher) -> bool {
        if self.set.len() >= self.max_open {
            return false;
        }
        let (relay, publisher) = (relay.clone(), publisher.clone());
        let (window, reopen) = (self.window.clone(), self.reopen.clone());
        self.set.push(Box::pin(async move {
            relay.run_batch(&publisher, Some(window), &reopen).await
        }));
        true
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next batch to end; `None` when none is in flight.
    async fn next(&mut self) -> Option<anyhow::Result<BatchOutcome>> {
        self.set.next().await
    }

    /// Waits for every batch in flight to end (each is bounded by its
    /// confirms' timeout), logging failures: their rows stay due.
    async fn finish(&mut self) {
        while let Some(result) = self.next().await {
            if let Err(error) = result {
                tracing::warn!(error = format!("{error:#}"), "relay batch failed");
            }
        }
    }
}

/// Waits for a NOTIFY; pends forever without a listener. On a listener
/// error it waits a little (the next `recv` reconnects) so the poll carries on.
async fn wait_notify(listener: &mut Option<PgListener>) {
    match listener {
        Some(l) => {
            if let Err(error) = l.recv().await {
                tracing::debug!(%error, "outbox listener error; reconnecting on next wait");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        None => std::future::pending().await,
    }
}

/// One publish's confirm.
struct Confirmed {
    id: i64,
    transaction_id: Uuid,
    /// Acked, or why not. An ack does not yet say the message was routed:
    /// its return may ride on another publish's confirm.
    outcome: Result<(), String>,
    /// A returned message this confirm carried, which may be another
    /// publish's: its `message_id` (a row's `transaction_id`) and the reason.
    returned: Option<(Uuid, String)>,
}

/// Waits for one publish's confirm (bounded: on a dead connection a confirm
/// may never resolve, and the batch holds its rows' locks until it ends),
/// then gives its `permit` back to the window.
async fn settle_confirm(
    row: &OutboxRow,
    span: tracing::Span,
    confirm: lapin::PublisherConfirm,
    permit: Option<OwnedSemaphorePermit>,
) -> Confirmed {
    let (id, transaction_id) = (row.id, row.transaction_id);
    let (outcome, returned) = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => (Err("no confirm from the broker in time".to_owned()), None),
        Ok(Ok(Confirmation::Ack(returned))) => (Ok(()), returned),
        Ok(Ok(Confirmation::Nack(returned))) => (Err("nacked by the broker".to_owned()), returned),
        Ok(Ok(Confirmation::NotRequested)) => {
            (Err("channel is not in confirm mode".to_owned()), None)
        }
        Ok(Err(error)) => (Err(format!("confirm failed: {error}")), None),
    };
    drop(permit);
    let returned = returned.map(|message| {
        let error = format!(
            "returned by the broker: {} {}",
            message.reply_code, message.reply_text
        );
        let owner = message
            .properties
            .message_id()
            .as_ref()
            .and_then(|m| Uuid::parse_str(m.as_str()).ok());
        tracing::warn!(parent: &span, message_id = ?owner, %error, "publish returned");
        // Every message the relay sends has its row's id; without one the
        // owner is unknown, and this row is at least not marked published.
        (owner.unwrap_or(transaction_id), error)
    });
    if let Err(error) = &outcome {
        span.record("otel.status_code", "ERROR");
        tracing::warn!(parent: &span, outbox.id = id, %error, "publish not confirmed");
    }
    Confirmed {
        id,
        transaction_id,
        outcome,
        returned,
    }
}

/// The PRODUCER span of one publish, a child of the context stored with the
/// row by the request that wrote it.
fn publish_span(exchange: &str, row: &OutboxRow) -> tracing::Span {
    let waited_ms = (Utc::now() - row.created_at).num_milliseconds();
    let span = tracing::info_span!(
        "order_events publish",
        otel.name = format!("{exchange} publish"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "publish",
        messaging.destination.name = %exchange,
        messaging.rabbitmq.destination.routing_key = %row.event_type,
        messaging.message.id = %row.transaction_id,
        outbox.id = row.id,
        outbox.attempts = row.attempts,
        outbox.wait_ms = waited_ms,
    );
    let _ = span.set_parent(propagation::context_from_json(&row.headers));
    span
}
