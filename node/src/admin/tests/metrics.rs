//! `/metrics`: per-instance series and `promtool check metrics`.

use http::Method;
use tokio::io::AsyncWriteExt;

use super::Server;

/// Lines of `text` that are samples (not comments) with `needle`.
fn samples<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .collect()
}

#[tokio::test]
async fn instance_series_follow_attach_and_detach() {
    let s = Server::start().await;
    s.create("web").await;
    s.attach("web", "a", "10.0.0.1").await;
    s.attach("web", "keep", "10.0.0.2").await;
    s.rebuild();
    let table = s.admin.dataplane.routes.load_full();
    let runtime = table.groups().next().expect("group").clone();
    let a = runtime
        .backends
        .values()
        .find(|b| b.name == "a")
        .expect("a")
        .clone();
    a.metrics.observe_status(204);
    a.metrics.bytes_tx.inc_by(10);

    let text = s.request(Method::GET, "/metrics", None, None).await.body;
    let series = samples(&text, r#"instance_name="a""#);
    assert!(
        series.contains(
            &r#"edgelb_instance_requests_total{code_class="2xx",instance_name="a",service="web"} 1"#
        ),
        "{text}"
    );
    assert!(series.contains(
        &r#"edgelb_instance_bytes_total{direction="tx",instance_name="a",service="web"} 10"#
    ));
    assert!(series.contains(&r#"edgelb_instance_up{instance_name="a",service="web"} 1"#));
    assert!(series.contains(&r#"edgelb_instance_inflight{instance_name="a",service="web"} 0"#));
    assert!(
        series
            .iter()
            .any(|l| l.starts_with("edgelb_instance_request_duration_seconds_bucket"))
    );
    assert!(samples(&text, "edgelb_groups").contains(&"edgelb_groups 1"));
    assert!(samples(&text, "edgelb_instances").contains(&"edgelb_instances 2"));
    assert!(samples(&text, "edgelb_listeners").contains(&"edgelb_listeners 1"));
    assert!(
        !samples(&text, r#"edgelb_admin_requests_total{code="200"}"#).is_empty(),
        "{text}"
    );

    s.delete("/v1/services/web/instances/a").await.data();
    s.rebuild();
    let text = s.request(Method::GET, "/metrics", None, None).await.body;
    assert_eq!(
        samples(&text, r#"instance_name="a""#),
        Vec::<&str>::new(),
        "{text}"
    );
    assert!(
        !samples(&text, r#"instance_name="keep""#).is_empty(),
        "{text}"
    );
    // A scrape against a table from before the detach brings nothing back.
    let text = s.admin.metrics.render(&table);
    assert_eq!(
        samples(&text, r#"instance_name="a""#),
        Vec::<&str>::new(),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let Some(promtool) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    }) else {
        assert!(
            std::env::var("EDGELB_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
            "EDGELB_REQUIRE_PROMTOOL=1 but promtool is not on PATH \
             (Debian/Ubuntu: apt-get install prometheus)"
        );
        eprintln!("promtool not on PATH: skipping `promtool check metrics`");
        return;
    };
    let s = Server::start().await;
    s.create("web").await;
    s.attach("web", "a", "10.0.0.1").await;
    s.rebuild();
    let table = s.admin.dataplane.routes.load_full();
    let runtime = table.groups().next().expect("group").clone();
    let a = runtime.backends.values().next().expect("a").clone();
    a.metrics.observe_status(503);
    a.metrics.duration.observe(0.02);
    a.metrics.connections.inc();
    s.get("/v1/services").await.data();
    let text = s.request(Method::GET, "/metrics", None, None).await.body;

    let mut child = tokio::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(text.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool output");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\nstdout: {}\nstderr: {}\ninput:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    s.stop().await;
}

/// `GET /metrics` with `accept-encoding`: the status, headers and raw body.
async fn scrape(s: &Server, accept: &str) -> (http::HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "admin")
        .header("accept-encoding", accept)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("send");
    assert_eq!(resp.status(), http::StatusCode::OK);
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (headers, body.to_vec())
}

#[tokio::test]
async fn metrics_are_gzipped_when_the_scraper_accepts_it() {
    use std::io::Read;
    let s = Server::start().await;
    s.create("web").await;
    s.attach("web", "a", "10.0.0.1").await;
    s.rebuild();

    let (headers, plain) = scrape(&s, "identity, gzip;q=0").await;
    assert_eq!(headers.get("content-encoding"), None);
    assert_eq!(
        headers.get("vary").map(|v| v.as_bytes()),
        Some(&b"accept-encoding"[..])
    );
    let plain = String::from_utf8(plain).expect("text");

    let (headers, zipped) = scrape(&s, "deflate, gzip").await;
    assert_eq!(
        headers.get("content-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(zipped.as_slice())
        .read_to_string(&mut text)
        .expect("gzip body");
    assert!(zipped.len() < text.len());
    // The same series (the admin request counter moved between the two).
    let series = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.contains("edgelb_admin_requests_total"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(series(&text), series(&plain));
    assert!(!samples(&text, r#"instance_name="a""#).is_empty(), "{text}");
    s.stop().await;
}

#[test]
fn gzip_is_accepted_unless_weighted_zero() {
    use crate::admin::scrape::accepts_gzip;
    let accepts = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("accept-encoding", v.parse().expect("header"));
        accepts_gzip(&h)
    };
    assert!(accepts("gzip"));
    assert!(accepts("br, GZIP;q=0.5"));
    assert!(accepts("*"));
    assert!(!accepts("gzip;q=0"));
    assert!(!accepts("identity"));
    assert!(!accepts("gzipx"));
    assert!(!accepts_gzip(&http::HeaderMap::new()));
}

#[tokio::test]
async fn a_configured_metrics_token_is_required() {
    let open = Server::start().await;
    let r = open.request(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status.as_u16(), 200, "no metrics_token: /metrics is open");

    let token = "scrape-0123456789abcdef";
    let s = Server::start_with(Some(token)).await;
    for wrong in [None, Some("scrape-0123456789abcdeX"), Some("")] {
        let r = s.request(Method::GET, "/metrics", wrong, None).await;
        r.assert_error(401);
    }
    let r = s.request(Method::GET, "/metrics", Some(token), None).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    assert!(r.body.contains("edgelb_"), "{}", r.body);
    // The admin token opens everything.
    let r = s
        .request(Method::GET, "/metrics", Some(super::TOKEN), None)
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    // The metrics token opens nothing else.
    let r = s
        .request(Method::GET, "/v1/services", Some(token), None)
        .await;
    r.assert_error(401);
    // Health checks stay open.
    let r = s.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status.as_u16(), 200);
}
