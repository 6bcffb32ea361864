//! The deployment files against a running bridge: every metric the Grafana dashboard
//! (`deploy/grafana`) and the alert rules (`deploy/prometheus`) query is on `/metrics` from the
//! start, so a panel or an alert is never silently empty because of a typo or a renamed metric.

use std::collections::BTreeSet;
use std::path::Path;

use mkb_tests::{RunningBridge, bridge_config, brokers, init_logging};

/// The `bridge_…` metric names in `text` (PromQL), without a histogram's `_bucket`, `_sum` or
/// `_count` suffix.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("bridge_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Every `expr` of the dashboard's panels, and its variables' queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_bridge_exports() {
    init_logging();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/mqtt-kafka-bridge.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yaml"))
        .expect("read the alert rules");

    // With a downlink, so its metrics are there too.
    let (kafka, mqtt, topic) = brokers();
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &topic,
        "deploy/#",
        &[("DOWNLINK_KAFKA_TOPICS", &topic)],
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let page = bridge.metrics().await;
    let exported: BTreeSet<&str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let known = |name: &str| {
        exported.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|b| exported.contains(b))
            })
    };

    for (file, text) in [
        ("deploy/grafana/mqtt-kafka-bridge.json", queries.join("\n")),
        ("deploy/prometheus/alerts.yaml", alerts),
    ] {
        let used = metric_names(&text);
        eprintln!("{file}: {} metrics: {used:?}", used.len());
        assert!(used.len() >= 10, "{file}: found only {used:?}");
        let missing: Vec<&String> = used.iter().filter(|name| !known(name)).collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics /metrics does not have: {missing:?}"
        );
    }
    // Every panel has at least one query.
    assert!(
        dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .all(|p| !p["targets"].as_array().expect("targets").is_empty())
    );
    bridge.stop().await.expect("clean stop");
}
