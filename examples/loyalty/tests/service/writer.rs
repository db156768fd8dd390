//! The writer: an award and its event commit together or not at all.

use loyalty_example::{OUTBOX, POINTS_AWARDED, PointsAwarded, awards};

use crate::fixture::TestService;

#[tokio::test]
async fn an_award_and_its_event_commit_together_or_not_at_all() {
    let t = TestService::new().await;

    let mut tx = t.service.pool().begin().await.unwrap();
    awards::award(&mut tx, "alice", 10).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(t.count("SELECT count(*) FROM awards").await, 0);
    assert_eq!(t.count("SELECT count(*) FROM loyalty_outbox").await, 0);

    let award = t.service.award("alice", 10).await.unwrap();
    let (event_type, aggregate_id, payload, published): (String, String, serde_json::Value, bool) =
        sqlx::query_as(
            "SELECT event_type, aggregate_id, payload, published_at IS NOT NULL \
             FROM loyalty_outbox WHERE transaction_id = $1",
        )
        .bind(award.award_id)
        .fetch_one(t.service.pool())
        .await
        .unwrap();
    assert_eq!(event_type, POINTS_AWARDED);
    assert_eq!(aggregate_id, "alice");
    assert_eq!(
        serde_json::from_value::<PointsAwarded>(payload).unwrap(),
        award
    );
    assert!(!published, "nothing publishes it yet");
    let mut conn = t.service.pool().acquire().await.unwrap();
    assert_eq!(OUTBOX.status(&mut conn).await.unwrap().pending, 1);
    assert_eq!(t.count("SELECT count(*) FROM awards").await, 1);
}
