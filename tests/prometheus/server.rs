//! A real Prometheus server of the test's own: started on a free port with a
//! generated configuration that scrapes the roles every second, queried
//! through its HTTP API, killed and its directory removed when dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

/// `PROMETHEUS_BIN`, else `prometheus` on the PATH (Debian's package;
/// `.ci/run` installs it).
fn binary() -> String {
    std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into())
}

/// One element of an instant vector (or a scalar, with no labels).
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{{{}}} {}", labels.join(","), self.value)
    }
}

/// Renders a query's answer for a failure message.
pub fn show(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "an empty vector".into();
    }
    samples
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub struct Prometheus {
    child: Option<Child>,
    /// Configuration, TSDB and log; removed on drop.
    dir: PathBuf,
    pub url: String,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts a server that scrapes `targets` (role label, address) every
    /// second as job `order-service`; returns once it answers `/-/ready`.
    pub async fn start(targets: &[(&str, SocketAddr)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ostest_prometheus_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).expect("creating the Prometheus directory");
        // JSON is YAML: no quoting to get wrong.
        let config = json!({
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{
                "job_name": "order-service",
                "metrics_path": "/metrics",
                "static_configs": targets.iter().map(|(role, addr)| json!({
                    "targets": [addr.to_string()],
                    "labels": {"role": role},
                })).collect::<Vec<_>>(),
            }],
        });
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config.to_string()).expect("writing prometheus.yml");
        let listen = free_port();
        let log = File::create(dir.join("prometheus.log")).expect("creating the Prometheus log");
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "could not start `{}` ({e}): this test needs a Prometheus server binary: \
                     `apt-get install prometheus` (as .ci/run does), or set PROMETHEUS_BIN",
                    binary()
                )
            });
        let mut prometheus = Self {
            child: Some(child),
            dir,
            url: format!("http://{listen}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = format!("{}/-/ready", self.url);
        loop {
            if let Ok(response) = self.client.get(&ready).send().await
                && response.status().is_success()
            {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "prometheus exited with {status} while starting:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The answer to an instant query, now: `Err` for an error answer (bad
    /// PromQL...) or a failed request.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", promql)],
        )
        .map_err(|e| e.to_string())?;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("{status}: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "{status} {}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ));
        }
        let data = &body["data"];
        let value = |v: &Value| -> f64 {
            // [timestamp, "value"]; "NaN", "+Inf" and "-Inf" parse too.
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    labels: s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect(),
                    value: value(&s["value"]),
                })
                .collect()),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value(&data["result"]),
            }]),
            other => Err(format!("unexpected result type {other:?}")),
        }
    }

    /// The metric family names of the targets' metadata (`/api/v1/metadata`).
    pub async fn metadata(&self) -> Result<Vec<String>, String> {
        let body: Value = self
            .client
            .get(format!("{}/api/v1/metadata", self.url))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let names = body["data"]
            .as_object()
            .ok_or_else(|| format!("unexpected answer: {body}"))?;
        Ok(names.keys().cloned().collect())
    }

    /// The scrape targets as Prometheus sees them: role, health, last error.
    pub async fn targets(&self) -> String {
        let answer = async {
            let body: Value = self
                .client
                .get(format!("{}/api/v1/targets", self.url))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let lines: Vec<String> = body["data"]["activeTargets"]
                .as_array()?
                .iter()
                .map(|t| {
                    format!(
                        "{} {} {} {}",
                        t["labels"]["role"].as_str().unwrap_or("?"),
                        t["scrapeUrl"].as_str().unwrap_or("?"),
                        t["health"].as_str().unwrap_or("?"),
                        t["lastError"].as_str().unwrap_or("")
                    )
                })
                .collect();
            Some(lines.join("\n"))
        };
        answer
            .await
            .unwrap_or_else(|| "(no answer from /api/v1/targets)".into())
    }

    /// Its log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    crate::common::roles::free_addr()
}
