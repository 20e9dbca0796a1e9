//! `/metrics` on a node with traffic: `promtool check metrics` and the
//! per-instance series (SPEC §7).

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use integration::backend::EchoClient;
use integration::client::{HttpConn, tcp_connect};
use integration::metrics::{Promtool, promtool_check};
use integration::{EchoBackend, TestNode, wait_until};
use serde_json::json;

const PER_INSTANCE: [&str; 9] = [
    "edgelb_instance_inflight",
    "edgelb_instance_inflight_global",
    "edgelb_instance_selected_total",
    "edgelb_instance_requests_total",
    "edgelb_instance_connections_total",
    "edgelb_instance_connect_errors_total",
    "edgelb_instance_request_duration_seconds_bucket",
    "edgelb_instance_bytes_total",
    "edgelb_instance_up",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_scrape_passes_promtool_and_labels_every_instance() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let backends = node.http_backends(&["m1", "m2"], 9000).await?;
    let web = node.http_group("web", 8080, 9000, &backends).await?;
    let echo = EchoBackend::start("t1", SocketAddr::new(node.subnet.next_ip(), 7000)).await?;
    let tcp = node
        .create_group(&json!({"name": "raw", "services": [{"port": 7100, "destination_port": 7000, "handlers": []}]}))
        .await?;
    node.attach(&tcp, "t1", echo.addr().ip()).await?;

    let mut conn = HttpConn::connect(node.addr(8080)).await?;
    for _ in 0..20 {
        assert_eq!(conn.get("web.test", "/").await?.status, StatusCode::OK);
    }
    let mut c = EchoClient::new(tcp_connect(node.addr(7100), None).await?);
    c.who("metered").await?;

    // Requests are counted when their response has been sent.
    wait_until(
        "20 requests counted as 2xx",
        Duration::from_secs(5),
        || async {
            node.scrape().await.is_ok_and(|s| {
                s.sum(
                    "edgelb_instance_requests_total",
                    &[("service", "web"), ("code_class", "2xx")],
                ) == 20.0
            })
        },
    )
    .await?;
    let scrape = node.scrape().await?;
    for (service, instance) in [("web", "m1"), ("web", "m2"), ("raw", "t1")] {
        for family in PER_INSTANCE {
            assert!(
                scrape
                    .select(family, &[("service", service), ("instance_name", instance)])
                    .next()
                    .is_some(),
                "no {family} series for service={service} instance_name={instance}"
            );
        }
        let up = scrape.sum(
            "edgelb_instance_up",
            &[("service", service), ("instance_name", instance)],
        );
        assert_eq!(up, 1.0, "edgelb_instance_up of {instance}");
    }
    let selected = scrape.sum("edgelb_instance_selected_total", &[("service", "web")]);
    assert_eq!(selected, 20.0);
    assert_eq!(
        scrape.sum(
            "edgelb_instance_inflight",
            &[("service", "raw"), ("instance_name", "t1")]
        ),
        1.0
    );
    assert!(
        scrape.sum(
            "edgelb_instance_bytes_total",
            &[("service", "raw"), ("direction", "tx")]
        ) >= 8.0
    );
    assert!(
        scrape
            .samples
            .iter()
            .filter(|s| s.name.starts_with("edgelb_instance_"))
            .all(|s| !s.labels.contains_key("instance")),
        "a per-instance series uses the label `instance`, which Prometheus sets itself"
    );

    match promtool_check(&scrape.text).await? {
        Promtool::Passed => {}
        Promtool::Missing if std::env::var("EDGELB_REQUIRE_PROMTOOL").as_deref() == Ok("1") => {
            panic!("promtool is not installed and EDGELB_REQUIRE_PROMTOOL=1");
        }
        Promtool::Missing => {
            eprintln!("note: promtool not on PATH; skipped `promtool check metrics`")
        }
    }
    drop((conn, c));
    node.wait_idle(&web).await?;
    node.wait_idle(&tcp).await?;
    node.stop().await
}
