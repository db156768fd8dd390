//! The probes of a process that runs several roles: `run`'s api answers for
//! all of them.

use std::time::Duration;

use order_service::config::{ConsumerConfig, HttpConfig};
use order_service::orders::BILLING;
use order_service::orders::billing::Billing;
use order_service::startup::Roles;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{DeleteQueues, TestDb, amqp_url, eventually, test_amqp};
use crate::proxy::{Proxy, target_of, via};

#[tokio::test]
async fn the_api_is_ready_only_once_the_consumers_of_its_process_are_subscribed() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(target_of(&amqp_url())).await;
    proxy.cut();
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let unreachable = amqp.clone().with_url(via(&amqp_url(), proxy.addr));
    let roles = Roles::new(db.pool.clone(), CancellationToken::new());
    let addr = roles.start_api(&HttpConfig::default(), None).await.unwrap();
    roles.start_handler(Billing, &unreachable, &ConsumerConfig::default());
    let (client, url) = (reqwest::Client::new(), format!("http://{addr}/readyz"));

    let before = client.get(&url).send().await.unwrap();
    assert_eq!(before.status(), StatusCode::SERVICE_UNAVAILABLE);
    let before: Value = before.json().await.unwrap();
    assert_eq!(before["postgres"], "ok");
    assert_eq!(before["notSubscribed"], json!([BILLING]));

    proxy.restore();
    let after: Value = eventually("the consumer to subscribe", Duration::from_secs(30), || {
        let request = client.get(&url).send();
        async move {
            let response = request.await.ok()?;
            (response.status() == StatusCode::OK).then_some(())?;
            response.json().await.ok()
        }
    })
    .await;
    assert_eq!(after["status"], "ready");
    assert!(after.get("notSubscribed").is_none(), "{after}");

    roles.cancel.cancel();
    roles.wait(Duration::from_secs(10)).await.unwrap();
    db.cleanup().await;
}
